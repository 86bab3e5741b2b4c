"""attnlab: a JAX/Flax lab for attention normalizers."""

__version__ = "0.1.0"

from attnlab import calibration, losses, normalizers
from attnlab.attention import dot_product_attention

__all__ = ["__version__", "calibration", "dot_product_attention", "losses", "normalizers"]
