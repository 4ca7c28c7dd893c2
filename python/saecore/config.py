"""Configs declared once: a dataclass whose fields carry docstrings becomes a verb's command-line flags.

Each field gives one flag: its name (``batch_size`` → ``--batch-size``, or ``option(flag=...)``), its type
from the annotation (int, float, str, Path, bool, ``X | None``, ``list[X]``, ``Literal[...]`` → choices),
its default from the field, its help from the string literal under the field, and its valid range from
``option(ge=..., gt=..., le=..., lt=...)``. The range is shown in ``--help`` and checked twice: by argparse
while parsing (so a bad number fails before any model or store is opened) and by :func:`validate` in the
dataclass's ``__post_init__`` (so library callers get the same check).

    >>> @dataclass
    ... class Demo:
    ...     k: int = option(10, ge=1)
    ...     '''Neighbours per feature.'''
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import math
import textwrap
import types
import typing
from dataclasses import MISSING, Field, dataclass, field
from pathlib import Path
from typing import Any, Literal

_KEY = "saecore"


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric option: ``ge``/``gt`` below, ``le``/``lt`` above (any may be None)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        """``≥ 1``, ``> 0``, ``≤ 10`` or an interval such as ``[0, 1)``."""
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return ("≥ " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("≤ " if high[-1] == "]" else "< ") + high[:-1]
        return ""

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range, or None when it is inside."""
        inside = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if inside else f"must be {self.describe()}, got {value!r}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class _Meta:
    range: Range | None
    flag: str | None
    aliases: tuple[str, ...]
    append: bool
    cli: bool
    metavar: str | None
    const: Any = None


def option(
    default: Any = MISSING,
    *,
    default_factory: Any = MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    append: bool = False,
    cli: bool = True,
    metavar: str | None = None,
    const: Any = None,
) -> Any:
    """A dataclass field with a valid range and CLI details.

    ``flag`` renames the flag (for a bool defaulting to True it is the flag that turns it off, e.g.
    ``--keep-bos`` for ``exclude_bos``); ``append`` makes a list field a repeatable flag; ``cli=False``
    keeps a field out of the command line; ``const`` makes the flag's value optional (``--ray`` alone
    means ``const``, ``--ray ADDRESS`` the address).
    """
    rng = Range(ge, gt, le, lt) if any(b is not None for b in (ge, gt, le, lt)) else None
    meta = _Meta(rng, flag, tuple(aliases), append, cli, metavar, const)
    return field(default=default, default_factory=default_factory, metadata={_KEY: meta})


def _meta(f: Field) -> _Meta:
    return f.metadata.get(_KEY) or _Meta(None, None, (), False, True, None)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name → the docstring under it, for ``cls`` and its dataclass bases (read from the source)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (frozen app): flags simply have no help
            continue
        body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)).body
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@dataclass(frozen=True)
class _Kind:
    """What an annotation means on the command line."""

    scalar: type
    optional: bool
    is_list: bool
    choices: tuple[Any, ...] | None


@functools.cache
def _kinds(cls: type) -> dict[str, _Kind]:
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}


def _kind(hint: Any) -> _Kind:
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
        origin = typing.get_origin(hint)
    is_list = origin in (list, tuple)
    if is_list:
        hint = typing.get_args(hint)[0]
        origin = typing.get_origin(hint)
    choices = None
    if origin is Literal:
        choices = typing.get_args(hint)
        hint = type(choices[0])
    return _Kind(hint if isinstance(hint, type) else str, optional, is_list, choices)


def _problem(value: Any, rng: Range | None) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if rng is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return rng.problem(value)
    return None


def _converter(kind: _Kind, rng: Range | None) -> Any:
    """argparse ``type=``: parse one word and check its range (errors become one-line usage errors)."""
    scalar = kind.scalar

    def convert(text: str) -> Any:
        value = scalar(text)  # a ValueError here reads "invalid int value: 'x'"
        problem = _problem(value, rng)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = scalar.__name__
    return convert


def _help(cls: type, f: Field, kind: _Kind, meta: _Meta) -> str:
    text = field_docs(cls).get(f.name, "")
    notes = []
    if meta.range is not None:
        notes.append(meta.range.describe())
    if kind.scalar is not bool and f.default is not MISSING and f.default is not None:
        shown = " ".join(map(str, f.default)) if isinstance(f.default, (list, tuple)) else f.default
        notes.append(f"default: {shown}")
    if meta.append:
        notes.append("repeatable")
    full = text + (f" ({'; '.join(notes)})" if notes else "")
    return full.replace("%", "%%")


def add_arguments(
    parser: argparse.ArgumentParser | Any, cls: type, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()
) -> None:
    """Add one flag per field of the dataclass ``cls`` (``only``/``skip`` select fields by name)."""
    kinds = _kinds(cls)
    for f in dataclasses.fields(cls):
        meta = _meta(f)
        if not f.init or not meta.cli or f.name in skip or (only is not None and f.name not in only):
            continue
        kind = kinds[f.name]
        flag = meta.flag or "--" + f.name.replace("_", "-")
        help_ = _help(cls, f, kind, meta)
        if kind.scalar is bool and not kind.is_list:
            default = f.default if f.default is not MISSING else False
            if default and meta.flag is None:
                flag = "--no-" + f.name.replace("_", "-")
            action = "store_false" if default else "store_true"
            parser.add_argument(flag, *meta.aliases, dest=f.name, action=action, default=default, help=help_)
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        kwargs: dict[str, Any] = {"dest": f.name, "type": _converter(kind, meta.range), "help": help_}
        if kind.choices is not None:
            kwargs["choices"] = list(kind.choices)
        if kind.choices is None:
            kwargs["metavar"] = meta.metavar or flag.lstrip("-").replace("-", "_").upper()
        if kind.is_list:
            if meta.append:  # repeatable; None when never given (argparse would append to a list default)
                kwargs.update(action="append", default=None)
            else:
                kwargs["nargs"] = "+"
        if meta.const is not None:
            kwargs.update(nargs="?", const=meta.const)
        if required:
            kwargs["required"] = True
        elif not (kind.is_list and meta.append):
            kwargs["default"] = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
        parser.add_argument(flag, *meta.aliases, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """An instance of ``cls`` from the parsed flags ``add_arguments`` added (``fixed`` overrides)."""
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is None and _kinds(cls)[f.name].is_list and _meta(f).append:
            continue  # a repeatable flag never given: the field's own default
        values[f.name] = value
    return cls(**{**values, **fixed})


def validate(config: Any) -> None:
    """Raise ValueError naming the field when a value is outside its declared range or not finite."""
    cls: Any = type(config)
    kinds = _kinds(cls)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        kind = kinds[f.name]
        for v in values:
            if v is None:
                continue
            problem = _problem(v, _meta(f).range)
            if problem is None and kind.choices is not None and v not in kind.choices:
                problem = f"must be one of {', '.join(map(str, kind.choices))}, got {v!r}"
            if problem:
                raise ValueError(f"{type(config).__name__}.{f.name} {problem}")


@dataclass(kw_only=True)
class SAEModelOptions:
    """The options of every verb that runs a model through an SAE (steer, attribute, probe, logit-lens)."""

    sae: Path
    """SAE directory (cfg.json + sae_weights.safetensors)."""

    model: str | None = None
    """Model name or local HF folder; unset: the SAE's model_name."""

    device: str | None = None
    """Torch device; unset: CUDA when present, else the CPU."""


__all__ = ["Range", "SAEModelOptions", "add_arguments", "field_docs", "from_args", "option", "validate"]
