"""Rules for config fields, declared beside each field, and one check that reports every problem.

A rule is a function `value -> None` (accepted) or a short text saying what is accepted, worded
to follow "must": `positive(0)` is "be > 0", `distinct((1, 1))` is "not repeat a value". A field
declares its rules with :func:`setting`; rules that relate several fields (or reach into a nested
setting) live in the class's `relations` method, which yields one line per problem and writes
every field its condition reads as `{name}` or `{table.name}`, shown as `name=value`:

    @dataclasses.dataclass(frozen=True)
    class Config:
        seeds: int = setting(8, at_least(1))
        sigmas: tuple[float, ...] = setting((0.5, 1.0, 2.0), nonempty, each(positive), distinct)
        peak_logit: float = setting(3.0, finite)
        rest_logit: float = setting(-2.0, finite)

        def relations(self):
            if self.peak_logit <= self.rest_logit:
                yield "{peak_logit} must be above {rest_logit}"

        def __post_init__(self):
            check(self)

`check` runs every field's rules, then the relations, and raises one :class:`SettingError`
listing every problem, one line each. A relation cannot be judged on a value its field's rules
rejected: when some field fails, only the relation lines naming none of the failed fields are
kept (and a relation that cannot compute on the rejected values is skipped).

    seeds must be >= 1; got 0
    sigmas must all be > 0 and not repeat a value; got [1.0, 1.0, -1.0]
    peak_logit=-5.0 must be above rest_logit=-2.0

`attnlab.experiments.config.parse_dataclass` runs the same rules on a config file's tables and
prefixes each line with the file and the table's dotted key (`model.width must be > 0; got 0`).

Rules: `finite`, `positive`, `at_least(m)`, `between(low, high, "(]")`, `multiple_of(k)`,
`one_of(options)` for one value; `nonempty`, `distinct`, `increasing`, `each(rule)` for a list
(a sweep is `nonempty, each(...), distinct`); `noted(rule, why)` adds a reason to a rule's text.
Every number rule rejects inf, nan and non-numbers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Rule = Callable[[Any], "str | None"]

_RULES = "attnlab.rules"


class SettingError(ValueError):
    """One or more settings out of range: `problems` lists them, one line each; `setting` is the
    instance that failed (so a caller can name its fields under a table's key)."""

    def __init__(self, problems: list[str], setting: Any = None):
        self.problems = list(problems)
        self.setting = setting
        super().__init__("\n".join(self.problems))


def setting(default: Any, *rules: Rule) -> Any:
    """A dataclass field with `default` and the rules its value must pass."""
    return dataclasses.field(default=default, metadata={_RULES: rules})


def shown(value: Any) -> str:
    """A value as a problem line shows it: tuples as lists, items with a label by their label."""
    if isinstance(value, (tuple, list)):
        return repr([getattr(item, "label", item) for item in value])
    return repr(value)


def value_problem(key: str, value: Any, rules: Iterable[Rule]) -> str | None:
    """The one problem line for `value` under `key` (every failing rule's text), or None."""
    texts = [text for rule in rules if (text := rule(value))]
    return f"{key} must {' and '.join(texts)}; got {shown(value)}" if texts else None


def _field_problem(field: dataclasses.Field, value: Any, prefix: str) -> str | None:
    """The problem line of one field's declared rules (see `setting`), or None."""
    return value_problem(prefix + field.name, value, field.metadata.get(_RULES, ()))


def field_problems(cls: type, values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Problems of the fields of `cls` given in `values`, each key written `prefix + name`."""
    fields = [field for field in dataclasses.fields(cls) if field.name in values]
    return [problem for field in fields if (problem := _field_problem(field, values[field.name], prefix))]


_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\}")


def _render(template: str, instance: Any, prefix: str) -> str:
    """`{name}` or `{table.name}` in a relation's line -> `prefix.name=value` (other braces kept)."""

    def field(match: re.Match) -> str:
        value = instance
        for part in match.group(1).split("."):
            if not dataclasses.is_dataclass(value) or part not in {f.name for f in dataclasses.fields(value)}:
                return match.group(0)
            value = getattr(value, part)
        return f"{prefix}{match.group(1)}={shown(value)}"

    return _PLACEHOLDER.sub(field, template)


def _relation_lines(instance: Any, failed: set[str]) -> list[str]:
    """The lines `instance.relations()` yields that can be judged: all of them when no field
    failed its rules, else those naming at least one field and none of the `failed` ones."""
    if not hasattr(instance, "relations"):
        return []
    try:
        lines = list(instance.relations())
    except (ArithmeticError, TypeError, ValueError):
        if failed:  # e.g. width % heads with heads = 0, already reported by heads' rule
            return []
        raise
    if not failed:
        return lines
    named = [{match.group(1).split(".")[0] for match in _PLACEHOLDER.finditer(line)} for line in lines]
    return [line for line, fields in zip(lines, named, strict=True) if fields and not fields & failed]


def problems(instance: Any, prefix: str = "", unjudged: Iterable[str] = ()) -> list[str]:
    """Every problem of a settings dataclass: its field rules, then the lines its `relations()`
    yields (see `_relation_lines`); keys are written under `prefix` ("model." for a [model]
    table). Fields in `unjudged` hold stand-in values: nothing is reported about them."""
    unjudged = set(unjudged)
    found = {f.name: _field_problem(f, getattr(instance, f.name), prefix) for f in dataclasses.fields(instance)}
    failed = {name for name, problem in found.items() if problem} | unjudged
    relations = [_render(line, instance, prefix) for line in _relation_lines(instance, failed)]
    return [problem for name, problem in found.items() if problem and name not in unjudged] + relations


def check(instance: Any) -> None:
    """Raise one SettingError listing every problem of `instance` (call it from __post_init__)."""
    found = problems(instance)
    if found:
        raise SettingError(found, instance)


# Rules. Numbers must be finite real numbers (not bool): inf and nan fail every number rule.


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_rule(condition: str, holds: Callable[[float], bool]) -> Rule:
    """A rule for a finite number satisfying `holds`, described as `condition` (e.g. "> 0")."""

    def rule(value: Any) -> str | None:
        if not _is_number(value):
            return f"be a finite number {condition}"
        return None if holds(value) else f"be {condition}"

    return rule


def finite(value: Any) -> str | None:
    """A finite number (not inf, not nan)."""
    return None if _is_number(value) else "be a finite number"


positive: Rule = _number_rule("> 0", lambda x: x > 0)
positive.__doc__ = "A finite number > 0."


def at_least(minimum: float) -> Rule:
    """A finite number >= minimum."""
    return _number_rule(f">= {minimum}", lambda x: x >= minimum)


def between(low: float, high: float, brackets: str = "[]") -> Rule:
    """A finite number in the interval from low to high; `brackets` says which ends are included,
    e.g. "(]" for 0 < x <= 1."""
    above = (lambda x: x >= low) if brackets[0] == "[" else (lambda x: x > low)
    below = (lambda x: x <= high) if brackets[1] == "]" else (lambda x: x < high)
    return _number_rule(f"in {brackets[0]}{low}, {high}{brackets[1]}", lambda x: above(x) and below(x))


def multiple_of(step: int) -> Rule:
    """A positive multiple of `step`."""
    return _number_rule(f"a positive multiple of {step}", lambda x: x > 0 and x % step == 0)


def one_of(options: Iterable[Any]) -> Rule:
    """One of `options`."""
    options = tuple(options)

    def rule(value: Any) -> str | None:
        return None if value in options else f"be one of {', '.join(map(str, options))}"

    return rule


def nonempty(value: Any) -> str | None:
    """A list with at least one entry."""
    try:
        return None if len(value) else "be a non-empty list"
    except TypeError:
        return "be a non-empty list"


def distinct(value: Any) -> str | None:
    """A list whose entries differ (a sweep never runs a point twice)."""
    entries = list(value) if isinstance(value, (tuple, list)) else []
    repeated = any(entry in entries[:i] for i, entry in enumerate(entries))
    return "not repeat a value" if repeated else None


def increasing(value: Any) -> str | None:
    """A list of numbers in non-decreasing order (use with `distinct` for strictly increasing)."""
    entries = list(value) if isinstance(value, (tuple, list)) else []
    if not all(_is_number(entry) for entry in entries):
        return "be finite numbers in increasing order"
    return None if all(a <= b for a, b in itertools.pairwise(entries)) else "be in increasing order"


def noted(rule: Rule, note: str) -> Rule:
    """`rule` with `note` after its text, explaining what it accepts: "be >= 0 (0: only at the end)"."""

    def explained(value: Any) -> str | None:
        text = rule(value)
        return f"{text} ({note})" if text else None

    explained.__doc__ = f"{rule.__doc__} ({note})"
    return explained


def each(rule: Rule) -> Rule:
    """A list whose every entry passes `rule` ("all be > 0")."""

    def every(value: Any) -> str | None:
        for entry in value if isinstance(value, (tuple, list)) else ():
            text = rule(entry)
            if text:
                return f"all {text}"
        return None

    every.__doc__ = f"Every entry: {rule.__doc__}"
    return every
