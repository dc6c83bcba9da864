"""Optional MLflow tracking: the store mirrors the MAPS, runs are linked across invocations, failures are handled."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bids_app.cli.main import main
from bids_app.config import AnalysisLevel, RunConfig, TrackingBackend, TrackingConfig
from bids_app.config_file import config_to_nested
from bids_app.errors import ConfigError
from bids_app.maps import MapsLayout
from bids_app.tracking.mlflow import LINK_FILE, MLFLOW_ENVIRONMENT, Tracker, flatten_config, open_tracker
from bids_app.training import checkpoint
from tests.conftest import make_cohort, run_cli, validate


def group_args(dataset: Any, out: Path, name: str, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
            "--mode", "image", "--epochs", "2", "--batch-size", "4", "--learning-rate", "0.01", "--n-splits", "2",
            "--test-size", "0.25", "--model-name", name, "--seed", "5", "--device", "cpu", *extra]  # fmt: skip


def client_for(store: Path) -> Any:
    os.environ.update(MLFLOW_ENVIRONMENT)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


def runs_by_name(store: Path, experiment: str = "bids_app") -> dict[str, Any]:
    client = client_for(store)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} in {store}"
    runs = client.search_runs([found.experiment_id])
    by_name = {run.info.run_name: run for run in runs}
    assert len(by_name) == len(runs), "run names are unique"
    return by_name


def metric_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"]).set_index("metric")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    return make_cohort(tmp_path_factory.mktemp("tracking"), 12, 1, "--modes", "image", "--skip-bids-validation")


@pytest.fixture(scope="module")
def tracked(cohort: tuple[Any, Path]) -> tuple[Any, Path, Path]:
    dataset, out = cohort
    result = run_cli(*group_args(dataset, out, "cnn", "--track", "mlflow"))
    assert result.returncode == 0, result.stderr[-3000:]
    return dataset, out, out / "models" / "cnn"


def test_store_mirrors_the_maps(tracked: tuple[Any, Path, Path]) -> None:
    _, out, maps_dir = tracked
    store = out / "mlruns"
    runs = runs_by_name(store)
    assert set(runs) == {"cnn", "cnn-split-0", "cnn-split-1"}
    parent = runs["cnn"]
    assert parent.data.params["train.architecture"] == "small_cnn"
    assert parent.data.params["run.seed"] == "5"
    assert parent.data.params["tracking.backend"] == "mlflow"
    assert parent.data.tags["bids_app.maps_dir"] == str(maps_dir)
    assert json.loads((maps_dir / LINK_FILE).read_text())["run_id"] == parent.info.run_id
    client = client_for(store)
    for k in (0, 1):
        run = runs[f"cnn-split-{k}"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        link = json.loads((maps_dir / f"split-{k}/training_logs/{LINK_FILE}").read_text())
        assert link["run_id"] == run.info.run_id
        history = pd.read_csv(maps_dir / f"split-{k}/training_logs/training.tsv", sep="\t")
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "validation_loss"))
        assert logged == list(zip(history["epoch"], history["validation_loss"], strict=True))
        summary = json.loads((maps_dir / f"split-{k}/training_logs/summary.json").read_text())
        assert run.data.metrics["best_loss"] == pytest.approx(summary["best"]["loss"]["value"])
        assert run.data.metrics["best_loss_epoch"] == summary["best"]["loss"]["epoch"]
        assert run.data.tags["bids_app.final_weights_sha256"] == summary["final_weights_sha256"]
        assert run.data.tags["bids_app.learning_status"] == summary["learning"]["status"]
        assert run.data.tags["bids_app.learning_reason"] == summary["learning"]["reason"]
        test = metric_table(maps_dir / f"split-{k}/best-loss/test/test_image_level_metrics.tsv")
        for column, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
            expected = test.loc["balanced_accuracy", column]
            assert run.data.metrics[f"test/best-loss/balanced_accuracy{suffix}"] == pytest.approx(expected)
        baseline = metric_table(maps_dir / f"split-{k}/baseline/best-loss/test/test_image_level_metrics.tsv")
        for column, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
            expected = baseline.loc["balanced_accuracy", column]
            assert run.data.metrics[f"baseline_test/best-loss/balanced_accuracy{suffix}"] == pytest.approx(expected)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"training.tsv", "summary.json", "predictions", "baseline"} <= artifacts
    means = [
        metric_table(maps_dir / f"split-{k}/best-loss/test/test_image_level_metrics.tsv").loc["roc_auc", "value"]
        for k in (0, 1)
    ]
    assert parent.data.metrics["test/best-loss/roc_auc"] == pytest.approx(sum(means) / 2)
    baseline_means = [
        metric_table(maps_dir / f"split-{k}/baseline/best-loss/test/test_image_level_metrics.tsv").loc[
            "balanced_accuracy", "value"
        ]
        for k in (0, 1)
    ]
    assert parent.data.metrics["baseline_test/best-loss/balanced_accuracy"] == pytest.approx(sum(baseline_means) / 2)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "maps.json", "environment.json", "invocations"} <= artifacts
    invocations = client.list_artifacts(parent.info.run_id, "invocations")
    assert len(invocations) == 1
    assert {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, invocations[0].path)} == {
        "config.toml",
        "command.txt",
    }
    assert validate(out).returncode == 0, "the store is ignored by the validator (.bidsignore)"


def test_later_prediction_logs_into_the_same_runs(tracked: tuple[Any, Path, Path]) -> None:
    dataset, out, _ = tracked
    before = {name: run.info.run_id for name, run in runs_by_name(out / "mlruns").items()}
    result = run_cli(*group_args(dataset, out, "cnn", "--stages", "predict", "--track", "mlflow"))
    assert result.returncode == 0, result.stderr[-3000:]
    after = runs_by_name(out / "mlruns")
    assert {name: run.info.run_id for name, run in after.items()} == before
    assert all(run.info.status == "FINISHED" for run in after.values())
    client = client_for(out / "mlruns")
    assert len(client.list_artifacts(before["cnn"], "invocations")) == 2


def test_untracked_run_writes_no_store(cohort: tuple[Any, Path], tmp_path: Path) -> None:
    dataset, _ = cohort
    cfg = RunConfig(dataset.bids_dir, tmp_path / "out", AnalysisLevel.GROUP)
    tracker = open_tracker(cfg, MapsLayout(tmp_path / "out" / "models" / "m"), None, new_maps=True)
    assert type(tracker) is Tracker
    with tracker.session():
        tracker.log_epoch(0, {"epoch": 0, "train_loss": 1.0})
    assert not (tmp_path / "out").exists()


def test_resumed_split_continues_its_run(
    cohort: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after split 0's first checkpoint, then resumed: one run per split, each epoch logged once."""
    dataset, out = cohort
    store = tmp_path / "store"
    args = group_args(dataset, out, "resumed", "--track", "mlflow", "--track-dir", str(store))
    real_save = checkpoint.save_checkpoint

    def interrupted_save(*a: Any, **kw: Any) -> None:
        real_save(*a, **kw)
        raise KeyboardInterrupt  # the job is killed right after epoch 0 of split 0

    monkeypatch.setattr(checkpoint, "save_checkpoint", interrupted_save)
    assert main(args) == 130
    interrupted = runs_by_name(store)
    assert interrupted["resumed-split-0"].info.status == "FAILED"
    assert interrupted["resumed"].info.status == "FAILED"
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert main([*args, "--resume"]) == 0
    runs = runs_by_name(store)
    assert set(runs) == {"resumed", "resumed-split-0", "resumed-split-1"}
    assert runs["resumed-split-0"].info.run_id == interrupted["resumed-split-0"].info.run_id
    assert runs["resumed"].info.run_id == interrupted["resumed"].info.run_id
    assert all(run.info.status == "FINISHED" for run in runs.values())
    client = client_for(store)
    steps = sorted(m.step for m in client.get_metric_history(runs["resumed-split-0"].info.run_id, "train_loss"))
    assert steps == [0, 1]


def test_a_new_split_starts_a_new_maps_run(cohort: tuple[Any, Path], tmp_path: Path) -> None:
    dataset, out = cohort
    store = tmp_path / "store"
    args = group_args(dataset, out, "redone", "--epochs", "1", "--stages", "split", "train", "--track", "mlflow",
                      "--track-dir", str(store), "--track-experiment", "redo")  # fmt: skip
    assert main(args) == 0
    first = json.loads((out / "models/redone" / LINK_FILE).read_text())["run_id"]
    assert main([*args, "--overwrite"]) == 0
    second = json.loads((out / "models/redone" / LINK_FILE).read_text())["run_id"]
    assert first != second
    runs = client_for(store).search_runs([client_for(store).get_experiment_by_name("redo").experiment_id])
    assert sorted(run.info.run_name for run in runs) == [
        "redone",
        "redone",
        *["redone-split-0"] * 2,
        *["redone-split-1"] * 2,
    ]


def test_unwritable_store_stops_the_run_before_the_maps(cohort: tuple[Any, Path], tmp_path: Path) -> None:
    dataset, out = cohort
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    result = run_cli(*group_args(dataset, out, "blocked", "--track", "mlflow", "--track-dir", str(blocker)))
    assert result.returncode == 73, result.stderr[-2000:]
    assert str(blocker) in result.stderr and "--track-dir" in result.stderr
    assert not (out / "models" / "blocked" / "groups").exists()


def test_store_inside_bids_dir_is_refused(cohort: tuple[Any, Path]) -> None:
    dataset, out = cohort
    result = run_cli(*group_args(dataset, out, "x", "--track", "mlflow", "--track-dir", str(dataset.bids_dir / "ml")))
    assert result.returncode == 64
    assert "--track-dir" in result.stderr
    assert not (dataset.bids_dir / "ml").exists()


def test_failure_after_set_up_is_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = RunConfig(tmp_path, tmp_path / "out", AnalysisLevel.GROUP, tracking=TrackingConfig(TrackingBackend.MLFLOW))
    tracker: Any = open_tracker(cfg, MapsLayout(tmp_path / "out" / "models" / "m"), None, new_maps=True)
    calls = []

    def full_disk(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracker.client, "log_batch", full_disk)
    with caplog.at_level(logging.WARNING, logger="bids_app.tracking.mlflow"):
        tracker.start_split(0, {"n_train_images": 4})
        tracker.log_epoch(0, {"epoch": 0, "train_loss": 0.5})
    assert len(calls) == 1, "tracking stops after its first failure"
    assert [r.message for r in caplog.records if "MLflow tracking stopped" in r.message]
    assert "No space left" in caplog.text


def test_missing_mlflow_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("mlflow", "mlflow.tracking", "mlflow.exceptions"):
        monkeypatch.setitem(sys.modules, name, None)
    cfg = RunConfig(tmp_path, tmp_path / "out", AnalysisLevel.GROUP, tracking=TrackingConfig(TrackingBackend.MLFLOW))
    with pytest.raises(ConfigError, match="mlflow-skinny"):
        open_tracker(cfg, MapsLayout(tmp_path / "out" / "models" / "m"), None, new_maps=True)


def test_empty_experiment_name_is_a_usage_error(tmp_path: Path) -> None:
    tracking = TrackingConfig(TrackingBackend.MLFLOW, experiment=" ")
    cfg = RunConfig(tmp_path, tmp_path / "out", AnalysisLevel.GROUP, tracking=tracking)
    with pytest.raises(ConfigError, match="--track-experiment"):
        open_tracker(cfg, MapsLayout(tmp_path / "out" / "models" / "m"), None, new_maps=True)
    assert not (tmp_path / "out").exists()


def test_every_config_key_is_a_parameter(tmp_path: Path) -> None:
    cfg = RunConfig(tmp_path, tmp_path / "out", AnalysisLevel.GROUP)
    params = flatten_config(cfg)
    expected = {f"{section}.{key}" for section, values in config_to_nested(cfg).items() for key in values}
    assert set(params) == expected
    assert params["train.selection_metrics"] == '["loss"]'
    assert all(isinstance(value, str) and len(value) <= 6000 for value in params.values())


def test_search_trials_are_runs_of_one_experiment(cohort: tuple[Any, Path], tmp_path: Path) -> None:
    dataset, out = cohort
    space = tmp_path / "space.toml"
    space.write_text("[train]\nlearning_rate = {log_uniform = [1e-3, 3e-2]}\nepochs = {int_range = [1, 1]}\n")
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "bids_app.cli.search", str(dataset.bids_dir), str(out), "--space", str(space),
         "--n-trials", "2", "--seed", "3", "--name", "lr", "--",
         "--label", "diagnosis", "--architecture", "small_cnn", "--mode", "image", "--n-splits", "2",
         "--test-size", "0.25", "--device", "cpu", "--track", "mlflow", "--track-dir", str(store),
         "--track-experiment", "search"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_by_name(store, "search")
    assert set(runs) == {f"lr-trial-{k}{split}" for k in (0, 1) for split in ("", "-split-0", "-split-1")}
    trials = json.loads((out / "models" / "lr-search.json").read_text())["trials"]
    for trial in trials:
        params = runs[trial["model_name"]].data.params
        assert float(params["train.learning_rate"]) == pytest.approx(trial["params"]["train.learning_rate"])
        assert params["train.model_name"] == trial["model_name"]


# MLflow turns its telemetry off by itself under pytest or CI; the run below has neither, so only bids_app's own
# settings keep MLflow from calling home.
TESTING_MARKERS = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE", "TF_BUILD",
                   "TRAVIS", "CIRCLECI", "DO_NOT_TRACK", *MLFLOW_ENVIRONMENT)  # fmt: skip
WATCHED_RUN = """
import json, sys
NETWORK = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "http.client.connect", "urllib.Request"}
events = []
sys.addaudithook(lambda event, args: events.append([event, repr(args[:2])]) if event in NETWORK else None)
from bids_app.cli.main import main
code = main(sys.argv[1:])
from mlflow.telemetry import utils
print(json.dumps({"code": code, "events": events, "testing": utils._IS_IN_CI_ENV_OR_TESTING,
                  "telemetry_disabled": utils.is_telemetry_disabled()}))
"""


def test_tracked_run_outside_tests_makes_no_network_call(cohort: tuple[Any, Path], tmp_path: Path) -> None:
    dataset, out = cohort
    env = {key: value for key, value in os.environ.items() if key not in TESTING_MARKERS}
    args = group_args(dataset, out, "offline", "--epochs", "1", "--track", "mlflow", "--track-dir", str(tmp_path))
    result = subprocess.run([sys.executable, "-c", WATCHED_RUN, *args], capture_output=True, text=True, env=env,
                            timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["code"] == 0
    assert record["testing"] is False, "MLflow must not see a test or CI environment here"
    assert record["telemetry_disabled"] is True
    assert record["events"] == []
    assert len(runs_by_name(tmp_path)) == 3
