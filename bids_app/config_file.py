"""The TOML configuration file: load with key/type checks, resolve into a RunConfig, dump back.

The resolved configuration is written as TOML into each run's log folder; passing that file to ``--config``
re-runs the same experiment. TOML has no null: an optional value whose default is not ``None`` is written as
the string ``"none"``, and the same spelling is accepted on load. In ``bids_filters`` the string ``"null"``
stands for JSON ``null`` (entity must be absent) and ``"*"`` for any value, as in ``--bids-filter-file``.
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

from bids_app.config import LEGACY_RUNTIME_KEYS, SECTIONS, RunConfig
from bids_app.errors import ConfigError

NONE_SPELLING = "none"


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
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # an entry of a TOML array of tables
        if not isinstance(value, Mapping):
            raise ConfigError(f"Config key '{key}' must be a table, got {value!r}.")
        return build_section(hint, value, key)
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
    allowed = {"run", *SECTIONS, "bids_filters", "cohorts"}
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


def move_legacy_keys(nested: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``nested`` with the runtime keys of bids_app 0.1.0 (``[train] device`` ...) moved to ``[runtime]``.

    A key given in both places is ambiguous and refused.
    """
    moved: dict[str, Any] = {name: dict(values) if isinstance(values, Mapping) else values
                             for name, values in nested.items()}  # fmt: skip
    for (section, key), runtime_key in LEGACY_RUNTIME_KEYS.items():
        values = moved.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        runtime = moved.setdefault("runtime", {})
        if not isinstance(runtime, dict):
            break  # build_section names the malformed table
        if runtime_key in runtime:
            raise ConfigError(
                f"Config key '{section}.{key}' and 'runtime.{runtime_key}' are both set. Keep only "
                f"'runtime.{runtime_key}' ([{section}] {key} is the old spelling)."
            )
        runtime[runtime_key] = values.pop(key)
    return moved


def resolve_config(nested: Mapping[str, Mapping[str, Any]]) -> RunConfig:
    """Build a RunConfig from ``{"run": {...}, "<section>": {...}, "bids_filters": {...}}``."""
    nested = move_legacy_keys(nested)
    run_values = dict(nested.get("run", {}))
    if "bids_filters" in nested:
        run_values["bids_filters"] = _decode_filters(nested["bids_filters"])
    for section in SECTIONS:
        if section in nested:
            run_values[section] = dict(nested[section])
    if "cohorts" in nested:  # [[cohorts]]: an array of tables
        run_values["cohorts"] = nested["cohorts"]
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


def config_to_nested(cfg: RunConfig) -> dict[str, Any]:
    """The inverse of ``resolve_config``: a nested dict ready for TOML (``cohorts`` only when there are some)."""
    nested: dict[str, Any] = {"run": {}}
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
        elif field.name == "cohorts":
            if value:
                nested["cohorts"] = [{f.name: _plain(getattr(c, f.name), None) for f in dataclasses.fields(c)}
                                     for c in value]  # fmt: skip
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
    for cohort in nested.get("cohorts", []):
        lines.append("")
        lines.append("[[cohorts]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in cohort.items())
    return "\n".join(lines) + "\n"
