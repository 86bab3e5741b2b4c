"""results/FINDINGS.md: every claim the results support, generated from the JSON alone.

A figure module may define `findings(payload) -> list[Finding]`: each finding is one sentence
computed from the results file (its summary's intervals, or closed forms it stores), the
comparison it makes, its interval and whether the interval settles the comparison, and the figure
that shows it. `write_findings(results_dir)` collects them from every results file of a kind that
has them, in file order, and writes the page (atomically); `attnlab figures` calls it after the
figures, so the page is rebuilt byte for byte from the committed JSON, and nothing on it is typed
by hand.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attnlab.atomic import write_atomic
from attnlab.experiments import intervals
from attnlab.experiments.results import read_json
from attnlab.figures import tuning
from attnlab.figures.names import figure_name

PAGE = "FINDINGS.md"
CAVEAT = (
    "An interval is the 95% Student t interval over the seeds a config ran (the number is given): "
    "it says how far the seeds disagree at this scale. It does not say whether a larger model, longer "
    "training, other data or another learning rate would change the comparison; a difference whose "
    "interval holds 0 is not shown to exist, not shown to be absent. A t interval is the mean plus or "
    "minus t times the standard error, not clipped: for a bounded metric it can pass the bound (an "
    "accuracy interval may end above 1), which shows the seeds' spread, not a possible value."
)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One claim: `claim` (a sentence), `significant` (True / False: the interval excludes / holds
    the value compared against; None: a measurement with nothing to compare), `figure` (the file
    name under figures/ that shows it, or None)."""

    claim: str
    significant: bool | None = None
    figure: str | None = None


def interval_text(interval: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """ "m [low, high]" of an interval's JSON (intervals.Interval.to_json), or "m (one seed)";
    `signed`: every number with its sign (a difference: "+0.052 [-0.010, +0.114]")."""
    if interval is None:
        return "n/a"
    form = f"{'+' if signed else ''}.{digits}f"
    mean = format(interval["mean"], form)
    if interval.get("low") is None:
        return f"{mean} (one seed)"
    return f"{mean} [{format(interval['low'], form)}, {format(interval['high'], form)}]"


def value_text(interval: dict[str, Any], digits: int = 3, signed: bool = False) -> str:
    """A measured value: "m [low, high]" over several seeds, "m" alone for one (the section says so)."""
    if interval.get("low") is not None:
        return interval_text(interval, digits, signed)
    return format(interval["mean"], f"{'+' if signed else ''}.{digits}f")


def verdict(significant: bool | None) -> str:
    return {True: "significant", False: "not significant", None: ""}[significant]


# Helpers for the kinds that train models: their summaries (intervals.summarize_records) hold per
# group each metric's interval over seeds, and per group its paired difference to a baseline group.


def significance(difference: dict[str, Any] | None) -> bool | None:
    """Whether a difference's interval excludes 0 (None: one seed, so no interval)."""
    if difference is None or difference.get("low") is None:
        return None
    return difference["low"] > 0 or difference["high"] < 0


def seeds_text(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def seed_count(groups: Sequence[dict[str, Any]]) -> int:
    """The most seeds any summary group has."""
    return max((len(group["seeds"]) for group in groups), default=0)


def one_seed(config: dict[str, Any]) -> Finding:
    """The lead finding of a one-seed file: nothing below is settled."""
    written = "" if "seeds" in config else " (the file was written before this kind swept seeds)"
    return Finding(
        f"One seed{written}: no number below has an interval, and one seed settles none of these "
        "comparisons: a difference seen on one seed may shrink, vanish or reverse on the next"
    )


def paired(a: Mapping[int, float], b: Mapping[int, float], name: str = "paired") -> dict[str, Any] | None:
    """The t interval (Interval JSON) of a_s - b_s over the seeds both have (None: none in common)."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    return intervals.paired_difference([a[s] for s in common], [b[s] for s in common], name=name).to_json()


def difference_text(difference: dict[str, Any], digits: int = 3) -> str:
    """'a paired difference of +0.052 [+0.040, +0.064]', or 'a difference of +0.052 (one seed)'."""
    kind = "difference" if difference.get("low") is None else "paired difference"
    return f"a {kind} of {interval_text(difference, digits, signed=True)}"


@dataclasses.dataclass(frozen=True)
class Row:
    """One group against the baseline group: its name, its metric's interval JSON, and the paired
    difference to the baseline's (group - baseline) on the seeds both have."""

    label: str
    value: dict[str, Any]
    difference: dict[str, Any]


def against_baseline(
    summary: dict[str, Any], metric: str, key: str, where: Mapping[str, Any], names: Mapping[str, str] | None = None
) -> tuple[str | None, dict[str, Any] | None, list[Row]]:
    """(the baseline's name, its interval of `metric`, and a Row per other group) among the summary
    groups whose values match `where`; the groups are told apart by `key` (e.g. "normalizer") and
    named by `names` (label -> what the page says). No baseline among them: (None, None, [])."""

    def matches(entry: dict[str, Any]) -> bool:
        return all(entry.get(k) == v for k, v in where.items())

    pairs = [p for p in summary.get("paired", []) if matches(p) and p.get(metric) is not None]
    if not pairs:
        return None, None, []
    names = names or {}
    values = {g[key]: g.get(metric) for g in summary["groups"] if matches(g)}
    baseline = pairs[0]["against"][key]
    if values.get(baseline) is None:
        return None, None, []
    rows = [Row(names.get(p[key], str(p[key])), values[p[key]], p[metric]) for p in pairs if values.get(p[key])]
    return names.get(baseline, str(baseline)), values[baseline], rows


def comparison_text(row: Row, baseline: str, base_value: dict[str, Any], digits: int = 3) -> str:
    """ "A at {mean} against {baseline} at {mean}, a (paired) difference of {A - baseline}"."""
    return (
        f"{row.label} at {row.value['mean']:.{digits}f} against {baseline} at {base_value['mean']:.{digits}f}, "
        f"{difference_text(row.difference, digits)}"
    )


def extremes(
    context: str,
    what: str,
    found: tuple[str | None, dict[str, Any] | None, list[Row]],
    figure: str | None,
    words: tuple[str, str] = ("lowest", "highest"),
    digits: int = 3,
) -> list[Finding]:
    """Two findings: the group with the smallest and the one with the largest difference to the
    baseline (`found`, from `against_baseline`), each against it: "{context}, {lowest} {what}: A
    at ... against B at ..., a difference of ..."; one when a single group is compared, none when
    none is. Groups with the same value and difference as a pick are named with it ("; the same
    for C and D"), so a tie does not read as one group standing out."""
    baseline, base_value, rows = found
    if not rows:
        return []
    ordered = sorted(rows, key=lambda row: row.difference["mean"])
    picks = [(f"{what}: ", ordered[0])] if len(rows) == 1 else [
        (f"{word} {what}: ", row) for word, row in zip(words, (ordered[0], ordered[-1]), strict=True)
    ]  # fmt: skip
    return [
        Finding(
            f"{context}, {lead}{comparison_text(row, baseline, base_value, digits)}{_ties_text(row, rows)}",
            significance(row.difference),
            figure,
        )
        for lead, row in picks
    ]


def _ties_text(row: Row, rows: list[Row]) -> str:
    """ "; the same for C and D": the other rows whose value and difference equal `row`'s, or ""."""
    ties = [r.label for r in rows if r is not row and (r.value, r.difference) == (row.value, row.difference)]
    if not ties:
        return ""
    return "; the same for " + (ties[0] if len(ties) == 1 else f"{', '.join(ties[:-1])} and {ties[-1]}")


def tally(
    context: str,
    found: tuple[str | None, dict[str, Any] | None, list[Row]],
    figure: str | None,
    noun: str = "normalizer",
) -> list[Finding]:
    """One finding sorting every compared group by its difference's interval: below the baseline,
    above it, or holding 0 (none with one seed: there are no intervals to sort by)."""
    baseline, _, rows = found
    if not rows or any(significance(row.difference) is None for row in rows):
        return []
    ordered = sorted(rows, key=lambda row: row.difference["mean"])

    def names(test: Callable[[Row], bool]) -> str:
        return ", ".join(row.label for row in ordered if test(row)) or "none"

    below = names(lambda row: significance(row.difference) and row.difference["mean"] < 0)
    above = names(lambda row: significance(row.difference) and row.difference["mean"] > 0)
    held = names(lambda row: not significance(row.difference))
    return [
        Finding(
            f"{context}, every {noun} against {baseline}: below it (interval excluding 0): {below}; "
            f"above it: {above}; interval holding 0: {held}",
            None,
            figure,
        )
    ]


def _kind_findings() -> dict[str, Any]:
    """kind -> its figure module's findings(payload), for the kinds that have one."""
    from attnlab.experiments.kinds import KINDS

    out = {}
    for name, kind in KINDS.items():
        if kind.figures:
            module = importlib.import_module(kind.figures)
            if hasattr(module, "findings"):
                out[name] = module.findings
    return out


def page(results_dir: Path) -> str:
    """The text of FINDINGS.md for the results files in `results_dir`."""
    makers = _kind_findings()
    lines = [
        "# Findings",
        "",
        "Generated by `attnlab figures results/` from the JSON in this folder: every sentence below is "
        "computed from a results file (edit the code in `attnlab/figures/`, never this page). Each "
        "section names the config and the command behind its file; the figures are indexed in "
        "[README.md](README.md).",
        "",
        CAVEAT,
        "",
    ]
    sections = 0
    for json_path in sorted(Path(results_dir).glob("*.json")):
        payload = read_json(json_path)
        kind = payload.get("kind")
        if kind not in makers:
            continue
        name = figure_name(json_path)
        found = makers[kind]({**payload, "experiment": name})
        tuned = tuning.finding_text(payload)
        if tuned is not None:
            found = [Finding(tuned, None, f"{name}_tuning.png"), *found]
        if not found:
            continue
        sections += 1
        lines += [f"## {name}", "", f"`{payload.get('command', 'attnlab run')}` -> `{json_path.name}`", ""]
        if payload.get("finished_at") is None:
            lines += [f"The run is not finished: these are its {len(payload['records'])} records so far.", ""]
        for finding in found:
            tail = f" ({verdict(finding.significant)})" if finding.significant is not None else ""
            link = f" [figure](figures/{finding.figure})" if finding.figure else ""
            lines.append(f"- {finding.claim}{tail}.{link}")
        lines.append("")
    if not sections:
        lines += ["No results file here has findings yet (the kinds with seeds and intervals write them).", ""]
    return "\n".join(lines)


def write_findings(results_dir: str | Path) -> Path:
    """Write results_dir/FINDINGS.md (atomically) and return its path."""
    text = page(Path(results_dir))
    return write_atomic(Path(results_dir) / PAGE, lambda handle: handle.write(text))
