"""The command-line options: one table of (group, dest, config key, extra flags, argparse keywords).

Each option declares the configuration key it sets, so the parser and the flag → config mapping cannot drift
apart. Kept apart from ``cli`` so the table reads as documentation of every flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bids_app.config import ExtractionMode, GroupStage, SliceDirection, Task, TrackingBackend


class BoolFlag(argparse.Action):
    """``--x`` sets True, ``--no-x`` sets False."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


S, R = "input selection", "run control"
P, F = "participant level: preprocessing and extraction", "group level: labels, splits, training, prediction"
M = "group level: runtime (how the machine is used; never what a model learns)"
GROUP_TITLES = (S, R, P, F, M)
# (group, dest, config key, extra flags, argparse keywords). Each dest gets --kebab-case plus the BIDS-App
# underscore alias; flags absent from the command line leave their key to the --config file or the default.
OPTIONS: tuple[tuple[str, str, str, tuple[str, ...], dict[str, Any]], ...] = (
    (
        S,
        "participant_label",
        "run.participant_labels",
        (),
        {
            "nargs": "+",
            "metavar": "LABEL",
            "help": "participant labels (with or without 'sub-'), or a text file with one label per line",
        },
    ),
    (S, "session_label", "run.session_labels", (), {"nargs": "+", "metavar": "LABEL", "help": "session labels"}),
    (
        S,
        "skip_bids_validation",
        "run.skip_bids_validation",
        (),
        {"action": "store_true", "help": "do not run bids-validator-deno on the input"},
    ),
    (
        S,
        "bids_database_dir",
        "run.bids_database_dir",
        (),
        {"type": Path, "metavar": "DIR", "help": "persist/reuse the pybids index here"},
    ),
    (
        S,
        "derivatives",
        "preprocess.derivatives_dirs",
        ("-d",),
        {
            "nargs": "+",
            "type": Path,
            "metavar": "PATH",
            "help": "already preprocessed inputs: BIDS derivative datasets or a Clinica CAPS",
        },
    ),
    (R, "work_dir", "run.work_dir", ("-w",), {"type": Path, "help": "intermediate files (default: $TMPDIR)"}),
    (R, "nprocs", "run.nprocs", (), {"type": int, "help": "participants processed in parallel"}),
    (R, "omp_nthreads", "run.omp_nthreads", (), {"type": int, "help": "threads per process (ANTs, torch)"}),
    (R, "seed", "run.seed", (), {"type": int, "help": "the one seed: splits, initialisation, sampling, augmentation"}),
    (R, "verbose", "run.verbose", ("-v",), {"action": "count", "help": "more log output (-vv)"}),
    (R, "overwrite", "run.overwrite", (), {"action": "store_true", "help": "redo outputs that already exist"}),
    (
        R,
        "stages",
        "run.stages",
        (),
        {
            "nargs": "+",
            "choices": [s.value for s in GroupStage],
            "help": "group-level stages to run (default: all that apply)",
        },
    ),
    (
        P,
        "template",
        "preprocess.template_path",
        (),
        {
            "type": Path,
            "metavar": "PATH",
            "help": "registration template (default: MNI152 2009a symmetric, 1 mm, shipped by nilearn)",
        },
    ),
    (P, "template_space", "preprocess.template_space", (), {"metavar": "LABEL", "help": "space label of --template"}),
    (
        P,
        "crop_shape",
        "preprocess.crop_shape",
        (),
        {"nargs": 3, "type": int, "metavar": ("X", "Y", "Z"), "help": "crop in template voxels (default 169 208 179)"},
    ),
    (P, "registration", "preprocess.registration", (), {"choices": ["AffineFast", "Affine"]}),
    (
        P,
        "pet_tracer",
        "preprocess.pet_tracers",
        (),
        {"nargs": "+", "metavar": "TRACER", "help": "also process PET with these tracers"},
    ),
    (P, "suvr_reference_mask", "preprocess.suvr_reference_mask", (), {"type": Path, "metavar": "PATH"}),
    (P, "modes", "extraction.modes", (), {"nargs": "+", "choices": [m.value for m in ExtractionMode]}),
    (P, "patch_size", "extraction.patch_size", (), {"type": int, "help": "cubic patch edge in voxels (50)"}),
    (P, "stride", "extraction.stride", (), {"type": int, "help": "patch stride in voxels (50)"}),
    (P, "slice_direction", "extraction.slice_direction", (), {"choices": [d.value for d in SliceDirection]}),
    (P, "discarded_slices", "extraction.discarded_slices", (), {"type": int, "help": "dropped at both ends (20)"}),
    (
        P,
        "roi_mask",
        "extraction.roi_masks",
        (),
        {"nargs": "+", "metavar": "NAME=PATH", "help": "binary masks in template space for roi mode"},
    ),
    (
        P,
        "roi_crop",
        "extraction.roi_crop",
        ("--no-roi-crop",),
        {"action": BoolFlag, "help": "crop regions to their bounding box (default) or keep the full frame"},
    ),
    (P, "normalization", "extraction.normalization", (), {"choices": ["minmax", "zscore", "none"]}),
    (P, "tensor_dtype", "extraction.dtype", (), {"choices": ["float32", "float16"]}),
    (F, "label", "labels.label", (), {"metavar": "COLUMN", "help": "column of participants.tsv or sessions.tsv"}),
    (F, "task", "labels.task", (), {"choices": [t.value for t in Task]}),
    (F, "classes", "labels.classes", (), {"nargs": "+", "metavar": "CLASS", "help": "restrict to these classes"}),
    (F, "baseline_only", "labels.baseline_only", (), {"action": "store_true", "help": "first session only"}),
    (F, "test_size", "split.test_size", (), {"type": float, "help": "test subjects: fraction (<1) or count"}),
    (F, "n_splits", "split.n_splits", (), {"type": int, "help": "k-fold splits (1: one train/validation split)"}),
    (F, "split_file", "split.split_file", (), {"type": Path, "metavar": "TSV", "help": "your own split"}),
    (F, "validation_size", "split.validation_size", (), {"type": float, "help": "validation fraction, 1 split"}),
    (
        F,
        "test_baseline_only",
        "split.test_baseline_only",
        ("--no-test-baseline-only",),
        {"action": BoolFlag, "help": "keep only baseline sessions in the test set (default on)"},
    ),
    (
        F,
        "positive_class",
        "labels.positive_class",
        (),
        {"metavar": "CLASS", "help": "the class sensitivity, specificity, PPV and NPV are computed for"},
    ),
    (F, "balance_p_threshold", "split.balance_p_threshold", (), {"type": float, "help": "age/sex tests p > this"}),
    (F, "max_attempts", "split.max_attempts", (), {"type": int, "help": "bounded number of split draws"}),
    (F, "parent_label", "split.parent_label", (), {"metavar": "COLUMN", "help": "transfer-safe nested split"}),
    (F, "model_name", "train.model_name", (), {"metavar": "NAME", "help": "model folder under OUTPUT_DIR/models/"}),
    (F, "architecture", "train.architecture", (), {"metavar": "NAME", "help": "see --list-architectures"}),
    (F, "mode", "train.mode", (), {"choices": [m.value for m in ExtractionMode], "help": "tensors to train on"}),
    (F, "epochs", "train.epochs", (), {"type": int}),
    (F, "batch_size", "train.batch_size", (), {"type": int}),
    (F, "learning_rate", "train.learning_rate", (), {"type": float}),
    (F, "optimizer", "train.optimizer", (), {"choices": ["adam", "adamw", "sgd"]}),
    (F, "weight_decay", "train.weight_decay", (), {"type": float}),
    (F, "dropout", "train.dropout", (), {"type": float}),
    (F, "accumulation_steps", "train.accumulation_steps", (), {"type": int, "help": "gradient accumulation"}),
    (F, "loss", "train.loss", (), {"help": "regression: mse, l1 or huber (default: the task's)"}),
    (F, "lr_plateau_patience", "train.lr_plateau_patience", (), {"type": int, "help": "ReduceLROnPlateau (0 off)"}),
    (F, "early_stopping_patience", "train.early_stopping_patience", (), {"type": int, "help": "0: off"}),
    (F, "early_stopping_tolerance", "train.early_stopping_tolerance", (), {"type": float}),
    (F, "augmentations", "train.augmentations", (), {"nargs": "+", "metavar": "NAME", "help": "training set only"}),
    (F, "class_weighted_sampling", "train.class_weighted_sampling", (), {"action": "store_true"}),
    (F, "splits", "train.splits", (), {"nargs": "+", "type": int, "metavar": "K", "help": "train only these"}),
    (F, "n_unfrozen_layers", "train.n_unfrozen_layers", (), {"type": int, "help": "transfer: layers trained"}),
    (
        F,
        "selection_metrics",
        "train.selection_metrics",
        (),
        {"nargs": "+", "metavar": "METRIC", "help": "one best model kept per metric"},
    ),
    (F, "resume", "train.resume", (), {"action": "store_true", "help": "continue an interrupted training"}),
    (F, "transfer_from", "train.transfer_from", (), {"type": Path, "metavar": "MAPS"}),
    (
        F,
        "predict_from",
        "predict.predict_from",
        (),
        {"type": Path, "metavar": "OUTPUT_DIR2", "help": "predict another participant-level output"},
    ),
    (F, "group_name", "predict.group_name", (), {"metavar": "NAME", "help": "name of the predicted group"}),
    (F, "allow_leak", "predict.allow_leak", (), {"action": "store_true", "help": "predict despite a leak"}),
    (F, "voting_threshold", "predict.voting_threshold", (), {"type": float, "help": "drop weaker parts"}),
    (F, "n_bootstrap", "predict.n_bootstrap", (), {"type": int, "help": "bootstrap resamples (1000)"}),
    (F, "inverse_mae_voting", "predict.inverse_mae_voting", (), {"action": "store_true"}),
    (
        F,
        "exclude_failed_qc",
        "split.exclude_failed_qc",
        (),
        {"action": "store_true", "help": "leave out images whose participant-level QC failed"},
    ),
    (
        F,
        "interpret_methods",
        "interpret.methods",
        (),
        {
            "nargs": "+",
            "metavar": "METHOD",
            "choices": ["gradients", "grad_cam", "integrated_gradients"],
            "help": "saliency methods for --stages interpret",
        },
    ),
    (
        F,
        "interpret_target",
        "interpret.target",
        (),
        {"choices": ["predicted", "true"], "help": "explain the predicted or the true class"},
    ),
    (F, "interpret_group", "interpret.group_name", (), {"metavar": "NAME", "help": "group to explain (test)"}),
    (F, "interpret_n_steps", "interpret.n_steps", (), {"type": int, "help": "integrated-gradients steps (32)"}),
    (
        F,
        "track",
        "tracking.backend",
        (),
        {"choices": [b.value for b in TrackingBackend], "help": "mirror the group level in a local MLflow store"},
    ),
    (F, "track_dir", "tracking.store_dir", (), {"type": Path, "metavar": "DIR", "help": "default OUTPUT_DIR/mlruns"}),
    (F, "track_experiment", "tracking.experiment", (), {"metavar": "NAME", "help": "MLflow experiment (bids_app)"}),
    (M, "device", "runtime.device", (), {"metavar": "DEVICE", "help": "auto, cpu, cuda or cuda:<index>"}),
    (
        M,
        "amp",
        "runtime.amp",
        (),
        {
            "action": "store_true",
            "help": "automatic mixed precision: float16 with loss scaling on a CUDA GPU; refused "
            "on a CPU, where torch's bfloat16 convolution gradients are wrong (docs/performance.md)",
        },
    ),
    (
        M,
        "channels_last",
        "runtime.channels_last",
        (),
        {"action": "store_true", "help": "channels-last memory format for model and batches (speed only)"},
    ),
    (M, "deterministic", "runtime.deterministic", (), {"action": "store_true", "help": "deterministic algorithms"}),
    (M, "num_workers", "runtime.num_workers", (), {"type": int, "help": "DataLoader worker processes"}),
    (
        M,
        "cache_samples",
        "runtime.cache_samples",
        (),
        {"action": "store_true", "help": "keep samples in memory after their first read (per worker)"},
    ),
    (
        M,
        "inference_batch_size",
        "runtime.inference_batch_size",
        (),
        {"type": int, "metavar": "N", "help": "samples per forward pass when predicting and interpreting"},
    ),
)
CONFIG_KEYS = {dest: key for _, dest, key, _, _ in OPTIONS}
