"""The BIDS-App command line: ``bids_app BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

This module stays light: it imports neither torch nor ants nor pybids, so ``--help`` and ``--version``
answer instantly. It parses arguments into a ``RunConfig`` (defaults ← ``--config`` TOML ← given flags),
configures logging, calls ``levels`` and maps every ``BidsAppError`` to its documented exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from bids_app import read_version
from bids_app.config import (
    AnalysisLevel,
    ExtractionMode,
    GroupStage,
    RunConfig,
    SliceDirection,
    Task,
    load_config_file,
    merge_nested,
    resolve_config,
)
from bids_app.errors import AnalysisLevelError, BidsAppError, ConfigError, InputMissingError, UsageError

log = logging.getLogger("bids_app")

LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")

# Flag destination → dotted config key. Flags absent from the command line leave the key untouched.
FLAG_KEYS: dict[str, str] = {
    "participant_label": "run.participant_labels",
    "session_label": "run.session_labels",
    "skip_bids_validation": "run.skip_bids_validation",
    "bids_database_dir": "run.bids_database_dir",
    "work_dir": "run.work_dir",
    "nprocs": "run.nprocs",
    "omp_nthreads": "run.omp_nthreads",
    "seed": "run.seed",
    "verbose": "run.verbose",
    "overwrite": "run.overwrite",
    "stages": "run.stages",
    "template": "preprocess.template_path",
    "template_space": "preprocess.template_space",
    "crop_shape": "preprocess.crop_shape",
    "registration": "preprocess.registration",
    "derivatives": "preprocess.derivatives_dirs",
    "pet_tracer": "preprocess.pet_tracers",
    "suvr_reference_mask": "preprocess.suvr_reference_mask",
    "modes": "extraction.modes",
    "patch_size": "extraction.patch_size",
    "stride": "extraction.stride",
    "slice_direction": "extraction.slice_direction",
    "discarded_slices": "extraction.discarded_slices",
    "roi_mask": "extraction.roi_masks",
    "roi_crop": "extraction.roi_crop",
    "normalization": "extraction.normalization",
    "tensor_dtype": "extraction.dtype",
    "label": "labels.label",
    "task": "labels.task",
    "classes": "labels.classes",
    "baseline_only": "labels.baseline_only",
    "test_size": "split.test_size",
    "n_splits": "split.n_splits",
    "split_file": "split.split_file",
    "validation_size": "split.validation_size",
    "test_baseline_only": "split.test_baseline_only",
    "balance_p_threshold": "split.balance_p_threshold",
    "max_attempts": "split.max_attempts",
    "parent_label": "split.parent_label",
    "model_name": "train.model_name",
    "architecture": "train.architecture",
    "mode": "train.mode",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate",
    "optimizer": "train.optimizer",
    "weight_decay": "train.weight_decay",
    "dropout": "train.dropout",
    "accumulation_steps": "train.accumulation_steps",
    "loss": "train.loss",
    "lr_plateau_patience": "train.lr_plateau_patience",
    "early_stopping_patience": "train.early_stopping_patience",
    "early_stopping_tolerance": "train.early_stopping_tolerance",
    "augmentations": "train.augmentations",
    "class_weighted_sampling": "train.class_weighted_sampling",
    "splits": "train.splits",
    "n_unfrozen_layers": "train.n_unfrozen_layers",
    "selection_metrics": "train.selection_metrics",
    "device": "train.device",
    "amp": "train.amp",
    "deterministic": "train.deterministic",
    "resume": "train.resume",
    "transfer_from": "train.transfer_from",
    "num_workers": "train.num_workers",
    "predict_from": "predict.predict_from",
    "group_name": "predict.group_name",
    "allow_leak": "predict.allow_leak",
    "voting_threshold": "predict.voting_threshold",
    "n_bootstrap": "predict.n_bootstrap",
    "inverse_mae_voting": "predict.inverse_mae_voting",
}


class BidsAppParser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; BEP027 wants 64 (EX_USAGE)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message}\n")


def _add_aliased(group: Any, name: str, **kwargs: Any) -> None:
    """Add ``--kebab-name`` with the BIDS-App underscore spelling as an alias."""
    flags = [f"--{name.replace('_', '-')}"]
    if "_" in name:
        flags.append(f"--{name}")
    group.add_argument(*flags, dest=name, default=argparse.SUPPRESS, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = BidsAppParser(
        prog="bids_app",
        description="Reproducible, leak-proof deep learning on BIDS neuroimaging data (a BIDS App).",
        epilog="Exit codes: 0 ok, 1 failure, 16 BIDS validation, 17 unknown level, 18 filters selected nothing, "
        "64 usage, 65 data error, 66 missing input, 73 cannot create output, 74 I/O error, 75 temporary failure. "
        "See docs/cli.md.",
    )
    parser.add_argument("bids_dir", type=Path, help="the root of the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="the output folder (a BIDS derivative dataset)")
    parser.add_argument(
        "analysis_level", help="'participant' (preprocess + extract) or 'group' (split, train, predict)"
    )
    parser.add_argument("--version", action="version", version=f"bids_app {read_version()}")

    sel = parser.add_argument_group("input selection")
    _add_aliased(
        sel,
        "participant_label",
        nargs="+",
        metavar="LABEL",
        help="participant labels (with or without 'sub-'), or a text file with one label per line",
    )
    _add_aliased(sel, "session_label", nargs="+", metavar="LABEL", help="session labels (with or without 'ses-')")
    _add_aliased(
        sel,
        "bids_filter_file",
        type=Path,
        metavar="FILE",
        help='JSON of pybids filters per input kind, e.g. {"t1w": {"acquisition": "mprage"}}',
    )
    _add_aliased(sel, "skip_bids_validation", action="store_true", help="do not run bids-validator-deno on the input")
    _add_aliased(sel, "bids_database_dir", type=Path, metavar="DIR", help="persist/reuse the pybids index here")
    sel.add_argument(
        "-d",
        "--derivatives",
        nargs="+",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="already preprocessed inputs: BIDS derivative datasets or a Clinica CAPS",
    )

    run = parser.add_argument_group("run control")
    run.add_argument(
        "-w",
        "--work-dir",
        "--work_dir",
        dest="work_dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="folder for intermediate files (default: a temporary folder)",
    )
    _add_aliased(run, "nprocs", type=int, help="participants processed in parallel")
    _add_aliased(run, "omp_nthreads", type=int, help="threads per process (ANTs, torch)")
    _add_aliased(run, "seed", type=int, help="the one seed for splits, initialisation, sampling, augmentation")
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML configuration; command-line flags override it",
    )
    run.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output (-vv)")
    _add_aliased(run, "overwrite", action="store_true", help="redo work whose outputs already exist")
    _add_aliased(
        run,
        "stages",
        nargs="+",
        choices=[s.value for s in GroupStage],
        help="group-level stages to run (default: all that apply)",
    )

    pre = parser.add_argument_group("participant level: preprocessing and extraction")
    _add_aliased(
        pre,
        "template",
        type=Path,
        metavar="PATH",
        help="registration template (default: MNI152 2009a symmetric, 1 mm, from nilearn)",
    )
    _add_aliased(pre, "template_space", metavar="LABEL", help="space label of --template (BIDS 'space-' entity)")
    _add_aliased(pre, "crop_shape", nargs=3, type=int, metavar=("X", "Y", "Z"), help="crop in template voxels")
    _add_aliased(pre, "registration", choices=["AffineFast", "Affine"], help="ANTs affine flavour")
    _add_aliased(pre, "pet_tracer", nargs="+", metavar="TRACER", help="also process PET with these tracers")
    _add_aliased(pre, "suvr_reference_mask", type=Path, metavar="PATH", help="SUVR reference region mask")
    _add_aliased(pre, "modes", nargs="+", choices=[m.value for m in ExtractionMode], help="extraction modes")
    _add_aliased(pre, "patch_size", type=int, help="cubic patch edge in voxels (default 50)")
    _add_aliased(pre, "stride", type=int, help="patch stride in voxels (default 50)")
    _add_aliased(pre, "slice_direction", choices=[d.value for d in SliceDirection], help="default sagittal")
    _add_aliased(pre, "discarded_slices", type=int, help="slices dropped at both ends (default 20)")
    _add_aliased(pre, "roi_mask", nargs="+", metavar="NAME=PATH", help="binary masks in template space for roi mode")
    pre.add_argument(
        "--roi-crop",
        "--no-roi-crop",
        dest="roi_crop",
        action=_BoolFlag,
        default=argparse.SUPPRESS,
        help="crop regions to their bounding box (default) or keep the full frame",
    )
    _add_aliased(pre, "normalization", choices=["minmax", "zscore", "none"], help="per-image intensity normalisation")
    _add_aliased(pre, "tensor_dtype", choices=["float32", "float16"], help="storage type of tensors")

    grp = parser.add_argument_group("group level: labels, splits, training, prediction")
    _add_aliased(grp, "label", metavar="COLUMN", help="label column of participants.tsv or sessions.tsv")
    _add_aliased(grp, "task", choices=[t.value for t in Task], help="learning task")
    _add_aliased(grp, "classes", nargs="+", metavar="CLASS", help="restrict to these classes")
    _add_aliased(grp, "baseline_only", action="store_true", help="use only the first session of each subject")
    _add_aliased(grp, "test_size", type=float, help="held-out test subjects: fraction (<1) or count")
    _add_aliased(grp, "n_splits", type=int, help="k-fold splits (1: a single train/validation split)")
    _add_aliased(grp, "split_file", type=Path, metavar="TSV", help="use your own subject-level split")
    _add_aliased(grp, "validation_size", type=float, help="validation fraction when --n-splits 1")
    grp.add_argument(
        "--test-baseline-only",
        "--no-test-baseline-only",
        dest="test_baseline_only",
        action=_BoolFlag,
        default=argparse.SUPPRESS,
        help="keep only baseline sessions in the test set (default on)",
    )
    _add_aliased(grp, "balance_p_threshold", type=float, help="age/sex balance tests must exceed this p (0.2)")
    _add_aliased(grp, "max_attempts", type=int, help="bounded number of split draws (1000)")
    _add_aliased(grp, "parent_label", metavar="COLUMN", help="transfer-safe nested split against this parent label")
    _add_aliased(grp, "model_name", metavar="NAME", help="model folder name under OUTPUT_DIR/models/")
    _add_aliased(grp, "architecture", metavar="NAME", help="network architecture (see docs/models.md)")
    _add_aliased(grp, "mode", choices=[m.value for m in ExtractionMode], help="tensors to train on")
    _add_aliased(grp, "epochs", type=int)
    _add_aliased(grp, "batch_size", type=int)
    _add_aliased(grp, "learning_rate", type=float)
    _add_aliased(grp, "optimizer", choices=["adam", "adamw", "sgd"])
    _add_aliased(grp, "weight_decay", type=float)
    _add_aliased(grp, "dropout", type=float)
    _add_aliased(grp, "accumulation_steps", type=int, help="gradient accumulation steps")
    _add_aliased(grp, "loss", help="regression: mse, l1 or huber (default: the task's)")
    _add_aliased(grp, "lr_plateau_patience", type=int, help="ReduceLROnPlateau patience (0: off)")
    _add_aliased(grp, "early_stopping_patience", type=int, help="epochs without improvement (0: off)")
    _add_aliased(grp, "early_stopping_tolerance", type=float)
    _add_aliased(grp, "augmentations", nargs="+", metavar="NAME", help="training-set augmentations")
    _add_aliased(grp, "class_weighted_sampling", action="store_true", help="sample classes evenly")
    _add_aliased(grp, "splits", nargs="+", type=int, metavar="K", help="train only these splits")
    _add_aliased(grp, "n_unfrozen_layers", type=int, help="transfer learning: layers left trainable")
    _add_aliased(grp, "selection_metrics", nargs="+", metavar="METRIC", help="one best model kept per metric")
    _add_aliased(grp, "device", choices=["auto", "cpu", "cuda"])
    _add_aliased(grp, "amp", action="store_true", help="automatic mixed precision")
    _add_aliased(grp, "deterministic", action="store_true", help="deterministic algorithms only")
    _add_aliased(grp, "resume", action="store_true", help="continue an interrupted training")
    _add_aliased(grp, "transfer_from", type=Path, metavar="MAPS", help="initialise from another model folder")
    _add_aliased(grp, "num_workers", type=int, help="DataLoader worker processes")
    _add_aliased(grp, "predict_from", type=Path, metavar="OUTPUT_DIR2", help="predict another participant-level output")
    _add_aliased(grp, "group_name", metavar="NAME", help="name of the predicted group")
    _add_aliased(grp, "allow_leak", action="store_true", help="predict despite a detected leak (recorded)")
    _add_aliased(grp, "voting_threshold", type=float, help="drop parts whose validation weight is below this")
    _add_aliased(grp, "n_bootstrap", type=int, help="bootstrap resamples for metric intervals (1000)")
    _add_aliased(grp, "inverse_mae_voting", action="store_true", help="regression: weight parts by 1/validation MAE")
    return parser


class _BoolFlag(argparse.Action):
    """``--x`` sets True, ``--no-x`` sets False."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


def parse_labels(values: Sequence[str], prefix: str, what: str) -> tuple[str, ...]:
    """Bare, de-duplicated labels from CLI values; a value naming an existing file is read line by line."""
    raw: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_file():
            raw.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        else:
            raw.append(value.strip())
    labels: list[str] = []
    for item in raw:
        if not item or item.startswith("#"):
            continue
        label = item[len(prefix) :] if item.startswith(prefix) else item
        if not LABEL_RE.match(label):
            raise UsageError(
                f"Invalid {what} label {item!r}: BIDS labels are alphanumeric only (no '/', '.', '_', '-'). "
                f"Pass e.g. '{prefix}01' or '01'."
            )
        if label not in labels:
            labels.append(label)
    return tuple(labels)


def _parse_roi_masks(values: Sequence[str]) -> list[list[str]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UsageError(
                f"--roi-mask expects NAME=PATH, got {value!r}. Example: --roi-mask hippocampus=mask.nii.gz"
            )
        if not LABEL_RE.match(name):
            raise UsageError(f"ROI name {name!r} must be alphanumeric (it becomes part of file names).")
        pairs.append([name, str(Path(path).resolve())])
    return pairs


def _read_filter_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputMissingError(f"BIDS filter file {path} does not exist. Check the --bids-filter-file path.") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"BIDS filter file {path} is not valid JSON: {exc}. Fix the file.") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(
            f"BIDS filter file {path} must map input kinds to entity filters, e.g. "
            '{"t1w": {"acquisition": "mprage"}}; got ' + json.dumps(data)[:200]
        )
    return data


def _flags_to_nested(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    given = vars(args)
    for dest, key in FLAG_KEYS.items():
        if dest not in given:
            continue
        value = given[dest]
        if dest == "participant_label":
            value = list(parse_labels(value, "sub-", "participant"))
        elif dest == "session_label":
            value = list(parse_labels(value, "ses-", "session"))
        elif dest == "roi_mask":
            value = _parse_roi_masks(value)
        elif isinstance(value, Path):
            value = str(value.resolve())
        elif isinstance(value, list) and value and isinstance(value[0], Path):
            value = [str(v.resolve()) for v in value]
        section, _, field = key.partition(".")
        nested.setdefault(section, {})[field] = value
    return nested


def _check_paths(bids_dir: Path, output_dir: Path) -> None:
    if output_dir == bids_dir:
        raise UsageError(
            f"OUTPUT_DIR must differ from BIDS_DIR ({bids_dir}); use e.g. {bids_dir / 'derivatives' / 'bids_app'}."
        )
    if output_dir.is_relative_to(bids_dir) and not output_dir.is_relative_to(bids_dir / "derivatives"):
        raise UsageError(
            f"OUTPUT_DIR {output_dir} is inside BIDS_DIR {bids_dir} but not under derivatives/; "
            f"use e.g. {bids_dir / 'derivatives' / 'bids_app'}."
        )


def parse_config(argv: Sequence[str]) -> RunConfig:
    """Parse ``argv`` into the resolved RunConfig (raises BidsAppError subclasses, or exits for --help)."""
    args = build_parser().parse_args(argv)
    try:
        level = AnalysisLevel(args.analysis_level)
    except ValueError:
        raise AnalysisLevelError(
            f"Unknown analysis level {args.analysis_level!r}. Use 'participant' or 'group'."
        ) from None
    bids_dir = args.bids_dir.resolve()
    output_dir = args.output_dir.resolve()
    _check_paths(bids_dir, output_dir)
    file_values: dict[str, Any] = load_config_file(args.config.resolve()) if args.config else {}
    flags = _flags_to_nested(args)
    nested = merge_nested(file_values, flags)
    nested.setdefault("run", {})
    nested["run"] = {
        **nested["run"],
        "bids_dir": str(bids_dir),
        "output_dir": str(output_dir),
        "analysis_level": level.value,
    }
    if "bids_filter_file" in vars(args):
        nested["bids_filters"] = _read_filter_file(args.bids_filter_file)
    return resolve_config(nested)


def configure_logging(verbose: int) -> None:
    """Console logging for the whole ``bids_app`` logger tree; per-run files are added by provenance."""
    level = logging.WARNING if verbose < 0 else (logging.INFO if verbose == 0 else logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("bids_app")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(0)
    try:
        cfg = parse_config(argv)
        configure_logging(cfg.verbose)
        from bids_app import levels  # heavy imports start here, never for --help/--version

        return levels.run(cfg, argv)
    except BidsAppError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("Interrupted; completed outputs are kept, partial files were not renamed into place.")
        return 130
