"""Normalizer configurations shared by the tests/normalizers/test_normalizers_*.py files."""

import pytest

# One configuration per registered name (every name in NAMES is covered, see
# test_configs_cover_every_name), choosing parameters that take the less common code paths: a
# temperature != 1, the general (non closed-form) entmax threshold on both sides of alpha = 2,
# and log-n scaling on top of it. ("entmax" / "logn_entmax" with their default alpha = 1.5 build
# exactly the entmax15 / logn_entmax15 normalizers.)
CONFIGS = [
    ("softmax", ()),
    ("scaled_softmax", (("temperature", 0.5),)),
    ("ssmax", ()),
    ("sparsemax", ()),
    ("entmax15", ()),
    ("entmax", (("alpha", 1.3),)),
    ("entmax", (("alpha", 2.5),)),
    ("logn_sparsemax", ()),
    ("logn_entmax15", ()),
    ("logn_entmax", (("alpha", 1.7),)),
    # Two of the length-scaled maps of attnlab.normalizers.length_scaling (one per family); the
    # others share their policies' code path and are checked in test_normalizers_field.py.
    ("llama4_softmax", (("floor_scale", 4.0),)),
    ("asentmax", (("gamma", 1.0),)),
]
CONFIG_IDS = [name + "".join(f"-{k}={v}" for k, v in params) for name, params in CONFIGS]
all_configs = pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)

# The normalizers proposed since SSMax (attnlab.normalizers.recent). None is shift invariant and
# softmax1, sigmoid and softpick do not sum to 1, so the simplex properties above do not apply;
# tests/normalizers/test_normalizers_recent.py checks what does (masking, limits, gradients, references).
RECENT_CONFIGS = [
    ("softmax1", ()),
    ("sigmoid", ()),
    ("sigmoid", (("bias", -0.5),)),
    ("stablemax", ()),
    ("softpick", ()),
    ("multimax", ()),
    ("multimax", (("b_low", -0.5), ("b_high", 0.5), ("slope_low", 3.0), ("slope_high", 1.5))),
]
RECENT_IDS = [name + "".join(f"-{k}={v}" for k, v in params) for name, params in RECENT_CONFIGS]
recent_configs = pytest.mark.parametrize("config", RECENT_CONFIGS, ids=RECENT_IDS)
# Checked against their published formulas in tests/normalizers/test_normalizers_field.py (values,
# gradients, masking): the other length-scaled maps, the learned sink and stick-breaking (neither
# sums to 1; stick-breaking reads the key order).
FIELD_NAMES = {"llama4_entmax15", "qwen_softmax", "critical_softmax", "sink_softmax", "stick_breaking"}
EVERY_NAME = {name for name, _ in CONFIGS + RECENT_CONFIGS} | FIELD_NAMES
