"""Results a careful user can trust: the failure modes of issue 15, each tried as a user would.

- a rerun with a changed setting trains anew and equals a fresh run with that setting;
- successive config changes keep every earlier result (archived), and an archived point is reused;
- duplicate names, binary, empty, folder and malformed configs exit 2 with nothing run;
- two concurrent runs on one --out both finish and lose nothing (one writer at a time);
- diverging training exits 1 with the step and the value, leaving only strict JSON;
- a crafted results file cannot make `attnlab figures` write outside its folder;
- a corrupt results file stops the run with one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab import cli, experiments
from attnlab.experiments import lm, results
from attnlab.experiments.kind import settings_key
from attnlab.nn import NormalizerSpec

REPO = Path(__file__).resolve().parents[2]
FADING_QUICK = REPO / "experiments" / "fading_synthetic_quick.toml"
TINY_FADING = ["--set", "normalizers=['softmax']", "--set", "seeds=1", "--set", "sigmas=[1.0]"]

# A length_generalization run small enough to train twice in a test: one layer, width 16, 4 steps, one seed.
TINY_LM = """\
kind = "length_generalization"
name = "tiny_lm"
normalizers = ["softmax"]
seeds = [0]
eval_length = 16
eval_windows = 1
position_bins = 4
rope_theta_factors = [1.0]
[model]
layers = 1
width = 16
heads = 2
[training]
seq_len = 8
batch_size = 2
steps = 4
warmup = 1
log_every = 2
checkpoint_every = 2
"""
# Fields of a training record that measure time, not the model.
TIMING = {"tokens_per_second", "compile_seconds", "train_seconds", "wall_seconds", "elapsed_seconds"}


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _strict_load(path: Path) -> dict:
    def reject(name):
        raise AssertionError(f"{path} holds the non-standard JSON number {name}")

    return json.loads(path.read_text(), parse_constant=reject)


def _measurements(payload: dict) -> list[dict]:
    """The records without timings, point keys or environment: what the model computed."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in TIMING}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return [clean(r) for r in payload["records"]]


def _run(*args: str) -> int:
    return cli.main(["run", *args, "--no-progress", "--no-figures"])


# ----------------------------------------------------------------------------------- keyed runs


def test_every_determining_setting_changes_the_model_key_and_nothing_else_does(monkeypatch):
    model, training = lm.ModelSetting(layers=1, width=16, heads=2), lm.TrainingSetting(seq_len=8, steps=4, warmup=1)
    softmax = NormalizerSpec("softmax")
    ssmax = NormalizerSpec("ssmax", {"s": 0.4})
    ssmax_other = NormalizerSpec("ssmax", {"s": 0.5})

    def key(model=model, training=training, normalizer=softmax, **kw):
        return settings_key(lm.model_settings(model, training, normalizer, **kw))

    reference = key()
    with monkeypatch.context() as patch:  # the code that builds and trains the model, edited
        edited = {**lm.code_fingerprint(lm.__name__), "source": "0" * 16}
        patch.setattr(lm, "code_fingerprint", lambda module: edited)
        edited_code = key()
    changed = {
        "code": edited_code,
        "learning rate": key(training=dataclasses.replace(training, learning_rate=0.05)),
        "seed": key(training=dataclasses.replace(training, seed=1)),
        "width": key(model=lm.ModelSetting(layers=1, width=32, heads=2)),
        "normalizer": key(normalizer=ssmax),
        "data": key(settings={"data": {"digest": "other"}}),
        "output": key(output="sparsemax"),
    }
    assert reference not in changed.values() and len(set(changed.values())) == len(changed)
    assert key(normalizer=ssmax) != key(normalizer=ssmax_other)  # a parameter under the same label
    # What does not change the model keeps its key: the checkpoint period and the display label.
    assert key(training=dataclasses.replace(training, checkpoint_every=1)) == reference
    relabelled = NormalizerSpec("softmax", label="plain softmax")
    assert key(normalizer=relabelled) == reference


def test_point_keys_follow_the_selected_normalizer_and_ignore_the_rest_of_the_sweep():
    kind = experiments.KINDS["fading_synthetic"]
    here = results.device()
    config = experiments.load(FADING_QUICK, ["normalizers=['softmax', {name='ssmax', s=0.4}]"]).config
    point = {"normalizer": "ssmax", "n": 10}
    key = kind.point_key(config, point, here)
    longer = experiments.load(FADING_QUICK, ["normalizers=['softmax', {name='ssmax', s=0.4}]", "lengths=[10, 77]"])
    assert kind.point_key(longer.config, point, here) == key  # another length does not touch this point
    other_s = experiments.load(FADING_QUICK, ["normalizers=['softmax', {name='ssmax', s=0.5}]"]).config
    assert kind.point_key(other_s, point, here) != key  # same label, other parameter: a new point
    assert kind.point_key(config, point, {**here, "device_kind": "H200"}) != key
    assert kind.point_key(experiments.load(FADING_QUICK, ["seeds=3"]).config, point, here) != key


def test_a_rerun_with_a_changed_learning_rate_trains_anew_and_equals_a_fresh_run(tmp_path):
    config = _write(tmp_path / "tiny_lm.toml", TINY_LM)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert _run(str(config), "--out", str(out)) == 0
    first = _strict_load(out / "tiny_lm.json")
    assert _run(str(config), "--out", str(out), "--set", "training.learning_rate=0.01") == 0
    rerun = _strict_load(out / "tiny_lm.json")
    assert _run(str(config), "--out", str(fresh), "--set", "training.learning_rate=0.01") == 0
    alone = _strict_load(fresh / "tiny_lm.json")

    assert rerun["config"]["training"]["learning_rate"] == 0.01
    assert _measurements(rerun) == _measurements(alone)
    assert _measurements(rerun) != _measurements(first)  # a different model, not the old one reused
    assert len(list((out / "checkpoints").iterdir())) == 2  # one folder per model key
    # The first run is archived, whole.
    (archived,) = results.archived_versions(out, "tiny_lm")
    assert _strict_load(archived)["records"] == first["records"]

    # Back to the first learning rate: the archived points and the checkpoint are reused, not recomputed.
    assert _run(str(config), "--out", str(out)) == 0
    again = _strict_load(out / "tiny_lm.json")
    assert again["records"] == first["records"]
    assert len(results.archived_versions(out, "tiny_lm")) == 2


def test_three_successive_config_changes_leave_all_three_results(tmp_path, replace_run_point):
    out = tmp_path / "out"
    for n in (10, 20, 30):
        assert _run(str(FADING_QUICK), "--out", str(out), *TINY_FADING, "--set", f"lengths=[{n}]") == 0
    versions = [*results.archived_versions(out, "fading_synthetic_quick"), out / "fading_synthetic_quick.json"]
    assert len(versions) == 3
    assert sorted({r["n"] for v in versions for r in _strict_load(v)["records"]}) == [10, 20, 30]

    # A fourth run asking for all three lengths computes nothing: each point is in some version.
    def fail(*args, **kwargs):
        raise AssertionError("a point kept in an earlier version was recomputed")

    replace_run_point("fading_synthetic", fail)
    assert _run(str(FADING_QUICK), "--out", str(out), *TINY_FADING, "--set", "lengths=[10, 20, 30]") == 0
    assert sorted({r["n"] for r in _strict_load(out / "fading_synthetic_quick.json")["records"]}) == [10, 20, 30]
    assert len(results.archived_versions(out, "fading_synthetic_quick")) == 3


def test_a_run_that_fails_before_its_first_point_moves_nothing(tmp_path, replace_run_point):
    out = tmp_path / "out"
    assert _run(str(FADING_QUICK), "--out", str(out), *TINY_FADING, "--set", "lengths=[10]") == 0
    before = (out / "fading_synthetic_quick.json").read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    replace_run_point("fading_synthetic", fail)
    assert _run(str(FADING_QUICK), "--out", str(out), *TINY_FADING, "--set", "lengths=[20]") == 1
    assert (out / "fading_synthetic_quick.json").read_bytes() == before
    assert results.archived_versions(out, "fading_synthetic_quick") == []


# ------------------------------------------------------------------------ checks before any work


def test_duplicate_names_in_one_command_exit_2_with_nothing_run(tmp_path, capsys):
    one = _write(tmp_path / "one.toml", 'kind = "fading_synthetic"\nname = "same"\nlengths = [10]\n')
    two = _write(tmp_path / "two.toml", 'kind = "fading_synthetic"\nname = "same"\nlengths = [20]\n')
    out = tmp_path / "out"
    assert _run(str(one), str(two), "--out", str(out)) == 2
    assert not out.exists()
    assert "all write results name 'same'" in capsys.readouterr().err
    assert _run(str(FADING_QUICK), str(FADING_QUICK), "--out", str(out)) == 2 and not out.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
        ("", "kind = None is not an experiment kind"),
        ('kind = ["fading_synthetic"]\n', "kind = ['fading_synthetic'] is not an experiment kind"),
        ('kind = "fading_synthetic"\nname = "' + "x" * 300 + '"\n', "(300 characters) is not a plain file name"),
        ('kind = "fading_synthetic"\nname = "a\\u0000b"\n', "is not a plain file name"),
        ('kind = "fading_synthetic"\nname = "../up"\n', "is not a plain file name"),
    ],
    ids=["binary", "empty", "kind-list", "long-name", "nul-name", "climbing-name"],
)
def test_unreadable_configs_exit_2_with_one_clear_line(tmp_path, capsys, content, expected):
    config = _write(tmp_path / "c.toml", content)
    out = tmp_path / "out"
    assert _run(str(config), "--out", str(out)) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert expected in err and str(config) in err and "Traceback" not in err


def test_a_folder_given_as_the_config_exits_2(tmp_path, capsys):
    assert _run(str(tmp_path), "--out", str(tmp_path / "out")) == 2
    assert "is a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ one writer, strict


def test_the_results_folder_has_one_writer_at_a_time(tmp_path):
    held = pytest.raises(RuntimeError, match=rf"{tmp_path} is being written by pid {os.getpid()}")
    with experiments.lock(tmp_path), held, experiments.lock(tmp_path, wait=False):
        pass
    with experiments.lock(tmp_path, wait=False):  # released when the first holder left
        pass


def test_two_concurrent_runs_on_one_folder_both_finish_and_lose_nothing(tmp_path):
    out = tmp_path / "out"
    configs = [
        _write(
            tmp_path / f"run{i}.toml",
            f'kind = "fading_synthetic"\nnormalizers = ["softmax"]\nlengths = [{10 * (i + 1)}, 50]\nseeds = 1\n',
        )
        for i in range(2)
    ]
    # The two processes run at once: they must not share the test process's compilation cache folder.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"} | {"JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "attnlab", "run", str(c), "--out", str(out), "--no-progress", "--no-figures"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for c in configs
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    for i in range(2):
        payload = _strict_load(out / f"run{i}.json")
        assert payload["finished_at"] and {r["n"] for r in payload["records"]} == {10 * (i + 1), 50}


def test_non_finite_measurements_are_written_as_null_with_the_reason(tmp_path, replace_run_point):
    def run_point(config, point):
        return [{"value": float("nan"), "curve": [1.0, float("inf")], "nested": {"low": float("-inf")}}]

    replace_run_point("fading_synthetic", run_point)
    out = tmp_path / "out"
    assert _run(str(FADING_QUICK), "--out", str(out), *TINY_FADING, "--set", "lengths=[10]") == 0
    (record,) = _strict_load(out / "fading_synthetic_quick.json")["records"]
    assert record["value"] is None and record["curve"] == [1.0, None] and record["nested"] == {"low": None}
    assert record["nonfinite"] == {"value": "nan", "curve[1]": "inf", "nested.low": "-inf"}


def test_diverging_training_exits_1_naming_the_step_and_leaves_strict_json(tmp_path, capsys):
    config = _write(tmp_path / "tiny_lm.toml", TINY_LM)
    out = tmp_path / "out"
    assert _run(str(config), "--out", str(out), "--set", "training.learning_rate=1e6") == 1
    err = capsys.readouterr().err
    assert "tiny_lm stopped" in err and "diverged at step" in err and "softmax" in err
    for path in out.rglob("*.json"):
        _strict_load(path)


def test_a_corrupt_results_file_stops_the_run_naming_it(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _write(out / "fading_synthetic_quick.json", '{"records": [')
    assert _run(str(FADING_QUICK), "--out", str(out), *TINY_FADING) == 1
    err = capsys.readouterr().err
    assert f"{out / 'fading_synthetic_quick.json'}: not valid JSON" in err and "Traceback" not in err
    assert (out / "fading_synthetic_quick.json").read_text() == '{"records": ['  # left for the user to inspect


def test_figures_stop_on_a_corrupt_results_file_naming_it_and_out_must_be_a_folder(tmp_path, capsys):
    _write(tmp_path / "broken.json", b"\x00\xff not json")
    assert cli.main(["figures", str(tmp_path)]) == 1
    assert f"{tmp_path / 'broken.json'}: not a results file (not UTF-8 text" in capsys.readouterr().err
    assert _run(str(FADING_QUICK), "--out", str(tmp_path / "broken.json")) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ figures


def test_a_crafted_results_file_cannot_make_figures_write_outside_its_folder(tmp_path):
    out, crafted = tmp_path / "results", tmp_path / "crafted"
    assert _run(str(FADING_QUICK), "--out", str(out), *TINY_FADING, "--set", "lengths=[10, 100]") == 0
    payload = _strict_load(out / "fading_synthetic_quick.json")
    for i, name in enumerate(["../../escaped", str(tmp_path / "absolute")]):
        results.write_json_atomic(crafted / f"crafted{i}.json", {**payload, "experiment": name})
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert cli.main(["figures", str(crafted)]) == 0
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert written and all(
        p.parent == crafted / "figures" or p in (crafted / "README.md", crafted / "FINDINGS.md") for p in written
    ), written
    assert {p.name.split("_")[0] for p in written if p.suffix == ".png"} == {"crafted0", "crafted1"}
    assert not list(tmp_path.rglob("escaped*")) and not list(tmp_path.rglob("absolute*"))


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    # A failure while drawing leaves the earlier figure whole and no temporary file behind.
    import matplotlib.pyplot as plt

    from attnlab.figures import style

    fig, _ = plt.subplots()
    (path, _) = style.save(fig, tmp_path / "f")
    before = path.read_bytes()
    fig, _ = plt.subplots()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError, match="No space left"):
        style.save(fig, tmp_path / "f")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "f.svg"]
    with pytest.raises(ValueError, match="climbs out"):
        style.save(fig, tmp_path / ".." / "f")
