"""Random search: seeded trials, one MAPS per trial, ranking on validation only, reproducible trials."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bids_app.cli.search import parse_space, sample_trials, summarize
from bids_app.errors import ConfigError
from tests.conftest import make_cohort, run_cli

SPACE = """
[train]
learning_rate = {log_uniform = [1e-3, 3e-2]}
batch_size = {choice = [2, 4]}
epochs = {int_range = [1, 2]}
dropout = {uniform = [0.0, 0.5]}
"""
BASE = """
[labels]
label = "diagnosis"
[train]
architecture = "small_cnn"
mode = "image"
[split]
n_splits = 2
test_size = 0.25
"""
TABLE = {
    "train": {
        "learning_rate": {"log_uniform": [1e-4, 1e-2]},
        "batch_size": {"choice": [2, 4, 8]},
        "architecture": {"choice": ["small_cnn", "conv4_fc3"]},
        "dropout": {"uniform": [0.0, 0.5]},
        "epochs": {"int_range": [2, 5]},
    },
    "run": {"seed": {"int_range": [0, 1000]}},
}


def run_search(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bids_app.cli.search", *args], capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def test_same_seed_gives_the_same_trials_and_another_seed_others() -> None:
    space = parse_space(TABLE)
    first, again, other = sample_trials(space, 5, 3), sample_trials(space, 5, 3), sample_trials(space, 5, 4)
    assert first == again
    assert first != other
    assert sample_trials(space, 2, 3) == first[:2]  # trial k does not depend on n_trials (array jobs)
    assert len({json.dumps(t, sort_keys=True) for t in first}) == 5
    for trial in first:
        assert 1e-4 <= trial["train"]["learning_rate"] <= 1e-2
        assert trial["train"]["batch_size"] in (2, 4, 8)
        assert 2 <= trial["train"]["epochs"] <= 5 and isinstance(trial["train"]["epochs"], int)
        assert 0.0 <= trial["train"]["dropout"] <= 0.5
        assert isinstance(trial["run"]["seed"], int)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"train": {"learnin_rate": {"uniform": [0.0, 1.0]}}}, "'train.learnin_rate'"),
        ({"trian": {"epochs": 2}}, "[trian]"),
        ({"train": {"epochs": {"uniform": [1, 3]}}}, "'train.epochs' must be an integer"),
        ({"train": {"batch_size": {"choice": [2, "four"]}}}, "'train.batch_size' must be an integer"),
        ({"train": {"learning_rate": {"log_uniform": [0.0, 1e-2]}}}, "low > 0"),
        ({"train": {"dropout": {"normal": [0.0, 1.0]}}}, "'train.dropout'"),
        ({"train": {"dropout": {"uniform": [0.5, 0.1]}}}, "low <= high"),
        ({"train": {"model_name": {"choice": ["a", "b"]}}}, "'train.model_name' cannot be searched"),
        ({"train": {"mode": {"choice": ["image", "voxel"]}}}, "'train.mode' has invalid value 'voxel'"),
    ],
)
def test_bad_space_is_refused_naming_the_key(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_space(table, "space.toml")
    assert message in str(info.value)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    """12 participants x 2 sessions at 4 mm, preprocessed input (no registration), image tensors."""
    root = tmp_path_factory.mktemp("search")
    dataset, out = make_cohort(root, 12, 2, "--modes", "image")
    (root / "space.toml").write_text(SPACE)
    (root / "base.toml").write_text(BASE)
    return dataset, out, root


def search_args(dataset, out: Path, root: Path, name: str, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "--space", str(root / "space.toml"), "--n-trials", "2", "--seed", "7",
            "--name", name, "--config", str(root / "base.toml"), *extra, "--", "--seed", "5"]  # fmt: skip


def test_bad_space_file_exits_64_before_any_work(cohort) -> None:
    dataset, out, root = cohort
    bad = root / "bad.toml"
    bad.write_text("[train]\nlearnin_rate = {log_uniform = [1e-4, 1e-2]}\n")
    args = search_args(dataset, out, root, "bad")
    args[args.index("--space") + 1] = str(bad)
    result = run_search(*args)
    assert result.returncode == 64
    assert "learnin_rate" in result.stderr
    assert not list(out.glob("models/bad*"))


@pytest.fixture(scope="module")
def searched(cohort):
    """The same search twice: trial 1 alone (an array job), then both trials in one process."""
    dataset, out, root = cohort
    one = run_search(*search_args(dataset, out, root, "one", "--trial", "1"))
    assert one.returncode == 0, one.stderr[-3000:]
    full = run_search(*search_args(dataset, out, root, "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    return dataset, out, root


def test_trial_option_runs_only_that_trial(searched) -> None:
    _, out, _ = searched
    assert sorted(p.name for p in (out / "models").glob("one-trial-*")) == ["one-trial-1"]
    summary = read_tsv(out / "models" / "one-search_summary.tsv")
    assert list(summary["trial"]) == ["1", "0"]
    assert list(summary["status"]) == ["complete", "missing"]
    assert list(summary["rank"]) == ["1", "n/a"]
    assert list(summary.columns)[:6] == ["rank", "trial", "model_name", "status", "selection_metric", "n_splits"]


def test_array_job_trial_equals_the_same_trial_of_a_full_run(searched) -> None:
    _, out, _ = searched
    models = out / "models"
    one = json.loads((models / "one-search.json").read_text())
    full = json.loads((models / "full-search.json").read_text())
    assert one["trials"][1]["params"] == full["trials"][1]["params"]
    assert full["trials"][0]["params"] != full["trials"][1]["params"]
    for k in (0, 1):
        name = f"split-{k}/best-loss/test/test_image_level_prediction.tsv"
        assert (models / "one-trial-1" / name).read_bytes() == (models / "full-trial-1" / name).read_bytes()


def test_each_trial_is_a_maps_with_its_sampled_configuration(searched) -> None:
    from bids_app.maps.folder import read_maps_json

    _, out, _ = searched
    record = json.loads((out / "models" / "full-search.json").read_text())
    assert [t["model_name"] for t in record["trials"]] == ["full-trial-0", "full-trial-1"]
    for trial in record["trials"]:
        cfg = read_maps_json(out / "models" / trial["model_name"]).config
        assert cfg.train.model_name == trial["model_name"]
        for key, value in trial["params"].items():
            section, _, field = key.partition(".")
            assert getattr(getattr(cfg, section), field) == value, key
        assert cfg.train.architecture == "small_cnn" and cfg.seed == 5  # the base config and flags still apply
        assert (
            len(read_tsv(out / "models" / trial["model_name"] / "split-0/training_logs/training.tsv"))
            == (trial["params"]["train.epochs"])
        )


def validation_value(maps: Path, split: int, metric: str = "balanced_accuracy") -> float:
    table = read_tsv(maps / f"split-{split}/best-loss/validation/validation_image_level_metrics.tsv")
    return float(table.loc[table["metric"] == metric, "value"].iloc[0])


def test_summary_ranks_on_validation_and_never_reads_test(searched, tmp_path: Path) -> None:
    _, out, _ = searched
    summary = read_tsv(out / "models" / "full-search_summary.tsv")
    assert list(summary["status"]) == ["complete", "complete"]
    means = {int(t): float(m) for t, m in zip(summary["trial"], summary["validation_balanced_accuracy_mean"],
                                               strict=True)}  # fmt: skip
    for k in (0, 1):
        expected = (validation_value(out / f"models/full-trial-{k}", 0) +
                    validation_value(out / f"models/full-trial-{k}", 1)) / 2  # fmt: skip
        assert means[k] == pytest.approx(expected)
    assert [means[int(t)] for t in summary["trial"]] == sorted(means.values(), reverse=True)

    # a copy with every test result destroyed, and validation results rigged to favour each trial in turn
    copy = tmp_path / "out"
    (copy / "models").mkdir(parents=True)
    for name in ("full-search.json", "full-trial-0", "full-trial-1"):
        source = out / "models" / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, copy / "models" / name)
    for path in (copy / "models").rglob("test/*.tsv"):
        path.write_text("garbage\x00")
    for winner in (0, 1):
        for k in (0, 1):
            for split in (0, 1):
                path = (
                    copy
                    / f"models/full-trial-{k}/split-{split}/best-loss/validation/validation_image_level_metrics.tsv"
                )
                table = read_tsv(path)
                table.loc[table["metric"] == "balanced_accuracy", "value"] = "0.9" if k == winner else "0.6"
                table.to_csv(path, sep="\t", index=False)
        ranked = summarize(copy, "full")
        assert list(ranked["trial"]) == [winner, 1 - winner]
        assert list(ranked["rank"]) == [1, 2]
        assert ranked["validation_balanced_accuracy_mean"].tolist() == pytest.approx([0.9, 0.6])
    assert (copy / "models" / "full-search_summary.tsv").is_file()


@pytest.mark.parametrize("source", ["maps.json", "logged config.toml"])
def test_a_trial_is_reproduced_from_its_recorded_configuration(searched, source: str, tmp_path: Path) -> None:
    from bids_app.config_file import dump_config
    from bids_app.maps.folder import read_maps_json

    dataset, out, _ = searched
    if source == "maps.json":
        trial = out / "models" / "full-trial-0"
        config = tmp_path / "trial.toml"
        config.write_text(dump_config(read_maps_json(trial).config))
    else:
        trial = out / "models" / "full-trial-1"
        logged = [
            p for p in (out / "logs").glob("*_group_*/config.toml") if 'model_name = "full-trial-1"' in p.read_text()
        ]
        assert len(logged) == 1
        config = logged[0]
    name = f"repro-{trial.name}"
    result = run_cli(str(dataset.bids_dir), str(out), "group", "--config", str(config), "--model-name", name)
    assert result.returncode == 0, result.stderr[-3000:]
    for k in (0, 1):
        for file in ("best-loss/model.safetensors", "best-loss/test/test_image_level_prediction.tsv",
                     "training_logs/training.tsv"):  # fmt: skip
            path = f"split-{k}/{file}"
            assert (out / "models" / name / path).read_bytes() == (trial / path).read_bytes(), path


def test_another_space_under_the_same_name_is_refused(searched, tmp_path: Path) -> None:
    dataset, out, root = searched
    other = tmp_path / "space.toml"
    other.write_text("[train]\nlearning_rate = {log_uniform = [1e-5, 1e-4]}\n")
    args = search_args(dataset, out, root, "full")
    args[args.index("--space") + 1] = str(other)
    result = run_search(*args)
    assert result.returncode == 64
    assert "full-search.json" in result.stderr


def test_a_trained_trial_with_an_na_validation_metric_is_complete_but_unranked(searched, tmp_path: Path) -> None:
    """One validation participant gives an n/a balanced accuracy: the trial trained and predicted, so it is
    complete; it is not ranked, since no finite value exists to rank it on. A split without summary.json is not."""
    _, out, _ = searched
    copy = tmp_path / "out"
    (copy / "models").mkdir(parents=True)
    for name in ("full-search.json", "full-trial-0", "full-trial-1"):
        source = out / "models" / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, copy / "models" / name)
    path = copy / "models/full-trial-0/split-1/best-loss/validation/validation_image_level_metrics.tsv"
    table = read_tsv(path)
    table.loc[table["metric"] == "balanced_accuracy", "value"] = "n/a"
    table.to_csv(path, sep="\t", index=False)
    ranked = summarize(copy, "full").set_index("trial")
    assert ranked.loc[0, "status"] == "complete"
    assert pd.isna(ranked.loc[0, "rank"]) and ranked.loc[0, "n_splits"] == 1
    assert ranked.loc[1, "status"] == "complete" and ranked.loc[1, "rank"] == 1

    (copy / "models/full-trial-1/split-0/training_logs/summary.json").unlink()
    ranked = summarize(copy, "full").set_index("trial")
    assert ranked.loc[1, "status"] == "partial" and pd.isna(ranked.loc[1, "rank"])
