"""Strict conversion between JSON-like dicts and typed dataclass trees.

Every error names the full dotted key: an unknown key lists the allowed ones, a wrong type says
what was expected and what was given. Only the types the config tree uses are supported, and an
unsupported annotation is a programming error, raised as such.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp) or tp is dict:
        return "object"
    return getattr(tp, "__name__", str(tp))


def _given(value: Any) -> str:
    name = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)
    return f"{name} ({json.dumps(value) if not isinstance(value, (list, dict)) else '...'})"


def _wrong(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {_given(value)}")


def convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a JSON value to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _wrong(key, tp, value)
        return from_dict(tp, value, prefix=key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(
                f"config key '{key}': {json.dumps(value)} is not allowed; "
                f"allowed: {', '.join(json.dumps(a) for a in allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _wrong(key, tp, value)
        for arm in args:
            if arm is type(None):
                continue
            try:
                return convert(value, arm, key)
            except ConfigError:
                continue
        raise _wrong(key, tp, value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong(key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(key, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _wrong(key, tp, value)
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _wrong(key, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _wrong(key, tp, value)
        return tuple(convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _wrong(key, tp, value)
        (arg,) = typing.get_args(tp)
        return [convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:  # a free-form JSON object, passed on as it is (deepspeed.extra)
        if not isinstance(value, dict):
            raise _wrong(key, tp, value)
        return json.loads(json.dumps(value))
    raise TypeError(f"unsupported config annotation {tp!r} at '{key}'")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys, wrong types and bad values raise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{where}'; allowed keys"
                          f"{' in ' + repr(prefix) if prefix else ''}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{key}' is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # __post_init__ validation: prefix with where it happened
        first = str(e).split(" ", 1)[0]
        if first in fields:  # the message is about one field: name its dotted key
            raise ConfigError(f"config key '{prefix + '.' if prefix else ''}{first}': {e}") from None
        raise ConfigError(f"config section '{prefix or '<root>'}': {e}") from None


SECRET = "secret"  # the field metadata key that marks a field as a secret (see `secret_field`)


def secret_field(default: str = "") -> Any:
    """A dataclass field holding a secret (a storage key): loaded like any other field, but never
    part of `to_dict` (so never written down, shown or compared) nor of the dataclass's repr."""
    return dataclasses.field(default=default, repr=False, metadata={SECRET: True})


def _public(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _public(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get(SECRET)}
    if isinstance(obj, (list, tuple)):
        return [_public(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items()}
    return obj


def to_dict(obj: Any) -> dict:
    """The dataclass tree as JSON-ready dicts (tuples become lists), without its secret fields:
    all that may be written down (the run's config.json, checkpoints, Ray's records) and that
    makes a run's identity. `secrets_of` gives the rest."""
    return json.loads(json.dumps(_public(obj)))


def secrets_of(obj: Any) -> dict:
    """The secret fields of the dataclass tree, nested as in `to_dict` ({} when it has none):
    `with_secrets(to_dict(obj), secrets_of(obj))` loads back to obj."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get(SECRET):
            out[f.name] = value
        elif dataclasses.is_dataclass(value):
            inner = secrets_of(value)
            if inner:
                out[f.name] = inner
    return out


def with_secrets(data: dict, secrets: dict) -> dict:
    """A copy of the JSON-like `data` with the nested `secrets` (from `secrets_of`) put back."""
    out = json.loads(json.dumps(data))
    for key, value in secrets.items():
        out[key] = with_secrets(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def redacted(obj: Any) -> dict:
    """`to_dict(obj)` with its secret fields put back, each shown as "<redacted>" when set ("" when
    not): what may be shown of the whole tree (train's --print-config)."""
    def mask(tree: dict) -> dict:
        return {k: mask(v) if isinstance(v, dict) else ("<redacted>" if v else v) for k, v in tree.items()}
    return with_secrets(to_dict(obj), mask(secrets_of(obj)))


def settable_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every key that `parse_override` accepts in dataclass `cls`, in the tree's order: (dotted key,
    its type, its default as JSON). An optional section's keys are listed with the section's
    defaults, which it takes when one of its keys is set."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = prefix + f.name, hints[f.name]
        section = _section(tp)
        if dataclasses.is_dataclass(section):
            rows += [(k, t, d + (f" ({key}: null by default)" if section is not tp else ""))
                     for k, t, d in settable_keys(section, key + ".")]
            continue
        if f.default is not dataclasses.MISSING:
            default = json.dumps(_public(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            default = json.dumps(_public(f.default_factory()))
        else:
            default = "(required)"
        rows.append((key, _type_name(tp) + (", secret" if f.metadata.get(SECRET) else ""), default))
    return rows


def key_table(cls: type) -> str:
    """`settable_keys(cls)` as aligned text lines: KEY  TYPE  DEFAULT."""
    rows = [("KEY", "TYPE", "DEFAULT")] + settable_keys(cls)
    kw, tw = (max(len(r[i]) for r in rows) for i in (0, 1))
    return "\n".join(f"{k:<{kw}}  {t:<{tw}}  {d}".rstrip() for k, t, d in rows)


def _section(tp: Any) -> Any:
    """The dataclass inside an optional section (`Section | None`), else tp itself."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]):
            return arms[0]
    return tp


def _field_type(cls: type, path: list[str], full: str) -> Any:
    tp: Any = cls
    for i, part in enumerate(path):
        tp = _section(tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key '{full}': '{'.'.join(path[:i])}' has no sub-keys")
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        if part not in names:
            where = ".".join(path[: i + 1])
            raise ConfigError(f"unknown config key '{where}'; allowed keys: {', '.join(names)}")
        tp = typing.get_type_hints(tp)[part]
    return tp


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return False


def parse_override(cls: type, assignment: str) -> tuple[list[str], Any]:
    """Parse `a.b=value` into (["a", "b"], JSON value typed for field a.b of `cls`).

    Values are JSON (numbers, true/false, null, lists); a field that takes a string also takes the
    bare text, so `--set train.name=run1` works without quotes.
    """
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like key.path=value")
    key, raw = assignment.split("=", 1)
    path = key.strip().split(".")
    tp = _field_type(cls, path, key)
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"override '{key}' names a section; set one of its keys instead")
    try:
        value = json.loads(raw)
        if _accepts_str(tp) and not isinstance(value, str) and not raw.strip().startswith('"'):
            # A bare `name=123` for a string field means the text "123", unless a non-string arm
            # of the type takes the parsed value.
            try:
                convert(value, tp, key)
            except ConfigError:
                value = raw
    except json.JSONDecodeError:
        if not _accepts_str(tp):
            raise ConfigError(f"override '{key}': cannot parse {raw!r} as {_type_name(tp)}") from None
        value = raw
    convert(value, tp, key)  # type errors surface here, named by the key
    return path, value


def apply_overrides(cls: type, data: dict, assignments: list[str]) -> dict:
    """Return a copy of `data` with each `a.b=value` assignment applied."""
    out = json.loads(json.dumps(data))
    for assignment in assignments:
        path, value = parse_override(cls, assignment)
        node = out
        for part in path[:-1]:
            if node.get(part) is None:  # an absent or null (optional) section: start it empty
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out
