"""Attention with any normalizer: a table of backends (dense reference, memory-efficient blocked
passes, cuDNN, Pallas), statistics reduced inside the computation.

`dot_product_attention` is the entry point; `BACKENDS` the table (attention.backends), with
`IMPLEMENTATIONS` every name `implementation=` accepts; `attention.mask_functions` holds masks and
scores as functions (causal, sliding window, prefix-LM, documents; ALiBi, soft-capping, a
relative-position table) for its `mask_fn` and `score_fn`; `context_parallel_attention` shards the
sequence over a mesh axis, exact for every normalizer (attention.context_parallel).
"""

from attnlab.attention.api import IMPLEMENTATIONS, dot_product_attention, resolve_normalizer
from attnlab.attention.backends import AUTOMATIC, BACKENDS, Backend, Options
from attnlab.attention.context_parallel import context_parallel_attention
from attnlab.attention.statistics import NAMES as STATISTICS

__all__ = [
    "AUTOMATIC",
    "BACKENDS",
    "IMPLEMENTATIONS",
    "STATISTICS",
    "Backend",
    "Options",
    "context_parallel_attention",
    "dot_product_attention",
    "resolve_normalizer",
]
