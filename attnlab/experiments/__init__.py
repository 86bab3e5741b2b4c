"""Experiment kinds: config (TOML) -> sweep points -> keyed records -> results/<name>.json.

Each kind module declares one :class:`attnlab.experiments.kind.Kind` as `KIND` (its config type,
its sweep, how a point runs, its figures); :data:`KINDS` is the one registry that `attnlab run`,
`attnlab figures` and `attnlab list` read. Experiments never import plotting; figures are made
from the JSON by the module each kind names.
"""

from attnlab.experiments import (
    calibration,
    distillation,
    fading_synthetic,
    length_generalization,
    needle,
    sparsity,
    throughput,
)
from attnlab.experiments.config import ConfigError
from attnlab.experiments.kind import Kind
from attnlab.experiments.results import ResultsError
from attnlab.experiments.runner import Experiment, load, load_all, lock, run


def _declared(module) -> Kind:
    # Transitional: a kind module not yet converted to a `Kind` declaration (throughput).
    if isinstance(module.KIND, Kind):
        return module.KIND
    return Kind(module.KIND, module.DESCRIPTION, module.Config, module.points, module.run_point, {}, None)


KINDS: dict[str, Kind] = {
    _declared(module).name: _declared(module)
    for module in (fading_synthetic, sparsity, throughput, length_generalization, needle, calibration, distillation)
}

__all__ = ["KINDS", "ConfigError", "Experiment", "Kind", "ResultsError", "load", "load_all", "lock", "run"]
