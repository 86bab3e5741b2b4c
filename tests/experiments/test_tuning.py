"""Learning-rate tuning per normalizer before a main run (`attnlab.experiments.lm.TuningSetting`).

The choice itself on crafted records (the lowest finite validation loss, the grid's edge, the
errors), then one quick mqar run with tuning through the CLI: the tuning points run first, each
main model trains at the rate its own group's tuning chose, and with the tuning seed among the
main seeds (and the main schedule) that seed's main model is the tuning model, restored from its
checkpoint rather than trained twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnlab import cli, figures
from attnlab.experiments import lm, mqar
from attnlab.experiments.checks import SettingError
from attnlab.figures import findings
from attnlab.figures import tuning as tuning_figures

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "mqar_quick.toml"


def _tuning(group: dict, rate: float, loss: float | None) -> dict:
    return {"record": "tuning", **group, "learning_rate": rate, "validation_loss": loss}


def test_the_lowest_finite_validation_loss_chooses_each_groups_rate():
    records = [
        _tuning({"normalizer": "softmax"}, 3e-3, 1.2),
        _tuning({"normalizer": "softmax"}, 1e-3, 1.5),
        _tuning({"normalizer": "softmax"}, 1e-2, None),  # diverged: never chosen
        _tuning({"normalizer": "sparsemax"}, 1e-3, 1.1),
        _tuning({"normalizer": "sparsemax"}, 3e-3, 1.4),
        _tuning({"normalizer": "sparsemax"}, 1e-2, 1.9),
        {"record": "training", "normalizer": "softmax", "validation_loss": 0.1, "learning_rate": 9.0},
    ]
    summary = lm.tuning_summary(records)
    assert [e["normalizer"] for e in summary] == ["softmax", "sparsemax"]
    softmax, sparsemax = summary
    assert softmax["learning_rates"] == [1e-3, 3e-3, 1e-2] and softmax["validation_loss"] == [1.5, 1.2, None]
    assert softmax["chosen"] == 3e-3 and softmax["at_edge"] is False
    assert sparsemax["chosen"] == 1e-3 and sparsemax["at_edge"] is True

    tuning = lm.TuningSetting(learning_rates=(1e-3, 3e-3, 1e-2))
    training = lm.TrainingSetting(learning_rate=5e-4)
    chosen = lm.main_training(training, tuning, records, {"normalizer": "sparsemax"}, seed=7)
    assert (chosen.learning_rate, chosen.seed) == (1e-3, 7)
    untuned = lm.main_training(training, lm.TuningSetting(), None, {"normalizer": "sparsemax"}, seed=7)
    assert (untuned.learning_rate, untuned.seed) == (5e-4, 7)


def test_a_main_point_without_its_tuning_stops_with_what_is_missing():
    tuning = lm.TuningSetting(learning_rates=(1e-3, 3e-3))
    training = lm.TrainingSetting()
    group = {"normalizer": "softmax"}
    with pytest.raises(ValueError, match="needs the run's records"):
        lm.main_training(training, tuning, None, group, seed=0)
    with pytest.raises(ValueError, match=r"rates \[0.001\], not the grid \[0.001, 0.003\]"):
        lm.main_training(training, tuning, [_tuning(group, 1e-3, 1.0)], group, seed=0)
    diverged = [_tuning(group, 1e-3, None), _tuning(group, 3e-3, None)]
    with pytest.raises(ValueError, match=r"no rate of .* gave a finite validation loss"):
        lm.main_training(training, tuning, diverged, group, seed=0)
    with pytest.raises(ValueError, match=r"tuning\.steps = 20 must be > training\.warmup = 30"):
        lm.tuning_training(training, lm.TuningSetting(learning_rates=(1e-3,), steps=20), 1e-3)
    with pytest.raises(SettingError, match="learning_rates must all be > 0"):
        lm.TuningSetting(learning_rates=(1e-3, -1.0))


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """The quick mqar config with a two-rate grid, seeds 0 and 1, tuning on seed 0 at the main
    schedule; returns (folder, payload, every train_model call's (point, training, record))."""
    out = tmp_path_factory.mktemp("tuned")
    calls = []
    real = lm.train_model

    def watched(model_setting, training, normalizer, batches, **keywords):
        model, record = real(model_setting, training, normalizer, batches, **keywords)
        calls.append((normalizer.label, model_setting.width, training, record))
        return model, record

    overrides = ["tuning.learning_rates=[1e-3, 3e-2]", "tuning.seed=0", "seeds=[0, 1]", "widths=[8]"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm, "train_model", watched)
        args = ["run", str(QUICK), "--out", str(out), "--no-progress"]
        assert cli.main(args + [a for o in overrides for a in ("--set", o)]) == 0
    return out, json.loads((out / "mqar_quick.json").read_text()), calls


def test_tuning_runs_first_and_each_main_model_trains_at_its_groups_chosen_rate(tuned_run):
    _, payload, calls = tuned_run
    records = payload["records"]
    kinds = [r["record"] for r in records]
    assert kinds == ["tuning"] * 4 + ["training"] * 4, "two normalizers x two rates, then two normalizers x two seeds"
    chosen = {e["normalizer"]: e["chosen"] for e in payload["summary"]["tuning"]}
    assert set(chosen) == {"softmax", "sparsemax"} and all(rate in (1e-3, 3e-2) for rate in chosen.values())
    for entry in payload["summary"]["tuning"]:
        losses = dict(zip(entry["learning_rates"], entry["validation_loss"], strict=True))
        assert entry["chosen"] == min((r for r in losses if losses[r] is not None), key=losses.get)
    for record in records[4:]:
        assert record["learning_rate"] == chosen[record["normalizer"]]
    trained_at = {(label, t.seed, t.learning_rate) for label, _, t, _ in calls}
    for record in records[4:]:
        assert (record["normalizer"], record["seed"], chosen[record["normalizer"]]) in trained_at


def test_the_tuning_seeds_main_model_is_the_tuning_model_restored(tuned_run):
    _, payload, calls = tuned_run
    records = payload["records"]
    for label in ("softmax", "sparsemax"):
        rate = next(e["chosen"] for e in payload["summary"]["tuning"] if e["normalizer"] == label)
        tuned = next(r for r in records if r["record"] == "tuning" and r["normalizer"] == label
                     and r["learning_rate"] == rate)  # fmt: skip
        main = next(r for r in records if r["record"] == "training" and r["normalizer"] == label and r["seed"] == 0)
        other = next(r for r in records if r["record"] == "training" and r["normalizer"] == label and r["seed"] == 1)
        assert main["model_key"] == tuned["model_key"] != other["model_key"]
        restored = [rec for lab, _, t, rec in calls if lab == label and t.seed == 0 and t.learning_rate == rate]
        assert len(restored) == 2 and restored[1]["compile_seconds"] == 0.0, "trained once, then restored"
        assert main["validation_loss"] == tuned["validation_loss"]
    assert all(r["tuning_seed"] == 0 for r in records if r["record"] == "tuning")


def test_main_points_keep_their_keys_and_a_changed_grid_tunes_again(tuned_run, tmp_path):
    config = mqar.Config(tuning=lm.TuningSetting(learning_rates=(1e-3, 3e-2)))
    other = mqar.Config(tuning=lm.TuningSetting(learning_rates=(1e-3, 1e-2)))
    point = {"normalizer": "softmax", "width": 16, "seed": 0}
    device = {"backend": "cpu"}
    assert mqar.KIND.point_key(config, point, device) != mqar.KIND.point_key(other, point, device)
    tuning_point = {"normalizer": "softmax", "width": 16, "learning_rate": 1e-3}
    seeds = mqar.Config(tuning=config.tuning, seeds=(5,))
    assert mqar.KIND.point_key(config, tuning_point, device) == mqar.KIND.point_key(seeds, tuning_point, device), (
        "a tuning point does not depend on the main seeds"
    )


def test_the_tuning_figure_is_drawn_with_the_kinds_own(tuned_run, tmp_path):
    out, _, _ = tuned_run
    target = tmp_path / "mqar_quick.json"
    target.write_text((out / "mqar_quick.json").read_text())
    names = {path.name for path in figures.render(target)}
    assert {"mqar_quick_tuning.png", "mqar_quick_tuning.svg"} <= names
    assert "mqar_quick_accuracy.png" in names, "the kind's own figures are drawn too"


def test_calibration_tunes_each_output_on_its_fit_windows(tmp_path):
    """An output's rate is chosen by its own loss on the fit windows; the test windows stay unseen."""
    quick = REPO / "experiments" / "calibration_quick.toml"
    overrides = ["tuning.learning_rates=[1e-3, 1e-2]", "seeds=[0]", 'outputs=["sparsemax"]']
    args = ["run", str(quick), "--out", str(tmp_path), "--no-progress", "--no-figures"]
    assert cli.main(args + [a for o in overrides for a in ("--set", o)]) == 0
    payload = json.loads((tmp_path / "calibration_quick.json").read_text())
    records = payload["records"]
    assert [r["record"] for r in records] == ["tuning", "tuning", "training", "calibration"]
    chosen = {e["output"]: e["chosen"] for e in payload["summary"]["tuning"]}
    assert set(chosen) == {"sparsemax"}
    for record in records:
        if record["record"] == "training":
            assert record["learning_rate"] == chosen[record["output"]]
            tuned = next(r for r in records if r["record"] == "tuning" and r["output"] == record["output"]
                         and r["learning_rate"] == record["learning_rate"])  # fmt: skip
            assert tuned["model_key"] == record["model_key"], "seed 0 at the chosen rate is the tuning model"


def test_the_findings_page_says_which_rate_each_group_trained_at(tuned_run):
    out, payload, _ = tuned_run
    text = findings.page(out)
    line = next(line for line in text.splitlines() if line.startswith("- Learning rates chosen by tuning"))
    assert "(seed 0, 4 steps, the lowest held-out loss among 0.001, 0.03)" in line
    for entry in payload["summary"]["tuning"]:
        edge = " (the grid's edge; loss" if entry["at_edge"] else ""
        assert f"{entry['normalizer']}, {entry['width']} {entry['chosen']:g}{edge}" in line
    assert line.endswith("[figure](figures/mqar_quick_tuning.png)")


@pytest.mark.slow  # the same lm.main_training as mqar's and calibration's tests; 11 s
def test_extrapolation_tunes_each_normalizer_and_encoding(tmp_path):
    quick = REPO / "experiments" / "extrapolation_quick.toml"
    overrides = ["tuning.learning_rates=[1e-3, 1e-2]", "seeds=[0]", 'normalizers=["softmax"]']
    args = ["run", str(quick), "--out", str(tmp_path), "--no-progress", "--no-figures"]
    assert cli.main(args + [a for o in overrides for a in ("--set", o)]) == 0
    payload = json.loads((tmp_path / "extrapolation_quick.json").read_text())
    tuned = [r for r in payload["records"] if r["record"] == "tuning"]
    positionals = payload["config"]["positionals"]
    assert len(tuned) == 2 * len(positionals) and {r["positional"] for r in tuned} == set(positionals)
    chosen = {e["positional"]: e["chosen"] for e in payload["summary"]["tuning"]}
    for record in payload["records"]:
        if record["record"] == "training":
            assert record["learning_rate"] == chosen[record["positional"]]


def test_an_unfinished_run_is_said_to_be_one(tuned_run, tmp_path):
    out, payload, _ = tuned_run
    (tmp_path / "mqar_quick.json").write_text(json.dumps({**payload, "finished_at": None}))
    assert f"The run is not finished: these are its {len(payload['records'])} records so far." in findings.page(
        tmp_path
    )
    assert "The run is not finished" not in findings.page(out)


def test_a_rate_that_diverges_is_recorded_as_such_and_never_chosen(tmp_path):
    """A tuning model that diverges is a result (the rate is too high), not a failure of the run."""
    overrides = ["tuning.learning_rates=[1e-3, 1e30]", "seeds=[0]", "widths=[8]", 'normalizers=["softmax"]']
    args = ["run", str(QUICK), "--out", str(tmp_path), "--no-progress", "--no-figures"]
    assert cli.main(args + [a for o in overrides for a in ("--set", o)]) == 0
    payload = json.loads((tmp_path / "mqar_quick.json").read_text())
    tuning = {r["learning_rate"]: r for r in payload["records"] if r["record"] == "tuning"}
    assert tuning[1e30]["validation_loss"] is None and tuning[1e30]["diverged_at"] >= 1
    assert tuning[1e-3]["validation_loss"] is not None and "diverged_at" not in tuning[1e-3]
    (entry,) = payload["summary"]["tuning"]
    assert entry["chosen"] == 1e-3 and entry["validation_loss"] == [tuning[1e-3]["validation_loss"], None]
    (main,) = [r for r in payload["records"] if r["record"] != "tuning"]
    assert main["learning_rate"] == 1e-3


def _tuned(normalizer: str, losses: dict[float, float | None]) -> list[dict]:
    """Tuning records of one normalizer, as a run writes them: its loss at each rate."""
    return [
        {**_tuning({"normalizer": normalizer}, rate, loss), "tuning_seed": 0, "steps": 10, "model_key": "k"}
        for rate, loss in losses.items()
    ]


def test_the_findings_sentence_warns_of_the_grids_edge_only_when_a_rate_lies_there():
    def sentence(losses: dict[float, float]) -> str:
        return tuning_figures.finding_text({"records": _tuned("softmax", losses)})

    interior = sentence({1e-3: 1.5, 2e-3: 1.2, 4e-3: 1.4})
    assert interior.endswith("at which every main model below trained: softmax 0.002"), interior
    edge = sentence({1e-3: 1.5, 2e-3: 1.4, 4e-3: 1.2})
    assert edge.endswith(
        "softmax 0.004 (the grid's edge; loss 1.2 against 1.4 at 0.002); "
        "a rate at the grid's edge may not be the best one"
    ), edge
    low_edge = sentence({1e-3: 1.1, 2e-3: None, 4e-3: 1.2})
    assert "softmax 0.001 (the grid's edge; 0.002 not finite)" in low_edge, low_edge


def test_the_findings_sentence_names_each_normalizer_as_the_figures_do():
    records = _tuned("entmax15", {1e-3: 1.5, 2e-3: 1.2, 4e-3: 1.4})
    text = tuning_figures.finding_text(
        {"records": records, "config": {"normalizers": [{"name": "entmax15", "label": "entmax15"}]}}
    )
    assert text.endswith("trained: 1.5-entmax 0.002"), text


@pytest.mark.parametrize(("losses", "scale"), [((0.3, 0.006, 0.0002), "log"), ((1.9, 1.76, 2.1), "linear")])
def test_the_tuning_figure_draws_losses_over_decades_on_a_log_axis(tmp_path, monkeypatch, losses, scale):
    drawn = []
    monkeypatch.setattr(tuning_figures.style, "save", lambda fig, stem: drawn.append(fig) or [])
    records = _tuned("softmax", dict(zip((1e-3, 1e-2, 1e-1), losses, strict=True)))
    tuning_figures.render({"records": records, "config": {}, "experiment": "x"}, tmp_path)
    (fig,) = drawn
    assert fig.axes[0].get_yscale() == scale
