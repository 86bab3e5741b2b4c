"""Experiment kinds: config (TOML) -> sweep points -> keyed records -> results/<name>.json.

Each kind module declares one :class:`attnlab.experiments.kind.Kind` as `KIND` (its config type,
its sweep, how a point runs, its figures); :data:`KINDS` (`attnlab.experiments.kinds`) is the one
registry that `attnlab run`, `attnlab figures` and `attnlab list` read. Experiments never import
plotting; figures are made from the JSON by the module each kind names.
"""

from attnlab.experiments.config import ConfigError
from attnlab.experiments.kind import Kind
from attnlab.experiments.kinds import KINDS
from attnlab.experiments.results import ResultsError
from attnlab.experiments.runner import Experiment, load, load_all, lock, run

__all__ = ["KINDS", "ConfigError", "Experiment", "Kind", "ResultsError", "load", "load_all", "lock", "run"]
