"""Experiment kinds: config (TOML) -> sweep points -> flat records -> results/<name>.json.

Each kind is a module with KIND, DESCRIPTION, a frozen `Config` dataclass, `config_to_json`,
`points(config)` (the sweep, as dicts) and `run_point(config, point)` (records for one point).
Experiments never import plotting; figures are made from the JSON by :mod:`attnlab.figures`.
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
from attnlab.experiments.runner import Experiment, load, load_all, run

KINDS = {
    module.KIND: module
    for module in (fading_synthetic, sparsity, throughput, length_generalization, needle, calibration, distillation)
}

__all__ = ["KINDS", "ConfigError", "Experiment", "load", "load_all", "run"]
