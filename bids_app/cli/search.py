"""Random hyper-parameter search: seeded trials, one model folder (MAPS) each, ranked on validation only.

``bids_app-search BIDS_DIR OUTPUT_DIR --space space.toml --n-trials N --seed S [--trial K]
[--name NAME] [--config base.toml] [-- group options...]`` samples N trials from a TOML search space and runs
the normal group level (split, train, predict) once per trial, into ``OUTPUT_DIR/models/<name>-trial-<k>/``.
Trial ``k`` is drawn from its own generator seeded by ``(seed, k)``, so it is the same whether trials run one
after the other, as array jobs (``--trial K``), or in a larger search with the same seed. Each trial's
model-folder record and ``logs/<run>/config.toml`` hold its resolved configuration: ``--config`` on that file
re-trains it. ``summarize`` ranks trials on their validation metrics, never on the test set.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bids_app.config import DEFAULT_GROUP_STAGES, SECTIONS, GroupStage, RunConfig, Task
from bids_app.config_file import config_to_nested, merge_nested, resolve_config
from bids_app.derivatives import atomic_write_json, atomic_write_text
from bids_app.errors import BidsAppError, ConfigError, InputMissingError, UsageError

if TYPE_CHECKING:
    from bids_app.maps import Maps

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform", "log_uniform", "int_range", "choice")
# Set by the search itself or by the command line, never sampled.
RESERVED_KEYS = frozenset({"run.bids_dir", "run.output_dir", "run.analysis_level", "train.model_name"})
DEFAULT_RANKING_METRIC = {Task.CLASSIFICATION: "balanced_accuracy", Task.REGRESSION: "mae", Task.RECONSTRUCTION: "mae"}

Trial = dict[str, dict[str, Any]]  # nested configuration overrides, {"train": {"learning_rate": 0.001}}


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One searched configuration key and its distribution.

    Attributes:
        section: ``run`` or a RunConfig section (``train``, ``split``, ...).
        key: the field name in that section.
        kind: ``uniform``, ``log_uniform``, ``int_range`` (bounds inclusive), ``choice``, or ``fixed``.
        values: the bounds ``(low, high)``, the options, or the one fixed value.
    """

    section: str
    key: str
    kind: str
    values: tuple[Any, ...]

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


def _fields(section: str) -> set[str]:
    cls = RunConfig if section == "run" else type(getattr(_dummy_config(), section))
    fields = {f.name for f in dataclasses.fields(cls)}
    return fields - set(SECTIONS) - {"bids_filters"} if section == "run" else fields


def _dummy_config() -> RunConfig:
    return resolve_config({"run": {"bids_dir": "/", "output_dir": "/", "analysis_level": "group"}})


def _parse_parameter(section: str, key: str, spec: Any, where: str) -> Parameter:
    name = f"{section}.{key}"
    if not isinstance(spec, Mapping):
        return Parameter(section, key, "fixed", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(
            f"Search space {where}: '{name}' = {dict(spec)!r} must be one of "
            f"{', '.join(f'{{{d} = [...]}}' for d in DISTRIBUTIONS)}, or a fixed value."
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"Search space {where}: '{name}' {kind} needs a non-empty list, got {values!r}.")
    if kind == "choice":
        return Parameter(section, key, kind, tuple(values))
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if len(values) != 2 or not numeric or not values[0] <= values[1]:
        raise ConfigError(f"Search space {where}: '{name}' {kind} needs [low, high] numbers with low <= high, "
                          f"got {values!r}.")  # fmt: skip
    if kind == "int_range" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"Search space {where}: '{name}' int_range bounds must be integers, got {values!r}.")
    if kind == "log_uniform" and values[0] <= 0:
        raise ConfigError(f"Search space {where}: '{name}' log_uniform needs low > 0, got {values!r}.")
    return Parameter(section, key, kind, (values[0], values[1]))


def parse_space(table: Mapping[str, Any], where: str = "<table>") -> tuple[Parameter, ...]:
    """Check a search-space table against the run configuration and return its parameters, sorted by name.

    Every key must be a field of its RunConfig section, and every value a distribution may produce (bounds,
    options, fixed value) must pass the configuration's own type checks.

    Raises:
        ConfigError: an unknown section or key (named), a malformed distribution, or a value of the wrong type.
    """
    allowed = ("run", *SECTIONS)
    parameters = []
    for section, keys in table.items():
        if section not in allowed or not isinstance(keys, Mapping):
            raise ConfigError(f"Search space {where}: unknown table [{section}]. Known tables: {', '.join(allowed)}.")
        known = _fields(section)
        for key, spec in keys.items():
            if key not in known:
                raise ConfigError(f"Search space {where}: unknown key '{section}.{key}'. "
                                  f"Known keys of [{section}]: {', '.join(sorted(known))}.")  # fmt: skip
            if f"{section}.{key}" in RESERVED_KEYS:
                raise ConfigError(f"Search space {where}: '{section}.{key}' cannot be searched (set by the search "
                                  "or the command line).")  # fmt: skip
            parameters.append(_parse_parameter(section, key, spec, where))
    if not parameters:
        raise ConfigError(
            f"Search space {where} is empty. Add e.g. [train] learning_rate = {{log_uniform = [1e-4, 1e-2]}}."
        )
    dummy = config_to_nested(_dummy_config())
    for parameter in parameters:
        samples = [float(v) for v in parameter.values] if "uniform" in parameter.kind else parameter.values
        for value in samples:
            try:
                resolve_config(merge_nested(dummy, {parameter.section: {parameter.key: value}}))
            except ConfigError as exc:
                raise ConfigError(f"Search space {where}: {exc}") from None
    return tuple(sorted(parameters, key=lambda p: p.name))


def read_space_table(path: Path) -> dict[str, Any]:
    """The raw TOML table of a search space (not yet checked: see ``parse_space``)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputMissingError(f"Search space {path} does not exist. Check the --space path.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Search space {path} is not valid TOML: {exc}. Fix the syntax.") from None


def load_space(path: Path) -> tuple[Parameter, ...]:
    """Read and check a TOML search space (``parse_space``); returns its parameters."""
    return parse_space(read_space_table(path), str(path))


def _sample(parameter: Parameter, rng: np.random.Generator) -> Any:
    low, high = parameter.values[0], parameter.values[-1]
    if parameter.kind == "uniform":
        return float(rng.uniform(low, high))
    if parameter.kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if parameter.kind == "int_range":
        return int(rng.integers(low, high + 1))
    if parameter.kind == "choice":
        return copy.deepcopy(parameter.values[int(rng.integers(len(parameter.values)))])
    return copy.deepcopy(low)


def sample_trials(space: Sequence[Parameter], n_trials: int, seed: int) -> list[Trial]:
    """Draw ``n_trials`` configurations; trial ``k`` depends only on ``(seed, k)`` and the space.

    Returns:
        One nested override per trial, e.g. ``{"train": {"learning_rate": 0.0031, "batch_size": 4}}``.
    """
    if n_trials < 1 or seed < 0:
        raise UsageError(f"Need --n-trials >= 1 and --seed >= 0, got {n_trials} and {seed}.")
    trials = []
    for k in range(n_trials):
        rng = np.random.default_rng([seed, k])
        trial: Trial = {}
        for parameter in sorted(space, key=lambda p: p.name):
            trial.setdefault(parameter.section, {})[parameter.key] = _sample(parameter, rng)
        trials.append(trial)
    return trials


def trial_name(name: str, trial: int) -> str:
    """The model name (MAPS folder under ``models/``) of one trial."""
    return f"{name}-trial-{trial}"


def trial_config(base: RunConfig, overrides: Trial, model_name: str) -> RunConfig:
    """``base`` with a trial's overrides on top and its own model name (re-checked by ``resolve_config``)."""
    nested = merge_nested(config_to_nested(base), overrides)
    nested = merge_nested(nested, {"train": {"model_name": model_name}})
    return resolve_config(nested)


def _flat(trial: Trial) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, keys in trial.items() for key, value in keys.items()}


def write_search_record(output_dir: Path, name: str, space_table: Mapping[str, Any], seed: int, n_trials: int) -> Path:
    """Write ``models/<name>-search.json`` (space, seed, trials); refuse another space or seed under ``name``.

    Array jobs of one search all write the same content (atomically); a record with more trials is kept.
    """
    path = output_dir / "models" / f"{name}-search.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("space") != json.loads(json.dumps(space_table)) or old.get("seed") != seed:
            raise UsageError(f"{path} records another search space or seed under the name '{name}'. "
                             "Choose another --name, or delete that search's files.")  # fmt: skip
        n_trials = max(n_trials, int(old.get("n_trials", 0)))
    trials = sample_trials(parse_space(space_table, str(path)), n_trials, seed)
    record = {
        "name": name,
        "seed": seed,
        "n_trials": n_trials,
        "space": space_table,
        "trials": [{"trial": k, "model_name": trial_name(name, k), "params": _flat(t)} for k, t in enumerate(trials)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return path


def _validation_metric(maps: Maps, split: int, selection: str, metric: str) -> float | None:
    """The validation value of ``metric`` for one split's ``best-<selection>`` model; None when absent."""
    path = maps.layout.metrics_tsv(split, selection, "validation")
    if not path.is_file():
        return None
    table = pd.read_csv(path, sep="\t", dtype={"metric": str}, na_values=["n/a"])
    row = table[table["metric"] == metric]
    return None if row.empty else float(row["value"].iloc[0])


def _trial_is_complete(maps: Maps, expected: Sequence[int], selection: str) -> bool:
    """Whether every expected split finished training (``summary.json``) and, when predict ran, predicted.

    Completeness is read from the model folder, never from a metric value: a validation metric may be n/a (one
    validation participant, one class) for a trial that trained and predicted normally.
    """
    cfg = maps.record.config
    predicts = GroupStage.PREDICT in (cfg.stages or DEFAULT_GROUP_STAGES)
    group = cfg.predict.group_name if cfg.predict.predict_from is not None and cfg.predict.group_name else "test"
    return all(
        maps.layout.summary_json(k).is_file()
        and (not predicts or maps.layout.prediction_tsv(k, selection, group).is_file())
        for k in expected
    )


def summarize(output_dir: Path, name: str, metric: str | None = None) -> pd.DataFrame:
    """Rank the trials of search ``name`` on a validation metric and write ``models/<name>-search_summary.tsv``.

    Only ``split-<k>/best-<selection>/validation/validation_image_level_metrics.tsv`` is read (``selection`` is
    the trial's first selection metric); test-set results never influence the ranking. A trial's status comes
    from its model folder: ``complete`` when every split it trains finished training and predicted, ``partial``
    when some did, ``missing`` otherwise. Only complete trials whose metric is finite on every split are ranked,
    by the mean over splits; a complete trial whose validation metric is n/a on some split (e.g. a validation
    group of one participant) keeps an empty rank, and ``n_splits`` counts the splits with a finite value.

    Args:
        output_dir: the group level's output folder.
        name: the search name (``--name``).
        metric: the ranking metric; default balanced_accuracy (classification) or mae (regression,
            reconstruction). Its direction comes from ``metrics.higher_is_better``.

    Returns:
        One row per trial: ``rank``, ``trial``, ``model_name``, ``status``, ``selection_metric``, ``n_splits``,
        ``validation_<metric>_mean``, ``validation_<metric>_std``, then one column per searched key.
    """
    from bids_app.maps import Maps
    from bids_app.metrics import higher_is_better

    models_dir = output_dir / "models"
    record_path = models_dir / f"{name}-search.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputMissingError(f"No search named '{name}' in {output_dir}: {record_path} is missing.") from None
    rows = []
    for trial in record["trials"]:
        maps_dir = models_dir / trial["model_name"]
        row: dict[str, Any] = {"trial": trial["trial"], "model_name": trial["model_name"], "status": "missing",
                               "selection_metric": None, "rankable": False}  # fmt: skip
        values: list[float] = []
        if Maps.exists(maps_dir):
            trial_maps = Maps.open(maps_dir)
            cfg = trial_maps.record.config
            metric = metric or DEFAULT_RANKING_METRIC[trial_maps.record.task]
            selection = cfg.train.selection_metrics[0]
            expected = cfg.train.splits or tuple(range(cfg.split.n_splits))
            found = [_validation_metric(trial_maps, k, selection, metric) for k in expected]
            values = [v for v in found if v is not None and math.isfinite(v)]
            row["selection_metric"] = selection
            if _trial_is_complete(trial_maps, expected, selection):
                row["status"] = "complete"
                row["rankable"] = len(values) == len(expected)
            elif trial_maps.layout.trained_splits():
                row["status"] = "partial"
        row["n_splits"] = len(values)
        row["mean"] = float(np.mean(values)) if values else math.nan
        row["std"] = float(np.std(values)) if values else math.nan
        rows.append({**row, **trial["params"]})
    metric = metric or "balanced_accuracy"
    table = pd.DataFrame(rows).rename(columns={"mean": f"validation_{metric}_mean", "std": f"validation_{metric}_std"})
    complete = table["status"] == "complete"
    score = table[f"validation_{metric}_mean"].where(complete & table.pop("rankable").astype(bool))
    table["rank"] = score.rank(ascending=not higher_is_better(metric), method="min")
    table = table.sort_values(["rank", "trial"], na_position="last", kind="stable").reset_index(drop=True)
    table = table[["rank", *[c for c in table.columns if c != "rank"]]]
    table["rank"] = table["rank"].astype("Int64")
    summary_path = models_dir / f"{name}-search_summary.tsv"
    atomic_write_text(summary_path, table.to_csv(sep="\t", index=False, na_rep="n/a"))
    log.info("Search '%s': %d/%d trial(s) complete, %d ranked; summary %s", name, int(complete.sum()), len(table),
             int(table["rank"].notna().sum()), summary_path)  # fmt: skip
    return table


def build_parser() -> argparse.ArgumentParser:
    from bids_app.cli.arguments import BidsAppParser

    parser = BidsAppParser(
        prog="bids_app-search",
        description="Random search: run the group level once per sampled trial, rank trials on validation metrics.",
        epilog="Options after '--' are group-level options of bids_app (e.g. -- --label diagnosis --seed 5); "
        "searched keys override them. See docs/random_search.md.",
    )
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path, help="the participant level's output folder")
    parser.add_argument("--space", type=Path, required=True, metavar="FILE", help="TOML search space")
    parser.add_argument("--n-trials", type=int, required=True, metavar="N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trial sampling (not the training seed)")
    parser.add_argument("--trial", type=int, default=None, metavar="K", help="run only trial K (0-based; array jobs)")
    parser.add_argument("--name", default="search", help="trials are models/<name>-trial-<k> (default: search)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="base group-level TOML config")
    parser.add_argument("--metric", default=None, help="ranking metric (default by task)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search (all trials, or ``--trial K``), then write the summary; returns the exit code."""
    from bids_app import levels
    from bids_app.cli.arguments import parse_config
    from bids_app.log_setup import configure_logging
    from bids_app.metrics import higher_is_better

    argv = list(sys.argv[1:] if argv is None else argv)
    own, group_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    configure_logging(0)
    try:
        args = build_parser().parse_args(own)
        base_argv = [str(args.bids_dir), str(args.output_dir), "group", *group_args]
        if args.config is not None:
            base_argv[3:3] = ["--config", str(args.config)]
        base = parse_config(base_argv)
        configure_logging(base.verbose)
        if not args.name or not all(c.isalnum() or c in "-_" for c in args.name):
            raise UsageError(f"--name {args.name!r} must be letters, digits, '-' or '_' (it names folders).")
        if args.trial is not None and not 0 <= args.trial < args.n_trials:
            raise UsageError(f"--trial {args.trial} is outside 0..{args.n_trials - 1} (--n-trials {args.n_trials}).")
        if args.metric is not None:
            higher_is_better(args.metric)  # an unknown ranking metric is refused before any training
        space_table = read_space_table(args.space.resolve())
        trials = sample_trials(parse_space(space_table, str(args.space)), args.n_trials, args.seed)
        configs = {k: trial_config(base, t, trial_name(args.name, k)) for k, t in enumerate(trials)}
        write_search_record(base.output_dir, args.name, space_table, args.seed, args.n_trials)
    except BidsAppError as exc:
        log.error("%s", exc)
        return exc.exit_code
    code = 0
    for k in [args.trial] if args.trial is not None else sorted(configs):
        log.info("Trial %d of search '%s': %s", k, args.name, json.dumps(_flat(trials[k])))
        try:
            trial_code = levels.run(configs[k], [*base_argv, "--model-name", trial_name(args.name, k)])
        except BidsAppError as exc:
            log.error("Trial %d failed: %s", k, exc)
            trial_code = exc.exit_code
        code = code or trial_code
    try:
        summarize(base.output_dir, args.name, args.metric)
    except BidsAppError as exc:
        log.error("%s", exc)
        code = code or exc.exit_code
    return code


if __name__ == "__main__":
    sys.exit(main())
