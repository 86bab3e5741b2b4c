"""Context-parallel attention (attention.context_parallel): on 4 forced CPU devices (one subprocess,
since JAX fixes its device count at import) the sharded call equals the single-device dense
reference in values and in the gradients of query, key, value and the normalizer's learnable
parameter, causal and with documents; in process: the layouts and the errors."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from attnlab.attention import context_parallel as cp
from attnlab.attention import dot_product_attention

FOUR_DEVICES = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from attnlab import normalizers
    from attnlab.attention import context_parallel as cp, dot_product_attention, mask_functions as mf

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("context",))
    B, T, N, K, H = 2, 32, 4, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k, v = (jax.random.normal(key, (B, T, K, H)) for key in keys[1:3])
    w = jax.random.normal(keys[3], (B, T, N, H))
    # Documents of uneven lengths that cut across the zigzag chunks (chunk = 4 positions).
    segments = jnp.asarray(np.repeat([[0] * 5 + [1] * 14 + [2] * 13], B, 0) + np.arange(B)[:, None])
    per_head = lambda lo, hi: jnp.linspace(lo, hi, N).reshape(N, 1, 1)
    # name, its learnable parameter (one per head) or None, causal, documents, scheme, layout
    SMALL = [
        ("ssmax", ("s", per_head(0.3, 0.6)), True, True, "ring", "zigzag"),
        ("sink_softmax", ("sink", per_head(-1.0, 1.0)), True, False, "ring", "striped"),
        ("sigmoid", ("bias", per_head(-2.0, 0.0)), False, True, "ring", "zigzag"),
        ("entmax15", None, True, True, "sharded_threshold", "zigzag"),
        ("asentmax", ("beta", per_head(0.3, 0.8)), True, True, "sharded_threshold", "contiguous"),
        ("entmax", ("alpha", 1.33), True, False, "sharded_threshold", "zigzag"),
        ("stick_breaking", None, True, True, "all_gather", "zigzag"),
    ]
    if sys.argv[1] == "all":
        cases = [(name, None, causal, docs, None, "zigzag")
                 for name in normalizers.NAMES for causal, docs in ((True, False), (True, True), (False, True))]
    else:
        cases = SMALL

    def attend(name, param, causal, docs, cp_scheme, layout):
        def normalizer(value):
            return normalizers.get(name) if param is None else normalizers.get(name, **{param[0]: value})

        def reference(q, k, v, value):
            return dot_product_attention(q, k, v, normalizer=normalizer(value), is_causal=causal,
                                         mask_fn=mf.document_mask(segments) if docs else None, implementation="dense")

        def sharded(q, k, v, value):
            return cp.context_parallel_attention(q, k, v, normalizer=normalizer(value), mesh=mesh, is_causal=causal,
                                                 segment_ids=segments if docs else None, scheme=cp_scheme,
                                                 layout=layout, key_block=8, query_block=4)
        return reference, sharded

    def values_and_grads(f, value):
        out, pullback = jax.vjp(f, q, k, v, value)
        return out, pullback(w)

    for case in cases:
        name, param = case[0], case[1]
        reference, sharded = attend(*case)
        if param is not None and param[0] == "alpha":  # a concrete alpha (static), not differentiated
            ref_f = lambda q, k, v, _, f=reference, a=param[1]: f(q, k, v, a)
            cp_f = lambda q, k, v, _, f=sharded, a=param[1]: f(q, k, v, a)
            value = jnp.float32(0.0)
        else:
            ref_f, cp_f = reference, sharded
            value = jnp.float32(0.0) if param is None else param[1]
        want, want_grads = jax.jit(lambda x: values_and_grads(ref_f, x))(value)
        got, got_grads = jax.jit(lambda x: values_and_grads(cp_f, x))(value)
        scale = lambda x: max(1.0, float(jnp.max(jnp.abs(x))))
        errors = [float(jnp.max(jnp.abs(a - b))) / scale(a) for a, b in zip((want, *want_grads), (got, *got_grads))]
        label = ",".join(map(str, (name, *case[2:])))
        print("CASE", label, " ".join(f"{e:.1e}" for e in errors), flush=True)
        assert max(errors) < 1e-5, (label, errors)
        assert float(jnp.max(jnp.abs(got))) > 0.1, label  # not vacuous: the outputs are not all 0
    print("DONE", len(cases))
    """
)


def _run_on_four_devices(which: str) -> str:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES, which], env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DONE" in done.stdout, done.stdout
    return done.stdout


def test_sharded_attention_on_four_devices_equals_one_device_in_values_and_gradients():
    """Each scheme and family, causal and with documents, every layout once: SSMax, a learned sink
    and sigmoid's learned bias on the ring; 1.5-entmax, ASEntmax (learned beta) and alpha = 1.33 on
    the sharded threshold search; stick-breaking all-gathered. Errors relative to max(1, |reference|)."""
    out = _run_on_four_devices("small")
    assert out.count("CASE") == 7, out


@pytest.mark.slow
def test_every_registered_normalizer_on_four_devices_equals_one_device():
    """The whole registry, causal, causal with documents and documents alone, each by its default scheme."""
    from attnlab import normalizers

    out = _run_on_four_devices("all")
    assert out.count("CASE") == 3 * len(normalizers.NAMES), out


# ---------------------------------------------------------------------------------------------- in process


def test_zigzag_gives_each_shard_an_early_and_a_late_chunk_and_round_trips():
    positions = cp.layout_positions(16, 2, "zigzag")
    np.testing.assert_array_equal(positions, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(cp.layout_positions(8, 2, "striped"), [0, 2, 4, 6, 1, 3, 5, 7])
    np.testing.assert_array_equal(cp.layout_positions(8, 2, "contiguous"), np.arange(8))
    x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3)
    for layout in cp.LAYOUTS:
        laid = cp.lay_out(x, 3, layout)
        assert not (layout != "contiguous" and bool(jnp.all(laid == x)))
        np.testing.assert_array_equal(cp.restore_order(laid, 3, layout), x)

    # Causal work (visible pairs) per shard: zigzag balances it exactly, contiguous does not.
    def work(layout):
        return [int(np.sum(rows + 1)) for rows in cp.layout_positions(32, 4, layout).reshape(4, 8)]

    assert len(set(work("zigzag"))) == 1
    assert work("contiguous")[-1] > 5 * work("contiguous")[0]


@pytest.mark.slow  # the 4-device test runs the same schemes; 10 s
def test_one_device_mesh_is_the_single_device_call():
    mesh = Mesh(np.array(jax.devices()[:1]), ("context",))
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(key, (1, 8, 2, 4)) for key in keys)
    for name in ("softmax", "sparsemax", "stablemax"):
        want = dot_product_attention(q, k, v, normalizer=name, is_causal=True)
        got = cp.context_parallel_attention(q, k, v, normalizer=name, mesh=mesh, is_causal=True)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_layout_errors_name_the_length_and_what_is_accepted():
    with pytest.raises(ValueError, match=r"sequence length 12 must be a positive multiple of 8 \(2 x 4 shards\)"):
        cp.layout_positions(12, 4, "zigzag")
    with pytest.raises(ValueError, match=r"sequence length 6 must be a positive multiple of 4 .*'striped'"):
        cp.lay_out(jnp.zeros((1, 6)), 4, "striped")
    with pytest.raises(ValueError, match="layout='spiral'; accepted: 'zigzag', 'striped', 'contiguous'"):
        cp.layout_positions(8, 2, "spiral")
    with pytest.raises(ValueError, match="shards must be a positive int"):
        cp.layout_positions(8, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"length": 3}, "sequence length 3 must be a positive multiple of 2 (2 x 1 shards) for layout 'zigzag'"),
        ({"axis_name": "sequence"}, "axis_name='sequence' is not an axis of the mesh; its axes: ('context',)"),
        ({"scheme": "ring", "normalizer": "entmax15"}, "scheme='ring' cannot serve this call"),
        ({"scheme": "sharded_threshold", "normalizer": "softmax"}, "one concrete alpha in (1, 2]"),
        ({"scheme": "bucket"}, "scheme='bucket'; accepted: None, 'ring', 'sharded_threshold', 'all_gather'"),
        ({"segment_ids": np.zeros((1, 8), np.float32)}, "segment_ids must be ints [B, T] = (1, 8)"),
        ({"kv_length": 4}, "key length 4 != query length 8"),
        ({"per_query": True}, "has shape (1, 2, 8, 1); context-parallel attention takes parameters"),
        ({"mesh": "context"}, "mesh must be a jax.sharding.Mesh; got str"),
    ],
)
def test_errors_name_the_value_and_what_is_accepted(kwargs, message):
    from attnlab import normalizers

    length = kwargs.pop("length", 8)
    q = jnp.ones((1, length, 2, 4))
    k = v = jnp.ones((1, kwargs.pop("kv_length", length), 2, 4))
    if kwargs.pop("per_query", False):
        kwargs["normalizer"] = normalizers.get("sink_softmax", sink=jnp.zeros((1, 2, length, 1)))
    kwargs.setdefault("mesh", Mesh(np.array(jax.devices()[:1]), ("context",)))
    with pytest.raises(ValueError) as error:
        cp.context_parallel_attention(q, k, v, **kwargs)
    assert message in str(error.value)
