"""Generic config I/O, apart from the schema in ``comkd.config`` (nothing here knows a config key):
type checks against annotations, merging mappings into dataclasses, validation, YAML, ``--set``."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message names the dotted key."""


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (coercing strings from the command line)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []  # a union has a member other than None: the first one's error is raised
        for a in args:
            if a is not type(None):
                try:
                    return coerce(value, a, key)
                except ConfigError as e:
                    errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):  # a section inside a list (distill.extra_teachers)
        return value if isinstance(value, tp) else _merge_section(tp(), value, key)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value not in allowed:
            raise ConfigError(
                f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}"
            )
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {getattr(tp, '__name__', tp)}")


def merge(obj: Any, updates: dict, prefix: str = "", aliases: dict[str, str] | None = None) -> None:
    """Set the dataclass tree ``obj`` from the nested mapping ``updates``, checking every key and
    value; ``aliases`` maps earlier spellings of ``obj``'s own keys to the current ones."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if aliases:
        updates = {aliases.get(k, k): v for k, v in updates.items()}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise ConfigError(f"unknown config key '{key}'; allowed keys here: {', '.join(sorted(fields))}")
        current = getattr(obj, k)
        if fields[k].metadata.get("none_is_a_value") and isinstance(v, str) and v.strip().lower() == "none":
            setattr(obj, k, "none")
        elif dataclasses.is_dataclass(current):
            _merge_section(current, v, key)
        else:
            setattr(obj, k, coerce(v, hints[k], key))


def _merge_section(section: Any, value: Any, key: str) -> Any:
    """``merge`` the mapping ``value`` into the dataclass ``section`` (the config key ``key``); returns it."""
    if not isinstance(value, dict):
        raise ConfigError(
            f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(section))}"
        )
    merge(section, value, key + ".")
    return section


def flat_keys(tree: dict, prefix: str = "", aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (an empty mapping is a leaf); top-level keys under
    their one spelling when ``aliases`` (earlier name -> name) is given."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        k = (aliases or {}).get(k, k) if not prefix else k
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def validate_tree(obj: Any, prefix: str = "") -> None:
    """Validate a merged dataclass tree once, each section by its own ``validate(prefix)``, so a
    later layer can fix what an earlier one set."""
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            validate_tree(v, f"{prefix}{f.name}.")
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if dataclasses.is_dataclass(item):
                    validate_tree(item, f"{prefix}{f.name}[{i}].")


_FLOAT32_MAX = 3.4028234663852886e38


def positive_finite(value: float | None, key: str, allow_zero: bool = False) -> None:
    """A learning rate, weight or scale: finite, within float32 and > 0 (>= 0 with ``allow_zero``)."""
    if value is None:
        return
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ConfigError(f"{key}: must be a finite number within float32's range, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>=' if allow_zero else '>'} 0, got {value!r}")


def at_least(value: float | None, lo: int, key: str, note: str = "") -> None:
    """A count or a duration of at least ``lo`` (None: unset, passes; NaN is refused); ``note``
    follows the bound in the message (what ``lo`` or null means there)."""
    if value is not None and not value >= lo:
        raise ConfigError(f"{key}: must be >= {lo}{note}, got {value}")


def read_yaml_mapping(p: Path) -> dict:
    """A YAML file whose top level is a mapping; a one-line ConfigError naming the file (and the
    line and column of a syntax error) otherwise."""
    try:
        with open(p) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data


def flag(
    default: Any, *, help: str, name: str | None = None, old: str | None = None, none: bool = False
) -> Any:
    """A config field a command may expose as ``--<name>`` (default: the field's name, dashed), with
    ``help`` (the command line adds the dotted key); ``old``: the earlier plural name of its
    repeated form (``run --seeds``); ``none``: the word ``none`` is a value of its own
    (``pretrained: none``: random weights on purpose), not YAML's null (the key left unset)."""
    meta = {"help": help, "flag": name, "old": old, "none_is_a_value": none}
    return dataclasses.field(default=default, metadata=meta)


def nest(flat: dict[str, Any]) -> dict:
    """``{"distill.optim.lr": 0.01}`` -> ``{"distill": {"optim": {"lr": 0.01}}}``: the one helper
    from dotted keys to config layers (``--set``, the command line's flags)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["distill.optim.lr=0.01", "seed=2"]`` → nested dict (values parsed as YAML scalars)."""
    flat: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at column {mark.column + 1}" if mark is not None else ""
            why = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({why}{where})") from None
        flat[key.strip()] = value
    return nest(flat)
