"""Experiment configs: frozen dataclasses, read from TOML and checked before any work.

A config file is a TOML table whose `kind` names an experiment (see
:mod:`attnlab.experiments`); the other keys are the fields of that kind's config dataclass.
Checking collects every problem in the file (unknown key, wrong type, bad normalizer name or
parameter, bad length sweep) and raises them together in one :class:`ConfigError`, each naming
the file, the key and what is accepted.

Field types understood by the checker: bool, int, float, str, tuple[int, ...],
tuple[float, ...], tuple[str, ...], :class:`NormalizerSpec` tuples and :class:`Lengths`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np

from attnlab import normalizers


class ConfigError(ValueError):
    """One or more problems in a config; `problems` lists them, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclasses.dataclass(frozen=True)
class NormalizerSpec:
    """A registry name with bound parameters and the label figures show.

    In TOML either a bare name, "ssmax", or a table, {name = "ssmax", s = 0.3, label = "SSMax s=0.3"}.
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def build(self) -> normalizers.Normalizer:
        return normalizers.get(self.name, **dict(self.params))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, **dict(self.params)}


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Sequence lengths: an explicit list, or {start, stop, num} spaced evenly in log n."""

    values: tuple[int, ...]

    @staticmethod
    def log_spaced(start: int, stop: int, num: int) -> Lengths:
        grid = np.geomspace(start, stop, num)
        return Lengths(tuple(sorted({round(v) for v in grid})))


def _describe(annotation: Any) -> str:
    if annotation is Lengths:
        return "a list of positive integers or a table {start, stop, num} (log-spaced)"
    if annotation == tuple[NormalizerSpec, ...]:
        return f"a list of normalizer names or tables {{name, label, params...}}; names: {', '.join(normalizers.NAMES)}"
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return f"a list of {typing.get_args(annotation)[0].__name__}"
    if isinstance(annotation, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, str(annotation)
    )


def _parse_scalar(value: Any, annotation: Any) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is type(None):
        return None
    raise TypeError


def _parse_normalizer(value: Any, where: str, problems: list[str]) -> NormalizerSpec | None:
    if isinstance(value, str):
        table: dict[str, Any] = {"name": value}
    elif isinstance(value, dict):
        table = dict(value)
    else:
        problems.append(f"{where}: expected a normalizer name or table, got {value!r}")
        return None
    name = table.pop("name", None)
    label = table.pop("label", "")
    if not isinstance(name, str):
        problems.append(f"{where}: a normalizer table needs name = one of {', '.join(normalizers.NAMES)}")
        return None
    if not isinstance(label, str):
        problems.append(f"{where}.label: expected a string, got {label!r}")
        return None
    spec = NormalizerSpec(name, tuple(sorted(table.items())), label)
    try:
        spec.build()
    except (ValueError, TypeError) as err:
        problems.append(f"{where}: {err}")
        return None
    return spec


def _parse_lengths(value: Any, where: str, problems: list[str]) -> Lengths | None:
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            return Lengths(tuple(value))
    elif isinstance(value, dict):
        keys = {"start", "stop", "num"}
        unknown = set(value) - keys
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; accepted: start, stop, num")
            return None
        integers = set(value) == keys and all(
            isinstance(value[k], int) and not isinstance(value[k], bool) for k in keys
        )
        if integers and 1 <= value["start"] <= value["stop"] and value["num"] >= 1:
            return Lengths.log_spaced(value["start"], value["stop"], value["num"])
    problems.append(f"{where}: expected {_describe(Lengths)} with 1 <= start <= stop; got {value!r}")
    return None


def _parse_field(value: Any, annotation: Any, where: str, problems: list[str]) -> Any:
    if annotation is Lengths:
        return _parse_lengths(value, where, problems)
    if annotation == tuple[NormalizerSpec, ...]:
        if not isinstance(value, list) or not value:
            problems.append(f"{where}: expected {_describe(annotation)}; got {value!r}")
            return None
        specs = [_parse_normalizer(v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        labels = [s.label for s in specs if s is not None]
        if len(set(labels)) != len(labels):
            problems.append(f"{where}: labels must be unique (give a label to repeated names); got {labels}")
        return tuple(specs)
    origin = typing.get_origin(annotation)
    try:
        if origin is tuple:
            if not isinstance(value, list):
                raise TypeError
            item_type = typing.get_args(annotation)[0]
            return tuple(_parse_scalar(v, item_type) for v in value)
        if isinstance(annotation, types.UnionType):
            for option in typing.get_args(annotation):
                try:
                    return _parse_scalar(value, option)
                except TypeError:
                    continue
            raise TypeError
        return _parse_scalar(value, annotation)
    except TypeError:
        problems.append(f"{where}: expected {_describe(annotation)}; got {value!r}")
        return None


def parse_dataclass(cls: type, table: dict[str, Any], source: str, problems: list[str]) -> Any:
    """Build `cls` from a TOML table, appending every problem found to `problems`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(table) - set(fields))
    for key in unknown:
        problems.append(f"{source}: unknown key {key!r}; accepted keys: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name in table:
            values[name] = _parse_field(table[name], hints[name], f"{source}: {name}", problems)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append(f"{source}: missing required key {name!r} ({_describe(hints[name])})")
    if len(problems):
        return None
    try:
        return cls(**values)
    except ValueError as err:
        problems.append(f"{source}: {err}")
        return None


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML table in `path`, or ConfigError naming the file and the parse error."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{path}: not valid TOML: {err}"]) from None


def apply_overrides(table: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """`key=value` strings (value in TOML syntax, bare words taken as strings) set into `table`."""
    table = dict(table)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected key=value")
            continue
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        table[key] = value
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return table
