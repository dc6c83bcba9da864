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
)
from bids_app.config_file import load_config_file, merge_nested, resolve_config
from bids_app.errors import AnalysisLevelError, BidsAppError, ConfigError, InputMissingError, UsageError

log = logging.getLogger("bids_app")

LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


class BidsAppParser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; BEP027 wants 64 (EX_USAGE)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message}\n")


class _BoolFlag(argparse.Action):
    """``--x`` sets True, ``--no-x`` sets False."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


P, F = "participant level: preprocessing and extraction", "group level: labels, splits, training, prediction"
S, R = "input selection", "run control"
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
        {"action": _BoolFlag, "help": "crop regions to their bounding box (default) or keep the full frame"},
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
        {"action": _BoolFlag, "help": "keep only baseline sessions in the test set (default on)"},
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
    (F, "device", "train.device", (), {"choices": ["auto", "cpu", "cuda"]}),
    (F, "amp", "train.amp", (), {"action": "store_true", "help": "automatic mixed precision"}),
    (F, "deterministic", "train.deterministic", (), {"action": "store_true", "help": "deterministic algorithms"}),
    (F, "resume", "train.resume", (), {"action": "store_true", "help": "continue an interrupted training"}),
    (F, "transfer_from", "train.transfer_from", (), {"type": Path, "metavar": "MAPS"}),
    (F, "num_workers", "train.num_workers", (), {"type": int, "help": "DataLoader worker processes"}),
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
        {"nargs": "+", "metavar": "METHOD", "help": "saliency methods for --stages interpret"},
    ),
    (
        F,
        "interpret_target",
        "interpret.target",
        (),
        {"choices": ["predicted", "true"], "help": "explain the predicted or the true class"},
    ),
    (F, "interpret_group", "interpret.group_name", (), {"metavar": "NAME", "help": "group to explain (test)"}),
)
CONFIG_KEYS = {dest: key for _, dest, key, _, _ in OPTIONS}


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
    parser.add_argument("analysis_level", help="'participant' (preprocess, extract) or 'group' (split, train, predict)")
    parser.add_argument("--version", action="version", version=f"bids_app {read_version()}")
    parser.add_argument("--list-architectures", action=_ListArchitectures, help="list model architectures and exit")
    groups = {title: parser.add_argument_group(title) for title in (S, R, P, F)}
    groups[S].add_argument(
        "--bids-filter-file",
        "--bids_filter_file",
        dest="bids_filter_file",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help='JSON of pybids filters per input kind, e.g. {"t1w": {"acquisition": "mprage"}}',
    )
    groups[R].add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="TOML configuration; command-line flags override it"
    )
    for title, dest, _, extra, kwargs in OPTIONS:
        flags = [f"--{dest.replace('_', '-')}"] + ([f"--{dest}"] if "_" in dest else [])
        groups[title].add_argument(*extra, *flags, dest=dest, default=argparse.SUPPRESS, **kwargs)
    return parser


class _ListArchitectures(argparse.Action):
    """``--list-architectures`` prints the model registry and exits (imports torch, only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        from bids_app.models import list_architectures

        for info in list_architectures():
            dims = "/".join(f"{d}D" for d in info.dims)
            tasks = ", ".join(t.value for t in info.tasks)
            print(f"{info.name:<18} {dims:<6} {tasks:<45} {info.description}")
        parser.exit(0)


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
    for dest, key in CONFIG_KEYS.items():
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
