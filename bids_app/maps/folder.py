"""The model folder (MAPS) as one object: ``Maps`` = layout + record (``maps.json``) + split + models.

A group run builds its ``Maps`` once (``Maps.create`` when training writes it, ``Maps.open`` otherwise, which
validates the whole folder) and passes it to training, prediction, interpretation and the report; this module
is the only one that parses ``maps.json``.

See ``docs/maps.md`` for the tree. Model weights are safetensors files read and written by ``weights``
(pickles are refused). Paths inside ``maps.json`` are written relative to declared roots (``${maps_dir}``,
``${output_dir}``, ``${bids_dir}``) and the roots relative to the MAPS when it lies inside them, so a MAPS
moved together with its output folder still reads back.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from bids_app import read_version
from bids_app.config import ExtractionMode, RunConfig, Task
from bids_app.config_file import config_to_nested, resolve_config
from bids_app.derivatives import atomic_write_json
from bids_app.errors import BidsAppError, DataError, InputMissingError
from bids_app.kinds import ImageKind, parse_kind
from bids_app.labels import image_names
from bids_app.maps.splits import SPLITS_JSON, Splits, read_splits
from bids_app.maps.weights import PICKLE_SUFFIXES, check_safetensors, load_state

if TYPE_CHECKING:
    import torch
    from torch import nn


REPORT_NAME = "report.html"
RECORD_JSON = "maps.json"  # the record's file name; this module alone parses it (the archive checks it is there)
EXCLUDED_SESSIONS_TSV = "excluded_sessions.tsv"  # sessions left out for lacking a channel (several channels only)


class LearningStatus(enum.StrEnum):
    """Whether a split's network learned (``training.learning``); ``n/a`` in the metric TSVs when unknown."""

    LEARNED = "learned"
    DID_NOT_LEARN = "did-not-learn"


NO_LEARNING_VERDICT = "n/a"  # a split trained before the verdict existed, or a reconstruction model


@dataclasses.dataclass(frozen=True)
class LearningVerdict:
    """The ``learning`` entry of ``split-<k>/training_logs/summary.json`` (``training.learning``).

    Attributes:
        status: learned or did not learn.
        reason: what the verdict rests on, with the figures (losses, chance level, predicted classes).
        advice: likely causes and what to try; empty when it learned.
        chance_loss: the training loss of the best constant prediction (None when unknown).
        train_loss_drop: the largest relative drop of the smoothed training loss below ``chance_loss``.
        validation_loss_drop: the relative drop of the lowest validation loss below that of the chance prediction.
    """

    status: LearningStatus
    reason: str
    advice: str
    chance_loss: float | None = None
    train_loss_drop: float | None = None
    validation_loss_drop: float | None = None

    def to_json(self) -> dict[str, Any]:
        numbers = {
            "chance_loss": self.chance_loss,
            "train_loss_drop": self.train_loss_drop,
            "validation_loss_drop": self.validation_loss_drop,
        }
        finite = {key: value if value is not None and math.isfinite(value) else None for key, value in numbers.items()}
        return {"status": self.status.value, "reason": self.reason, "advice": self.advice, **finite}


@dataclasses.dataclass(frozen=True)
class MapsLayout:
    """Every path of one MAPS folder ``root``.

    ``home`` is where the folder will live when it differs from ``root``: an ``--overwrite`` run builds the new
    model in a hidden sibling and renames it to ``home`` once complete; names shown to users follow ``home``.
    """

    root: Path
    home: Path | None = None

    @property
    def name(self) -> str:
        return (self.home or self.root).name

    @property
    def maps_json(self) -> Path:
        return self.root / RECORD_JSON

    @property
    def environment_json(self) -> Path:
        return self.root / "environment.json"

    def record_files(self) -> list[Path]:
        """The files that describe the folder (``maps.json``, ``environment.json``) that exist."""
        return [path for path in (self.maps_json, self.environment_json) if path.is_file()]

    @property
    def excluded_sessions_tsv(self) -> Path:
        """The sessions a model of several channels left out because they lack one (``data.tables.index_channels``)."""
        return self.root / EXCLUDED_SESSIONS_TSV

    @property
    def groups_dir(self) -> Path:
        return self.root / "groups"

    @property
    def train_validation_tsv(self) -> Path:
        return self.groups_dir / "train+validation.tsv"

    @property
    def splits_json(self) -> Path:
        """Written last by the split stage: a split without it is incomplete."""
        return self.groups_dir / SPLITS_JSON

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_NAME

    def split_dir(self, split: int) -> Path:
        return self.root / f"split-{split}"

    def best_dir(self, split: int, metric: str) -> Path:
        return self.split_dir(split) / f"best-{metric}"

    def model_path(self, split: int, metric: str) -> Path:
        return self.best_dir(split, metric) / "model.safetensors"

    def selection_json(self, split: int, metric: str) -> Path:
        """Epoch and value at which the model in ``best-<metric>`` was selected."""
        return self.best_dir(split, metric) / "selection.json"

    def group_dir(self, split: int, metric: str, group: str) -> Path:
        """Predictions and metrics of that model on one group (``train``, ``validation``, ``test``...)."""
        return self.best_dir(split, metric) / group

    def metrics_tsv(self, split: int, metric: str, group: str) -> Path:
        """Image-level metrics of that model on one group, with their bootstrap intervals (labelled groups)."""
        return self.group_dir(split, metric, group) / f"{group}_image_level_metrics.tsv"

    @property
    def summary_dir(self) -> Path:
        """Metrics summarised across the trained splits."""
        return self.root / "summary"

    def split_summary_tsv(self, group: str, metric: str) -> Path:
        """Every metric of the ``best-<metric>`` models on ``group``: mean, sd and value of each split."""
        return self.summary_dir / f"{group}_best-{metric}_metrics_across_splits.tsv"

    def baseline_summary_tsv(self, group: str, metric: str) -> Path:
        """``split_summary_tsv`` of the linear baselines selected like ``best-<metric>``."""
        return self.summary_dir / f"{group}_best-{metric}_baseline_metrics_across_splits.tsv"

    def baseline_dir(self, split: int) -> Path:
        """The linear baseline fitted on split ``k``'s training group (``bids_app.baseline``)."""
        return self.split_dir(split) / "baseline"

    def baseline_best_dir(self, split: int, metric: str) -> Path:
        """The baseline whose hyper-parameter was chosen on validation with ``metric``, as ``best-<metric>``."""
        return self.baseline_dir(split) / f"best-{metric}"

    def baseline_selection_json(self, split: int, metric: str) -> Path:
        """The grid, each value's validation score, the chosen value and the features of that baseline."""
        return self.baseline_best_dir(split, metric) / "selection.json"

    def baseline_model_path(self, split: int, metric: str) -> Path:
        """That baseline's coefficients, intercept and feature standardisation (safetensors)."""
        return self.baseline_best_dir(split, metric) / "model.safetensors"

    def baseline_group_dir(self, split: int, metric: str, group: str) -> Path:
        return self.baseline_best_dir(split, metric) / group

    def baseline_prediction_tsv(self, split: int, metric: str, group: str) -> Path:
        return self.baseline_group_dir(split, metric, group) / f"{group}_image_level_prediction.tsv"

    def baseline_metrics_tsv(self, split: int, metric: str, group: str) -> Path:
        return self.baseline_group_dir(split, metric, group) / f"{group}_image_level_metrics.tsv"

    def training_logs_dir(self, split: int) -> Path:
        return self.split_dir(split) / "training_logs"

    def training_tsv(self, split: int) -> Path:
        return self.training_logs_dir(split) / "training.tsv"

    def tensorboard_dir(self, split: int) -> Path:
        return self.training_logs_dir(split) / "tensorboard"

    def summary_json(self, split: int) -> Path:
        """Written last by a finished training of the split."""
        return self.training_logs_dir(split) / "summary.json"

    def tmp_dir(self, split: int) -> Path:
        return self.split_dir(split) / "tmp"

    def checkpoint_path(self, split: int) -> Path:
        return self.tmp_dir(split) / "checkpoint.pt"

    def prediction_tsv(self, split: int, metric: str, group: str) -> Path:
        """Image-level predictions of that model on one group."""
        return self.group_dir(split, metric, group) / f"{group}_image_level_prediction.tsv"

    def has_predictions(self, group: str = "test") -> bool:
        """Whether some split's model predicted ``group``."""
        return any(self.root.glob(f"split-*/best-*/{group}/{group}_image_level_prediction.tsv"))

    def trained_splits(self) -> list[int]:
        """Splits whose training finished (``summary.json`` present), ascending."""
        found = []
        for path in self.root.glob("split-*"):
            suffix = path.name.removeprefix("split-")
            if suffix.isdigit() and self.summary_json(int(suffix)).is_file():
                found.append(int(suffix))
        return sorted(found)


@dataclasses.dataclass(frozen=True)
class MapsRecord:
    """The content of ``maps.json`` with paths resolved against the MAPS' current location.

    Attributes:
        version: bids_app version that wrote it.
        config: the resolved run configuration of the training.
        task, mode, architecture: what the models are.
        input_shape: one sample ``(1, ...)`` in voxels.
        n_outputs: model outputs (classes in classification).
        label_encoding: class → index (classification), else None.
        extra: every other key of ``maps.json`` (e.g. ``transfer_source``, ``channels``, ``excluded_sessions``).
    """

    version: str
    config: RunConfig
    task: Task
    mode: ExtractionMode
    architecture: str
    input_shape: tuple[int, ...]
    n_outputs: int
    label_encoding: dict[str, int] | None
    extra: dict[str, Any]

    @property
    def kinds(self) -> tuple[ImageKind, ...]:
        """The image kinds the models read, one per input channel in order (``train.channels``; a model made
        before channels could be chosen reads T1w, the configuration's default)."""
        return tuple(parse_kind(name) for name in self.config.train.channels)


def _portable(value: Any, roots: Mapping[str, Path]) -> Any:
    """Replace absolute path strings under a root by ``${root}/relative`` (the deepest root wins)."""
    if isinstance(value, dict):
        return {key: _portable(item, roots) for key, item in value.items()}
    if isinstance(value, list):
        return [_portable(item, roots) for item in value]
    if isinstance(value, str) and os.path.isabs(value):
        best: tuple[int, str] | None = None
        for name, root in roots.items():
            try:
                relative = Path(value).relative_to(root)
            except ValueError:
                continue
            if best is None or len(root.parts) > best[0]:
                rel = relative.as_posix()
                best = (len(root.parts), f"${{{name}}}" + ("" if rel == "." else f"/{rel}"))
        return value if best is None else best[1]
    return value


def _resolved(value: Any, roots: Mapping[str, Path]) -> Any:
    if isinstance(value, dict):
        return {key: _resolved(item, roots) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolved(item, roots) for item in value]
    if isinstance(value, str) and value.startswith("${"):
        name, _, rest = value[2:].partition("}")
        if name in roots:
            return str(roots[name] / rest.lstrip("/")) if rest else str(roots[name])
    return value


def _stored_root(root: Path, maps_dir: Path) -> str:
    """A root relative to the MAPS when the MAPS lies inside it, else absolute."""
    root = Path(os.path.abspath(root))
    if Path(os.path.abspath(maps_dir)).is_relative_to(root):
        return Path(os.path.relpath(root, os.path.abspath(maps_dir))).as_posix()
    return str(root)


def write_maps_json(maps_dir: Path, cfg: RunConfig, extra: Mapping[str, Any]) -> None:
    """Write ``maps.json``: the resolved config, the bids_app version and what rebuilds the models.

    Args:
        maps_dir: the MAPS folder.
        cfg: the training's configuration.
        extra: at least ``input_shape`` (one sample, ``(1, ...)``), ``n_outputs`` and ``label_encoding``
            (class → index, or None); any other JSON-ready key is kept (e.g. ``transfer_source``).
    """
    maps_dir = Path(os.path.abspath(maps_dir))
    roots = {"maps_dir": maps_dir, "output_dir": cfg.output_dir, "bids_dir": cfg.bids_dir}
    abs_roots = {name: Path(os.path.abspath(path)) for name, path in roots.items()}
    content = {
        "bids_app_version": read_version(),
        "task": cfg.labels.task.value,
        "mode": cfg.train.mode.value,
        "architecture": cfg.train.architecture,
        **{key: _portable(value, abs_roots) for key, value in extra.items()},
        "roots": {name: _stored_root(path, maps_dir) for name, path in abs_roots.items() if name != "maps_dir"},
        "config": _portable(config_to_nested(cfg), abs_roots),
    }
    atomic_write_json(MapsLayout(maps_dir).maps_json, content)


def read_maps_json(maps_dir: Path, roots: Mapping[str, Path] | None = None) -> MapsRecord:
    """Read ``maps.json``, resolving stored paths against the MAPS' current location.

    Args:
        maps_dir: the MAPS folder.
        roots: override a stored root (``output_dir``, ``bids_dir``), e.g. when only the MAPS was moved.

    Raises:
        DataError: ``maps.json`` is missing, unreadable, or lacks a key.
    """
    maps_dir = Path(os.path.abspath(maps_dir))
    path = MapsLayout(maps_dir).maps_json
    try:
        content = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing, so {maps_dir} is not a trained model folder. Run the group level with "
            "--stages train first, or point to the right MAPS."
        ) from None
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError, a repeated key
        raise DataError(f"{path} is not readable JSON ({exc}). Re-run training to rewrite it.") from exc
    try:
        stored = content["roots"]
        resolved_roots = {"maps_dir": maps_dir}
        for name, value in stored.items():
            resolved_roots[name] = Path(value) if os.path.isabs(value) else Path(os.path.normpath(maps_dir / value))
        resolved_roots.update({name: Path(p) for name, p in (roots or {}).items()})
        known = {"bids_app_version", "task", "mode", "architecture", "input_shape", "n_outputs", "label_encoding"}
        extra = {k: _resolved(v, resolved_roots) for k, v in content.items() if k not in known | {"roots", "config"}}
        encoding = content["label_encoding"]
        record = MapsRecord(
            version=str(content["bids_app_version"]),
            config=resolve_config(_resolved(content["config"], resolved_roots)),
            task=Task(content["task"]),
            mode=ExtractionMode(content["mode"]),
            architecture=str(content["architecture"]),
            input_shape=tuple(int(v) for v in content["input_shape"]),
            n_outputs=int(content["n_outputs"]),
            label_encoding=None if encoding is None else {str(k): int(v) for k, v in encoding.items()},
            extra=extra,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, BidsAppError):
            raise DataError(f"{path} holds an invalid configuration: {exc}") from exc
        raise DataError(f"{path} is incomplete or malformed ({exc!r}). Re-run training to rewrite it.") from exc
    _check_record(record, path)
    return record


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json keeps the last one silently)."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"key(s) {', '.join(repeated)} given twice")
    return dict(pairs)


def _check_record(record: MapsRecord, path: Path) -> None:
    """Refuse a record whose model description is inconsistent (a hand-edited or damaged ``maps.json``)."""
    shape = record.input_shape
    problems = []
    if len(shape) not in (3, 4) or min(shape, default=0) < 1:
        problems.append(f"input_shape {list(shape)} is not (channels, [depth,] height, width) with sides >= 1")
    if record.n_outputs < 1:
        problems.append(f"n_outputs is {record.n_outputs}")
    channels = list(record.config.train.channels)
    if shape and len(channels) != shape[0]:
        problems.append(f"input_shape {list(shape)} has {shape[0]} channel(s) but train.channels is {channels}")
    if record.task is Task.CLASSIFICATION:
        encoding = record.label_encoding or {}
        if sorted(encoding.values()) != list(range(len(encoding))) or len(encoding) < 2:
            problems.append(f"label_encoding {encoding} does not number two or more classes 0..n-1 once each")
        elif len(encoding) != record.n_outputs:
            problems.append(f"label_encoding has {len(encoding)} classes but n_outputs is {record.n_outputs}")
    if problems:
        raise DataError(f"{path} is inconsistent: {'; '.join(problems)}. Re-train the model (--overwrite).")


def write_environment_json(maps_dir: Path, seed: int, training_run: Mapping[str, str] | None = None) -> None:
    """Record the software and machine that trained the models, and the run that did it (``environment.json``).

    ``training_run`` (``run_id``, ``command``) lives here rather than in ``maps.json``: it changes with every run,
    and ``maps.json`` stays byte-identical for the same seed and configuration.
    """
    from bids_app.provenance import environment_record

    record = environment_record(seed)
    if training_run is not None:
        record["training_run"] = dict(training_run)
    atomic_write_json(MapsLayout(maps_dir).environment_json, record)


def find_model_path(maps_dir: Path, split: int, metric: str) -> Path:
    """``split-<k>/best-<metric>/model.safetensors``, checked to be safetensors.

    Raises:
        DataError: only a pickle model file exists in that folder, or the file is not safetensors.
        InputMissingError: no model for this split and metric.
    """
    layout = MapsLayout(Path(maps_dir))
    path = layout.model_path(split, metric)
    if not path.is_file():
        best_dir = layout.best_dir(split, metric)
        pickles = sorted(p for p in best_dir.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            check_safetensors(pickles[0])
        available = sorted(p.parent.name for p in layout.split_dir(split).glob("best-*/model.safetensors"))
        raise InputMissingError(
            f"No model {path}. Available for split {split}: {available or 'none'}. Train split {split} with "
            f"selection metric '{metric}' (--stages train), or choose another metric."
        )
    check_safetensors(path)
    return path


def build_maps_model(record: MapsRecord) -> nn.Module:
    """A freshly initialised model of the MAPS' architecture, task and input shape."""
    from bids_app.models import build_model

    return build_model(
        record.architecture,
        task=record.task,
        input_shape=record.input_shape,
        n_outputs=record.n_outputs,
        dropout=record.config.train.dropout,
    )


def load_model(maps_dir: Path, split: int, metric: str, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model ``split-<k>/best-<metric>`` in eval mode on ``device``.

    The architecture is rebuilt from ``maps.json`` and the weights read from safetensors (never unpickled).

    Raises:
        DataError: invalid MAPS, a pickle model file, or weights that do not fit the architecture.
        InputMissingError: no such split or metric.
    """
    return Maps.open(maps_dir).load_model(split, metric, device)


def load_weights_into(model: nn.Module, path: Path, record: MapsRecord) -> nn.Module:
    """``model`` with the safetensors weights of ``path`` (strict: every tensor must fit).

    Raises:
        DataError: a pickle file, or weights that do not fit the architecture of ``record``.
    """
    state = load_state(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(
            f"Weights in {path} do not fit architecture '{record.architecture}' with input shape "
            f"{record.input_shape}: {str(exc).splitlines()[0]}. The MAPS is inconsistent; re-train this split."
        ) from exc
    return model


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def validate_maps(maps_dir: Path, roots: Mapping[str, Path] | None = None) -> MapsRecord:
    """Check a MAPS before predicting with it or resuming it, and return its record.

    Checks ``maps.json`` (present, readable, same major version as this bids_app), ``environment.json``,
    and for every finished split a safetensors model per selection metric (pickles refused).

    Raises:
        InputMissingError: ``maps_dir`` does not exist.
        DataError: a file is missing or invalid, or the MAPS was written by another major version.
    """
    maps_dir = Path(maps_dir)
    if not maps_dir.is_dir():
        raise InputMissingError(f"Model folder {maps_dir} does not exist. Train a model first (--stages train).")
    record = read_maps_json(maps_dir, roots)
    check_maps_files(MapsLayout(maps_dir), record)
    return record


def check_maps_files(layout: MapsLayout, record: MapsRecord) -> None:
    """The checks of ``validate_maps`` that follow the record: version, ``environment.json``, model files.

    Raises:
        DataError: a file is missing or invalid, or the MAPS was written by another major version.
    """
    current = read_version()
    if _major(record.version) != _major(current):
        raise DataError(
            f"{layout.maps_json} was written by bids_app {record.version}, but this is bids_app {current} "
            f"(different major version). Use bids_app {_major(record.version)}.x to read it, or re-train."
        )
    if not layout.environment_json.is_file():
        raise DataError(f"{layout.environment_json} is missing. Re-run training (--stages train) to recreate it.")
    for split in layout.trained_splits():
        for metric in record.config.train.selection_metrics:
            try:
                find_model_path(layout.root, split, metric)
            except InputMissingError as exc:
                raise DataError(
                    f"{layout.model_path(split, metric)} is missing although split {split} finished training. "
                    f"Re-train split {split} (--stages train with train.splits = [{split}] in the --config file)."
                ) from exc


def read_training_pool(maps_dir: Path, fix: str) -> pd.DataFrame:
    """A MAPS' ``groups/train+validation.tsv`` (every image its model saw), read as strings.

    Raises:
        InputMissingError: the file does not exist; the message ends with ``fix``.
    """
    path = MapsLayout(Path(maps_dir)).train_validation_tsv
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputMissingError(f"{path} does not exist; the MAPS is incomplete. {fix}") from None


class Maps:
    """One model folder, read and validated once, then passed to every group stage.

    The record is the one source of task, mode, label column and class order at prediction and interpretation
    time: a run that predicts with a model never needs ``--mode`` or ``--label`` repeated.

    Attributes:
        layout: every path of the folder.
        record: the content of ``maps.json``.
    """

    def __init__(self, layout: MapsLayout, record: MapsRecord) -> None:
        self.layout = layout
        self.record = record
        self._splits: Splits | None = None

    @classmethod
    def open(cls, root: Path, roots: Mapping[str, Path] | None = None) -> Maps:
        """Read and validate the model folder ``root`` (``validate_maps``).

        Raises:
            InputMissingError: ``root`` does not exist.
            DataError: a file is missing or invalid, or the MAPS was written by another major version.
        """
        return cls(MapsLayout(Path(root)), validate_maps(Path(root), roots))

    @staticmethod
    def exists(root: Path) -> bool:
        """Whether ``root`` holds a model folder's record (it may still be incomplete or invalid)."""
        return MapsLayout(Path(root)).maps_json.is_file()

    @staticmethod
    def read_record(root: Path) -> MapsRecord:
        """The record of the model folder ``root`` alone, its files unchecked: for checks before a run writes.

        Raises:
            DataError: the record is missing, unreadable or inconsistent.
        """
        return read_maps_json(Path(root))

    @classmethod
    def create(
        cls,
        root: Path,
        cfg: RunConfig,
        extra: Mapping[str, Any],
        training_run: Mapping[str, str] | None = None,
        excluded: pd.DataFrame | None = None,
    ) -> Maps:
        """Write ``maps.json`` and ``environment.json`` (with ``training_run``) of a new training into ``root``.

        ``excluded``: with several channels, the sessions left out for lacking one (``data.tables.EXCLUDED_COLUMNS``,
        led by ``cohort`` with cohorts), written to ``excluded_sessions.tsv`` (header only when none) and counted in
        the record (``excluded_sessions``).
        """
        if excluded is not None:
            from bids_app.derivatives import atomic_write_text
            from bids_app.labels import sort_table

            table = sort_table(excluded.astype(str)) if len(excluded) else excluded
            atomic_write_text(MapsLayout(Path(root)).excluded_sessions_tsv,
                              table.to_csv(sep="\t", index=False, lineterminator="\n"))  # fmt: skip
            by_kind: dict[str, int] = {}
            for missing in excluded["missing_kinds"].astype(str):
                for name in missing.split(","):
                    by_kind[name] = by_kind.get(name, 0) + 1
            extra = {**extra, "excluded_sessions": {"n_sessions": len(excluded), "by_missing_kind": by_kind,
                                                    "table": EXCLUDED_SESSIONS_TSV}}  # fmt: skip
        write_maps_json(root, cfg, extra)
        write_environment_json(root, cfg.seed, training_run)
        return cls(MapsLayout(Path(root)), read_maps_json(Path(root)))

    def validate(self) -> Maps:
        """Check the folder's files against its record again (after training wrote new models); returns self."""
        check_maps_files(self.layout, self.record)
        return self

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def class_names(self) -> list[str]:
        """Class names by output index (classification), else empty."""
        encoding = self.record.label_encoding or {}
        return sorted(encoding, key=encoding.__getitem__)

    @property
    def splits(self) -> Splits:
        """The model's subject-level split, read and verified once (``maps.splits.read_splits``)."""
        if self._splits is None:
            self._splits = read_splits(self.layout.groups_dir)
        return self._splits

    def excluded_sessions(self) -> pd.DataFrame | None:
        """The sessions left out for lacking one of the model's channels, as strings; None when not recorded
        (a single-channel model, or one made before they were)."""
        path = self.layout.excluded_sessions_tsv
        if not path.is_file():
            return None
        try:
            return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} is not a readable table ({exc}). Re-train the model (--overwrite).") from exc

    @property
    def participant_settings(self) -> list[dict[str, Any]]:
        """Per dataset, the participant-level settings of the tensors the models were trained on
        (``data.origin.settings_by_dataset``); empty for a model folder written before they were recorded."""
        return list(self.record.extra.get("participant_settings") or [])

    def trained_splits(self, selected: Sequence[int] = ()) -> list[int]:
        """Finished splits, restricted to ``selected`` when given.

        Raises:
            InputMissingError: none is trained.
        """
        trained = [k for k in self.layout.trained_splits() if not selected or k in selected]
        if not trained:
            raise InputMissingError(
                f"No trained split in {self.root}"
                + (f" among splits {list(selected)}" if selected else "")
                + ". Run the group level with --stages train first."
            )
        return trained

    def learning(self, split: int) -> LearningVerdict | None:
        """Whether split ``k``'s network learned, as its ``summary.json`` records it (``training.learning``).

        Returns None when the summary has no verdict: a split trained before the verdict existed, a
        reconstruction model, or a split not trained.

        Raises:
            DataError: ``summary.json`` is unreadable or its ``learning`` entry is malformed.
        """
        path = self.layout.summary_json(split)
        try:
            entry = json.loads(path.read_text(encoding="utf-8")).get("learning")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            raise DataError(f"{path} is not a readable JSON object ({exc}). Re-train split {split}.") from exc
        if entry is None:
            return None
        try:
            numbers = {key: entry.get(key) for key in ("chance_loss", "train_loss_drop", "validation_loss_drop")}
            return LearningVerdict(
                LearningStatus(entry["status"]),
                str(entry["reason"]),
                str(entry["advice"]),
                **{key: None if value is None else float(value) for key, value in numbers.items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: its 'learning' entry is malformed ({exc!r}). Re-train split {split}.") from exc

    def learning_status(self, split: int) -> str:
        """``learned``, ``did-not-learn`` or ``n/a`` (no verdict, see ``learning``): the metric TSVs' status."""
        verdict = self.learning(split)
        return NO_LEARNING_VERDICT if verdict is None else verdict.status.value

    def check_input_shape(self, shape: Sequence[int], where: Path) -> None:
        """DataError unless the tensors of ``where`` have the sample shape the models were trained on."""
        if tuple(shape) != tuple(self.record.input_shape):
            raise DataError(
                f"The {self.record.mode.value} tensors of {where} have sample shape {tuple(shape)}, but model "
                f"{self.name} was trained on {tuple(self.record.input_shape)}: they were made with other "
                "participant-level settings (crop, patch size, ROI masks...). Re-run the participant level with the "
                "model's settings (its config.toml), or predict with a model trained on these tensors."
            )

    def check_tensors_unchanged(self, table: pd.DataFrame, where: Path) -> None:
        """DataError when tensors of ``table`` differ from those of the same images the model was made with.

        The model folder records the sha256 of every tensor it was split, trained and selected on; a re-run of
        the participant level with other settings, or another BIDS_DIR's participants of the same names, writes
        other tensors under the same paths. A model folder written before this record existed is not checked.
        """
        recorded: dict[str, str] = self.record.extra.get("tensor_sha256") or {}
        if not recorded or "tensor_sha256" not in table.columns:
            return
        changed = [
            name
            for name, sha in zip(image_names(table), table["tensor_sha256"], strict=True)
            if recorded.get(name) not in (None, sha)
        ]
        if changed:
            shown = ", ".join(changed[:5]) + (f" ... ({len(changed)} in all)" if len(changed) > 5 else "")
            raise DataError(
                f"The {self.record.mode.value} tensors of {len(changed)} image(s) in {where} are not the ones model "
                f"{self.name} was made with: {shown}. The participant level wrote them again since (other settings "
                "or another dataset). Restore them, re-run the participant level with the model's settings, or "
                "re-train the model (--overwrite)."
            )

    def model_path(self, split: int, metric: str) -> Path:
        """``split-<k>/best-<metric>/model.safetensors``, checked to be safetensors (``find_model_path``)."""
        return find_model_path(self.root, split, metric)

    def build_model(self) -> nn.Module:
        """A freshly initialised model of this folder's architecture, task and input shape."""
        return build_maps_model(self.record)

    def load_model(self, split: int, metric: str, device: str | torch.device = "cpu") -> nn.Module:
        """The trained model ``split-<k>/best-<metric>`` in eval mode on ``device`` (weights never unpickled).

        Raises:
            DataError: a pickle model file, or weights that do not fit the architecture.
            InputMissingError: no such split or metric.
        """
        return load_weights_into(self.build_model(), self.model_path(split, metric), self.record).to(device).eval()

    def training_pool(self, fix: str = "Re-run the split stage.") -> pd.DataFrame:
        """``groups/train+validation.tsv``: every image the models saw (``read_training_pool``)."""
        return read_training_pool(self.root, fix)

    def exported_record(self, splits: Sequence[int], metrics: Sequence[str]) -> bytes:
        """``maps.json`` as a portable copy holding only ``splits`` x ``metrics`` must say it (bytes to write).

        The selection metrics and splits of the training configuration are narrowed to the exported models, so
        the copy validates (``check_maps_files``) and predicts with exactly them; every other key is unchanged.
        """
        content = json.loads(self.layout.maps_json.read_text(encoding="utf-8"))
        content["config"]["train"]["selection_metrics"] = list(metrics)
        content["config"]["train"]["splits"] = [int(k) for k in splits]
        return (json.dumps(content, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")
