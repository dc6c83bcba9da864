"""The command-line options: one table of (group, dest, config key, extra flags, argparse keywords).

Each option declares the configuration key it sets, so the parser and the flag → config mapping cannot drift
apart. Kept apart from ``cli`` so the table reads as documentation of every flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bids_app.config import CONTRASTS, ExtractionMode, GroupStage, SliceDirection, Task, TrackingBackend


class BoolFlag(argparse.Action):
    """``--x`` sets True, ``--no-x`` sets False."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


# Names users type, kept here (no torch, numpy or scipy) so that --help can list them; tests/cli/test_help.py
# checks them against the real registries (models.list_architectures, data.augment, metrics.metric_names,
# interpret.saliency.SaliencyMethod).
ARCHITECTURE_NAMES = ("conv3_fc3_3mm", "conv4_fc3", "conv4_fc3_2mm", "conv5_fc3", "conv_autoencoder", "resnet3d",
                      "small_autoencoder", "small_cnn")  # fmt: skip
AUGMENTATION_NAMES = ("affine", "elastic", "flip", "motion", "ghosting", "spike", "bias_field", "blur", "gamma",
                      "intensity_scaling", "gaussian_noise")  # fmt: skip
INTERPRET_METHOD_NAMES = ("gradients", "grad_cam", "integrated_gradients")
KIND_NAMES = ("T1w", "T2w", "FLAIR", "pet-<tracer>", "a --custom-map name")  # bids_app.kinds.parse_kind
SELECTION_METRIC_NAMES = {
    Task.CLASSIFICATION: ("loss", "balanced_accuracy", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1",
                          "mcc", "roc_auc"),
    Task.REGRESSION: ("loss", "mae", "rmse", "r2"),
    Task.RECONSTRUCTION: ("loss", "mae", "rmse", "psnr", "ssim"),
}  # fmt: skip

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
    (R, "work_dir", "run.work_dir", ("-w",), {"type": Path, "help": "intermediate files"}),
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
            "help": "group-level stages to run",
        },
    ),
    (
        P,
        "from_model",
        "run.from_model",
        (),
        {
            "type": Path,
            "metavar": "MAPS",
            "help": "prepare the data like this model folder's training data: its template, crop, mode and mode "
            "parameters, normalisation and ROI masks are used; options given too must agree with it",
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
            "help": "registration template; give its space with --template-space unless its file name starts with "
            "tpl-<label>_ (the space is then <label>)",
        },
    ),
    (
        P,
        "template_space",
        "preprocess.template_space",
        (),
        {"metavar": "LABEL", "help": "space label of --template (the space- entity of the outputs)"},
    ),
    (
        P,
        "crop_shape",
        "preprocess.crop_shape",
        (),
        {"nargs": 3, "type": int, "metavar": ("X", "Y", "Z"), "help": "crop in template voxels"},
    ),
    (
        P,
        "registration",
        "preprocess.registration",
        (),
        {"choices": ["AffineFast", "Affine"], "help": "ANTs affine registration"},
    ),
    (
        P,
        "pet_tracer",
        "preprocess.pet_tracers",
        (),
        {"nargs": "+", "metavar": "TRACER", "help": "also process PET with these tracers"},
    ),
    (
        P,
        "contrasts",
        "preprocess.contrasts",
        (),
        {
            "nargs": "+",
            "choices": list(CONTRASTS),
            "help": "also process these raw contrasts, each registered to the session's T1w",
        },
    ),
    (
        P,
        "custom_map",
        "preprocess.custom_maps",
        (),
        {
            "action": "extend",
            "nargs": "+",
            "metavar": "NAME=ENTITY:VALUE[,ENTITY:VALUE...]",
            "help": "also extract template-space maps of the -d folders, selected by entities (e.g. gm=suffix:probseg,"
            "label:GM,space:MNI152NLin2009cAsym); NAME (a lower-case letter, then letters/digits) names the kind "
            "and its files; several values or a repeated flag",
        },
    ),
    (
        P,
        "suvr_reference_mask",
        "preprocess.suvr_reference_mask",
        (),
        {"type": Path, "metavar": "PATH", "help": "binary SUVR reference-region mask in template space"},
    ),
    (
        P,
        "modes",
        "extraction.modes",
        (),
        {"nargs": "+", "choices": [m.value for m in ExtractionMode], "help": "tensors to extract"},
    ),
    (P, "patch_size", "extraction.patch_size", (), {"type": int, "help": "cubic patch edge in voxels"}),
    (P, "stride", "extraction.stride", (), {"type": int, "help": "patch stride in voxels"}),
    (
        P,
        "slice_direction",
        "extraction.slice_direction",
        (),
        {"choices": [d.value for d in SliceDirection], "help": "axis orthogonal to the slices"},
    ),
    (P, "discarded_slices", "extraction.discarded_slices", (), {"type": int, "help": "slices dropped at both ends"}),
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
        {"action": BoolFlag, "help": "crop regions to their bounding box, or keep the full frame (--no-roi-crop)"},
    ),
    (
        P,
        "normalization",
        "extraction.normalization",
        (),
        {"choices": ["minmax", "zscore", "none"], "help": "per-image intensity normalisation"},
    ),
    (P, "tensor_dtype", "extraction.dtype", (), {"choices": ["float32", "float16"], "help": "tensor type"}),
    (
        P,
        "image_voxel_size",
        "extraction.image_voxel_size",
        (),
        {
            "type": float,
            "metavar": "MM",
            "help": "image mode only: resample image tensors to this isotropic voxel size (mm, >= the template's; "
            "Gaussian anti-aliasing), e.g. 2 or 3 for a CPU",
        },
    ),
    (F, "label", "labels.label", (), {"metavar": "COLUMN", "help": "column of participants.tsv or sessions.tsv"}),
    (F, "task", "labels.task", (), {"choices": [t.value for t in Task], "help": "what the model predicts"}),
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
        {
            "action": BoolFlag,
            "help": "keep only baseline sessions in the test set, or every session (--no-test-baseline-only)",
        },
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
    (
        F,
        "cohort",
        "run.cohorts",
        (),
        {
            "action": "extend",
            "nargs": "+",
            "metavar": "NAME=BIDS_DIR[:OUTPUT_DIR]",
            "help": "also train on other cohorts: their labels from BIDS_DIR, their tensors from OUTPUT_DIR "
            "(default BIDS_DIR/derivatives/bids_app); several values or a repeated flag; docs/cohorts.md",
        },
    ),
    (F, "cohort_name", "run.cohort_name", (), {"metavar": "NAME", "help": "the cohort name of BIDS_DIR/OUTPUT_DIR"}),
    (
        F,
        "leave_cohort_out",
        "split.leave_cohort_out",
        (),
        {"metavar": "NAME", "help": "test on this whole cohort; train and validate on the others"},
    ),
    (F, "model_name", "train.model_name", (), {"metavar": "NAME", "help": "model folder under OUTPUT_DIR/models/"}),
    (
        F,
        "architecture",
        "train.architecture",
        (),
        {"metavar": "NAME", "help": "network; --list-architectures describes each"},
    ),
    (F, "mode", "train.mode", (), {"choices": [m.value for m in ExtractionMode], "help": "tensors to train on"}),
    (
        F,
        "channels",
        "train.channels",
        (),
        {
            "nargs": "+",
            "metavar": "KIND",
            "help": "image kinds to train on, stacked as the channels of one sample in this order; a session "
            "lacking one is listed in the model folder's excluded_sessions.tsv and left out",
        },
    ),
    (F, "epochs", "train.epochs", (), {"type": int, "help": "maximum training epochs"}),
    (F, "batch_size", "train.batch_size", (), {"type": int, "help": "samples per training batch"}),
    (F, "learning_rate", "train.learning_rate", (), {"type": float, "help": "optimiser learning rate"}),
    (F, "optimizer", "train.optimizer", (), {"choices": ["adam", "adamw", "sgd"], "help": "optimiser"}),
    (F, "weight_decay", "train.weight_decay", (), {"type": float, "help": "L2 penalty"}),
    (F, "dropout", "train.dropout", (), {"type": float, "help": "dropout probability"}),
    (F, "accumulation_steps", "train.accumulation_steps", (), {"type": int, "help": "gradient accumulation"}),
    (F, "loss", "train.loss", (), {"help": "regression: mse, l1 or huber"}),
    (F, "lr_plateau_patience", "train.lr_plateau_patience", (), {"type": int, "help": "ReduceLROnPlateau (0 off)"}),
    (F, "early_stopping_patience", "train.early_stopping_patience", (), {"type": int, "help": "0: off"}),
    (
        F,
        "early_stopping_tolerance",
        "train.early_stopping_tolerance",
        (),
        {"type": float, "help": "smallest improvement that resets early stopping"},
    ),
    (
        F,
        "augmentations",
        "train.augmentations",
        (),
        {
            "nargs": "+",
            "metavar": "NAME",
            "help": "training set only, seeded per sample, applied in the order listed; "
            "parameters and cost in docs/cli.md",
        },
    ),
    (
        F,
        "class_weighted_sampling",
        "train.class_weighted_sampling",
        (),
        {"action": "store_true", "help": "sample training examples inversely to their class frequency"},
    ),
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
    (
        F,
        "linear_baseline",
        "train.linear_baseline",
        ("--no-linear-baseline", "--no-baseline"),
        {
            "action": BoolFlag,
            "help": "also fit a linear model (logistic regression or ridge) on the same tensors and splits and "
            "report its metrics beside the network's, or not (--no-baseline); never for reconstruction",
        },
    ),
    (
        F,
        "transfer_from",
        "train.transfer_from",
        (),
        {"type": Path, "metavar": "MAPS", "help": "initialise from another model folder"},
    ),
    (
        F,
        "predict_from",
        "predict.predict_from",
        (),
        {"type": Path, "metavar": "OUTPUT_DIR2", "help": "predict another participant-level output"},
    ),
    (F, "group_name", "predict.group_name", (), {"metavar": "NAME", "help": "name of the predicted group"}),
    (
        F,
        "model",
        "predict.model",
        (),
        {
            "type": Path,
            "metavar": "FILE_OR_DIR",
            "help": "predict OUTPUT_DIR's images with a portable model (bids_app-model export), after its leak guard",
        },
    ),
    (
        F,
        "allow_leak",
        "predict.allow_leak",
        (),
        {
            "action": "store_true",
            "help": "predict despite a leak, and split cohorts despite an anatomical match across them (recorded)",
        },
    ),
    (F, "voting_threshold", "predict.voting_threshold", (), {"type": float, "help": "drop weaker parts"}),
    (F, "n_bootstrap", "predict.n_bootstrap", (), {"type": int, "help": "bootstrap resamples"}),
    (
        F,
        "inverse_mae_voting",
        "predict.inverse_mae_voting",
        (),
        {"action": "store_true", "help": "regression: weight parts by 1 / validation MAE"},
    ),
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
            "choices": INTERPRET_METHOD_NAMES,
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
    (F, "interpret_group", "interpret.group_name", (), {"metavar": "NAME", "help": "group to explain"}),
    (F, "interpret_n_steps", "interpret.n_steps", (), {"type": int, "help": "integrated-gradients steps"}),
    (
        F,
        "track",
        "tracking.backend",
        (),
        {"choices": [b.value for b in TrackingBackend], "help": "mirror the group level in a local MLflow store"},
    ),
    (F, "track_dir", "tracking.store_dir", (), {"type": Path, "metavar": "DIR", "help": "MLflow file store"}),
    (F, "track_experiment", "tracking.experiment", (), {"metavar": "NAME", "help": "MLflow experiment"}),
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
        ("--no-channels-last",),
        {
            "action": BoolFlag,
            "help": "channels-last memory format for model and batches, the faster one on CPU (same results to "
            "float rounding), or the default contiguous layout (--no-channels-last)",
        },
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
# What a default of None or an empty list means, where "none" would not say it; every other default is read
# from the config dataclasses (bids_app/config.py) when the parser is built.
DEFAULT_TEXT = {
    "participant_label": "every participant",
    "session_label": "every session",
    "bids_database_dir": "a fresh index per run",
    "derivatives": "none: preprocess from BIDS_DIR",
    "work_dir": "$TMPDIR",
    "from_model": "none: the options given",
    "template": "MNI152 2009a symmetric, 1 mm, shipped by nilearn",
    "crop_shape": "none: the template frame",
    "image_voxel_size": "none: the template grid",
    "pet_tracer": "none: T1w only",
    "contrasts": "none: T1w only",
    "custom_map": "none",
    "suvr_reference_mask": "none: the whole brain",
    "classes": "every class present",
    "split_file": "none: a seeded split",
    "cohort": "none: one cohort, BIDS_DIR and OUTPUT_DIR",
    "cohort_name": "primary",
    "leave_cohort_out": "none: test participants drawn from every cohort",
    "positive_class": "the second class in sorted order",
    "loss": "the task's: cross_entropy for classification, mse otherwise",
    "splits": "every split",
    "n_unfrozen_layers": "all: fine-tune everything",
    "transfer_from": "none: random initialisation",
    "predict_from": "none: predict the test split",
    "group_name": "none: the test split",
    "model": "none: the model folder --model-name names",
    "track_dir": "OUTPUT_DIR/mlruns",
}
# Allowed names listed in the help of options whose values argparse does not check (or hides behind a metavar).
ALLOWED_NAMES = {
    "architecture": ARCHITECTURE_NAMES,
    "augmentations": AUGMENTATION_NAMES,
    "interpret_methods": INTERPRET_METHOD_NAMES,
    "channels": KIND_NAMES,
}
