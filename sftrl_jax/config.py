"""YAML experiment files -> frozen, validated dataclasses, with dotted `key.sub=value` overrides.

    cfg = config.load(SFTConfig, "configs/sft/gp_l_tiny.yaml", ["optim.lr=1e-5", "train.steps=20"])

Rules:
- Override values are parsed as YAML scalars (`yaml.safe_load`), never with `eval`.
- An unknown key is an error that names the closest valid key; a key a section lists in its
  `MOVED_KEYS` class variable (old name -> new dotted key) is an error that names the new key.
- A wrong type is an error naming the key, the value and the expected type.
- Float fields also take strings such as `1e-6` (PyYAML's YAML 1.1 reads `1e-6` as a string).
- A dataclass may validate itself in `__post_init__` by raising `ConfigError`; numbers by
  `check_ranges(self, clip="(0, inf)", gamma="(0, 1]")`, whose error `from_dict` names by the full
  dotted key (`ppo.clip`). Every range is finite: NaN and infinities are refused.
- Configs may `include: other.yaml` (a path relative to the including file); the including file wins.
  An include cycle, a non-string `include`, a folder or a file that is not UTF-8 is an error.
- A key that appears twice in one mapping is an error (YAML would keep the last one silently), and so
  is a document whose aliases expand to more than `MAX_NODES` values (an "alias bomb").
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

from sftrl_jax.errors import UserError

T = TypeVar("T")

_MISSING = object()
MAX_NODES = 100_000  # values of a config once its aliases are expanded; ours have a few hundred


class ConfigError(UserError):
    """A bad config file, key, value or override; the message names it."""


class RangeError(ConfigError):
    """A field's value outside its range. Raised by a section as `PPOConfig.clip must be ...`;
    `from_dict` names it by its dotted key in the file instead: `config key 'ppo.clip' must be ...`."""

    def __init__(self, key: str, value: Any, rule: str, *, owner: str = ""):
        self.key, self.value, self.rule, self.shown = key, value, rule, _short(value)
        where = f"{owner}.{key}" if owner else f"config key {key!r}"
        super().__init__(f"{where} must be {rule}, got {self.shown}")

    def under(self, prefix: str) -> RangeError:
        return RangeError(f"{prefix}{self.key}", self.value, self.rule)


def _short(value: Any, n: int = 40) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit limit on int -> str
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


_INTERVAL = re.compile(r"^([\[(])\s*(-inf|[-+.\de]+)\s*,\s*(inf|[-+.\de]+)\s*([\])])$")


def check_ranges(section: Any, **ranges: str) -> None:
    """Each named field of `section` in its interval, written `"(0, 1]"`, `"[0, inf)"`, `"[1, 4096]"`.

    A float must also be finite (so NaN, which fails every comparison, and +-inf are refused); an
    int field must hold an integer; None (an optional field left unset) passes. Raises `RangeError`
    naming the field, the value and the range in words.
    """
    for name, interval in ranges.items():
        value = getattr(section, name)
        if value is None:
            continue
        integer = _integer_fields(type(section)).get(name)
        try:
            if isinstance(value, tuple | list):  # every item of a sequence field (seeds, buckets)
                for i, item in enumerate(value):
                    check_range(f"{name}[{i}]", item, interval, integer=integer)
            else:
                check_range(name, value, interval, integer=integer)
        except RangeError as e:
            raise RangeError(e.key, e.value, e.rule, owner=type(section).__name__) from None


@functools.cache
def _integer_fields(cls: type) -> dict[str, bool]:
    """field -> whether it holds integers (int, int | None, tuple[int, ...]) rather than floats."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        names = set(re.split(r"[\s|\[\],]+", _type_name(tp)))
        out[name] = "int" in names and "float" not in names
    return out


def check_range(key: str, value: Any, interval: str, *, integer: bool | None = None) -> None:
    """`value` (a number) in `interval` (see `check_ranges`), else `RangeError(key, ...)`; `integer`
    says which the field holds (None: as `value` is), for the message's words."""
    m = _INTERVAL.match(interval)
    if m is None:
        raise ValueError(f"bad interval {interval!r} for {key!r}")
    lo_b, lo, hi, hi_b = m.groups()
    lo_v, hi_v = float(lo), float(hi)
    if integer is None:
        integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    kind = "an integer" if integer else "a finite number"
    if lo_v == -math.inf and hi_v == math.inf:
        rule = kind
    elif hi_v == math.inf:
        rule = f"{kind} {'>' if lo_b == '(' else '>='} {lo}"
    elif lo_v == -math.inf:
        rule = f"{kind} {'<' if hi_b == ')' else '<='} {hi}"
    else:
        rule = f"{kind} in {lo_b}{lo}, {hi}{hi_b}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RangeError(key, value, rule)
    exact = isinstance(value, numbers.Integral)
    v = int(value) if exact else float(value)  # a huge int compares exactly, never overflows
    ok = exact or math.isfinite(v)
    ok = ok and (v > lo_v if lo_b == "(" else v >= lo_v)
    ok = ok and (v < hi_v if hi_b == ")" else v <= hi_v)
    if not ok:
        raise RangeError(key, value, rule)


# ----------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"a.b.c=value"` -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Returns a deep copy of `data` with each `key.sub=value` override set (keys checked later)."""
    out = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part, _MISSING)
            if child is _MISSING or child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"override {text!r}: {where!r} is a value ({child!r}), not a section")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# ----------------------------------------------------------------------------------------------
# Dict -> dataclass


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, prefix: str = "") -> T:
    """Builds the frozen dataclass `cls` from `data`, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    moved = getattr(cls, "MOVED_KEYS", {})
    for key in data:
        if key in fields:
            continue
        full = f"{prefix}{key}"
        if key in moved:
            raise ConfigError(f"config key {full!r} was moved to {moved[key]!r}: set that instead and remove {full!r}")
        valid = [f"{prefix}{name}" for name in fields]
        close = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {full!r}{hint}; valid keys here: {', '.join(valid)}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {prefix}{name!r}")
    try:
        return cls(**kwargs)
    except RangeError as e:
        raise e.under(prefix) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r}: {e}") from None


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _wrong(value: Any, tp: Any, key: str) -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    pass
        raise _wrong(value, tp, key)
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, args))}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise _wrong(value, tp, key)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key {key!r}: expected {len(args)} items, got {len(value)}: {value!r}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong(value, tp, key)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _wrong(value, tp, key)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _wrong(value, tp, key)
    if isinstance(tp, type) and isinstance(value, tp):  # bool, str and other plain types
        return value
    raise _wrong(value, tp, key)


# ----------------------------------------------------------------------------------------------
# Files


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key repeated in one mapping (YAML keeps the last silently:
    a second `train:` section replaced the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges; its keys may be overridden
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(f"key {key!r} appears twice (lines {seen[key]} and {line})")
                    seen[key] = line
                except TypeError:  # an unhashable key: construct_mapping reports it
                    continue
        return super().construct_mapping(node, deep=deep)


def _check_size(data: Any) -> None:
    """Counts the values of `data` as if its aliases were copied, stopping at MAX_NODES: PyYAML shares
    aliased objects, so a 1 KB file can stand for 10**9 values that `merge` and `from_dict` would copy."""
    stack, count = [data], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(
                f"more than {MAX_NODES:,} values once its aliases are expanded (an alias bomb?); "
                "configs need far fewer: write the values out or use fewer aliases"
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _load_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
        _check_size(data)
        return data
    except ConfigError as e:
        raise ConfigError(f"config file {path!r}: {e}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a folder, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path!r} is not valid UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    except RecursionError:
        raise ConfigError(f"config file {path!r}: values nested too deeply") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None


def read_yaml(path: str | os.PathLike, *, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads a YAML mapping, following `include:` (relative to the file); the including file wins."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    real = os.path.realpath(path)
    if real in _chain:
        names = [os.path.basename(p) for p in (*_chain[_chain.index(real) :], real)]
        raise ConfigError(f"config file {path!r} includes itself ({' -> '.join(names)})")
    data = _load_file(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: the top level must be a mapping, got {type(data).__name__}")
    include = data.pop("include", None)
    if include is not None:
        if not isinstance(include, str) or not include:
            raise ConfigError(f"config file {path!r}: 'include' must be a file path (a string), got {include!r:.80}")
        base = read_yaml(os.path.join(os.path.dirname(path), include), _chain=(*_chain, real))
        data = merge(base, data)
    return data


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values in `top` win."""
    out = _deep_copy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = _deep_copy(v)
    return out


def load(cls: type[T], path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> T:
    """Loads `cls` from a YAML file (or defaults when `path` is None), then applies overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{os.fspath(path)}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain dict/list/scalars (tuples become lists), suitable for YAML or JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def replace(cfg: T, overrides: Iterable[str]) -> T:
    """A copy of `cfg` with dotted overrides applied (validated like a file)."""
    return from_dict(type(cfg), apply_overrides(to_dict(cfg), overrides))
