"""The one typed TOML loader of nanosil: TOML tables become the very dataclasses their consumers take.

Both configurations (active learning, :mod:`al_manager.learning.config`; campaigns,
:mod:`al_manager.campaign.config`) are read with :func:`build`: unknown keys are refused with a suggestion,
every value is checked against the field's type annotation before any work starts (``int``, ``float``,
``bool``, ``str``, ``Path``, ``list[...]``, ``tuple[...]``, ``Literal[...]``, ``X | None``), and then the
dataclass's own ``__post_init__`` checks run; their messages start with the field name and are reported
under ``section.field``. Every problem is one :class:`ConfigError` line naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ConfigError", "Where", "read_toml", "build", "convert", "check_keys", "suggest", "type_name",
           "table_of", "temperatures"]

NONE_WORDS = ("none", "off")   # TOML has no null: an optional value is switched off with "none"


class ConfigError(ValueError):
    """A bad configuration: one line naming the file and the key."""


class Where:
    """The file a configuration came from; ``fail(key, problem)`` raises the one-line error."""

    def __init__(self, source: Path | str | None):
        self.source = source

    def fail(self, key: str, problem: str) -> typing.NoReturn:
        where = str(self.source) if self.source is not None else "configuration"
        raise ConfigError(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


def read_toml(path: str | Path, what: str = "configuration file") -> dict:
    """The parsed TOML document; a missing file or bad TOML is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def check_keys(table: dict, known, prefix: str, where: Where) -> None:
    for key in table:
        if key not in known:
            where.fail(f"{prefix}{key}", f"unknown key{suggest(key, known)}; known here: {', '.join(known)}")


def temperatures(value, key: str, where: Where) -> list[float]:
    """A non-empty list of distinct positive temperatures (K)."""
    temps = convert(value, list[float], key, where)
    if not temps:
        where.fail(key, "needs at least one temperature (K)")
    for k, t in enumerate(temps):
        if not t > 0:
            where.fail(f"{key}[{k}]", f"{t:g} K: temperatures must be > 0 K")
    if len(set(temps)) != len(temps):
        where.fail(key, f"repeated temperature in {temps}")
    return temps


def table_of(data: dict, name: str, where: Where) -> dict:
    """``data[name]`` as a table (empty when absent)."""
    table = data.get(name, {})
    if not isinstance(table, dict):
        where.fail(name, f"must be a table ([{name}]), got {type_name(table)}")
    return table


def build(cls, table: dict, section: str, where: Where, exclude: tuple[str, ...] = (), **fixed):
    """A dataclass ``cls`` from a TOML table: unknown keys and wrong types refused, then the class's own
    checks (``__post_init__``). ``exclude``: fields the table may not set (set elsewhere); ``fixed``:
    values given by the caller (e.g. resolved paths)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in exclude and f.name not in fixed]
    prefix = f"{section}." if section else ""
    for key in table:
        if key in exclude:
            where.fail(f"{prefix}{key}", "is not set here (see the documentation of this section)")
    check_keys(table, names, prefix, where)
    kwargs = {key: convert(value, hints[key], f"{prefix}{key}", where) for key, value in table.items()}
    kwargs.update(fixed)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        m = re.match(r"^([A-Za-z_]\w*)(\[\d+\])?", message)
        if m and m.group(1) in names:
            rest = message[m.end():].lstrip(" :") or message
            where.fail(f"{prefix}{m.group(1)}{m.group(2) or ''}", rest)
        where.fail(section, message)


def convert(value, tp, key: str, where: Where):
    """``value`` (from TOML) as type ``tp``; ints are accepted for floats, nothing else is coerced."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):
        args = typing.get_args(tp)
        if type(None) in args and isinstance(value, str) and value.strip().lower() in NONE_WORDS:
            return None
        errors = []
        for option in [a for a in args if a is not type(None)]:
            try:
                return convert(value, option, key, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            where.fail(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{suggest(value, choices)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            where.fail(key, f"must be true or false, got {type_name(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            where.fail(key, f"must be an integer, got {type_name(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            where.fail(key, f"must be a number, got {type_name(value)} {value!r}")
        if not math.isfinite(value):
            where.fail(key, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            where.fail(key, f"must be a string, got {type_name(value)} {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            where.fail(key, f"must be a list, got {type_name(value)} {value!r}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [typing.Any]
        items = [convert(v, args[0], f"{key}[{k}]", where) for k, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            where.fail(key, f"must be a table, got {type_name(value)} {value!r}")
        return dict(value)
    if tp is Path:
        text = convert(value, str, key, where)
        if not text.strip():
            where.fail(key, "must be a path, got an empty string")
        return Path(text).expanduser()
    return value  # typing.Any
