"""Run configuration: frozen dataclasses and their enums (the TOML side lives in ``config_file``).

A run's configuration is resolved once, in this order: dataclass defaults, then the ``--config`` TOML file,
then the command-line flags the user actually gave.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any


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


class TrackingBackend(enum.StrEnum):
    """Where group-level runs are mirrored, besides the MAPS (which stays the record)."""

    NONE = "none"
    MLFLOW = "mlflow"


class GroupStage(enum.StrEnum):
    SPLIT = "split"
    TRAIN = "train"
    BASELINE = "baseline"  # the linear model beside the network (train.linear_baseline); before predict
    PREDICT = "predict"
    INTERPRET = "interpret"  # only when asked: --stages ... interpret


DEFAULT_GROUP_STAGES = (GroupStage.SPLIT, GroupStage.TRAIN, GroupStage.BASELINE, GroupStage.PREDICT)


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
    contrasts: tuple[str, ...] = ()  # raw T2w/FLAIR, registered through the session's T1w; empty: T1w only
    suvr_reference_mask: Path | None = None  # binary mask in template space; None: whole-brain reference
    # template-space maps of the --derivatives folders, each "NAME=ENTITY:VALUE[,ENTITY:VALUE...]" (kinds.CustomMap)
    custom_maps: tuple[str, ...] = ()


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
    normalization: Normalization = Normalization.ZSCORE  # min-max left ROIs too flat to learn (docs/performance.md)
    dtype: TensorDtype = TensorDtype.FLOAT32
    # image mode only: resample to this isotropic voxel edge (mm, >= the template's; None keeps the template grid)
    image_voxel_size: float | None = None


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """Which column is the target and which rows are used."""

    label: str = "diagnosis"
    task: Task = Task.CLASSIFICATION
    classes: tuple[str, ...] = ()  # empty: every class present
    baseline_only: bool = False
    positive_class: str | None = None  # sensitivity, specificity, PPV, NPV are for this class; None: see metrics


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
    exclude_failed_qc: bool = False  # leave out images whose participant-level QC failed
    leave_cohort_out: str | None = None  # a cohort name: its images are the test set, the others train/validate


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Model, optimisation and selection options."""

    model_name: str = "model"  # the MAPS folder name under models/
    architecture: str = "conv5_fc3"
    mode: ExtractionMode = ExtractionMode.IMAGE
    # Image kinds stacked as the channels of one sample, in this order (bids_app.kinds: T1w, T2w, FLAIR,
    # pet-<tracer>, a custom map's name); a session lacking one is listed and left out, never zero-padded.
    channels: tuple[str, ...] = ("T1w",)
    optimizer: str = "adam"
    learning_rate: float = 1e-3  # 1e-4 stayed near ln 2 for 20 epochs, 3e-3 can collapse (docs/performance.md)
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
    splits: tuple[int, ...] = ()  # empty: every split
    resume: bool = False
    transfer_from: Path | None = None
    n_unfrozen_layers: int | None = None  # None: fine-tune everything
    # A linear model (logistic regression / ridge) fitted on the same tensors and splits, its metrics beside the
    # network's (bids_app.baseline); not "baseline" alone, which names first sessions (labels.baseline_only).
    linear_baseline: bool = True


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Prediction on the test split or on another participant-level output."""

    predict_from: Path | None = None
    group_name: str | None = None
    model: Path | None = None  # a portable model (archive or imported folder) to predict OUTPUT_DIR with
    allow_leak: bool = False
    voting_threshold: float = 0.0  # parts whose validation weight is below this are dropped
    n_bootstrap: int = 1000
    inverse_mae_voting: bool = False  # regression: weight parts by 1 / validation MAE (default: plain mean)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the group level uses the machine, apart from what the model learns (``bids_app.runtime``).

    None of these changes a trained model's weights, except ``amp`` (float16 arithmetic on CUDA) and
    ``deterministic`` (other kernels on CUDA); the checkpoint's configuration hash covers those two.
    """

    device: str = "auto"  # auto, cpu, cuda or cuda:<index>
    amp: bool = False  # float16 autocast with loss scaling, CUDA only
    channels_last: bool = True  # model and batches in channels-last memory format (speed only; docs/performance.md)
    num_workers: int = 0  # DataLoader worker processes
    cache_samples: bool = False  # keep every sample in memory after its first read (per worker process)
    deterministic: bool = False  # torch deterministic algorithms
    inference_batch_size: int = 8  # samples per forward pass when predicting and interpreting


# Keys that lived in [train] or [predict] before [runtime] existed (bids_app 0.1.0): old config files and
# model folders are read with them moved here.
LEGACY_RUNTIME_KEYS = {
    ("train", "device"): "device",
    ("train", "amp"): "amp",
    ("train", "channels_last"): "channels_last",
    ("train", "num_workers"): "num_workers",
    ("train", "cache_samples"): "cache_samples",
    ("train", "deterministic"): "deterministic",
    ("predict", "batch_size"): "inference_batch_size",
}


@dataclasses.dataclass(frozen=True)
class InterpretConfig:
    """Saliency maps of a trained model, written as NIfTI in template space."""

    methods: tuple[str, ...] = ("gradients", "grad_cam", "integrated_gradients")
    target: str = "predicted"  # "predicted" or "true" class
    group_name: str = "test"
    selection_metric: str | None = None  # None: the first of train.selection_metrics
    n_steps: int = 32  # integrated gradients: steps of the path integral


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Optional experiment tracking of the group level (off by default; never uses the network)."""

    backend: TrackingBackend = TrackingBackend.NONE
    store_dir: Path | None = None  # MLflow file store; None: OUTPUT_DIR/mlruns
    experiment: str = "bids_app"


@dataclasses.dataclass(frozen=True)
class CohortConfig:
    """Another participant-level output the group level trains on beside BIDS_DIR/OUTPUT_DIR (docs/cohorts.md).

    Its labels are read from ``bids_dir`` (participants.tsv, sessions.tsv, phenotype/), its tensors from
    ``output_dir``; nothing is ever written into either.
    """

    name: str  # the value of the ``cohort`` column: letters and digits first, then letters, digits, '_', '-'
    bids_dir: Path
    output_dir: Path


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
    from_model: Path | None = None  # participant level: settings copied from this model folder (data.origin)
    stages: tuple[GroupStage, ...] = ()  # empty: DEFAULT_GROUP_STAGES
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    extraction: ExtractionConfig = dataclasses.field(default_factory=ExtractionConfig)
    labels: LabelConfig = dataclasses.field(default_factory=LabelConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    predict: PredictConfig = dataclasses.field(default_factory=PredictConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    interpret: InterpretConfig = dataclasses.field(default_factory=InterpretConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    cohort_name: str | None = None  # the primary cohort's name when ``cohorts`` is given; None: "primary"
    cohorts: tuple[CohortConfig, ...] = ()  # other cohorts of a multi-cohort group run ([[cohorts]] in TOML)


# Sections of RunConfig that are TOML tables of their own (the other fields live in [run]).
SECTIONS = ("preprocess", "extraction", "labels", "split", "train", "predict", "runtime", "interpret", "tracking")


# Names that become one path component under OUTPUT_DIR (models/<model_name>/, <group_name>/, ...): labels,
# never paths. Letters and digits first, then letters, digits, '_' and '-'.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# The input kinds --bids-filter-file may filter (keys of RunConfig.bids_filters).
FILTER_KINDS = ("t1w", "t2w", "flair", "pet")
# The raw contrasts --contrasts may add to T1w (each registered to the session's raw T1w: t2-linear, flair-linear).
CONTRASTS = ("T2w", "FLAIR")


def check_channels(names: tuple[str, ...]) -> None:
    """Refuse a ``--channels`` list no group run can use: empty, an unknown kind, or a kind given twice.

    Raises:
        ConfigError: naming the value and the kinds that exist (``kinds.parse_kind``).
    """
    from bids_app.errors import ConfigError
    from bids_app.kinds import ANATOMICAL_SUFFIXES, parse_kind

    if not names:
        raise ConfigError("Invalid --channels (train.channels) []: give one image kind or more, e.g. --channels T1w.")
    for name in names:
        try:
            parse_kind(str(name))
        except ConfigError as exc:
            raise ConfigError(f"Invalid --channels (train.channels) {name!r}: {exc}") from None
        # a custom map's name could be 'flair', but the case slip is far likelier than such a map
        bids_kind = {kind.lower(): kind for kind in ANATOMICAL_SUFFIXES}.get(str(name).lower())
        if bids_kind is not None and bids_kind != name:
            raise ConfigError(
                f"Invalid --channels (train.channels) {name!r}: did you mean {bids_kind!r}? Kind names are "
                "case-sensitive (T1w, T2w, FLAIR, pet-<tracer>)."
            )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"Invalid --channels (train.channels) {list(names)!r}: {', '.join(repeated)} given twice; each kind is "
            "one channel. Give each kind once."
        )


def check_custom_maps(cfg: RunConfig) -> None:
    """Refuse ``--custom-map`` values that cannot select maps: malformed, a name given twice or taken by a BIDS
    kind, or (participant level) no ``--derivatives`` folder to select them from.

    Raises:
        ConfigError: naming the value and the fix.
    """
    from bids_app.errors import ConfigError
    from bids_app.kinds import parse_custom_map

    names = [parse_custom_map(spec).name for spec in cfg.preprocess.custom_maps]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"Invalid --custom-map (preprocess.custom_maps): the name(s) {', '.join(repeated)} are given twice. Give "
            "each map its own name."
        )
    if names and cfg.analysis_level is AnalysisLevel.PARTICIPANT and not cfg.preprocess.derivatives_dirs:
        raise ConfigError(
            f"Invalid --custom-map (preprocess.custom_maps) {list(cfg.preprocess.custom_maps)!r}: custom maps are "
            "selected in the --derivatives (-d) folders, and none is given. Add -d DERIVATIVE_DIR (a BIDS "
            "derivative or a Clinica CAPS holding the maps)."
        )


def check_config_values(cfg: RunConfig) -> None:
    """Refuse option values no run can use, before anything is written (ConfigError naming option and fix).

    Only what needs neither data nor heavy imports is checked here; the stages check the rest (architecture
    names, augmentations, extraction geometry) before their own first write.
    """
    import math
    import re

    from bids_app.errors import ConfigError

    def fail(option: str, value: object, fix: str) -> None:
        raise ConfigError(f"Invalid {option} {value!r}: {fix}")

    unknown = sorted(kind for kind in cfg.bids_filters if kind not in FILTER_KINDS)
    if unknown:
        close = [kind for kind in FILTER_KINDS if kind in {u.lower() for u in unknown}]
        hint = f" Did you mean '{close[0]}'?" if close else ""
        fail("--bids-filter-file kind(s)", unknown, f"the kinds are {', '.join(FILTER_KINDS)} (lower case).{hint}")
    check_channels(cfg.train.channels)
    contrasts = list(cfg.preprocess.contrasts)
    if any(c not in CONTRASTS for c in contrasts) or len(set(contrasts)) != len(contrasts):
        fail("--contrasts (preprocess.contrasts)", contrasts, f"give each of {', '.join(CONTRASTS)} at most once "
             "(case-sensitive), or none for T1w only.")  # fmt: skip
    if contrasts and cfg.preprocess.derivatives_dirs:
        fail("--contrasts (preprocess.contrasts)", contrasts, "raw T2w/FLAIR are registered through the session's "
             "raw T1w, which --derivatives skips: run without -d to process raw T1w and contrasts.")  # fmt: skip
    check_custom_maps(cfg)
    for option, name in (
        ("--model-name (train.model_name)", cfg.train.model_name),
        ("--group-name (predict.group_name)", cfg.predict.group_name),
        ("--interpret-group (interpret.group_name)", cfg.interpret.group_name),
        ("--parent-label (split.parent_label)", cfg.split.parent_label),
        ("--cohort-name (run.cohort_name)", cfg.cohort_name),
        ("--leave-cohort-out (split.leave_cohort_out)", cfg.split.leave_cohort_out),
        *(("--cohort NAME (cohorts.name)", cohort.name) for cohort in cfg.cohorts),
    ):
        if name is not None and not re.match(NAME_PATTERN, name):
            fail(option, name, "a name, not a path: letters and digits first, then letters, digits, '_' or '-' "
                 "(at most 64 characters; no '/', '.', '..').")  # fmt: skip
    integers = (
        ("--seed (run.seed)", cfg.seed, 0, 2**32 - 1),
        ("--nprocs (run.nprocs)", cfg.nprocs, 1, None),
        ("--omp-nthreads (run.omp_nthreads)", cfg.omp_nthreads, 1, None),
        ("--epochs (train.epochs)", cfg.train.epochs, 1, None),
        ("--batch-size (train.batch_size)", cfg.train.batch_size, 1, None),
        ("--accumulation-steps (train.accumulation_steps)", cfg.train.accumulation_steps, 1, None),
        ("--lr-plateau-patience (train.lr_plateau_patience)", cfg.train.lr_plateau_patience, 0, None),
        ("--early-stopping-patience (train.early_stopping_patience)", cfg.train.early_stopping_patience, 0, None),
        ("--n-splits (split.n_splits)", cfg.split.n_splits, 1, None),
        ("--max-attempts (split.max_attempts)", cfg.split.max_attempts, 1, None),
        ("--n-bootstrap (predict.n_bootstrap)", cfg.predict.n_bootstrap, 0, None),
        ("--num-workers (runtime.num_workers)", cfg.runtime.num_workers, 0, None),
        ("--inference-batch-size (runtime.inference_batch_size)", cfg.runtime.inference_batch_size, 1, None),
        ("--interpret-n-steps (interpret.n_steps)", cfg.interpret.n_steps, 1, None),
        ("--patch-size (extraction.patch_size)", cfg.extraction.patch_size, 1, None),
        ("--stride (extraction.stride)", cfg.extraction.stride, 1, None),
        ("--discarded-slices (extraction.discarded_slices)", cfg.extraction.discarded_slices, 0, None),
        ("preprocess.n4_shrink_factor", cfg.preprocess.n4_shrink_factor, 1, None),
    )
    for option, count, low, high in integers:
        if count < low or (high is not None and count > high):
            fail(option, count, f"use an integer >= {low}" + (f" and <= {high}." if high is not None else "."))
    # (option, value, low, low allowed, high or None, high allowed)
    reals = (
        ("--learning-rate (train.learning_rate)", cfg.train.learning_rate, 0.0, False, None, False),
        ("--weight-decay (train.weight_decay)", cfg.train.weight_decay, 0.0, True, None, False),
        ("--dropout (train.dropout)", cfg.train.dropout, 0.0, True, 1.0, False),
        ("--early-stopping-tolerance (train.early_stopping_tolerance)", cfg.train.early_stopping_tolerance, 0.0,
         True, None, False),
        ("--test-size (split.test_size)", cfg.split.test_size, 0.0, True, None, False),
        ("--validation-size (split.validation_size)", cfg.split.validation_size, 0.0, False, None, False),
        ("--balance-p-threshold (split.balance_p_threshold)", cfg.split.balance_p_threshold, 0.0, True, 1.0, False),
        ("--voting-threshold (predict.voting_threshold)", cfg.predict.voting_threshold, 0.0, True, 1.0, True),
    )  # fmt: skip
    for option, value, low_value, low_ok, high_value, high_ok in reals:
        above = value > low_value or (low_ok and value == low_value)
        below = high_value is None or value < high_value or (high_ok and value == high_value)
        if not (math.isfinite(value) and above and below):
            bounds = f"{'>=' if low_ok else '>'} {low_value}" + (
                "" if high_value is None else f" and {'<=' if high_ok else '<'} {high_value}"
            )
            fail(option, value, f"use a finite number {bounds}.")
    for option, size in (("--test-size (split.test_size)", cfg.split.test_size),
                         ("--validation-size (split.validation_size)", cfg.split.validation_size)):  # fmt: skip
        if size >= 1 and size != int(size):
            fail(option, size, "a fraction of the participants (0 <= x < 1) or a whole count (x >= 1).")
    voxel_size = cfg.extraction.image_voxel_size
    if voxel_size is not None and not (math.isfinite(voxel_size) and voxel_size > 0):
        fail("--image-voxel-size (extraction.image_voxel_size)", voxel_size,
             "use a voxel edge in mm > 0, at least the template's (e.g. 2 or 3), or none for the template "
             "grid.")  # fmt: skip
    if cfg.preprocess.crop_shape is not None and min(cfg.preprocess.crop_shape) < 1:
        fail("--crop-shape (preprocess.crop_shape)", list(cfg.preprocess.crop_shape), "use three integers >= 1.")
