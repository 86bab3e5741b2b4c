"""Every registered normalizer's description is consistent, and what is derived from it agrees."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

import attnlab.normalizers as N
from attnlab import losses
from attnlab.normalizers.describe import ALPHA, POSITIVE, RAW

BUILT_IN = tuple(N.NAMES)
FAMILY_ATTRIBUTE = {N.SOFTMAX: "sink", N.THRESHOLD: "alpha", N.ELEMENTWISE: "bias"}


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_entry_builds_from_its_descriptions(name):
    entry = N.entry(name)
    assert entry.label and entry.summary and entry.color.startswith("#")
    assert entry.family in N.FAMILIES
    normalizer = N.get(name)
    assert normalizer.name == name and normalizer.family in N.FAMILIES
    # The mapping's fields are its described parameters, in order.
    fields = [f.name for f in dataclasses.fields(entry.mapping)]
    assert fields == [p.name for p in entry.mapping.description.parameters]
    # The family's attribute, through which attention backends run it without whole rows.
    if entry.family in FAMILY_ATTRIBUTE:
        assert hasattr(normalizer.mapping, FAMILY_ATTRIBUTE[entry.family])
    # The functional API documents every parameter from its description.
    if hasattr(N, name):
        for p in entry.parameters:
            assert f"  {p.name}: {p.summary}" in getattr(N, name).__doc__
    z = jnp.asarray([[0.5, -1.0, 2.0, 0.0]])
    p = normalizer(z)
    assert p.shape == z.shape and bool(jnp.all(p >= 0))
    if entry.mapping.description.normalized:
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_spec_round_trips_through_its_table(name):
    learnable = tuple(p.name for p in N.entry(name).parameters if p.learn is not None)
    starts = {"bias": 0.1} if name == "sigmoid" else {}
    for learn in (None, (), learnable):
        spec = N.NormalizerSpec(name, starts, label=f"{name} {learn}", learn=learn)
        assert N.NormalizerSpec.parse(spec.to_json()) == spec
        start = spec.initial_params(3)
        assert set(start) == set(spec.learned) and all(v.shape == (3, 1, 1) for v in start.values())
        built = spec.build({k: jnp.asarray(v) for k, v in start.items()})
        z = jnp.linspace(-2.0, 2.0, 36).reshape(1, 3, 2, 6)  # [B, H, T, S]: one parameter per head
        np.testing.assert_allclose(built(z), spec.build()(z), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("learn", "value"), [(RAW, -0.7), (POSITIVE, 0.25), (ALPHA, 1.3)])
def test_parametrisations_invert(learn, value):
    assert float(learn.to_value(jnp.asarray(learn.from_value(value)))) == pytest.approx(value, rel=1e-6)


def test_alpha_learned_stays_inside_its_range():
    assert float(ALPHA.to_value(jnp.asarray(-50.0))) == pytest.approx(1.01)
    assert float(ALPHA.to_value(jnp.asarray(50.0))) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: N.NormalizerSpec("nosuch"), "unknown normalizer 'nosuch'; valid names are: softmax"),
        (lambda: N.NormalizerSpec("ssmax", {"beta": 1.0}), "normalizer 'ssmax' does not take beta; it accepts s, bias"),
        (lambda: N.NormalizerSpec("ssmax", learn=("n",)), "'ssmax' cannot learn 'n'; learnable: s, bias"),
        (lambda: N.NormalizerSpec("softpick", learn=("eps",)), "'softpick' cannot learn 'eps'; learnable: nothing"),
        (
            lambda: N.NormalizerSpec("entmax", {"alpha": 2.0}, learn=("alpha",)),
            r"cannot start at 2.0; accepted: \[1.01",
        ),
        (lambda: N.NormalizerSpec("sigmoid", learn=("bias",)), "learning 'bias' of 'sigmoid' needs a start value"),
        (lambda: N.NormalizerSpec("ssmax", {"s": -1.0}), r"parameter 's' must be > 0; got \[-1.0\]"),
        (lambda: N.NormalizerSpec("ssmax", learn="s"), "learn must be a list of parameter names"),
        (lambda: N.NormalizerSpec("ssmax", {"s": "big"}), r"params\['s'\] must be a number"),
        (
            lambda: N.NormalizerSpec.parse({"name": "ssmax", "learn_s": False}),
            "'learn_s' is no longer a key; write learn",
        ),
        (lambda: N.as_spec(3, "ModelConfig.normalizer"), "ModelConfig.normalizer must be a name"),
    ],
)
def test_spec_errors_name_the_value_and_what_is_accepted(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_the_default_learned_parameters_come_from_the_descriptions():
    assert N.NormalizerSpec("ssmax").learn == ("s",) and N.NormalizerSpec("ssmax").learned == ("s",)
    assert N.NormalizerSpec("logn_entmax", learn=("alpha", "bias")).learned == ("alpha_logit", "bias")
    assert N.NormalizerSpec("scaled_softmax", {"temperature": 2.0}, learn=("temperature",)).initial_params(1)[
        "log_temperature"
    ][0, 0, 0] == pytest.approx(math.log(2.0))
    assert N.NormalizerSpec("softmax").learn == () and N.NormalizerSpec("softmax").to_json() == {
        "name": "softmax",
        "label": "softmax",
    }


def test_register_checks_what_it_is_given():
    with pytest.raises(ValueError, match="lower-case letters"):
        N.register("Bad Name", N.Softmax)
    with pytest.raises(ValueError, match=r"must be a class made with attnlab\.normalizers\.describe\.described"):
        N.register("plain", dict)
    with pytest.raises(ValueError, match="describing a scale policy"):
        N.register("twice", N.Softmax, N.Sparsemax)
    with pytest.raises(ValueError, match=r"both take \['bias'\]"):
        N.register("sigmoid_logn", N.Sigmoid, N.LogN)
    assert "twice" not in N.NAMES and "sigmoid_logn" not in N.NAMES
    # Registering the same entry again is a no-op.
    assert N.register("softmax", N.Softmax, color=N.entry("softmax").color) == N.entry("softmax")


def test_the_output_mappings_of_the_losses_are_the_unscaled_entmax_family():
    assert tuple(losses.MAPPINGS)[:4] == ("softmax", "sparsemax", "entmax15", "entmax")
    assert "ssmax" not in losses.MAPPINGS and "softmax1" not in losses.MAPPINGS


def test_described_refuses_fields_that_are_not_its_parameters():
    with pytest.raises(TypeError, match=r"dataclass fields \['x'\] must be the described parameters \[\]"):

        @N.described(N.Description("odd", "odd", "z", family=N.GENERIC))
        class Odd:
            x: float = 1.0
