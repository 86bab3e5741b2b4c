"""The spec of a layer's normalizer lives in `attnlab.normalizers.spec`; re-exported for the layers."""

from attnlab.normalizers.describe import alpha_from_logit
from attnlab.normalizers.spec import NormalizerSpec, as_spec, inverse_mean_log_n

__all__ = ["NormalizerSpec", "alpha_from_logit", "as_spec", "inverse_mean_log_n"]
