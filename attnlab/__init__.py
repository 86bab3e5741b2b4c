"""attnlab: a JAX/Flax lab for attention normalizers."""

__version__ = "0.1.0"

from attnlab import normalizers

__all__ = ["__version__", "normalizers"]
