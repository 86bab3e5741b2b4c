"""attnlab: a JAX/Flax lab for attention normalizers."""

__version__ = "0.1.0"

from attnlab import normalizers  # noqa: E402

__all__ = ["normalizers", "__version__"]
