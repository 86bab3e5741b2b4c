"""An experiment kind, declared once: its config type, its sweep, how a point runs, its figures.

Every kind module ends with one declaration,

    KIND = Kind(
        name="fading_synthetic",
        description="max weight, entropy and support vs row length n ...",
        config_type=Config,
        points=points,
        run_point=run_point,
        sweep_fields={"normalizers": "normalizer", "lengths": "n"},
        figures="attnlab.figures.fading_synthetic",
    )

and :data:`attnlab.experiments.KINDS` maps each name to its `Kind`; `attnlab run`, `attnlab
figures` and `attnlab list` read that one registry.

A point's key is a hash of everything that determines its records (see :meth:`Kind.point_key`):
the kind, the config without the fields that only enumerate the sweep (`sweep_fields`), the
point itself, the entry of each list-of-specs sweep field that the point selects (so a changed
normalizer parameter under the same label is a new point), the device, and the code that computes
the records (the kind's module and the attnlab modules and library versions it runs on:
`attnlab.experiments.fingerprint`). A rerun reuses the records whose key matches and runs the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

from attnlab.experiments.config import to_json
from attnlab.experiments.fingerprint import code_fingerprint

KEY_LENGTH = 16  # hex digits of the SHA-256 kept in keys: 64 bits, collision-free at any realistic scale


def settings_key(settings: Any) -> str:
    """A short stable hash of JSON-serialisable settings (sorted keys, exact float repr)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


@dataclasses.dataclass(frozen=True)
class Kind:
    """One experiment kind.

    Fields:
      name: the `kind = "..."` of its configs.
      description: one line for `attnlab list`.
      config_type: its frozen config dataclass (fields, defaults and checks).
      points: points(config) -> the sweep, a list of flat JSON dicts, in run order.
      run_point: run_point(config, point, *, progress=None, workdir=None, records=None) -> records
        (flat JSON dicts) of one point; `progress(description, completed, total)` reports work
        inside a long point, `workdir` is the folder where it may keep checkpoints (keyed by their
        settings), `records` is a copy of the run's records so far (e.g. the learning-rate tuning
        a main point reads: `lm.TuningSetting`). Any keyword may be left out of the signature.
      sweep_fields: {config field: point key} for the fields that only enumerate the sweep; a
        point's key leaves these fields out and keeps the point (and, for a list of normalizer
        specs, the spec whose label the point names under that point key). Every other config
        field is part of every point's key.
      figures: the module (dotted name) whose render(payload, folder) draws the kind's figures;
        named, not imported, so experiments never import plotting.
      derived: derived(config) -> values computed from the config that the results file records
        beside it (e.g. the row lengths a setting implies), or None.
      summarize: summarize(config, records) -> the "summary" the results file records when the
        sweep finishes (a pure function of the records: e.g. each metric's mean and interval over
        seeds, see attnlab.experiments.intervals), or None.
      code_module: the module whose code, with every attnlab module it imports, computes the
        records (its fingerprint is part of every point's key: `code`); run_point's module unless
        given, and kept by `dataclasses.replace` (a test that swaps run_point keeps the kind's keys).
    """

    name: str
    description: str
    config_type: type
    points: Callable[[Any], list[dict[str, Any]]]
    run_point: Callable[..., list[dict[str, Any]]]
    sweep_fields: dict[str, str] = dataclasses.field(default_factory=dict)
    figures: str | None = None
    derived: Callable[[Any], dict[str, Any]] | None = None
    summarize: Callable[[Any, list[dict[str, Any]]], dict[str, Any]] | None = None
    code_module: str = ""

    def __post_init__(self) -> None:
        if not self.code_module:
            object.__setattr__(self, "code_module", self.run_point.__module__)

    def config_json(self, config: Any) -> dict[str, Any]:
        """The config as plain JSON values (what the results file records), with `derived`'s values."""
        out = to_json(config)
        return {**out, **self.derived(config)} if self.derived is not None else out

    def point_settings(self, config: Any, point: dict[str, Any], device: dict[str, Any]) -> dict[str, Any]:
        """Everything that determines the records of `point` (what its key hashes): the kind, the
        config less its sweep fields, the point, for each sweep field of labelled entries
        (normalizer specs, outputs) the entry whose label the point names (the whole field
        when none does), the device, and the code (`code`)."""
        config_json = self.config_json(config)
        selected = {}
        for field, point_key in self.sweep_fields.items():
            entries = getattr(config, field, None)
            if point_key not in point or not isinstance(entries, tuple):
                continue
            labelled = [e for e in entries if hasattr(e, "label")]
            if labelled:
                chosen = [e for e in labelled if e.label == point[point_key]]
                selected[field] = to_json(chosen[0]) if chosen else config_json.get(field)
        rest = {k: v for k, v in config_json.items() if k not in self.sweep_fields}
        return {
            "kind": self.name,
            "config": rest,
            "point": point,
            "selected": selected,
            "device": device,
            "code": self.code(),
        }

    def code(self) -> dict[str, Any]:
        """The fingerprint of the code that computes this kind's records: `code_module` and every
        attnlab module it imports, transitively, with their library versions."""
        return code_fingerprint(self.code_module)

    def point_key(self, config: Any, point: dict[str, Any], device: dict[str, Any]) -> str:
        return settings_key(self.point_settings(config, point, device))
