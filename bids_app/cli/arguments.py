"""The BIDS-App arguments: ``BIDS_DIR OUTPUT_DIR {participant,group} [options]`` → a resolved ``RunConfig``.

The parser is built from ``options.OPTIONS``; ``parse_config`` resolves defaults ← ``--config`` TOML ← given
flags and refuses any output path inside BIDS_DIR. This module stays light (no torch, ants, pybids, nibabel or
pandas) because ``--help`` and ``--version`` go through it; ``cli`` and ``search`` build their runs from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from bids_app import read_version
from bids_app.cli.options import (
    ALLOWED_NAMES,
    CONFIG_KEYS,
    DEFAULT_TEXT,
    GROUP_TITLES,
    OPTIONS,
    SELECTION_METRIC_NAMES,
)
from bids_app.config import DEFAULT_GROUP_STAGES, AnalysisLevel, RunConfig, check_config_values
from bids_app.config_file import load_config_file, merge_nested, move_legacy_keys, resolve_config
from bids_app.errors import AnalysisLevelError, ConfigError, InputMissingError, UsageError

LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
TEMPLATE_LABEL_RE = re.compile(r"^tpl-([A-Za-z0-9]+)_")
# Defaults that an empty value stands for.
EMPTY_MEANS: dict[str, Any] = {"stages": DEFAULT_GROUP_STAGES}


class BidsAppParser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; BEP027 wants 64 (EX_USAGE)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message}\n")


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
    groups = {title: parser.add_argument_group(title) for title in GROUP_TITLES}
    S, R = GROUP_TITLES[0], GROUP_TITLES[1]
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
        kwargs = {**kwargs, "help": option_help(dest, kwargs.get("help", ""))}
        groups[title].add_argument(*extra, *flags, dest=dest, default=argparse.SUPPRESS, **kwargs)
    return parser


def config_default(dest: str) -> Any:
    """The configuration default of option ``dest``, read from the config dataclasses (``CONFIG_KEYS``)."""
    section, _, name = CONFIG_KEYS[dest].partition(".")
    if section == "run":
        owner: Any = RunConfig
    else:
        (field,) = [f for f in dataclasses.fields(RunConfig) if f.name == section]
        owner = field.default_factory()  # type: ignore[operator]
    (field,) = [f for f in dataclasses.fields(owner) if f.name == name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[operator]


def format_default(value: Any) -> str:
    """A default as a user types it: ``0.0001``, ``image patch slice``, ``on``/``off``, ``none``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return " ".join(format_default(v) for v in value) if value else "none"
    return str(value)


def default_text(dest: str) -> str:
    """What option ``dest`` is when not given: ``DEFAULT_TEXT`` for a None or empty default, else its value."""
    value = config_default(dest)
    if value is None or value == ():
        value = EMPTY_MEANS.get(dest, value)
    if (value is None or value == ()) and dest in DEFAULT_TEXT:
        return DEFAULT_TEXT[dest]
    return format_default(value)


def option_help(dest: str, text: str) -> str:
    """``text`` plus the allowed names and the default of option ``dest`` (escaped for argparse's % format)."""
    parts = [text] if text else []
    if dest in ALLOWED_NAMES:
        parts.append(f"one or more of: {', '.join(ALLOWED_NAMES[dest])}")
    if dest == "selection_metrics":
        parts.append("by task: " + "; ".join(f"{task.value}: {', '.join(names)}"
                                              for task, names in SELECTION_METRIC_NAMES.items()))  # fmt: skip
    if dest == "architecture":
        parts[-1] = parts[-1].replace("one or more of", "one of")
    return (", ".join(parts) + f" (default: {default_text(dest)})").replace("%", "%%")


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


def _parse_cohort(value: str) -> dict[str, str]:
    """``--cohort NAME=BIDS_DIR[:OUTPUT_DIR]`` as a ``[[cohorts]]`` table (OUTPUT_DIR: BIDS_DIR/derivatives/...)."""
    name, sep, paths = value.partition("=")
    bids_dir, _, output_dir = paths.partition(":")
    if not sep or not name or not bids_dir:
        raise UsageError(
            f"--cohort expects NAME=BIDS_DIR[:OUTPUT_DIR], got {value!r}. Example: --cohort adni=/data/adni:/out/adni"
        )
    bids_path = Path(bids_dir).resolve()
    output_path = Path(output_dir).resolve() if output_dir else bids_path / "derivatives" / "bids_app"
    return {"name": name, "bids_dir": str(bids_path), "output_dir": str(output_path)}


def _resolve_cohort_paths(table: Any) -> Any:
    """A ``[[cohorts]]`` table with absolute paths and its default ``output_dir`` (others are left to the checks)."""
    if not isinstance(table, dict) or not isinstance(table.get("bids_dir"), str):
        return table
    bids_path = Path(table["bids_dir"]).resolve()
    output_dir = table.get("output_dir", str(bids_path / "derivatives" / "bids_app"))
    return {**table, "bids_dir": str(bids_path),
            "output_dir": str(Path(output_dir).resolve()) if isinstance(output_dir, str) else output_dir}  # fmt: skip


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
        elif dest == "cohort":
            value = [_parse_cohort(item) for item in value]
        elif isinstance(value, Path):
            value = str(value.resolve())
        elif isinstance(value, list) and value and isinstance(value[0], Path):
            value = [str(v.resolve()) for v in value]
        section, _, field = key.partition(".")
        nested.setdefault(section, {})[field] = value
    return nested


def _check_writable_path(bids_dir: Path, path: Path, what: str) -> None:
    """Nothing is ever written into BIDS_DIR, except under its derivatives/ folder."""
    if path == bids_dir or (path.is_relative_to(bids_dir) and not path.is_relative_to(bids_dir / "derivatives")):
        raise UsageError(
            f"{what} {path} is BIDS_DIR {bids_dir} or inside it (not under derivatives/); bids_app never writes "
            f"into the input dataset. Use e.g. {bids_dir / 'derivatives' / 'bids_app'}."
        )


def _with_template_space(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the space of a ``--template`` whose space was not given, read from its ``tpl-<label>_`` name.

    Raises:
        UsageError: a template whose file name gives no space label (its outputs would carry a wrong space-).
    """
    template = cfg.preprocess.template_path
    if template is None:
        return cfg
    match = TEMPLATE_LABEL_RE.match(template.name)
    if match is None:
        raise UsageError(
            f"--template {template} has no space label: its outputs would be named space-"
            f"{cfg.preprocess.template_space} although the image may be in another space. Pass --template-space "
            "LABEL (e.g. --template-space MNI152NLin2009cAsym), set preprocess.template_space in --config, or name "
            "the file tpl-<label>_T1w.nii.gz."
        )
    space = match.group(1)
    return dataclasses.replace(cfg, preprocess=dataclasses.replace(cfg.preprocess, template_space=space))


def _with_model_settings(nested: dict[str, Any], level: AnalysisLevel) -> dict[str, Any]:
    """``--from-model``: the participant-level options completed from the model folder (``data.origin``)."""
    maps_dir = Path(nested["run"]["from_model"]).resolve()
    if level is not AnalysisLevel.PARTICIPANT:
        raise UsageError(
            f"--from-model {maps_dir} prepares data at the participant level. At the group level, predict with "
            "--stages predict --predict-from OUTPUT_DIR (the model folder decides mode and labels)."
        )
    if not maps_dir.is_dir():
        raise InputMissingError(f"--from-model {maps_dir} does not exist. Give the model folder (models/<name>).")
    from bids_app.data.origin import model_participant_config  # reads the model folder: pandas, not at --help

    return model_participant_config({**nested, "run": {**nested["run"], "from_model": str(maps_dir)}}, maps_dir)


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
    _check_writable_path(bids_dir, output_dir, "OUTPUT_DIR")
    # Old spellings in the file are moved first, so a flag (always the new spelling) overrides them.
    file_values: dict[str, Any] = move_legacy_keys(load_config_file(args.config.resolve())) if args.config else {}
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
    if "cohorts" in nested.get("run", {}):  # --cohort flags replace a config file's [[cohorts]]
        nested["cohorts"] = nested["run"].pop("cohorts")
    if isinstance(nested.get("cohorts"), list):
        nested["cohorts"] = [_resolve_cohort_paths(c) for c in nested["cohorts"]]
    if nested["run"].get("from_model"):
        nested = _with_model_settings(nested, level)
    cfg = resolve_config(nested)
    if "template_space" not in nested.get("preprocess", {}):
        cfg = _with_template_space(cfg)
    for path, what in (
        (cfg.work_dir, "--work-dir"),
        (cfg.bids_database_dir, "--bids-database-dir"),
        (cfg.tracking.store_dir, "--track-dir"),
    ):
        if path is not None:
            _check_writable_path(bids_dir, path.resolve(), what)
    check_config_values(cfg)
    return cfg
