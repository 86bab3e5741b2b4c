"""Shared fixtures for the normalizer tests (tests/test_normalizers_*.py).

Compilation dominates the cost of these tests, so they go through `normalize`, which jits each
(name, axis, static parameters) once per session; jit then re-traces only for a new shape or
dtype. Numeric parameters are traced arguments (so different values share one compilation),
except alpha = 1, 1.5 or 2, which stays a Python number: it selects the exact closed forms.
"""

from __future__ import annotations

import functools

import jax
import pytest

from attnlab import normalizers as N

_CLOSED_FORM_ALPHAS = (1, 1.5, 2)


def _is_static(key, value):
    if value is None or isinstance(value, (bool, str)):
        return True
    return key == "alpha" and isinstance(value, (int, float)) and value in _CLOSED_FORM_ALPHAS


@functools.cache
def _jitted(name, axis, static):
    def run(x, where, dynamic):
        return N.get(name, **dict(static), **dynamic)(x, axis=axis, where=where)

    return jax.jit(run)


def _normalize(name, logits, *, axis=-1, where=None, **params):
    """`attnlab.normalizers.get(name, **params)(logits, axis=axis, where=where)`, jit-cached.

    Parameters are traced, except None and a Python alpha of 1, 1.5 or 2 (closed forms).
    """
    static = tuple(sorted((k, v) for k, v in params.items() if _is_static(k, v)))
    dynamic = {k: v for k, v in params.items() if not _is_static(k, v)}
    return _jitted(name, axis, static)(logits, where, dynamic)


@pytest.fixture(scope="session")
def normalize():
    return _normalize
