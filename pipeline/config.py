"""Typed configuration sections: dataclasses filled from YAML/JSON dictionaries.

Unknown keys are rejected with the key's full path (``model.descriptor.rcutt``); values are
checked against the field's type; keys starting with ``_`` are comments (DeePMD-kit's
``_comment``) and ignored. Options that DeePMD-kit has but dpelt does not implement are
accepted only at their default value (see ``NOT_IMPLEMENTED`` metadata on a field), so a
DeePMD-kit input never silently gives a different model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError

#: field metadata key: the only accepted value of an option dpelt does not implement
NOT_IMPLEMENTED = "dpelt_not_implemented"
#: field metadata key: other accepted spellings of the key
ALIASES = "dpelt_aliases"


def load_mapping(path: str | os.PathLike) -> dict:
    """Read a YAML or JSON file into a dictionary (error names the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("file not found", path=path)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse: {exc}", path=path) from None
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping, got {type(data).__name__}", path=path)
    return data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append((arg, exc))
        for arg, exc in errors:  # a mapping meant as a section: its own error names the inner key
            if isinstance(value, Mapping) and dataclasses.is_dataclass(arg):
                raise exc
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", path=source, key=key)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"expected null, got {value!r}", path=source, key=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", path=source, key=key)
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{k}]", source) for k, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", path=source, key=key)
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {value!r}", path=source, key=key)
        return parse_dataclass(tp, value, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", path=source, key=key)


def parse_dataclass(cls: type, data: Mapping[str, Any] | None, key_path: str, source: str | None = None):
    """Build dataclass ``cls`` from ``data``; ``key_path`` prefixes keys in error messages."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {a: f.name for f in fields.values() for a in f.metadata.get(ALIASES, ())}
    kwargs = {}
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"keys must be strings, got {raw_key!r}", path=source, key=key_path)
        if raw_key.startswith("_"):
            continue
        name = aliases.get(raw_key, raw_key)
        key = f"{key_path}.{raw_key}" if key_path else raw_key
        if name not in fields:
            known = ", ".join(sorted(k for k in fields if not k.startswith("_")))
            raise ConfigError(f"unknown key (known keys: {known})", path=source, key=key)
        field = fields[name]
        if NOT_IMPLEMENTED in field.metadata:
            allowed = field.metadata[NOT_IMPLEMENTED]
            if value != allowed and not (isinstance(allowed, (list, tuple)) and list(value or []) == list(allowed)):
                raise ConfigError(
                    f"dpelt does not implement this option; only {allowed!r} is accepted, got {value!r}",
                    path=source,
                    key=key,
                )
        kwargs[name] = _coerce(value, hints[name], key, source)
    for f in fields.values():
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            key = f"{key_path}.{f.name}" if key_path else f.name
            raise ConfigError("required key is missing", path=source, key=key)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(key_path, source)
    return obj


def unsupported(default: Any, *, aliases: tuple[str, ...] = ()) -> Any:
    """A field for a DeePMD-kit option that dpelt accepts only at its default value."""
    meta = {NOT_IMPLEMENTED: default}
    if aliases:
        meta[ALIASES] = aliases
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list tree (tuples as lists), for JSON/YAML and model files."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
