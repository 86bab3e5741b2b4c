"""Conformance: attnlab's entmax family against the entmax package (PyTorch), on the cases of its own
tests (`entmax/test_root_finding.py`, `test_mask.py`, `test_losses.py`) where they apply. They do not
apply to alpha < 1 (attnlab's entmax is defined for alpha >= 1) nor to top-k, normmax and budget
mappings. Skipped where the peers are not installed (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from attnlab import losses
from attnlab import normalizers as N

torch = pytest.importorskip("torch")
entmax = pytest.importorskip("entmax")

# --- entmax package: mappings (entmax's test_root_finding.py and test_mask.py) ----------------------


def _torch(x):
    return torch.from_numpy(np.asarray(x))


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_entmax_arbitrary_dimension_and_per_row_alpha_match_entmax_bisect(dim):
    # entmax's test_arbitrary_dimension, with alpha in [1.05, 2.55] (attnlab's entmax takes alpha >= 1)
    rng = np.random.default_rng(dim)
    shape = [3, 4, 2, 5]
    x = rng.normal(size=shape)
    alpha_shape = list(shape)
    alpha_shape[dim] = 1
    alpha = 1.05 + 1.5 * rng.random(alpha_shape)
    want = entmax.entmax_bisect(_torch(x), alpha=_torch(alpha), dim=dim, n_iter=60).numpy()
    with jax.enable_x64(True):
        got = np.asarray(N.entmax(x, alpha=alpha, axis=dim))
    np.testing.assert_allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparsemax_and_entmax15_match_the_entmax_package(dtype):
    rng = np.random.default_rng(1)
    x = (0.5 * rng.normal(size=(4, 6))).astype(dtype)
    atol = 1e-6 if dtype == np.float32 else 1e-12
    with jax.enable_x64(dtype == np.float64):
        np.testing.assert_allclose(N.sparsemax(x, axis=1), entmax.sparsemax(_torch(x), 1).numpy(), atol=atol)
        np.testing.assert_allclose(N.entmax15(x, axis=1), entmax.entmax15(_torch(x), 1).numpy(), atol=atol)
        for alpha in (1.25, 1.5, 1.75, 2.25):
            np.testing.assert_allclose(
                N.entmax(x, alpha=alpha), entmax.entmax_bisect(_torch(x), alpha=alpha).numpy(), atol=10 * atol
            )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_columns_equal_the_shorter_rows(dtype):
    # entmax's test_mask and test_mask_alphas
    x = np.random.default_rng(42).normal(size=(2, 6)).astype(dtype)
    x[:, 3:] = -np.inf
    with jax.enable_x64(dtype == np.float64):
        for f in (N.sparsemax, N.entmax15, *(lambda z, a=a: N.entmax(z, alpha=a) for a in (1.25, 1.5, 1.75, 2.25))):
            y = np.asarray(f(x))
            np.testing.assert_array_equal(y[:, 3:], 0.0)
            np.testing.assert_allclose(y[:, :3], f(x[:, :3]), atol=1e-7)
        np.testing.assert_allclose(N.entmax(x, alpha=1.75), entmax.entmax_bisect(_torch(x), 1.75).numpy(), atol=1e-6)


def test_entmax_gradients_match_entmax_bisect_backward():
    # entmax's test_entmax_grad_multiple_alphas: the package's hand-written backward, for x and alpha
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6))
    alpha = 1.05 + 1.4 * rng.random((4, 1))
    cotangent = rng.normal(size=(4, 6))
    xt = _torch(x).requires_grad_()
    at = _torch(alpha).requires_grad_()
    (entmax.entmax_bisect(xt, at, n_iter=60) * _torch(cotangent)).sum().backward()
    with jax.enable_x64(True):
        gx, ga = jax.grad(lambda x, a: jnp.sum(N.entmax(x, alpha=a) * cotangent), argnums=(0, 1))(x, alpha)
    np.testing.assert_allclose(gx, xt.grad.numpy(), atol=1e-8)
    np.testing.assert_allclose(ga, at.grad.numpy(), atol=1e-7)


# --- entmax package: losses (entmax's test_losses.py) ------------------------------------------


@pytest.mark.parametrize(
    ("name", "theirs"),
    [
        ("sparsemax", lambda **kw: entmax.SparsemaxLoss(**kw)),
        ("entmax15", lambda **kw: entmax.Entmax15Loss(**kw)),
        ("sparsemax_bisect", lambda **kw: entmax.SparsemaxBisectLoss(**kw)),
        ("entmax_bisect", lambda **kw: entmax.EntmaxBisectLoss(alpha=1.3, n_iter=60, **kw)),
    ],
)
def test_losses_match_the_entmax_package_with_ignore_index(name, theirs):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 6))
    y = rng.integers(0, 6, 20)
    ours = {
        "sparsemax": losses.multiclass_sparsemax_loss,
        "entmax15": losses.entmax15_loss,
        "sparsemax_bisect": losses.multiclass_sparsemax_loss,
        "entmax_bisect": lambda x, y, **kw: losses.entmax_loss(x, y, alpha=1.3, **kw),
    }[name]
    xt = _torch(x).requires_grad_()
    want = theirs(reduction="none")(xt, _torch(y))
    ignored = int(y[0])
    want_sum = theirs(reduction="sum", ignore_index=ignored)(xt, _torch(y))
    want_sum.backward()
    with jax.enable_x64(True):
        np.testing.assert_allclose(ours(x, y), want.detach().numpy(), atol=1e-9)
        assert np.all(np.asarray(ours(x, y)) >= 0)  # entmax's test_non_neg
        # ignore_index is a per-example where (its gradient too)
        total, grad = jax.value_and_grad(lambda x: ours(x, y, where=y != ignored).sum())(x)
        total, grad = float(total), np.asarray(grad)
    np.testing.assert_allclose(total, want_sum.item(), rtol=1e-9)
    np.testing.assert_allclose(grad, xt.grad.numpy(), atol=1e-9)
    assert total < want.sum().item()  # entmax's test_index_ignored
