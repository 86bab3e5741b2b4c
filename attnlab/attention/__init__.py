"""Attention with any normalizer: a table of backends (dense reference, memory-efficient blocked
passes, cuDNN, Pallas), statistics reduced inside the computation.

`dot_product_attention` is the entry point; `BACKENDS` the table (attention.backends), with
`IMPLEMENTATIONS` every name `implementation=` accepts.
"""

from attnlab.attention.api import IMPLEMENTATIONS, dot_product_attention, resolve_normalizer
from attnlab.attention.backends import AUTOMATIC, BACKENDS, Backend, Options
from attnlab.attention.statistics import NAMES as STATISTICS

__all__ = [
    "AUTOMATIC",
    "BACKENDS",
    "IMPLEMENTATIONS",
    "STATISTICS",
    "Backend",
    "Options",
    "dot_product_attention",
    "resolve_normalizer",
]
