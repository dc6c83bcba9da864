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
    PREDICT = "predict"
    INTERPRET = "interpret"  # only when asked: --stages ... interpret


DEFAULT_GROUP_STAGES = (GroupStage.SPLIT, GroupStage.TRAIN, GroupStage.PREDICT)


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
    exclude_failed_qc: bool = False  # leave out images whose participant-level QC failed


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
    inverse_mae_voting: bool = False  # regression: weight parts by 1 / validation MAE (default: plain mean)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the group level uses the machine, apart from what the model learns (``bids_app.runtime``).

    None of these changes a trained model's weights, except ``amp`` (float16 arithmetic on CUDA) and
    ``deterministic`` (other kernels on CUDA); the checkpoint's configuration hash covers those two.
    """

    device: str = "auto"  # auto, cpu, cuda or cuda:<index>
    amp: bool = False  # float16 autocast with loss scaling, CUDA only
    channels_last: bool = False  # model and batches in channels-last memory format (speed only)
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


# Sections of RunConfig that are TOML tables of their own (the other fields live in [run]).
SECTIONS = ("preprocess", "extraction", "labels", "split", "train", "predict", "runtime", "interpret", "tracking")
