"""A normalizer defined here, outside the package, runs everywhere attnlab's own do.

Power-softmax, p_i = exp(z_i)^a / sum_j exp(z_j)^a = softmax(a z) with a learnable exponent a > 0,
is one described class and one `register` call. With no edit to `attnlab/` it runs through dense
and memory-efficient attention, the NNX and Linen layers (learning a per head), the TOML configs
of the fading and length-generalisation kinds, and their figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlab.normalizers as N
from attnlab import cli, figures
from attnlab.attention import dot_product_attention
from attnlab.nn import LinenMultiHeadAttention, MultiHeadAttention
from attnlab.normalizers.mappings import softmax_rows

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@N.described(
    N.Description(
        "power_softmax",
        "power softmax",
        "exp(z)^a / sum exp(z)^a",
        family=N.GENERIC,
        parameters=(N.Parameter("a", 1.0, "exponent", minimum=0.0, inclusive=False, learn=N.describe.POSITIVE),),
    )
)
class PowerSoftmax:
    a: Any = 1.0

    def __call__(self, z: jax.Array, valid: jax.Array, align) -> jax.Array:
        return softmax_rows(align(self.a, "a") * z, valid)


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Registered for this module's tests only: other tests in the process see the built-in names."""
    N.register("power_softmax", PowerSoftmax, label="power softmax (a)")
    yield
    N.unregister("power_softmax")


def _qkv(T=24, S=24, N_heads=2, H=8):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    shapes = ((1, T, N_heads, H), (1, S, N_heads, H), (1, S, N_heads, H))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]


def test_it_is_registered_with_its_description():
    assert "power_softmax" in N.NAMES and N.parameters("power_softmax") == {"a": 1.0}
    assert N.entry("power_softmax").family == N.GENERIC
    z = jnp.asarray([[0.3, -1.0, 2.0]])
    np.testing.assert_allclose(N.get("power_softmax", a=2.5)(z), jax.nn.softmax(2.5 * z), rtol=1e-6)
    with pytest.raises(ValueError, match=r"power_softmax: parameter 'a' must be > 0; got \[-1.0\]"):
        N.get("power_softmax", a=-1.0)
    with pytest.raises(ValueError, match="a different normalizer is already registered"):
        N.register("power_softmax", PowerSoftmax, label="another")
    with pytest.raises(ValueError, match="unknown normalizer 'no_such'"):
        N.unregister("no_such")


def test_dense_and_chunked_attention_agree_with_softmax_of_scaled_scores():
    q, k, v = _qkv()
    normalizer = N.get("power_softmax", a=1.7)
    want = jax.nn.dot_product_attention(q * 1.7, k, v, is_causal=True)
    for implementation in ("dense", "chunked"):
        out = dot_product_attention(
            q, k, v, normalizer=normalizer, is_causal=True, implementation=implementation, query_block=8
        )
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6, err_msg=implementation)

    def loss(a, implementation):
        norm = N.get("power_softmax", a=a)
        return jnp.sum(dot_product_attention(q, k, v, normalizer=norm, implementation=implementation, query_block=8))

    grads = [jax.grad(loss)(jnp.asarray(1.7), impl) for impl in ("dense", "chunked")]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4)


def test_the_nnx_and_linen_layers_learn_its_exponent_per_head():
    spec = N.NormalizerSpec("power_softmax", {"a": 2.0}, learn=("a",))
    assert spec.learned == ("log_a",)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
    layer = MultiHeadAttention(num_heads=2, in_features=16, normalizer=spec, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer.normalizer.log_a[...], np.log(2.0) * np.ones((2, 1, 1)), rtol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(x, is_causal=True) ** 2))(layer)
    assert np.all(np.abs(grads.normalizer.log_a[...]) > 0)

    linen = LinenMultiHeadAttention(num_heads=2, normalizer=spec)
    variables = linen.init(jax.random.PRNGKey(0), x, is_causal=True)
    leaves = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
    (name,) = [path for path in leaves if "log_a" in path]
    grads = jax.grad(lambda p: jnp.sum(linen.apply(p, x, is_causal=True) ** 2))(variables)
    grad_leaves = dict((jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(grads))
    assert grad_leaves[name].shape == (2, 1, 1) and np.all(np.abs(grad_leaves[name]) > 0)


def test_configs_of_the_fading_and_length_generalization_kinds_run_it_and_draw_it(tmp_path, capsys):
    out = tmp_path / "results"
    fading = [
        "--set",
        "normalizers=['softmax', { name = 'power_softmax', a = 2.0, label = 'power a=2' }]",
        "--set",
        "seeds=1",
        "--set",
        "lengths=[10, 100]",
    ]
    length = [
        "--set",
        "normalizers=[{ name = 'power_softmax', learn = ['a'] }]",
        "--set",
        "training.steps=3",
        "--set",
        "training.log_every=1",
        "--set",
        "rope_theta_factors=[1.0]",
        "--set",
        "seeds=[0]",
    ]
    for config, overrides in (("fading_synthetic_quick", fading), ("length_generalization_quick", length)):
        code = cli.main(["run", str(EXPERIMENTS / f"{config}.toml"), "--out", str(out), *overrides, "--no-progress"])
        assert code == 0, capsys.readouterr()

    drawn = figures.render_all(out)
    names = [p.name for paths in drawn.values() for p in paths]
    assert any(n.startswith("fading_synthetic_quick") for n in names)
    assert any(n.startswith("length_generalization_quick") for n in names)
    svg = (out / "figures" / "fading_synthetic_quick_max_weight.svg").read_text()
    assert "power a=2" in svg
    trained = [p for p in (out / "figures").glob("length_generalization_quick*.svg")]
    assert any("power softmax (a)" in p.read_text() for p in trained)
