"""Dataclasses that are also command lines: each setting's default, help, choices and bounds are
stated once, in its field (:func:`setting`), and the argparse parser (:func:`add_arguments`) and the
range check (:func:`first_error`) are generated from the fields.

A field's type says what its flag is: ``bool`` a switch (``--x``), ``Optional[bool]`` a tri-state
(``--x/--no-x``, None: decided later), ``int``/``float``/``str`` (or ``Optional`` of them) a value.

Not transformers' ``HfArgumentParser`` (which TRL's configs use): it makes one argument group per
dataclass, has no mutually exclusive flags, adds ``--no-x`` only to fields whose default is True (the
tri-states above default to None), hands every metadata key to ``add_argument`` (so bounds cannot
live in the metadata), adds ``--x_y`` spellings beside ``--x-y``, and importing it loads
transformers, which ``--help`` must not wait for (tests/test_cli.py).

This module imports nothing of the package: every config module may import it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import typing
from dataclasses import MISSING
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

# "-1e-3", "-.5", "-inf": values, not flags (argparse's own pattern only knows "-1" and "-1.5")
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reads negative numbers in scientific notation as values, so that
    ``--lr -1e-3`` reaches the range check instead of failing as "expected one argument"."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self._negative_number_matcher = NEGATIVE_NUMBER


@dataclasses.dataclass(frozen=True)
class Bound:
    """The numbers a setting accepts: finite, at least ``low`` (above it when ``strict``), below ``high``."""
    low: float
    strict: bool = False
    high: Optional[float] = None
    high_text: str = ""  # how ``high`` reads in messages ("2^32"), when not as a number
    why: str = ""  # said after the bound: what a boundary value means ("0: no clipping")

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a finite number"
        if self.high is not None:
            text = f"{kind} in [{self.low:g}, {self.high_text or format(self.high, 'g')})"
        else:
            text = f"{kind} {'>' if self.strict else '>='} {self.low:g}"
        return f"{text} ({self.why})" if self.why else text

    def valid(self, value, integer: bool) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if integer and not float(value).is_integer():
            return False
        return (value > self.low if self.strict else value >= self.low) and (self.high is None or value < self.high)


def setting(default: Any = MISSING, help: Optional[str] = None, *, default_factory: Any = MISSING,
            group: Optional[str] = None, choices: Optional[Sequence] = None, low: Optional[float] = None,
            strict: bool = False, high: Optional[float] = None, high_text: str = "", why: str = "",
            metavar: Optional[str] = None, exclusive: Optional[str] = None, path: bool = False,
            flag: bool = True) -> Any:
    """A dataclass field that is one setting: its default (none: a required flag), ``help``, the
    ``group`` its flag is listed under in ``--help``, ``choices``, the bounds of a number (``low``,
    ``strict``, ``high``; ``why`` is said with them), ``metavar``, ``exclusive``: the name of a set
    of flags of which one may be given, ``path``: a value that must not be empty, ``flag``: False
    for a setting that is no flag (set in Python only)."""
    bound = None if low is None else Bound(low, strict, high, high_text, why)
    metadata = {"help": help, "group": group, "choices": None if choices is None else tuple(choices), "bound": bound,
                "metavar": metavar, "exclusive": exclusive, "path": path, "flag": flag}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def like(cls: type, name: str, default: Any = MISSING, **metadata) -> Any:
    """The field ``name`` of dataclass ``cls`` (its default, help, bounds, ...) for another
    dataclass, with the ``default`` and ``metadata`` keys given here changed: settings two
    configs share are stated once."""
    source = {f.name: f for f in dataclasses.fields(cls)}[name]
    unknown = set(metadata) - set(source.metadata)
    if unknown:
        raise TypeError(f"like({cls.__name__}, {name!r}): unknown metadata {sorted(unknown)}")
    if default is MISSING and source.default_factory is not MISSING:
        return dataclasses.field(default_factory=source.default_factory, metadata={**source.metadata, **metadata})
    return dataclasses.field(default=source.default if default is MISSING else default,
                             metadata={**source.metadata, **metadata})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates every annotation of the class: once


def value_type(cls: type, name: str) -> Tuple[type, bool]:
    """``(type, optional)`` of field ``name``: ``Optional[int]`` is ``(int, True)``."""
    hint = _hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return args[0], True
    return hint, False


def flag_fields(cls: type) -> list:
    """The fields of ``cls`` that are command-line flags, in order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", False)]


def _argument(cls: type, f: dataclasses.Field) -> Dict[str, Any]:
    """``add_argument``'s keywords for field ``f``."""
    kind, optional = value_type(cls, f.name)
    kw: Dict[str, Any] = {"help": f.metadata["help"]}
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction if optional else "store_true"
    else:
        kw["type"] = kind
        for key in ("choices", "metavar"):
            if f.metadata[key] is not None:
                kw[key] = f.metadata[key]
    if f.default is MISSING and f.default_factory is MISSING:
        kw["required"] = True
    else:
        kw["default"] = f.default if f.default_factory is MISSING else f.default_factory()
    return kw


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """One flag per field of ``cls`` (``--x-y`` for ``x_y``), in field order, under its group."""
    groups: Dict[Optional[str], Any] = {None: parser}
    exclusive: Dict[Tuple[Optional[str], str], Any] = {}
    for f in flag_fields(cls):
        title = f.metadata["group"]
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = groups[title]
        if f.metadata["exclusive"] is not None:
            key = (title, f.metadata["exclusive"])
            if key not in exclusive:
                exclusive[key] = target.add_mutually_exclusive_group()
            target = exclusive[key]
        target.add_argument(flag(f.name), **_argument(cls, f))
    return parser


def first_error(config: Any, name_of: Callable[[str], str] = flag) -> Optional[str]:
    """What is wrong with the first setting of ``config`` that is outside its choices or bounds, or is
    an empty path, named by ``name_of`` (the flag, by default); None when every setting is valid.
    None values are "the default" and are not checked."""
    cls = type(config)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None or not f.metadata:
            continue
        choices, bound = f.metadata.get("choices"), f.metadata.get("bound")
        if choices is not None and value not in choices:
            return f"{name_of(f.name)} must be one of {', '.join(map(str, choices))}, got {value!r}"
        if bound is not None:
            integer = value_type(cls, f.name)[0] is int
            if not bound.valid(value, integer):
                return f"{name_of(f.name)} must be {bound.describe(integer)}, got {value}"
        if f.metadata.get("path") and not str(value).strip():
            required = f.default is MISSING and f.default_factory is MISSING
            return f"{name_of(f.name)} is empty: give a path" + ("" if required else
                                                                  ", or leave the flag out for its default")
    return None
