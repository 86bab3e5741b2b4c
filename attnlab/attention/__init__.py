"""Attention with any normalizer: dense reference, memory-efficient chunked paths, statistics."""

from attnlab.attention.api import IMPLEMENTATIONS, dot_product_attention, resolve_normalizer
from attnlab.attention.statistics import NAMES as STATISTICS

__all__ = ["IMPLEMENTATIONS", "STATISTICS", "dot_product_attention", "resolve_normalizer"]
