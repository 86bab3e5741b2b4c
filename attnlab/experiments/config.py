"""Experiment configs: frozen dataclasses, read from TOML and checked before any work.

A config file is a TOML table whose `kind` names an experiment (see
:mod:`attnlab.experiments`); the other keys are the fields of that kind's config dataclass.
Checking collects every problem in the file (unknown key, wrong type, bad normalizer name or
parameter, a value outside what a field's rules accept, see :mod:`attnlab.experiments.checks`)
in every table, outer and nested, and raises them together in one :class:`ConfigError`, each
naming the file, the dotted key, the value and what is accepted.

Field types understood by the checker: bool, int, float, str, tuple[int, ...],
tuple[float, ...], tuple[str, ...], tuples of :class:`attnlab.normalizers.NormalizerSpec`
(a normalizer, its parameters, what a trained layer learns, its label), tuples of
:class:`attnlab.losses.OutputNormalizer` (a model's output layer), :class:`Lengths`, and
nested frozen dataclasses, written as TOML tables (`[model]` / `model = {width = 64}`) and
overridden with dotted keys (`--set model.width=64`).
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
from attnlab.experiments import checks
from attnlab.experiments.checks import at_least, distinct, each, nonempty
from attnlab.losses import MAPPINGS, OutputNormalizer
from attnlab.normalizers import NormalizerSpec


class ConfigError(ValueError):
    """One or more problems in a config; `problems` lists them, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


LENGTH_RULES = (nonempty, each(at_least(1)), distinct)


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Sequence lengths: an explicit list, or {start, stop, num} spaced evenly in log n; a
    non-empty sweep of distinct integers >= 1 (`LENGTH_RULES`)."""

    values: tuple[int, ...]

    def __post_init__(self):
        problem = checks.value_problem("lengths", self.values, LENGTH_RULES)
        if problem:
            raise checks.SettingError([problem], self)

    @staticmethod
    def log_spaced(start: int, stop: int, num: int) -> Lengths:
        grid = np.geomspace(start, stop, num)
        return Lengths(tuple(sorted({round(v) for v in grid})))


def _describe(annotation: Any) -> str:
    if annotation is Lengths:
        return "a list of positive integers or a table {start, stop, num} (log-spaced)"
    if annotation == tuple[NormalizerSpec, ...]:
        return (
            "a list of normalizer names or tables {name, label, learn, <parameters>...}; "
            f"names: {', '.join(normalizers.NAMES)}"
        )
    if annotation == tuple[OutputNormalizer, ...]:
        return f"a list of output mappings ({', '.join(MAPPINGS)}) or tables {{mapping, alpha, label_smoothing}}"
    if dataclasses.is_dataclass(annotation):
        return f"a table with keys {', '.join(f.name for f in dataclasses.fields(annotation))}"
    origin = typing.get_origin(annotation)
    if origin is tuple:
        item = typing.get_args(annotation)[0]
        plural = {bool: "true or false values", int: "integers", float: "finite numbers", str: "strings"}
        return f"a list of {plural.get(item, item.__name__)}"
    if isinstance(annotation, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
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


def _parse_specs(value: Any, annotation: Any, where: str, problems: list[str]) -> tuple | None:
    """A non-empty list of normalizer specs with unique labels."""
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: expected {_describe(annotation)}; got {value!r}")
        return None
    specs = [_parse_normalizer(v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    labels = [s.label for s in specs if s is not None]
    if len(set(labels)) != len(labels):
        problems.append(f"{where}: labels must be unique (give a label to repeated names); got {labels}")
    return tuple(specs)


def _parse_normalizer(value: Any, where: str, problems: list[str]) -> NormalizerSpec | None:
    try:
        return NormalizerSpec.parse(value, where)
    except ValueError as err:
        problems.append(str(err))
        return None


def _parse_outputs(value: Any, where: str, problems: list[str]) -> tuple[OutputNormalizer, ...] | None:
    """A non-empty list of output normalizers with unique labels."""
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: expected {_describe(tuple[OutputNormalizer, ...])}; got {value!r}")
        return None
    outputs = []
    for i, item in enumerate(value):
        try:
            outputs.append(OutputNormalizer.parse(item, f"{where}[{i}]"))
        except ValueError as err:
            problems.append(str(err))
    labels = [output.label for output in outputs]
    if len(set(labels)) != len(labels):
        problems.append(f"{where}: each output must appear once; got {labels}")
    return tuple(outputs)


def _parse_lengths(value: Any, where: str, problems: list[str]) -> Lengths | None:
    if isinstance(value, list):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            problem = checks.value_problem(where, tuple(value), LENGTH_RULES)
            if problem:
                problems.append(problem)
                return None
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


def _parse_field(value: Any, annotation: Any, source: str, key: str, problems: list[str], base: Any = None) -> Any:
    """The value of the field at dotted `key` of the file `source`, parsed to `annotation`; on a
    problem, appends it and returns None."""
    where = f"{source}: {key}"
    if annotation is Lengths:
        return _parse_lengths(value, where, problems)
    if annotation == tuple[NormalizerSpec, ...]:
        return _parse_specs(value, annotation, where, problems)
    if annotation == tuple[OutputNormalizer, ...]:
        return _parse_outputs(value, where, problems)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected {_describe(annotation)}; got {value!r}")
            return None
        return parse_dataclass(annotation, value, source, problems, base, key)
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


def _default(field: dataclasses.Field) -> Any:
    """A field's default value (calling its default_factory), or None when it has none."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def parse_dataclass(
    cls: type, table: dict[str, Any], source: str, problems: list[str], base: Any = None, key: str = ""
) -> Any:
    """Build `cls` from a TOML table, appending every problem found to `problems`, each starting
    with `source` (the file) and the field's dotted key (`key` is this table's, "" at the top).

    Keys the table leaves out come from `base` (an instance of cls) when given, else from cls's
    defaults; a nested table starts from its field's default (so `[student] layers = 3` keeps the
    kind's default student width, not the class's). Every table is checked in full, here and in
    every nested table: types, then the rules of `attnlab.experiments.checks` (each field's, and
    those relating fields); a value that could not be parsed is judged by nothing else.
    """
    before = len(problems)
    at = _where(source, key)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in sorted(set(table) - set(fields)):
        problems.append(f"{at}: unknown key {name!r}; accepted keys: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name in table:
            nested = _default(field) if dataclasses.is_dataclass(hints[name]) else None
            count = len(problems)
            value = _parse_field(table[name], hints[name], source, _dotted(key, name), problems, nested)
            if len(problems) == count:
                values[name] = value
        elif base is None and not _has_default(field):
            problems.append(f"{at}: missing required key {name!r} ({_describe(hints[name])})")
    if base is None and not all(_has_default(f) for name, f in fields.items() if name not in values):
        problems.extend(f"{source}: {p}" for p in checks.field_problems(cls, values, _prefix(key)))
        return None
    # A value that could not be parsed is replaced by its default (or base's), to judge the others.
    unparsed = {name for name in table if name in fields and name not in values}
    values.update((name, _default(fields[name])) for name in unparsed if base is None)
    instance = _build(cls, values, base, unparsed, source, key, problems)
    return instance if len(problems) == before else None


def _where(source: str, key: str) -> str:
    """How a problem of the table at dotted `key` of the file `source` begins."""
    return f"{source}: {key}" if key else source


def _dotted(key: str, name: str) -> str:
    """`name` under the table at dotted `key` ("model" + "width" -> "model.width")."""
    return f"{key}.{name}" if key else name


def _prefix(key: str) -> str:
    """What goes before a field's name under the table at dotted `key` ("model" -> "model.")."""
    return f"{key}." if key else ""


def _has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def _build(
    cls: type, values: dict[str, Any], base: Any, unparsed: set[str], source: str, key: str, problems: list[str]
) -> Any:
    """`cls(**values)` (over `base` when given), or None with its problems appended; the fields in
    `unparsed` hold stand-ins, and nothing is reported about them."""
    try:
        return cls(**values) if base is None else dataclasses.replace(base, **values)
    except checks.SettingError as err:
        if isinstance(err.setting, cls):
            found = checks.problems(err.setting, _prefix(key), unjudged=unparsed)
        else:
            found = [] if unparsed else err.problems
        problems.extend(f"{source}: {p}" for p in found)
    except ValueError as err:
        if not unparsed:  # else it may be about a stand-in
            problems.extend(f"{_where(source, key)}: {p}" for p in getattr(err, "problems", [str(err)]))
    return None


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML table in `path`, or ConfigError naming the file and what is wrong: missing, a
    folder, unreadable, not UTF-8 text (a binary file), or not valid TOML."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a folder; give a config file (experiments/*.toml)"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            [f"{path}: not a TOML config (not UTF-8 text: {err.reason} at byte {err.start}; a binary file?)"]
        ) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot be read ({err.strerror})"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{path}: not valid TOML: {err}"]) from None


def to_json(value: Any) -> Any:
    """A config (nested frozen dataclasses, specs, lengths, tuples) as plain JSON values."""
    if isinstance(value, (NormalizerSpec, OutputNormalizer)):
        return value.to_json()
    if isinstance(value, Lengths):
        return list(value.values)
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    return value


def _set_dotted(table: dict[str, Any], key: str, value: Any) -> str | None:
    """Set table[a][b][c] = value for key "a.b.c" (copying the nested tables); a problem or None."""
    *path, last = key.split(".")
    node = table
    for i, part in enumerate(path):
        child = node.get(part, {})
        if not isinstance(child, dict):
            return f"--set {key}: {'.'.join(path[: i + 1])} is not a table"
        node[part] = node = dict(child)
    node[last] = value
    return None


def apply_overrides(table: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """`key=value` strings (value in TOML syntax, bare words taken as strings) set into `table`;
    dotted keys reach nested tables (`model.width=64`)."""
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
        problem = _set_dotted(table, key, value)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return table
