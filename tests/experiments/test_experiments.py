"""Experiment configs, the runner and the figures: checked early, written atomically, resumable."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from attnlab import cli, experiments, figures
from attnlab.experiments import fading_synthetic, theory
from attnlab.experiments.config import ConfigError, Lengths
from attnlab.experiments.results import write_json_atomic

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "fading_synthetic_quick.toml"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_committed_config_is_valid():
    configs = sorted((REPO / "experiments").glob("*.toml"))
    assert configs, "experiments/ holds no configs"
    loaded = experiments.load_all(configs)
    assert {e.kind for e in loaded} <= set(experiments.KINDS)


def test_bad_config_reports_every_problem_at_once(tmp_path):
    bad = _write(
        tmp_path,
        "bad.toml",
        'kind = "fading_synthetic"\n'
        'normalizers = ["softmax", "nosuchmax", { name = "entmax", alpha = 0.5 }, { name = "ssmax", beta = 1 }]\n'
        "seeds = 'many'\n"
        "lenghts = [10]\n",
    )
    with pytest.raises(ConfigError) as err:
        experiments.load(bad)
    text = str(err.value)
    assert len(err.value.problems) == 5, text
    assert all(str(bad) in p for p in err.value.problems)
    assert "nosuchmax" in text and "valid names are" in text
    assert "'alpha' must be >= 1" in text
    assert "does not take beta" in text and "accepts s, bias, n" in text
    assert "seeds: expected an integer" in text
    assert "unknown key 'lenghts'" in text and "lengths" in text


def test_cli_exit_code_two_and_nothing_written_for_any_bad_config(tmp_path, capsys):
    good = _write(tmp_path, "good.toml", 'kind = "fading_synthetic"\nlengths = [10]\nseeds = 1\nsigmas = [1.0]\n')
    bad = _write(tmp_path, "bad.toml", 'kind = "fading_synthetic"\nsigmas = [-1.0]\n')
    out = tmp_path / "out"
    assert cli.main(["run", str(good), str(bad), "--out", str(out)]) == 2
    assert not out.exists()
    assert "sigmas must all be > 0" in capsys.readouterr().err


def test_unknown_kind_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not an experiment kind; available: fading_synthetic"):
        experiments.load(_write(tmp_path, "a.toml", 'kind = "nope"\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        experiments.load(_write(tmp_path, "b.toml", "kind = \n"))
    with pytest.raises(ConfigError, match="no such config file"):
        experiments.load(tmp_path / "missing.toml")


def test_overrides_are_checked_like_the_file(tmp_path):
    experiment = experiments.load(QUICK, ["seeds=1", "lengths=[10, 20]"])
    assert experiment.config.seeds == 1 and experiment.config.lengths.values == (10, 20)
    with pytest.raises(ConfigError, match="seeds: expected an integer"):
        experiments.load(QUICK, ["seeds=many"])


def test_log_spaced_lengths():
    assert Lengths.log_spaced(10, 1000, 3).values == (10, 100, 1000)
    values = Lengths.log_spaced(1, 10, 30).values
    assert values[0] == 1 and values[-1] == 10 and len(set(values)) == len(values)


def test_quick_run_matches_closed_forms_and_resumes(tmp_path, replace_run_point):
    # The normalizers with closed forms; the quick config's others run in the CLI test below.
    experiment = experiments.load(QUICK, ["normalizers=['softmax', 'ssmax', 'sparsemax']"])
    path = experiments.run(experiment, tmp_path, progress=False)
    payload = json.loads(path.read_text())
    assert payload["kind"] == "fading_synthetic" and payload["finished_at"]
    assert payload["environment"]["backend"] == "cpu"
    records = payload["records"]
    specs = experiment.config.normalizers
    # per point: the peak row, one record per sigma, and the required gap (SSMax Figure 3)
    assert len(records) == len(specs) * len(experiment.config.lengths.values) * (2 + len(experiment.config.sigmas))

    def peak(label, n):
        return next(r for r in records if r["normalizer"] == label and r["n"] == n and r["input"] == "peak")

    for n in (10, 100, 1000):
        gap = next(r for r in records if r["normalizer"] == "softmax" and r["n"] == n and r["input"] == "required_gap")
        assert gap["required_gap"] == pytest.approx(gap["required_gap_theory"], rel=1e-5)
        assert peak("softmax", n)["max_weight"] == pytest.approx(1 / (1 + (n - 1) * math.exp(-5)), rel=1e-5)
        assert peak("ssmax", n)["max_weight"] == pytest.approx(1 / (1 + (n - 1) * n**-2.15), rel=1e-5)
        assert peak("softmax", n)["max_weight_theory"] == pytest.approx(peak("softmax", n)["max_weight"], rel=1e-5)
        assert peak("sparsemax", n)["max_weight"] == 1.0 and peak("sparsemax", n)["support_size"] == 1
        assert peak("softmax", n)["support_size"] == n
    gaussian = [r for r in records if r["input"] == "gaussian" and r["normalizer"] == "sparsemax"]
    assert all(1 <= r["support_size"] < r["n"] for r in gaussian if r["n"] >= 100)

    # A rerun of the same config computes nothing: every point is already in the file.
    def fail(*args, **kwargs):
        raise AssertionError("a finished point was recomputed")

    replace_run_point("fading_synthetic", fail)
    experiments.run(experiment, tmp_path, progress=False)
    assert json.loads(path.read_text())["records"] == records
    # Every record carries its point's key; the points of one sweep have distinct keys.
    keys = {(r["normalizer"], r["n"]): r["point_key"] for r in records}
    assert len(set(keys.values())) == len(keys) == len(specs) * len(experiment.config.lengths.values)


def test_interrupted_run_keeps_finished_points_and_resumes(tmp_path, replace_run_point):
    experiment = experiments.load(QUICK, ["lengths=[10, 20, 30]", "normalizers=['softmax']"])
    real = fading_synthetic.run_point
    calls = []

    def interrupt_third(config, point):
        calls.append(point["n"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(config, point)

    replace_run_point("fading_synthetic", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        experiments.run(experiment, tmp_path, progress=False)
    saved = json.loads((tmp_path / f"{experiment.name}.json").read_text())
    assert sorted({r["n"] for r in saved["records"]}) == [10, 20] and saved["finished_at"] is None

    replace_run_point("fading_synthetic", real)
    calls.clear()
    experiments.run(experiment, tmp_path, progress=False)
    saved = json.loads((tmp_path / f"{experiment.name}.json").read_text())
    assert sorted({r["n"] for r in saved["records"]}) == [10, 20, 30] and saved["finished_at"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    # The file gets open()'s usual mode (0666 less the umask), not the temporary file's 0600.
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_cli_run_then_figures_from_json_alone_are_stable(tmp_path, capsys):
    out = tmp_path / "results"
    # The quick config's normalizers not run by the closed-form test above.
    others = "normalizers=['entmax15', { name = 'entmax', alpha = 1.3, label = 'entmax α=1.3' }]"
    small = ["--set", "seeds=1", "--set", "lengths=[10, 100]", "--set", others]
    assert cli.main(["run", str(QUICK), "--out", str(out), *small, "--no-progress"]) == 0
    pngs = sorted((out / "figures").glob("*.png"))
    svgs = sorted((out / "figures").glob("*.svg"))
    assert len(pngs) == 3 and len(svgs) == 3  # max weight, support, required gap
    first = {p.name: p.read_bytes() for p in pngs + svgs}
    for p in pngs + svgs:
        p.unlink()
    assert cli.main(["figures", str(out)]) == 0
    second = {p.name: p.read_bytes() for p in sorted((out / "figures").iterdir())}
    assert first == second
    index = (out / "README.md").read_text()
    assert "fading_synthetic_quick_max_weight.png" in index and "--set seeds=1" in index


def test_figures_reject_unknown_kind(tmp_path):
    write_json_atomic(tmp_path / "x.json", {"kind": "mystery", "records": []})
    with pytest.raises(ValueError, match="kind 'mystery' has no figures"):
        figures.render(tmp_path / "x.json")


def test_figures_show_their_progress_over_the_folder_unless_told_not_to(tmp_path, capsys, monkeypatch):
    # A folder of full results takes a minute or two to draw: a bar counts its results files.
    drawn = []
    monkeypatch.setattr(
        figures, "renderers", lambda: {"quick": lambda payload, _: drawn.append(payload["experiment"]) or []}
    )
    for name in ("a", "b"):
        write_json_atomic(tmp_path / f"{name}.json", {"kind": "quick", "config": {}, "records": []})
    write_json_atomic(tmp_path / "other.json", {"kind": "mystery", "records": []})  # no figures: skipped
    assert cli.main(["figures", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert drawn == ["a", "b"] and "figures" in shown and "3/3" in shown
    assert cli.main(["figures", str(tmp_path), "--no-progress"]) == 0
    assert drawn == ["a", "b", "a", "b"] and "3/3" not in capsys.readouterr().out


def test_cli_list(capsys):
    assert cli.main(["list"]) == 0
    text = capsys.readouterr().out
    assert "fading_synthetic" in text and "logn_entmax15" in text and "alpha=1.5" in text


def test_theory_reference_values():
    # REFERENCES.md: SSMax paper Figure 1 and the Gaussian fading approximation.
    got = [theory.peak_max_weight(n, 5.0) for n in (100, 1000, 10000)]
    assert got == pytest.approx([0.600, 0.129, 0.0146], abs=5e-4)
    assert theory.peak_max_weight(1000, 5.0, 0.43 * math.log(1000)) == pytest.approx(0.9996, abs=1e-4)
    assert theory.gaussian_softmax_max_weight(1024, 1.0) == pytest.approx(0.0157, abs=2e-4)
    assert theory.gaussian_softmax_max_weight(1024, 10.0) is None


@pytest.mark.parametrize("n", [10, 1000])
def test_required_gap_matches_the_closed_forms(n):
    # The SSMax paper's Figure 3: softmax needs log(n - 1) for a top weight of 1/2, SSMax that over
    # s log n; sparsemax on [g, 0, ..., 0] gives the top (g (n - 1) + 1) / n, so g = (n/2 - 1) / (n - 1).
    from attnlab import normalizers

    softmax = fading_synthetic.required_gap(normalizers.get("softmax"), n, 0.5)
    ssmax = fading_synthetic.required_gap(normalizers.get("ssmax", s=0.43), n, 0.5)
    sparsemax = fading_synthetic.required_gap(normalizers.get("sparsemax"), n, 0.5)
    assert softmax == pytest.approx(theory.required_gap(n, 0.5), rel=1e-5)
    assert softmax == pytest.approx(math.log(n - 1), rel=1e-5)
    assert ssmax == pytest.approx(math.log(n - 1) / (0.43 * math.log(n)), rel=1e-5)
    assert sparsemax == pytest.approx((n / 2 - 1) / (n - 1), rel=1e-5)


def test_committed_figures_are_reproduced_from_the_committed_json(tmp_path):
    # A fresh clone redraws the committed figures of a results file from its JSON alone: the SVGs byte for byte.
    source = REPO / "results" / "fading_synthetic.json"
    (tmp_path / source.name).write_bytes(source.read_bytes())
    drawn = figures.render(tmp_path / source.name)
    assert len(drawn) == 6
    for path in drawn:
        committed = REPO / "results" / "figures" / path.name
        assert committed.exists(), f"{committed} is not committed"
        if path.suffix == ".svg":
            assert path.read_bytes() == committed.read_bytes(), f"{path.name} differs from the committed figure"
        else:  # PNG bytes depend on the installed rasteriser and zlib; the pixels may differ by an antialiasing step
            drawn_pixels, committed_pixels = plt.imread(path), plt.imread(committed)
            assert drawn_pixels.shape == committed_pixels.shape, path.name
            assert np.mean(np.abs(drawn_pixels - committed_pixels)) < 1e-3, (
                f"{path.name} differs from the committed figure"
            )
