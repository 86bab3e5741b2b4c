"""attnlab: a JAX/Flax lab for attention normalizers."""

__version__ = "0.1.0"

from attnlab import normalizers
from attnlab.attention import dot_product_attention

__all__ = ["__version__", "dot_product_attention", "normalizers"]
