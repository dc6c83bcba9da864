"""Multi-cohort group level: two generated datasets whose participants share labels (sub-001...), trained together.

Checked from the files a user gets: the ``cohort`` column in split and prediction TSVs, no (cohort, participant)
on two sides, stratification by cohort, per-cohort metrics with n, leave-one-cohort-out, byte-identical reruns,
the model folder's cohort record, and every bad cohort option refused before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.conftest import TINY_CROP, make_dataset, run_cli

N_SUBJECTS = 6  # per cohort, one session each: 3 AD and 3 CN


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def _cohort(root: Path, name: str, seed: int, n_subjects: int = N_SUBJECTS, **options: Any) -> tuple[Path, Path]:
    """A tiny generated dataset named ``name`` in its description, processed at participant level (image mode);
    ``options`` go to the generator."""
    dataset, out = _generated_cohort(root, name, seed, n_subjects, **options)
    return dataset.bids_dir, out


def _generated_cohort(root: Path, name: str, seed: int, n_subjects: int, **options: Any) -> tuple[Any, Path]:
    dataset = make_dataset(root, n_subjects, 1, seed=seed, **options)
    description_path = dataset.bids_dir / "dataset_description.json"
    description = json.loads(description_path.read_text(encoding="utf-8"))
    description_path.write_text(json.dumps({**description, "Name": f"cohort {name}"}), encoding="utf-8")
    out = root / "out"
    result = run_cli(str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir),
                     "--template", str(dataset.template_path), "--crop-shape", *TINY_CROP, "--nprocs", "2",
                     "--modes", "image", "--skip-bids-validation")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return dataset, out


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Cohorts ``a`` and ``b``: independently generated (seeds 11 and 23), both with sub-001...sub-006."""
    root = tmp_path_factory.mktemp("cohorts")
    return {"a": _cohort(root / "a", "a", 11), "b": _cohort(root / "b", "b", 23)}


def group_args(cohorts: dict[str, tuple[Path, Path]], name: str, *extra: str) -> list[str]:
    (bids_a, out_a), (bids_b, out_b) = cohorts["a"], cohorts["b"]
    return [str(bids_a), str(out_a), "group", "--cohort-name", "a", "--cohort", f"b={bids_b}:{out_b}",
            "--label", "diagnosis", "--architecture", "small_cnn", "--mode", "image", "--epochs", "1",
            "--batch-size", "4", "--n-splits", "2", "--test-size", "0.25", "--n-bootstrap", "20",
            "--model-name", name, "--seed", "5", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(cohorts) -> Path:
    result = run_cli(*group_args(cohorts, "pooled"))
    assert result.returncode == 0, result.stderr[-3000:]
    return cohorts["a"][1] / "models" / "pooled"


def people(path: Path) -> set[tuple[str, str]]:
    table = read_tsv(path)
    assert list(table.columns[:2]) == ["cohort", "participant_id"], path
    return set(zip(table["cohort"], table["participant_id"], strict=True))


def test_no_cohort_participant_on_two_sides(trained: Path) -> None:
    groups = trained / "groups"
    test = people(groups / "test/data.tsv")
    everyone = set(test)
    for k in (0, 1):
        train, validation = people(groups / f"split-{k}/train.tsv"), people(groups / f"split-{k}/validation.tsv")
        assert not train & validation and not (train | validation) & test
        everyone |= train | validation
    # the same labels in both cohorts are different people: all 12 are there, each once
    assert len(everyone) == 2 * N_SUBJECTS
    assert {p for _, p in everyone} == {f"sub-{i:03d}" for i in range(1, N_SUBJECTS + 1)}
    assert not people(groups / "train+validation.tsv") & test


def test_split_is_stratified_by_cohort(trained: Path) -> None:
    test = read_tsv(trained / "groups/test/data.tsv")
    assert len(test) == 3  # 0.25 of 12
    assert set(test["cohort"]) == {"a", "b"}
    for k in (0, 1):
        validation = read_tsv(trained / f"groups/split-{k}/validation.tsv")
        assert set(validation["cohort"]) == {"a", "b"}, k


def test_predictions_and_per_cohort_metrics(trained: Path) -> None:
    test = read_tsv(trained / "groups/test/data.tsv")
    for k in (0, 1):
        group_dir = trained / f"split-{k}/best-loss/test"
        predictions = read_tsv(group_dir / "test_image_level_prediction.tsv")
        assert list(predictions.columns[:3]) == ["cohort", "participant_id", "session_id"]
        assert sorted(zip(predictions["cohort"], predictions["participant_id"], strict=True)) == sorted(
            zip(test["cohort"], test["participant_id"], strict=True)
        )
        pooled = read_tsv(group_dir / "test_image_level_metrics.tsv")
        assert set(pooled["n_images"]) == {str(len(test))}
        for cohort in ("a", "b"):
            metrics = read_tsv(group_dir / f"test_cohort-{cohort}_image_level_metrics.tsv")
            assert list(metrics.columns) == [c for c in pooled.columns if not c.startswith("baseline_")]
            assert list(metrics["metric"]) == list(pooled["metric"])
            n = str(int((test["cohort"] == cohort).sum()))
            assert set(metrics["n_images"]) == {n} and set(metrics["n_participants"]) == {n}
            assert {"ci_low", "ci_high"} <= set(metrics.columns)
        validation = trained / f"split-{k}/best-loss/validation"
        assert (validation / "validation_cohort-a_image_level_metrics.tsv").is_file()
    for cohort in ("a", "b"):  # each cohort's metrics summarised across the two splits, as the pooled ones
        summary = read_tsv(trained / f"summary/test_cohort-{cohort}_best-loss_metrics_across_splits.tsv")
        assert list(summary.columns[:4]) == ["metric", "n_splits", "mean", "sd"]
        assert {"split-0", "split-1"} <= set(summary.columns)


def test_model_folder_records_the_cohorts(trained: Path, cohorts) -> None:
    record = json.loads((trained / "maps.json").read_text(encoding="utf-8"))
    entries = {entry["name"]: entry for entry in record["cohorts"]}
    assert set(entries) == {"a", "b"}
    for name, (bids_dir, out) in cohorts.items():
        entry = entries[name]
        assert (trained / entry["bids_dir"]).resolve() == bids_dir.resolve()
        assert (trained / entry["output_dir"]).resolve() == out.resolve()
        assert entry["n_participants"] == N_SUBJECTS and entry["n_images"] == N_SUBJECTS
        assert entry["dataset_name"] == f"cohort {name}"
        assert entry["dataset_id"].startswith("ds-")
    assert entries["a"]["dataset_id"] != entries["b"]["dataset_id"]
    assert [c["name"] for c in record["config"]["cohorts"]] == ["b"]


def test_leave_one_cohort_out(cohorts) -> None:
    result = run_cli(*group_args(cohorts, "without-b", "--leave-cohort-out", "b"))
    assert result.returncode == 0, result.stderr[-3000:]
    maps = cohorts["a"][1] / "models" / "without-b"
    test = read_tsv(maps / "groups/test/data.tsv")
    assert set(test["cohort"]) == {"b"} and len(test) == N_SUBJECTS
    for k in (0, 1):
        for side in ("train", "validation"):
            assert set(read_tsv(maps / f"groups/split-{k}/{side}.tsv")["cohort"]) == {"a"}, (k, side)
    assert set(read_tsv(maps / "groups/train+validation.tsv")["cohort"]) == {"a"}
    assert json.loads((maps / "groups/splits.json").read_text())["config"]["leave_cohort_out"] == "b"
    metrics = read_tsv(maps / "split-0/best-loss/test/test_cohort-b_image_level_metrics.tsv")
    assert set(metrics["n_participants"]) == {str(N_SUBJECTS)}
    assert not (maps / "split-0/best-loss/test/test_cohort-a_image_level_metrics.tsv").exists()


def test_same_seed_same_bytes(trained: Path, cohorts) -> None:
    result = run_cli(*group_args(cohorts, "pooled-again"))
    assert result.returncode == 0, result.stderr[-3000:]
    again = trained.parent / "pooled-again"
    files = sorted(p.relative_to(trained) for p in trained.rglob("*") if p.suffix in (".tsv", ".json"))
    compared = [p for p in files if p.parts[0] == "groups" or "best-loss" in p.parts]
    assert any(p.name == "test_cohort-b_image_level_metrics.tsv" for p in compared)
    for path in compared:
        assert (again / path).read_bytes() == (trained / path).read_bytes(), path


def _tree(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("missing folder", 66, "does not exist"),
        ("not a dataset", 66, "not a BIDS dataset"),
        ("duplicate name", 64, "given twice"),
        ("same dataset", 64, "one dataset"),
        ("same dataset elsewhere", 64, "same dataset id"),
        ("unknown held-out cohort", 64, "names no cohort"),
        ("held out without cohorts", 64, "needs other cohorts"),
        ("malformed", 64, "NAME=BIDS_DIR"),
        ("name not a label", 64, "Invalid --cohort NAME"),
        ("participant label", 64, "--participant-label cannot be combined"),
        ("no tensors of the mode", 66, "slice tensors"),
        ("label column missing", 65, "Cohort 'primary'"),
    ],
)
def test_bad_cohort_options_refused_before_any_write(cohorts, tmp_path: Path, case: str, code: int, words: str):
    (bids_a, out_a), (bids_b, out_b) = cohorts["a"], cohorts["b"]
    base = [str(bids_a), str(out_a), "group", "--label", "diagnosis", "--model-name", "refused", "--epochs", "1"]
    extra = {
        "missing folder": ["--cohort", f"b={bids_b}:{tmp_path / 'absent'}"],
        "not a dataset": ["--cohort", f"b={tmp_path}:{out_b}"],
        "duplicate name": ["--cohort-name", "b", "--cohort", f"b={bids_b}:{out_b}"],
        "same dataset": ["--cohort", f"b={bids_a}:{out_b}"],
        "same dataset elsewhere": ["--cohort", f"b={tmp_path / 'copy'}:{out_b}"],
        "unknown held-out cohort": ["--cohort", f"b={bids_b}:{out_b}", "--leave-cohort-out", "c"],
        "held out without cohorts": ["--leave-cohort-out", "b"],
        "malformed": ["--cohort", str(bids_b)],
        "name not a label": ["--cohort", f"b.c={bids_b}:{out_b}"],
        "participant label": ["--cohort", f"b={bids_b}:{out_b}", "--participant-label", "001"],
        "no tensors of the mode": ["--cohort", f"b={bids_b}:{out_b}", "--mode", "slice"],
        "label column missing": ["--cohort", f"b={bids_b}:{out_b}", "--label", "no_such_column"],
    }[case]
    if case == "same dataset elsewhere":  # a copy of cohort a's dataset at another path: the same description
        (tmp_path / "copy").mkdir()
        (tmp_path / "copy" / "dataset_description.json").write_bytes((bids_a / "dataset_description.json").read_bytes())
    before = _tree(out_a, out_b, bids_a, bids_b)
    result = run_cli(*base, *extra)
    assert result.returncode == code, result.stderr[-2000:]
    assert words in result.stderr, result.stderr[-2000:]
    assert _tree(out_a, out_b, bids_a, bids_b) == before


def test_one_scan_in_two_cohorts_is_refused(cohorts, tmp_path: Path) -> None:
    """A renamed copy of cohort b (another dataset Name, same tensors) as a third cohort: the checksums match."""
    import shutil

    (bids_a, out_a), (bids_b, out_b) = cohorts["a"], cohorts["b"]
    bids_c, out_c = tmp_path / "c" / "bids", tmp_path / "c" / "out"
    shutil.copytree(bids_b, bids_c)
    shutil.copytree(out_b, out_c)
    description_path = bids_c / "dataset_description.json"
    description = json.loads(description_path.read_text(encoding="utf-8"))
    description_path.write_text(json.dumps({**description, "Name": "cohort c"}), encoding="utf-8")
    before = _tree(out_a, out_b, out_c)
    result = run_cli(str(bids_a), str(out_a), "group", "--cohort-name", "a", "--cohort", f"b={bids_b}:{out_b}",
                     "--cohort", f"c={bids_c}:{out_c}", "--label", "diagnosis", "--model-name", "copy")  # fmt: skip
    assert result.returncode == 65, result.stderr[-2000:]
    assert f"{N_SUBJECTS} image(s) are in two cohorts" in result.stderr
    assert "b/sub-001 ses-M000 = c/sub-001 ses-M000 (source_sha256" in result.stderr
    assert _tree(out_a, out_b, out_c) == before


def test_a_model_is_used_with_its_own_cohorts(trained: Path, cohorts) -> None:
    (bids_a, out_a), (bids_b, out_b) = cohorts["a"], cohorts["b"]
    alone = run_cli(str(bids_a), str(out_a), "group", "--stages", "predict", "--model-name", "pooled")
    assert alone.returncode == 64, alone.stderr[-2000:]
    assert "was trained on cohort(s) a, b, but this run names (BIDS_DIR/OUTPUT_DIR only)" in alone.stderr
    metrics = trained / "split-0/best-loss/test/test_cohort-b_image_level_metrics.tsv"
    written = metrics.read_bytes()
    again = run_cli(str(bids_a), str(out_a), "group", "--stages", "predict", "--model-name", "pooled",
                    "--cohort-name", "a", "--cohort", f"b={bids_b}:{out_b}", "--n-bootstrap", "20")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert metrics.read_bytes() == written


def test_one_person_rescanned_in_two_cohorts_is_refused(tmp_path: Path) -> None:
    """Cohort r2 holds re-scans (other noise, other labels) of two participants of r1: no checksum is shared, the
    anatomy is; refused before anything is written, or kept with a warning under --allow-leak."""
    from bids_app.synthetic.dataset import generate_dataset

    first = tmp_path / "r1"
    bids_1, out_1 = _cohort(first, "r1", 41, n_subjects=4)
    original = generate_dataset(tmp_path / "r1-again", n_subjects=4, n_sessions=1, preset="tiny", seed=41,
                                effect_size=0.6, preprocessed="derivative")  # fmt: skip
    second, out_2 = _generated_cohort(tmp_path / "r2", "r2", 42, 4, first_label=101, rescans_of=original,
                                      n_rescans=2)  # fmt: skip
    bids_2 = second.bids_dir
    args = [str(bids_1), str(out_1), "group", "--cohort-name", "r1", "--cohort", f"r2={bids_2}:{out_2}",
            "--label", "diagnosis", "--model-name", "rescans", "--stages", "split", "--n-splits", "2",
            "--test-size", "0"]  # fmt: skip
    before = _tree(out_1, out_2)
    refused = run_cli(*args)
    assert refused.returncode == 65, refused.stderr[-3000:]
    assert "2 image pair(s) of two cohorts look like one person" in refused.stderr, refused.stderr[-3000:]
    for new, old in second.rescans:
        assert f"r1/sub-{old} ses-M000 ~ r2/sub-{new} ses-M000" in refused.stderr, refused.stderr[-3000:]
    assert _tree(out_1, out_2) == before
    allowed = run_cli(*args, "--allow-leak")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "kept because of --allow-leak" in allowed.stderr
    # r2 holds one class only: allowed for one cohort of several, with a warning that cohort and class go together
    assert "Cohort 'r2' has only class(es)" in allowed.stderr, allowed.stderr[-3000:]


def test_saliency_maps_of_two_cohorts_do_not_collide(trained: Path, cohorts) -> None:
    (bids_a, out_a), (bids_b, out_b) = cohorts["a"], cohorts["b"]
    result = run_cli(str(bids_a), str(out_a), "group", "--stages", "interpret", "--model-name", "pooled",
                     "--cohort-name", "a", "--cohort", f"b={bids_b}:{out_b}", "--interpret-methods", "gradients",
                     "--splits", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    test = read_tsv(trained / "groups/test/data.tsv")
    maps_dir = trained / "split-0/best-loss/test/interpret/gradients"
    written = sorted(p.relative_to(maps_dir).parts[0] for p in maps_dir.glob("cohort-*/*saliency.nii.gz"))
    assert written == sorted(f"cohort-{c}" for c in test["cohort"])
    targets = read_tsv(maps_dir.parent / "targets.tsv")
    assert list(targets.columns[:2]) == ["cohort", "participant_id"] and len(targets) == len(test)


def test_report_shows_each_cohorts_metrics(trained: Path) -> None:
    report = (trained / "report.html").read_text(encoding="utf-8")
    test = read_tsv(trained / "groups/test/data.tsv")
    for cohort in ("a", "b"):
        n = int((test["cohort"] == cohort).sum())
        assert f"<h4>Cohort {cohort} ({n} participant(s), {n} image(s))</h4>" in report


def test_report_names_each_participant_with_its_cohort_and_links_its_own_output(trained: Path, cohorts) -> None:
    """Both cohorts call their participants sub-001...: the report must not show cohort b's with cohort a's QC."""
    import os
    import re

    report = (trained / "report.html").read_text(encoding="utf-8")
    pool = read_tsv(trained / "groups/train+validation.tsv")
    for cohort, participant in zip(pool["cohort"], pool["participant_id"], strict=True):
        links = re.findall(rf'<a href="([^"]+)">{cohort}/{participant}</a>', report)
        assert links, f"{cohort}/{participant} is not linked in the report"
        target = (trained / links[0]).resolve()
        assert target.is_file() and target.is_relative_to(cohorts[cohort][1].resolve()), target
    assert not re.search(r">sub-\d+</a>", report.split("<h2>Participants</h2>")[1]), "a participant without cohort"
    assert os.sep not in "".join(pool["cohort"])


def test_split_record_and_demographics_per_cohort(trained: Path) -> None:
    groups = trained / "groups"
    record = json.loads((groups / "splits.json").read_text(encoding="utf-8"))["cohorts"]
    test = read_tsv(groups / "test/data.tsv")
    for cohort in ("a", "b"):
        counts = record[cohort]
        assert counts["test"] == int((test["cohort"] == cohort).sum())
        assert counts["test"] + counts["train+validation"] == N_SUBJECTS
        for k in (0, 1):
            validation = read_tsv(groups / f"split-{k}/validation.tsv")
            assert counts[f"split-{k}/validation"] == int((validation["cohort"] == cohort).sum())
    demographics = read_tsv(groups / "demographics.tsv")
    assert demographics.columns[0] == "cohort" and set(demographics["cohort"]) == {"all", "a", "b"}
    rows = demographics[(demographics["group"] == "test") & (demographics["label"] == "all")]
    n = dict(zip(rows["cohort"], rows["n_subjects"].astype(int), strict=True))
    assert n["all"] == n["a"] + n["b"] == len(test)
