"""Run configuration: frozen dataclasses, their enums, and TOML load/dump.

A run's configuration is resolved once, in this order: dataclass defaults, then the ``--config`` TOML file,
then the command-line flags the user actually gave. The resolved configuration is written back as TOML into
the run's log folder; passing that file to ``--config`` re-runs the same experiment.

TOML has no null: an optional value whose default is not ``None`` is written as the string ``"none"``, and
the same spelling is accepted on load. In ``bids_filters`` the string ``"null"`` stands for JSON ``null``
(entity must be absent) and ``"*"`` for any value, as in the ``--bids-filter-file`` JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bids_app.errors import ConfigError

NONE_SPELLING = "none"


class AnalysisLevel(enum.StrEnum):
    PARTICIPANT = "participant"
    GROUP = "group"


class ExtractionMode(enum.StrEnum):
    """How a preprocessed volume is cut into model inputs."""

    IMAGE = "image"
    PATCH = "patch"
    SLICE = "slice"
    ROI = "roi"


class SliceDirection(enum.StrEnum):
    """Axis orthogonal to the slices, in the template's RAS voxel order (0 = sagittal)."""

    SAGITTAL = "sagittal"
    CORONAL = "coronal"
    AXIAL = "axial"


class Normalization(enum.StrEnum):
    """Per-image intensity normalisation applied before cutting tensors."""

    MINMAX = "minmax"
    ZSCORE = "zscore"
    NONE = "none"


class TensorDtype(enum.StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"


class Registration(enum.StrEnum):
    """ANTs affine registration flavour (``AffineFast`` is ~4x faster at equal quality on brains)."""

    AFFINE_FAST = "AffineFast"
    AFFINE = "Affine"


class Task(enum.StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    RECONSTRUCTION = "reconstruction"


class GroupStage(enum.StrEnum):
    SPLIT = "split"
    TRAIN = "train"
    PREDICT = "predict"


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """t1-linear / pet-linear preprocessing and the sources of already preprocessed images."""

    template_path: Path | None = None  # None: nilearn's MNI152 2009a symmetric T1 (1 mm)
    template_space: str = "MNI152NLin2009aSym"
    crop_shape: tuple[int, int, int] | None = (169, 208, 179)  # voxels; None keeps the template frame
    registration: Registration = Registration.AFFINE_FAST
    n4_shrink_factor: int = 4
    derivatives_dirs: tuple[Path, ...] = ()  # already preprocessed inputs (BIDS derivative or Clinica CAPS)
    pet_tracers: tuple[str, ...] = ()  # empty: T1w only
    suvr_reference_mask: Path | None = None  # binary mask in template space; None: whole-brain reference


@dataclasses.dataclass(frozen=True)
class ExtractionConfig:
    """Tensor extraction parameters (shapes are in voxels of the preprocessed image)."""

    modes: tuple[ExtractionMode, ...] = (ExtractionMode.IMAGE, ExtractionMode.PATCH, ExtractionMode.SLICE)
    patch_size: int = 50
    stride: int = 50
    slice_direction: SliceDirection = SliceDirection.SAGITTAL
    discarded_slices: int = 20
    roi_masks: tuple[tuple[str, Path], ...] = ()  # (name, binary mask in template space)
    roi_crop: bool = True  # crop each region to its bounding box; False keeps the full frame (masked)
    normalization: Normalization = Normalization.MINMAX
    dtype: TensorDtype = TensorDtype.FLOAT32


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """Which column is the target and which rows are used."""

    label: str = "diagnosis"
    task: Task = Task.CLASSIFICATION
    classes: tuple[str, ...] = ()  # empty: every class present
    baseline_only: bool = False


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """Subject-level splitting. ``test_size`` < 1 is a fraction of subjects, >= 1 a count."""

    test_size: float = 0.2
    n_splits: int = 5  # k-fold on the rest; 1 means a single train/validation split
    validation_size: float = 0.2  # used when n_splits == 1
    test_baseline_only: bool = True
    balance_p_threshold: float = 0.2  # age t-test and sex chi-square must both have p above this
    max_attempts: int = 1000
    split_file: Path | None = None  # a user's own split (TSV), checked for subject-level disjointness
    parent_label: str | None = None  # split these classes first, then the parent label respecting them


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Model, optimisation and selection options."""

    model_name: str = "model"  # the MAPS folder name under models/
    architecture: str = "conv5_fc3"
    mode: ExtractionMode = ExtractionMode.IMAGE
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    dropout: float = 0.5
    epochs: int = 20
    batch_size: int = 8
    accumulation_steps: int = 1
    loss: str | None = None  # None: the task's default (cross_entropy, mse, mse)
    lr_plateau_patience: int = 0  # 0 disables ReduceLROnPlateau
    early_stopping_patience: int = 0  # 0 disables early stopping
    early_stopping_tolerance: float = 0.0
    selection_metrics: tuple[str, ...] = ("loss",)
    augmentations: tuple[str, ...] = ()
    class_weighted_sampling: bool = False
    amp: bool = False
    device: str = "auto"
    num_workers: int = 0
    cache_samples: bool = False  # keep every sample in memory after its first read (per worker process)
    deterministic: bool = False
    splits: tuple[int, ...] = ()  # empty: every split
    resume: bool = False
    transfer_from: Path | None = None
    n_unfrozen_layers: int | None = None  # None: fine-tune everything


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Prediction on the test split or on another participant-level output."""

    predict_from: Path | None = None
    group_name: str | None = None
    allow_leak: bool = False
    voting_threshold: float = 0.0  # parts whose validation weight is below this are dropped
    n_bootstrap: int = 1000
    batch_size: int = 8
    inverse_mae_voting: bool = False  # regression: weight parts by 1 / validation MAE (default: plain mean)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one invocation needs. Paths are absolute once resolved by the CLI."""

    bids_dir: Path
    output_dir: Path
    analysis_level: AnalysisLevel
    participant_labels: tuple[str, ...] = ()  # bare labels; empty: all participants
    session_labels: tuple[str, ...] = ()
    bids_filters: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    skip_bids_validation: bool = False
    bids_database_dir: Path | None = None
    work_dir: Path | None = None
    nprocs: int = 1
    omp_nthreads: int = 1
    seed: int = 0
    verbose: int = 0
    overwrite: bool = False
    stages: tuple[GroupStage, ...] = ()  # empty: every stage that applies
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    extraction: ExtractionConfig = dataclasses.field(default_factory=ExtractionConfig)
    labels: LabelConfig = dataclasses.field(default_factory=LabelConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    predict: PredictConfig = dataclasses.field(default_factory=PredictConfig)


# Fields of RunConfig that live in the TOML [run] table (the nested dataclasses get their own tables).
SECTIONS = ("preprocess", "extraction", "labels", "split", "train", "predict")


def _coerce(value: Any, hint: Any, key: str, default: Any) -> Any:
    """Convert a TOML/CLI value to ``hint`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value == NONE_SPELLING and type(None) in args):
            return None
        return _coerce(value, non_none[0], key, default)
    if hint is Any:
        return value
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"Config key '{key}' must be a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", None) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"Config key '{key}' must have {len(args)} items, got {value!r}.")
        return tuple(_coerce(v, a, f"{key}[{i}]", None) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"Config key '{key}' must be a table, got {value!r}.")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", None) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(m.value for m in hint)
            raise ConfigError(f"Config key '{key}' has invalid value {value!r}. Allowed: {allowed}.") from None
    if hint is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"Config key '{key}' must be a path string, got {value!r}.")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"Config key '{key}' must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"Config key '{key}' must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"Config key '{key}' must be a number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"Config key '{key}' must be a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def build_section(cls: type[Any], values: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {', '.join(repr(u) for u in unknown)} in [{where}]. "
            f"Known keys: {', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, value in values.items():
        field = fields[name]
        default = field.default if field.default is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"Config key '{where}.{name}' must be a table.")
            kwargs[name] = build_section(hints[name], value, name)
        else:
            kwargs[name] = _coerce(value, hints[name], f"{where}.{name}", default)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"Incomplete [{where}] configuration: {exc}") from None


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config into a nested dict ``{"run": {...}, "train": {...}, ...}`` (not yet validated)."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        from bids_app.errors import InputMissingError

        raise InputMissingError(f"Config file {path} does not exist. Check the --config path.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}. Fix the syntax.") from None
    allowed = {"run", *SECTIONS, "bids_filters"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"Unknown table(s) {', '.join(repr(u) for u in unknown)} in config file {path}. "
            f"Known tables: {', '.join(sorted(allowed))}."
        )
    return data


def _decode_filters(filters: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    decoded: dict[str, dict[str, Any]] = {}
    for kind, entities in filters.items():
        if not isinstance(entities, Mapping):
            raise ConfigError(f"bids_filters.{kind} must map entity names to values, got {entities!r}.")
        decoded[kind] = {k: (None if v == "null" else v) for k, v in entities.items()}
    return decoded


def resolve_config(nested: Mapping[str, Mapping[str, Any]]) -> RunConfig:
    """Build a RunConfig from ``{"run": {...}, "<section>": {...}, "bids_filters": {...}}``."""
    run_values = dict(nested.get("run", {}))
    if "bids_filters" in nested:
        run_values["bids_filters"] = _decode_filters(nested["bids_filters"])
    for section in SECTIONS:
        if section in nested:
            run_values[section] = dict(nested[section])
    return typing.cast(RunConfig, build_section(RunConfig, run_values, "run"))


def merge_nested(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge two nested dicts; ``override`` wins."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and key != "bids_filters":
            merged[key] = merge_nested(merged[key], value)
        else:
            merged[key] = value
    return merged


def _plain(value: Any, default: Any) -> Any:
    if value is None:
        return NONE_SPELLING
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v, None) for v in value]
    return value


def config_to_nested(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The inverse of ``resolve_config``: a nested dict ready for TOML."""
    nested: dict[str, dict[str, Any]] = {"run": {}}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name in SECTIONS:
            section: dict[str, Any] = {}
            for sub in dataclasses.fields(value):
                sub_value = getattr(value, sub.name)
                if sub_value is None and sub.default is None:
                    continue  # omitted means default None
                section[sub.name] = _plain(sub_value, sub.default)
            nested[field.name] = section
        elif field.name == "bids_filters":
            nested["bids_filters"] = {
                kind: {k: ("null" if v is None else v) for k, v in entities.items()} for kind, entities in value.items()
            }
        elif value is None and field.default is None:
            continue
        else:
            nested["run"][field.name] = _plain(value, field.default)
    return nested


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_config(cfg: RunConfig) -> str:
    """Serialise ``cfg`` as TOML that ``load_config_file`` + ``resolve_config`` read back identically."""
    nested = config_to_nested(cfg)
    lines = ["# bids_app resolved configuration: pass to --config to re-run", ""]
    lines.append("[run]")
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in nested["run"].items())
    for kind, entities in nested.get("bids_filters", {}).items():
        lines.append("")
        lines.append(f"[bids_filters.{kind}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in entities.items())
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in nested[section].items())
    return "\n".join(lines) + "\n"
