"""The sparsity experiment: known zero fractions, the quick config end to end, and attention_logits
reproducing the model it was taken from."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import cli, experiments
from attnlab.experiments import sparsity
from attnlab.experiments.config import ConfigError
from attnlab.experiments.results import read_json
from attnlab.nn import ModelConfig, TransformerLM
from attnlab.nn.inspect import attention_logits, causal_mask, query_key_value
from attnlab.normalizers import get, softmax

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "sparsity_quick.toml"
RECORD_KEYS = {
    "input",
    "normalizer",
    "n",
    "scale",
    "layer",
    "rows",
    "zero_fraction",
    "zero_fraction_std",
    "support_size",
    "support_size_std",
    "max_weight",
    "max_weight_std",
}
MODEL_KEYS = {"model_train_loss", "model_validation_loss"}
RECORD_KEYS |= {"point_key"}  # every record carries its sweep point's key


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparsity")
    assert cli.main(["run", str(QUICK), "--out", str(out), "--no-progress"]) == 0
    return out


def _stats(name, logits, where=None, **params):
    measured = sparsity.row_sparsity(get(name, **params), jnp.asarray(logits, jnp.float32), where)
    return {k: np.asarray(v) for k, v in measured.items()}


def test_sparsemax_on_two_entries_keeps_both_iff_the_gap_is_below_one():
    # sparsemax([t, 0]) = ((1 + t) / 2, (1 - t) / 2) for t < 1, else (1, 0).
    measured = _stats("sparsemax", [[0.5, 0.0], [0.99, 0.0], [1.01, 0.0], [3.0, 0.0]])
    np.testing.assert_array_equal(measured["zero_fraction"], [0.0, 0.0, 0.5, 0.5])
    np.testing.assert_array_equal(measured["support_size"], [2, 2, 1, 1])
    np.testing.assert_allclose(measured["max_weight"], [0.75, 0.995, 1.0, 1.0], rtol=1e-6)


def test_equal_logits_have_no_zeros_and_masked_keys_are_not_counted_as_zeros():
    for name in ("sparsemax", "entmax15", "logn_sparsemax"):
        measured = _stats(name, np.full((1, 7), 2.5))
        assert measured["zero_fraction"][0] == 0.0 and measured["support_size"][0] == 7, name
        np.testing.assert_allclose(measured["max_weight"], [1 / 7], rtol=1e-6)
    # Third key hidden: the row is sparsemax([0.5, 0]) over n = 2 valid keys, no zero among them.
    masked = _stats("sparsemax", [[0.5, 0.0, 100.0]], jnp.asarray([[True, True, False]]))
    assert masked["zero_fraction"][0] == 0.0 and masked["support_size"][0] == 2


def test_softmax_has_no_zeros_even_on_wide_rows():
    rows = 4.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 5000))
    measured = _stats("softmax", rows)
    assert np.all(measured["zero_fraction"] == 0.0) and np.all(measured["support_size"] == 5000)


def test_sparsemax_zeros_grow_with_the_logit_scale_on_every_row():
    # support(sparsemax(c z)) = max{k : c (sum_{j<=k} z_(j) - k z_(k)) < 1} shrinks as c grows.
    rows = jax.random.normal(jax.random.PRNGKey(1), (16, 300))
    scales = jnp.asarray([0.05, 0.5, 1.0, 2.0, 4.0, 50.0])
    zeros = _stats("sparsemax", scales[:, None, None] * rows)["zero_fraction"]  # [scale, row]
    assert np.all(np.diff(zeros, axis=0) >= 0)
    assert np.all(zeros[0] < zeros[-1])


def test_quick_config_writes_every_record_and_the_known_values(quick_run):
    payload = read_json(quick_run / "sparsity_quick.json")
    config = experiments.load(QUICK).config
    records = payload["records"]
    synthetic = [r for r in records if r["input"] == "synthetic"]
    model = [r for r in records if r["input"] == "model"]
    lengths = sparsity.model_row_lengths(config.training.seq_len, config.model_positions)
    assert lengths == (1, 4, 16, 64) and payload["config"]["model_row_lengths"] == list(lengths)
    # The model and its training are nested tables, as in the other kinds that train a model.
    assert payload["config"]["model"] == {"layers": 1, "width": 32, "heads": 2, "rope_theta": 10000.0}
    assert payload["config"]["training"]["steps"] == 20 and payload["config"]["training"]["learning_rate"] == 3e-3
    assert not any(key in payload["config"] for key in ("model_width", "model_steps", "model_seq_len"))
    labels = [s.label for s in config.normalizers]
    assert len(synthetic) == len(labels) * len(config.lengths.values) * len(config.scales)
    assert len(model) == len(labels) * config.model.layers * len(lengths) * len(config.model_scales)
    assert all(set(r) == RECORD_KEYS for r in synthetic)
    assert all(set(r) == RECORD_KEYS | MODEL_KEYS for r in model)
    assert {r["layer"] for r in synthetic} == {None} and {r["n"] for r in model} == set(lengths)
    assert all(0.0 <= r["zero_fraction"] <= 1.0 for r in records)
    assert all(r["zero_fraction"] == 0.0 for r in records if r["normalizer"] == "softmax")
    for r in records:  # support and zero fraction count the same keys
        assert r["support_size"] == pytest.approx((1 - r["zero_fraction"]) * r["n"])
    for n in config.lengths.values:
        low, high = (
            next(r for r in synthetic if r["normalizer"] == "sparsemax" and r["n"] == n and r["scale"] == c)
            for c in (1.0, 4.0)
        )
        assert high["zero_fraction"] >= low["zero_fraction"] > 0.5
    first_row = [r for r in model if r["n"] == 1]
    assert all(r["support_size"] == 1 and r["max_weight"] == 1.0 for r in first_row)
    assert model[0]["model_validation_loss"] < np.log(256)  # it learned something about bytes
    assert all(r["rows"] == config.model_windows * config.model.heads for r in model)
    assert len({(r["model_train_loss"], r["model_validation_loss"]) for r in model}) == 1  # one model for all


def test_rerun_resumes_and_figures_are_rebuilt_byte_identically(quick_run):
    figures = sorted((quick_run / "figures").glob("sparsity_quick_*"))
    assert [f.name for f in figures] == [
        f"sparsity_quick_{stem}.{ext}" for stem in ("model", "vs_n", "vs_scale") for ext in ("png", "svg")
    ]
    before = {f.name: f.read_bytes() for f in figures}
    count = len(read_json(quick_run / "sparsity_quick.json")["records"])
    assert cli.main(["run", str(QUICK), "--out", str(quick_run), "--no-progress", "--no-figures"]) == 0
    assert len(read_json(quick_run / "sparsity_quick.json")["records"]) == count  # every point was done
    assert cli.main(["figures", str(quick_run)]) == 0
    assert {f.name: f.read_bytes() for f in sorted((quick_run / "figures").glob("sparsity_quick_*"))} == before


def _forward_from_logits(model, tokens, logits):
    """The model's logits recomputed with each layer's attention weights = softmax(logits[l], causal)."""
    h = model.embed(tokens)
    mask = causal_mask(tokens.shape[1])
    for layer, block in enumerate(model.blocks):
        x = block.attention_norm(h)
        _, _, value = query_key_value(block.attention, x)
        weights = softmax(logits[layer], where=mask)  # [B, N, T, S]
        value = jnp.repeat(value, weights.shape[1] // value.shape[2], axis=2)  # key/value head of head n: n // G
        h = h + block.attention.out(jnp.einsum("bnts,bsnh->btnh", weights, value))
        h = h + block.mlp(block.mlp_norm(h))
    return model.embed.attend(model.final_norm(h))


@nnx.jit
def _model_and_recomputed(model, tokens, other_theta):
    """(logits [L, B, N, T, T], the model's output, the output recomputed from those logits, and
    recomputed from logits taken with RoPE base other_theta): one compilation, not op by op."""
    logits = attention_logits(model, tokens)
    other = attention_logits(model, tokens, rope_theta=other_theta)
    recomputed = _forward_from_logits(model, tokens, logits)
    return logits, model(tokens), recomputed, _forward_from_logits(model, tokens, other)


def test_attention_logits_reproduce_the_trained_model(quick_run):
    config = experiments.load(QUICK).config
    setup = sparsity.ModelSetup.of(config)
    model, trained = sparsity.trained_model(config.model, config.training)  # the run's model, cached
    assert [entry["step"] for entry in trained["history"]] == [5, 10, 15, 20]
    records = read_json(quick_run / "sparsity_quick.json")["records"]
    assert {r["model_train_loss"] for r in records if r["input"] == "model"} == {trained["history"][-1]["loss"]}
    tokens = jnp.asarray(sparsity.validation_windows(setup).inputs)
    logits, expected, recomputed, _ = _model_and_recomputed(model, tokens, jnp.float32(100.0))
    seq_len = config.training.seq_len
    assert logits.shape == (config.model.layers, config.model_windows, config.model.heads, seq_len, seq_len)
    np.testing.assert_allclose(recomputed, expected, atol=2e-5, rtol=1e-5)


def test_attention_logits_with_grouped_heads_and_the_rope_base_matter():
    model = TransformerLM(
        ModelConfig(vocab_size=32, num_layers=2, width=32, num_heads=4, num_kv_heads=2, init_std=0.4),
        rngs=nnx.Rngs(3),
    )
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 32)
    logits, expected, recomputed, other = _model_and_recomputed(model, tokens, jnp.float32(100.0))
    assert logits.shape == (2, 2, 4, 10, 10) and float(jnp.std(logits)) > 0.5  # far from uniform attention
    np.testing.assert_allclose(recomputed, expected, atol=2e-5, rtol=1e-5)
    # The check can fail: logits taken with another RoPE base no longer give the model's output.
    assert not np.allclose(other, expected, atol=1e-3)


@pytest.mark.parametrize(
    "line, key",
    [
        ("scales = [1.0, 0.0]", "scales"),
        ("model_scales = []", "model_scales"),
        ('inputs = ["gaussian"]', "inputs"),
        ("seeds = 0", "seeds"),
        ("model_windows = 0", "model_windows"),
        ("[model]\nwidth = 30", "model.width"),
        ("[training]\nsteps = 0", "training.steps"),
        ("[training]\nlr = 0.1", "'lr'"),
        ("model_steps = 250", "'model_steps'"),  # the flat keys are gone: [model] and [training] tables
        ("model_lr = 0.1", "model_lr"),
    ],
)
def test_a_bad_value_names_its_key(tmp_path, line, key):
    path = tmp_path / "bad.toml"
    path.write_text(f'kind = "sparsity"\n{line}\n')
    with pytest.raises(ConfigError) as err:
        experiments.load(path)
    assert len(err.value.problems) == 1 and str(path) in str(err.value) and key in str(err.value)


def test_the_full_config_spells_out_the_defaults():
    config = experiments.load(REPO / "experiments" / "sparsity.toml").config
    assert config == sparsity.Config()
    assert config.model == sparsity.lm.ModelSetting(layers=3, width=96, heads=4)
    assert (config.training.steps, config.training.seq_len, config.training.learning_rate) == (250, 256, 3e-3)
