"""The extrapolation kind: one LM per seed x normalizer x positional encoding, trained on associative
recall at L and tested at longer lengths.

The quick config runs once per module (one-layer models, a few steps), with every call of the
training loop watched; the tests check the records (one training record and one per length for
every point), the summary's intervals and paired differences, that a seed fixes the
initialisation and the data (the same for every normalizer and encoding), the held-out
sequences, the figures, the findings on a crafted payload, and the config checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from attnlab import cli, experiments, figures
from attnlab.experiments import extrapolation, lm
from attnlab.experiments.config import ConfigError
from attnlab.experiments.intervals import paired_difference, t_interval
from attnlab.figures import extrapolation as drawn
from attnlab.figures.findings import interval_text
from attnlab.normalizers import NormalizerSpec

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "extrapolation_quick.toml"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, watch_training):
    """Runs the quick config (figures included); returns (folder, payload, calls), calls as
    conftest's watch_training records them, one per trained model."""
    out = tmp_path_factory.mktemp("results")
    calls: list[dict] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm, "train_model", watch_training(calls))
        assert cli.main(["run", str(QUICK), "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "extrapolation_quick.json").read_text()), calls


def test_one_training_record_and_one_per_length_for_every_point(quick_run):
    _, payload, _ = quick_run
    config = experiments.load(QUICK).config
    records = payload["records"]
    expected = {(s.label, p, seed) for s in config.normalizers for p in config.positionals for seed in config.seeds}
    trained = [r for r in records if r["record"] == "training"]
    evaluated = [r for r in records if r["record"] == "evaluation"]
    assert len(trained) == len(expected) == 8 and len(evaluated) == 8 * len(config.eval_lengths)
    assert {(r["normalizer"], r["positional"], r["seed"]) for r in trained} == expected
    # Seed first: an interrupted run holds whole seeds.
    assert [r["seed"] for r in trained] == [0] * 4 + [1] * 4
    for r in trained:
        assert r["adaptive_scale"] == (r["normalizer"] == "asentmax")  # ASEntmax's scale from each query
        assert r["train_loss"] == r["history"][-1]["loss"] and r["steps"] == config.training.steps
    assert len({r["model_key"] for r in trained}) == 8  # the encoding is part of the model's key
    for r in evaluated:
        assert r["length_factor"] == r["length"] / config.training.seq_len
        assert 0 <= r["sequence_accuracy"] <= r["accuracy"] <= 1 and r["loss"] > 0
        assert r["queries"] == config.eval_examples * config.num_kv_pairs
        assert r["batch_size"] == config.eval_batch_size(r["length"])
    assert sorted({r["length"] for r in evaluated}) == list(config.eval_lengths)


def test_summary_holds_t_intervals_over_seeds_and_differences_paired_within_an_encoding(quick_run):
    _, payload, _ = quick_run
    summary = payload["summary"]["evaluation"]
    assert summary["method"] == "t" and summary["level"] == 0.95
    evaluated = [r for r in payload["records"] if r["record"] == "evaluation"]

    def per_seed(label, positional, length, metric):
        rows = [r for r in evaluated if (r["normalizer"], r["positional"], r["length"]) == (label, positional, length)]
        return [r[metric] for r in sorted(rows, key=lambda r: r["seed"])]

    assert len(summary["groups"]) == 2 * 2 * 2
    for group in summary["groups"]:
        assert group["seeds"] == [0, 1] and set(extrapolation.EVALUATION_METRICS) <= set(group)
        values = per_seed(group["normalizer"], group["positional"], group["length"], "loss")
        assert group["loss"]["mean"] == pytest.approx(np.mean(values))
        assert group["loss"]["low"] == pytest.approx(t_interval(values).low)
    assert {(p["normalizer"], p["positional"], p["length"]) for p in summary["paired"]} == {
        ("asentmax", positional, length) for positional in ("none", "alibi") for length in (16, 64)
    }
    for pair in summary["paired"]:
        assert pair["against"] == {"normalizer": "softmax", "positional": pair["positional"], "length": pair["length"]}
        ours = per_seed("asentmax", pair["positional"], pair["length"], "loss")
        theirs = per_seed("softmax", pair["positional"], pair["length"], "loss")
        expected = paired_difference(ours, theirs)
        assert pair["loss"]["mean"] == pytest.approx(expected.mean)
        assert pair["loss"]["high"] == pytest.approx(expected.high)
    training = payload["summary"]["training"]
    assert {(g["normalizer"], g["positional"]) for g in training["groups"]} == {
        (n, p) for n in ("softmax", "asentmax") for p in ("none", "alibi")
    }


def test_a_seed_fixes_initialisation_and_data_for_every_normalizer_and_encoding(quick_run):
    _, payload, calls = quick_run
    assert len(calls) == 8
    by = {(c["label"], c["name"].split("_")[-2], c["seed"]): c for c in calls}
    assert set(by) == {(n, p, s) for n in ("softmax", "asentmax") for p in ("none", "alibi") for s in (0, 1)}
    for seed in (0, 1):
        same = [by[(n, p, seed)] for n in ("softmax", "asentmax") for p in ("none", "alibi")]
        # One seed: the same sequences in the same order for every model...
        assert all(np.array_equal(a, b) for c in same[1:] for a, b in zip(c["inputs"], same[0]["inputs"], strict=True))
        # ...and the same initial parameters under every encoding (none of them has parameters).
        assert by[("softmax", "none", seed)]["weights"] == by[("softmax", "alibi", seed)]["weights"]
        assert all(c["seq_len"] == 16 for c in same)
    assert by[("softmax", "none", 0)]["weights"] != by[("softmax", "none", 1)]["weights"]
    assert not np.array_equal(by[("softmax", "none", 0)]["inputs"][0], by[("softmax", "none", 1)]["inputs"][0])
    first = {(r["normalizer"], r["positional"], r["seed"]): r["history"][0]["loss"]
             for r in payload["records"] if r["record"] == "training"}  # fmt: skip
    assert first[("softmax", "none", 0)] != first[("softmax", "none", 1)]


def test_each_point_builds_its_encoding_and_adaptive_scale():
    config = extrapolation.Config()
    softmax, asentmax = (next(s for s in config.normalizers if s.name == name) for name in ("softmax", "asentmax"))
    setting = config.model_setting("alibi", asentmax)
    model = setting.build(asentmax, seed=0)
    assert model.config.positional == "alibi" and model.config.adaptive_scale
    assert (setting.layers, setting.width, setting.heads) == (
        config.model.layers,
        config.model.width,
        config.model.heads,
    )
    assert not config.model_setting("none", softmax).build(softmax, seed=0).config.adaptive_scale
    fixed = extrapolation.Config(adaptive_scale=False)
    assert not fixed.model_setting("rope", asentmax).adaptive_scale


def test_held_out_sequences_do_not_depend_on_the_batching():
    config = extrapolation.Config(eval_examples=6)
    task = config.task(64)
    one = extrapolation.evaluation_batches(task, 6, 6)
    three = extrapolation.evaluation_batches(task, 6, 2)
    assert len(one) == 1 and len(three) == 3 and one[0].inputs.shape == (6, 64)
    np.testing.assert_array_equal(np.concatenate([b.inputs for b in three]), one[0].inputs)
    assert np.all(one[0].loss_mask.sum(axis=1) == config.num_kv_pairs)
    # The largest divisor of eval_examples within the token budget, at least one sequence.
    sized = extrapolation.Config(eval_examples=12, eval_batch_tokens=5 * 64)
    assert [sized.eval_batch_size(n) for n in (32, 64, 128, 1024)] == [6, 4, 2, 1]


def test_figures_are_drawn_stable_and_work_without_a_summary(quick_run, tmp_path):
    out, _, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    files = {p.name: p.read_bytes() for p in sorted((copy / "figures").iterdir())}
    assert set(files) == {f"extrapolation_quick_{s}.{e}" for s in ("accuracy", "training") for e in ("png", "svg")}
    path = copy / "extrapolation_quick.json"
    payload = json.loads(path.read_text())
    del payload["summary"]  # a run in progress: the figures compute the same intervals from the records
    path.write_text(json.dumps(payload))
    shutil.rmtree(copy / "figures")
    figures.render(path)
    assert {p.name: p.read_bytes() for p in sorted((copy / "figures").iterdir())} == files


def test_a_rerun_trains_nothing(quick_run, replace_run_point, tmp_path):
    out, payload, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints", "figures"))

    def fail(*args, **kwargs):
        raise AssertionError("a finished point ran again")

    replace_run_point("extrapolation", fail)
    assert cli.main(["run", str(QUICK), "--out", str(copy), "--no-progress", "--no-figures"]) == 0
    assert json.loads((copy / "extrapolation_quick.json").read_text())["records"] == payload["records"]


def _crafted(accuracy: dict[tuple[str, str], tuple[list[float], list[float]]]) -> dict:
    """A results payload whose accuracies at L = 32 and at 8192 are given per (normalizer,
    encoding), one per seed; its summary is computed by the kind."""
    records = []
    for (label, positional), (at_l, far) in accuracy.items():
        for seed, (near, long) in enumerate(zip(at_l, far, strict=True)):
            point = {"normalizer": label, "positional": positional, "seed": seed}
            records.append({**point, "record": "evaluation", "length": 32, "accuracy": near})
            records.append({**point, "record": "evaluation", "length": 8192, "accuracy": long})
    seeds = sorted({r["seed"] for r in records})
    config = {
        "normalizers": [{"name": name, "label": name} for name in ("softmax", "asentmax", "ssmax")],
        "positionals": ["rope", "alibi"],
        "training": {"seq_len": 32},
        "seeds": seeds,
    }
    summary = extrapolation.summary_of(records)
    return {"experiment": "crafted", "config": config, "records": records, "summary": summary}


def _against(ours: list[float], theirs: list[float]) -> str:
    """What findings.comparison_text says of ours against softmax's, paired by seed."""
    difference = paired_difference(ours, theirs).to_json()
    return (
        f"at {np.mean(ours):.3f} against softmax at {np.mean(theirs):.3f}, "
        f"a paired difference of {interval_text(difference, signed=True)}"
    )


def test_findings_state_each_comparison_with_its_interval_and_verdict():
    learned = [0.95] * 3
    rope = {"softmax": [0.05, 0.2, 0.1], "asentmax": [0.1, 0.3, 0.0], "ssmax": [0.3, 0.4, 0.35]}
    alibi = {"softmax": [0.1, 0.1, 0.2], "asentmax": [0.7, 0.8, 0.9]}
    payload = _crafted(
        {**{(label, "rope"): (learned, far) for label, far in rope.items()},
         **{(label, "alibi"): (learned, far) for label, far in alibi.items()},
         ("ssmax", "alibi"): ([0.2, 0.3, 0.2], [0.9, 0.9, 0.9])}
    )  # fmt: skip
    found = drawn.findings(payload)
    assert all(f.figure == "crafted_accuracy.png" for f in found)
    claims = [f.claim for f in found]
    assert claims[0] == (
        "RoPE, held-out query accuracy at n = L = 32 / 8,192 (256 L), 3 seeds, means over seeds: "
        "softmax 0.950 / 0.117; ASEntmax 0.950 / 0.133; SSMax 0.950 / 0.350"
    )
    # RoPE: ASEntmax's 0.017 over softmax holds 0 in its interval, SSMax's 0.233 does not.
    assert (
        claims[1]
        == f"RoPE, n = 8,192 (256 L), 3 seeds, lowest accuracy: ASEntmax {_against(rope['asentmax'], rope['softmax'])}"
    )
    assert (
        claims[2]
        == f"RoPE, n = 8,192 (256 L), 3 seeds, highest accuracy: SSMax {_against(rope['ssmax'], rope['softmax'])}"
    )
    assert [f.significant for f in found[1:3]] == [False, True]
    assert claims[3].endswith("below it (interval excluding 0): none; above it: SSMax; interval holding 0: ASEntmax")
    # ALiBi: SSMax did not learn the task at L, so it is not compared beyond it.
    assert claims[5].startswith("ALiBi, 3 seeds: SSMax answers 0.233 [") and "did not learn the task" in claims[5]
    assert (
        claims[6]
        == f"ALiBi, n = 8,192 (256 L), 3 seeds, accuracy: ASEntmax {_against(alibi['asentmax'], alibi['softmax'])}"
    )
    assert found[6].significant is True
    assert claims[7].endswith("above it: ASEntmax; interval holding 0: none") and len(found) == 8
    # One seed: a lead sentence says nothing is settled, and no finding carries a verdict.
    one = drawn.findings(_crafted({("softmax", "alibi"): ([1.0], [0.1]), ("asentmax", "alibi"): ([1.0], [0.9])}))
    assert one[0].claim.startswith("One seed: no number below has an interval")
    assert all(f.significant is None for f in one)
    assert one[-1].claim.endswith("ASEntmax at 0.900 against softmax at 0.100, a difference of +0.800 (one seed)")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text('kind = "extrapolation"\n' + text)
    return path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("eval_lengths = [16, 512]", r"eval_lengths=\[16, 512\] must each be >= training.seq_len=32 .*; 16 is not"),
        (
            'positionals = ["rope", "learned"]',
            r"positionals must all be one of rope, none, alibi; got \['rope', 'learned'\]",
        ),
        ('positionals = ["none", "none"]', r"positionals must not repeat a value"),
        ("eval_lengths = [512, 32]", r"eval_lengths must be in increasing order"),
        (
            "num_kv_pairs = 20\nvocab_size = 64",
            r"num_kv_pairs=20, vocab_size=64 and the length 32 make no MQAR task: .*seq_len=32 is too short",
        ),
        (
            'normalizers = ["softmax", { name = "asentmax", beta = 1.0 }]',
            r"adaptive_scale=True: normalizer 'asentmax': with adaptive_scale=True beta and gamma are computed",
        ),
        ("seeds = []", "seeds must be a non-empty list"),
        ("eval_examples = 0", "eval_examples must be > 0; got 0"),
    ],
)
def test_config_problems_are_named(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        experiments.load(_write(tmp_path, text))


def test_full_configs_load_and_reach_far_beyond_the_training_length():
    cpu = experiments.load(REPO / "experiments" / "extrapolation.toml").config
    gpu = experiments.load(REPO / "experiments" / "extrapolation_gpu.toml").config
    defaults = extrapolation.Config()
    for config in (cpu, gpu):
        length = config.training.seq_len
        assert config.seeds == (0, 1, 2) and 32 <= length <= 64
        assert config.positionals == ("rope", "none", "alibi") and config.adaptive_scale
        assert [s.name for s in config.normalizers] == [s.name for s in defaults.normalizers]
        # The production scalings' lengths are the training length, as in length_generalization.toml.
        params = {s.name: dict(s.params) for s in config.normalizers}
        assert params["qwen_softmax"]["seq_length"] == params["llama4_softmax"]["floor_scale"] == length
        assert config.eval_lengths[0] == length and {16 * length, 64 * length} <= set(config.eval_lengths)
        runs = 3 + len(config.tuning.learning_rates)  # three seeds, after the tuning models
        assert len(extrapolation.points(config)) == len(config.normalizers) * 3 * runs
    assert {256 * gpu.training.seq_len, 1024 * gpu.training.seq_len} <= set(gpu.eval_lengths)
    assert cpu == defaults  # the defaults are the CPU config
    assert NormalizerSpec("asentmax") in cpu.normalizers
