"""Optional experiment tracking (``--track mlflow``): the group level mirrored in a local MLflow file store.

The MAPS stays the record of an experiment; the store is a browsable copy for comparing models across model
folders and search trials (``mlflow ui --backend-store-uri <store>``). In the store:

- one experiment (``--track-experiment``, default ``bids_app``) shared by every MAPS that names it;
- one run per MAPS, named after it: the resolved configuration as parameters (``train.learning_rate``, ...),
  provenance tags, the model folder's record files (``MapsLayout.record_files``), each invocation's ``config.toml`` and
  ``command.txt``, the group report, and
  the prediction metrics averaged over the trained splits (``test/best-loss/balanced_accuracy``);
- one nested run per split: per-epoch ``train_loss``, ``learning_rate`` and ``validation_<metric>`` (step =
  epoch), the best value and epoch per selection metric, whether the network learned (tags
  ``bids_app.learning_status`` and ``bids_app.learning_reason``), every predicted group's metrics with their bootstrap
  interval (``test/best-loss/roc_auc``, ``test/best-loss/roc_auc_ci_low``), ``training.tsv`` and ``summary.json``;
  the linear baseline's metrics likewise, prefixed ``baseline_`` (``baseline_test/best-loss/roc_auc``), in the
  split's run and averaged in the MAPS' run.

The run ids are kept in the MAPS (``tracking.json`` for the MAPS, ``split-<k>/training_logs/tracking.json`` per
split): a resumed split continues its run, a later ``--stages predict`` logs into the runs that trained the
models, and a split trained again from scratch (its ``training_logs`` are removed) gets a new run.

Only a local folder is accepted as store, and MLflow's telemetry is switched off before MLflow is imported, so
tracking never opens a network connection. MLflow keeps its folder store in maintenance mode behind
``MLFLOW_ALLOW_FILE_STORE``, which this module sets. Failures while setting up (MLflow missing, store not
writable) stop the run before the MAPS is written; a failure later (the store's disk fills up, say) is logged as one
warning and tracking stops for the rest of the run, because the MAPS is complete without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from bids_app import read_version
from bids_app.config import RunConfig, TrackingBackend
from bids_app.config_file import config_to_nested
from bids_app.derivatives import atomic_write_json
from bids_app.errors import ConfigError, OutputError
from bids_app.maps.folder import MapsLayout

log = logging.getLogger(__name__)

# Set before mlflow is imported: no telemetry (its only network use with a folder store), folder store allowed.
MLFLOW_ENVIRONMENT = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}
LINK_FILE = "tracking.json"
MAX_BATCH = 100  # params, tags or metrics per log_batch call (MLflow's smallest limit)
MAX_PARAM_LENGTH = 6000  # characters of one parameter value
BASELINE_PREFIX = "baseline_"  # the linear baseline's metrics: baseline_test/best-loss/balanced_accuracy


class Tracker:
    """The tracker of runs without ``--track``: every hook does nothing."""

    def start_split(self, split: int, params: Mapping[str, Any]) -> None:
        """A split's training starts (or resumes); ``params`` are recorded once per split run."""

    def log_epoch(self, split: int, row: Mapping[str, Any]) -> None:
        """One finished epoch: a ``training.tsv`` row (``epoch`` is the step, the other numbers metrics)."""

    def end_split(self, split: int, summary: Mapping[str, Any]) -> None:
        """A split finished training (``summary`` as in ``summary.json``)."""

    def log_group(self, split: int, selection_metric: str, group_name: str) -> None:
        """A group was predicted with ``split-<k>/best-<metric>``: copy its metrics."""

    def log_baseline_group(self, split: int, selection_metric: str, group_name: str) -> None:
        """The linear baseline ``split-<k>/baseline/best-<metric>`` predicted a group: copy its metrics."""

    def log_prediction_means(self) -> None:
        """Average every group's metrics over the trained splits, on the MAPS' run."""

    def log_report(self, report_path: Path) -> None:
        """Attach the group report."""

    def close(self, *, failed: bool) -> None:
        """Mark the runs still open as finished or failed."""

    @contextlib.contextmanager
    def session(self) -> Iterator[Tracker]:
        """``with tracker.session():`` closes the runs as failed when the block raises, finished otherwise."""
        try:
            yield self
        except BaseException:
            self.close(failed=True)
            raise
        self.close(failed=False)


def open_tracker(cfg: RunConfig, layout: MapsLayout, run_dir: Path | None, *, new_maps: bool) -> Tracker:
    """The tracker ``cfg.tracking`` asks for.

    Args:
        cfg: the run configuration (``cfg.tracking`` above all).
        layout: the model folder being trained or predicted.
        run_dir: this invocation's ``logs/<run-id>/`` folder (its config and command are attached), if known.
        new_maps: the split stage just (re)wrote the MAPS: start a new MAPS run even if one is linked.

    Raises:
        ConfigError: MLflow is not installed, or the experiment name is empty.
        OutputError: the store cannot be created or written.
    """
    if cfg.tracking.backend is TrackingBackend.NONE:
        return Tracker()
    if not cfg.tracking.experiment.strip():
        raise ConfigError("tracking.experiment is empty; give --track-experiment a name (default: bids_app).")
    return MlflowTracker(cfg, layout, run_dir, new_maps=new_maps)


def flatten_config(cfg: RunConfig) -> dict[str, str]:
    """``{"train.learning_rate": "0.0001", ...}``: every configuration key as an MLflow parameter."""
    flat: dict[str, str] = {}
    for section, values in config_to_nested(cfg).items():
        for key, value in values.items():
            text = json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)
            flat[f"{section}.{key}"] = text[:MAX_PARAM_LENGTH]
    return flat


def _read_link(path: Path) -> dict[str, Any]:
    try:
        link = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return link if isinstance(link, dict) else {}


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), MAX_BATCH):
        yield items[start : start + MAX_BATCH]


class MlflowTracker(Tracker):
    """Runs in a local MLflow folder store (module docstring)."""

    def __init__(self, cfg: RunConfig, layout: MapsLayout, run_dir: Path | None, *, new_maps: bool) -> None:
        os.environ.update(MLFLOW_ENVIRONMENT)
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(
                "--track mlflow needs the 'mlflow-skinny' package, which this installation lacks. Install "
                "bids_app[tracking] (the container image has it), or run without --track."
            ) from None
        self.layout = layout
        self.store_dir = (cfg.tracking.store_dir or cfg.output_dir / "mlruns").absolute()
        self.store_uri = self.store_dir.as_uri()
        self.active = True
        self.split_runs: dict[int, str] = {}  # split → run id, for the splits this invocation touched
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=self.store_uri)
            self.experiment_id = self._experiment_id(cfg.tracking.experiment)
            self.maps_run = self._maps_run(cfg, new_maps)
            if run_dir is not None:
                for name in ("config.toml", "command.txt"):
                    if (run_dir / name).is_file():
                        self.client.log_artifact(self.maps_run, str(run_dir / name), f"invocations/{run_dir.name}")
        except (OSError, MlflowException) as exc:
            raise OutputError(
                f"Cannot use the MLflow store {self.store_dir}: {str(exc).splitlines()[0]}. Choose a writable "
                "--track-dir, or run without --track."
            ) from exc
        log.info(
            "Tracking in MLflow store %s, experiment '%s', run %s",
            self.store_dir,
            cfg.tracking.experiment,
            self.maps_run,
        )

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except MlflowException:  # another job (a search trial) created it first
            again = self.client.get_experiment_by_name(name)
            if again is None:
                raise
            return str(again.experiment_id)

    def _linked_run(self, path: Path) -> str | None:
        """The run id recorded in ``path`` if it lives in this store and experiment and still exists."""
        from mlflow.exceptions import MlflowException

        link = _read_link(path)
        if link.get("store_uri") != self.store_uri or link.get("experiment_id") != self.experiment_id:
            return None
        try:
            run = self.client.get_run(str(link.get("run_id")))
        except MlflowException:
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        return str(run.info.run_id)

    def _write_link(self, path: Path, run_id: str) -> None:
        atomic_write_json(path, {"backend": "mlflow", "store_uri": self.store_uri,
                                 "experiment_id": self.experiment_id, "run_id": run_id})  # fmt: skip

    def _maps_run(self, cfg: RunConfig, new_maps: bool) -> str:
        from mlflow.entities import Param

        link_path = self.layout.root / LINK_FILE
        run_id = None if new_maps else self._linked_run(link_path)
        if run_id is not None:
            return run_id
        home = self.layout.home or self.layout.root
        tags = {
            "bids_app.version": read_version(),
            "bids_app.maps_dir": str(home.absolute()),
            "bids_app.bids_dir": str(cfg.bids_dir),
            "bids_app.seed": str(cfg.seed),
            "mlflow.source.name": "bids_app",
            "mlflow.note.content": f"Model folder {home}; the MAPS holds the complete record.",
        }
        run = self.client.create_run(self.experiment_id, run_name=self.layout.name, tags=tags)
        params = [Param(key, value) for key, value in flatten_config(cfg).items()]
        for chunk in _chunks(params):
            self.client.log_batch(run.info.run_id, params=chunk)
        self._write_link(link_path, run.info.run_id)
        return str(run.info.run_id)

    def _guarded(self, what: str, action: Callable[..., object], *args: Any) -> None:
        if not self.active:
            return
        try:
            action(*args)
        except Exception as exc:  # the store is a mirror: its failure must not lose a finished training
            self.active = False
            log.warning("MLflow tracking stopped: %s failed (%s). The MAPS %s is unaffected.", what, exc,
                        self.layout.root)  # fmt: skip

    def _metrics(self, run_id: str, values: Mapping[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), stamp, step)
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(float(value))
        ]
        for chunk in _chunks(metrics):
            self.client.log_batch(run_id, metrics=chunk)

    def _split_run(self, split: int, params: Mapping[str, Any] | None = None) -> str:
        """The split's run: the linked one, or a new run nested under the MAPS' run."""
        from mlflow.entities import Param

        if split in self.split_runs:
            return self.split_runs[split]
        link_path = self.layout.training_logs_dir(split) / LINK_FILE
        run_id = self._linked_run(link_path)
        if run_id is None:
            tags = {"mlflow.parentRunId": self.maps_run, "bids_app.split": str(split)}
            run_id = str(
                self.client.create_run(
                    self.experiment_id, run_name=f"{self.layout.name}-split-{split}", tags=tags
                ).info.run_id
            )
            self.client.log_batch(
                run_id, params=[Param(k, str(v)) for k, v in {"split": split, **(params or {})}.items()]
            )
            self._write_link(link_path, run_id)
        self.split_runs[split] = run_id
        return run_id

    def start_split(self, split: int, params: Mapping[str, Any]) -> None:
        self._guarded(f"starting split {split}", self._split_run, split, params)

    def log_epoch(self, split: int, row: Mapping[str, Any]) -> None:
        values = {key: value for key, value in row.items() if key != "epoch"}
        self._guarded(
            f"logging split {split}", lambda: self._metrics(self._split_run(split), values, int(row["epoch"]))
        )

    def end_split(self, split: int, summary: Mapping[str, Any]) -> None:
        def record() -> None:
            run_id = self._split_run(split)
            best: dict[str, Any] = {}
            for metric, entry in summary.get("best", {}).items():
                best[f"best_{metric}"] = entry["value"]
                best[f"best_{metric}_epoch"] = entry["epoch"]
            self._metrics(run_id, best)
            if "final_weights_sha256" in summary:
                self.client.set_tag(run_id, "bids_app.final_weights_sha256", summary["final_weights_sha256"])
            learning = summary.get("learning")
            if learning:  # whether the network learned (training.learning): filterable in the run list
                self.client.set_tag(run_id, "bids_app.learning_status", learning["status"])
                self.client.set_tag(run_id, "bids_app.learning_reason", learning["reason"][:MAX_PARAM_LENGTH])
            for path in (self.layout.training_tsv(split), self.layout.summary_json(split)):
                if path.is_file():
                    self.client.log_artifact(run_id, str(path))
            self.client.set_terminated(run_id, "FINISHED")

        self._guarded(f"ending split {split}", record)

    def log_group(self, split: int, selection_metric: str, group_name: str) -> None:
        path = self.layout.metrics_tsv(split, selection_metric, group_name)

        def record() -> None:
            if not path.is_file():  # an unlabelled group has predictions but no metrics
                return
            run_id = self._split_run(split)
            self._metrics(run_id, _metric_values(path, f"{group_name}/best-{selection_metric}"))
            self.client.log_artifact(run_id, str(path), f"predictions/best-{selection_metric}")

        self._guarded(f"logging group '{group_name}' of split {split}", record)

    def log_baseline_group(self, split: int, selection_metric: str, group_name: str) -> None:
        path = self.layout.baseline_metrics_tsv(split, selection_metric, group_name)

        def record() -> None:
            if not path.is_file():
                return
            run_id = self._split_run(split)
            self._metrics(run_id, _metric_values(path, f"{BASELINE_PREFIX}{group_name}/best-{selection_metric}"))
            self.client.log_artifact(run_id, str(path), f"baseline/best-{selection_metric}")

        self._guarded(f"logging the baseline's group '{group_name}' of split {split}", record)

    def log_prediction_means(self) -> None:
        def record() -> None:
            values: dict[str, list[float]] = {}
            for pattern, prefix in (("split-*/best-*/*/", ""), ("split-*/baseline/best-*/*/", BASELINE_PREFIX)):
                for path in sorted(self.layout.root.glob(f"{pattern}*_image_level_metrics.tsv")):
                    group_name, selection_dir = path.parent.name, path.parent.parent.name
                    key_prefix = f"{prefix}{group_name}/{selection_dir}"
                    for key, value in _metric_values(path, key_prefix, intervals=False).items():
                        values.setdefault(key, []).append(value)
            self._metrics(self.maps_run, {key: sum(v) / len(v) for key, v in values.items()})

        self._guarded("averaging the prediction metrics", record)

    def log_report(self, report_path: Path) -> None:
        self._guarded("attaching the report", self.client.log_artifact, self.maps_run, str(report_path))

    def close(self, *, failed: bool) -> None:
        status = "FAILED" if failed else "FINISHED"

        def record() -> None:
            for path in self.layout.record_files():
                self.client.log_artifact(self.maps_run, str(path))
            for run_id in self.split_runs.values():
                if self.client.get_run(run_id).info.status == "RUNNING":
                    self.client.set_terminated(run_id, status)
            self.client.set_terminated(self.maps_run, status)

        self._guarded("closing the runs", record)


def _metric_values(path: Path, prefix: str, *, intervals: bool = True) -> dict[str, float]:
    """``{prefix/metric: value}`` (plus ``_ci_low``, ``_ci_high``) from a ``*_image_level_metrics.tsv``."""
    table = pd.read_csv(path, sep="\t", na_values=["n/a"])
    values: dict[str, float] = {}
    for row in table.itertuples():
        for column, suffix in (("value", ""), *((("ci_low", "_ci_low"), ("ci_high", "_ci_high")) if intervals else ())):
            value = getattr(row, column, None)
            if isinstance(value, int | float) and math.isfinite(value):
                values[f"{prefix}/{row.metric}{suffix}"] = float(value)
    return values
