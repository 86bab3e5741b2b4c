"""results/FINDINGS.md is generated from the committed JSON, byte for byte, and says what the JSON says."""

from __future__ import annotations

import shutil
from pathlib import Path

from attnlab.figures import findings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def test_the_committed_findings_page_is_rebuilt_byte_for_byte_from_the_committed_json(tmp_path):
    for path in RESULTS.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    written = findings.write_findings(tmp_path)
    assert written.read_bytes() == (RESULTS / findings.PAGE).read_bytes(), (
        "results/FINDINGS.md is not what `attnlab figures results/` writes from the committed JSON: rerun it"
    )
    # Every claim is one sentence: the page adds its verdict and the full stop.
    claims = [line for line in written.read_text().splitlines() if line.startswith("- ")]
    assert claims and not [line for line in claims if ". (" in line or ".." in line]


def test_a_critical_scaling_file_gives_its_claims_with_intervals(tmp_path):
    shutil.copy(RESULTS / "critical_scaling.json", tmp_path / "critical_scaling.json")
    text = findings.page(tmp_path)
    assert "## critical_scaling" in text and "`attnlab run experiments/critical_scaling.toml`" in text
    softmax = [line for line in text.splitlines() if line.startswith("- softmax(γ log n · z), ρ = 0.0")]
    assert len(softmax) == 1 and "3 seeds" in softmax[0] and "γ_c = 1 / (1 − ρ) = 1" in softmax[0]
    assert softmax[0].endswith("[figure](figures/critical_scaling_gamma_half.png)")


def test_interval_text_and_an_empty_folder():
    assert findings.interval_text({"mean": 0.5, "low": 0.25, "high": 0.75}) == "0.500 [0.250, 0.750]"
    assert findings.interval_text({"mean": 0.5, "low": None, "high": None}) == "0.500 (one seed)"
    assert "No results file here has findings yet" in findings.page(Path("/nonexistent"))


# Crafted results of the kinds that train models: records of 3 seeds, the summary computed from
# them by the kind's own summarize, and the sentences that summary must give. Each paired
# difference below is -0.4 + (0, 0.01, -0.01)-like: mean m, sd 0.01, so its 95% t interval is
# m +- t_{2, 0.975} * 0.01 / sqrt(3) = m +- 0.025 (t_{2, 0.975} = 4.303).

SEEDS = (0, 1, 2)


def _payload(kind, config, records, name="crafted", summarized=True):
    """A results payload as `attnlab figures` hands it to findings (with its summary, or without one
    as in a file written before summaries existed)."""
    from attnlab.experiments.config import to_json

    payload = {"kind": kind.KIND.name, "config": to_json(config), "records": records, "experiment": name}
    if summarized:
        payload["summary"] = kind.summarize(config, records)
    return payload


def _one_seed(payload):
    """The same results as a one-seed file written before seeds were swept (no seed, no summary)."""
    config = {k: v for k, v in payload["config"].items() if k != "seeds"}
    records = [{k: v for k, v in r.items() if k != "seed"} for r in payload["records"] if r.get("seed", 0) == 0]
    return {**payload, "config": config, "records": records, "summary": None}


def _claims(found):
    return {finding.claim: finding for finding in found}


def _check_one_seed(found):
    assert found[0].claim.startswith("One seed (the file was written before this kind swept seeds)")
    assert "one seed settles none of these comparisons" in found[0].claim
    assert all(finding.significant is None for finding in found)
    assert all("1 seed" in finding.claim for finding in found[1:])


def _length_generalization():
    from attnlab.experiments import length_generalization
    from attnlab.normalizers import NormalizerSpec

    config = length_generalization.Config(
        normalizers=(NormalizerSpec("softmax"), NormalizerSpec("stick_breaking"), NormalizerSpec("ssmax")),
        rope_theta_factors=(1.0,),
        seeds=SEEDS,
    )
    losses = {  # label: (within L per seed, beyond L per seed)
        "softmax": ((1.90, 1.91, 1.92), (2.20, 2.21, 2.22)),
        "stick_breaking": ((1.85, 1.86, 1.87), (1.80, 1.82, 1.81)),  # -0.4 beyond, flat
        "ssmax": ((1.88, 1.93, 1.92), (2.30, 2.15, 2.27)),  # +0.03 [-0.173, +0.233] beyond
    }
    records = []
    for seed in SEEDS:
        for label, (within, beyond) in losses.items():
            records.append({"record": "training", "normalizer": label, "seed": seed, "history": [{"loss": 1.8}],
                            "validation_loss": within[seed]})  # fmt: skip
            records.append({"record": "evaluation", "normalizer": label, "seed": seed, "rope_theta_factor": 1.0,
                            "loss": beyond[seed], "loss_within": within[seed], "loss_beyond": beyond[seed],
                            "loss_last_eighth": beyond[seed]})  # fmt: skip
    return _payload(length_generalization, config, records)


def test_length_generalization_findings_compare_the_loss_beyond_and_within_L_with_softmax():
    from attnlab.figures import length_generalization

    found = length_generalization.findings(_length_generalization())
    claims = _claims(found)
    beyond = "Beyond L (positions 128 to 1,023), RoPE θ as trained, 3 seeds"
    lowest = (
        f"{beyond}, lowest loss (nats per byte): stick-breaking at 1.810 against softmax at 2.210, "
        "a paired difference of -0.400 [-0.425, -0.375]"
    )
    highest = (
        f"{beyond}, highest loss (nats per byte): SSMax at 2.240 against softmax at 2.210, "
        "a paired difference of +0.030 [-0.173, +0.233]"
    )
    assert claims[lowest].significant is True and claims[lowest].figure == "crafted_losses.png"
    assert claims[highest].significant is False
    tally = f"{beyond}, every normalizer against softmax: below it (interval excluding 0): stick-breaking; above it: none; interval holding 0: SSMax"  # noqa: E501
    assert tally in claims
    assert any(c.startswith("Within L = 128, RoPE θ as trained, 3 seeds, lowest loss") for c in claims)
    flat = (
        "stick-breaking's loss does not climb beyond L (RoPE θ as trained, 3 seeds): its loss beyond L minus within L "
        "(nats per byte) is -0.050 [-0.075, -0.025] against softmax's +0.300, a paired difference of -0.350 "
        "[-0.375, -0.325]"
    )
    assert claims[flat].significant is True and claims[flat].figure == "crafted_loss_vs_position.png"
    assert (
        "Every other normalizer's loss climbs beyond L (RoPE θ as trained, 3 seeds; beyond minus within, the mean "
        "over seeds): by +0.300 (softmax) to +0.330 (SSMax); softmax's by +0.300"
    ) in claims


def test_length_generalization_findings_of_one_seed_settle_nothing():
    from attnlab.figures import length_generalization

    found = length_generalization.findings(_one_seed(_length_generalization()))
    _check_one_seed(found)
    assert (
        "Beyond L (positions 128 to 1,023), RoPE θ as trained, 1 seed, lowest loss (nats per byte): stick-breaking at "
        "1.800 against softmax at 2.200, a difference of -0.400 (one seed)"
    ) in _claims(found)
    assert not any("every normalizer against" in finding.claim for finding in found)  # no intervals to sort by


def _needle():
    from attnlab.experiments import needle
    from attnlab.normalizers import NormalizerSpec

    config = needle.Config(
        normalizers=(NormalizerSpec("softmax"), NormalizerSpec("ssmax"), NormalizerSpec("sparsemax")),
        eval_lengths=(128, 1024),
        depths=(0.5,),
        rope_theta_factors=(1.0,),
        seeds=SEEDS,
    )
    accuracy = {  # label: {length: sequence accuracy per seed}
        "softmax": {128: (0.90, 0.80, 0.85), 1024: (0.10, 0.00, 0.05)},
        "ssmax": {128: (0.70, 0.61, 0.64), 1024: (0.20, 0.00, 0.00)},  # -0.2 at L; +0.017, holds 0, at 8 L
        "sparsemax": {128: (0.00, 0.03, 0.00), 1024: (0.00, 0.00, 0.00)},  # did not learn
    }
    records = []
    for seed in SEEDS:
        for label, cells in accuracy.items():
            records.append({"record": "training", "normalizer": label, "seed": seed, "history": [{"loss": 0.5}]})
            for length, values in cells.items():
                records.append({"record": "retrieval", "normalizer": label, "seed": seed, "rope_theta_factor": 1.0,
                                "length": length, "depth": 0.5, "sequence_accuracy": values[seed],
                                "digit_accuracy": 0.3 if label == "sparsemax" else 0.9})  # fmt: skip
    return _payload(needle, config, records)


def test_needle_findings_compare_retrieval_at_L_and_at_the_longest_length_and_name_what_did_not_learn():
    from attnlab.figures import needle

    payload = _needle()
    steps = payload["config"]["training"]["steps"]
    claims = _claims(needle.findings(payload))
    at_l = (
        "At L = 128, RoPE θ as trained, 3 seeds, retrieval: SSMax at 0.650 against softmax at 0.850, "
        "a paired difference of -0.200 [-0.225, -0.175]"
    )
    far = (
        "At n = 1,024 (8 L), RoPE θ as trained, 3 seeds, retrieval: SSMax at 0.067 against softmax at 0.050, "
        "a paired difference of +0.017 [-0.173, +0.206]"
    )
    assert claims[at_l].significant is True and claims[at_l].figure == "crafted_accuracy_vs_length.png"
    assert claims[far].significant is False
    unlearned = (
        f"sparsemax did not learn the task at the training length in {steps:,} steps (RoPE θ as trained, 3 seeds): "
        "at L = 128 it retrieves the needle in 0.010 [-0.033, 0.053] of the sequences (under 0.1) against softmax's "
        "0.850, a paired difference of -0.840 [-1.003, -0.677], and gets 0.300 [0.300, 0.300] of the digits right "
        "(guessing: 0.1), so its accuracy beyond L says nothing about extrapolation"
    )
    assert claims[unlearned].significant is True
    assert not any(c.startswith("At n = 1,024") and "sparsemax at" in c for c in claims)
    assert (
        "RoPE θ as trained, 3 seeds: softmax retrieves the needle (all 4 digits right; mean over the depths) in "
        "0.850 [0.726, 0.974] of the sequences at L = 128 and 0.050 [-0.074, 0.174] at n = 1,024 (8 L)"
    ) in claims


def test_needle_findings_of_one_seed_settle_nothing():
    from attnlab.figures import needle

    found = needle.findings(_one_seed(_needle()))
    _check_one_seed(found)
    assert (
        "At L = 128, RoPE θ as trained, 1 seed, retrieval: SSMax at 0.700 against softmax at 0.900, "
        "a difference of -0.200 (one seed)"
    ) in _claims(found)


def _calibration():
    from attnlab.experiments import calibration
    from attnlab.losses import OutputNormalizer

    config = calibration.Config(
        outputs=(OutputNormalizer("softmax"), OutputNormalizer("softmax", label_smoothing=0.1),
                 OutputNormalizer("sparsemax")),
        seeds=SEEDS,
    )  # fmt: skip
    ece = {  # label: ECE as trained, after temperature scaling
        "softmax": ((0.040, 0.030, 0.035), (0.020, 0.020, 0.020)),
        "softmax ls0.1": ((0.070, 0.061, 0.064), (0.030, 0.031, 0.029)),  # +0.03 as trained
        "sparsemax": ((0.050, 0.020, 0.030), (0.025, 0.015, 0.020)),  # -0.002, holds 0
    }
    nll = {"softmax": (1.90, 1.91, 1.92), "softmax ls0.1": (2.00, 2.02, 2.00), "sparsemax": (None, None, None)}
    records = []
    for seed in SEEDS:
        for output in config.outputs:
            label = output.label
            zero = 0.05 if nll[label][0] is None else 0.0
            scores = {"accuracy": 0.5, "nll": nll[label][seed], "nll_nonzero": 1.7, "zero_target_fraction": zero,
                      "brier": 0.6, "confidence": 0.5, "support": 10.0}  # fmt: skip
            before = {**scores, "ece_width": ece[label][0][seed], "ece_mass": ece[label][0][seed]}
            after = {**scores, "ece_width": ece[label][1][seed], "ece_mass": ece[label][1][seed]}
            records.append({"record": "training", "output": label, "seed": seed, "history": [{"loss": 1.8}]})
            records.append({"record": "calibration", "output": label, "seed": seed, "temperature": 0.9,
                            "before": before, "after": after})  # fmt: skip
    return _payload(calibration, config, records)


def test_calibration_findings_compare_ece_and_nll_with_softmax_and_name_the_zero_probability_targets():
    from attnlab.figures import calibration

    claims = _claims(calibration.findings(_calibration()))
    trained = "ECE (15 equal-width bins) as trained, 3 seeds"
    highest = f"{trained}, highest ECE: softmax ls0.1 at 0.065 against softmax at 0.035, a paired difference of +0.030 [+0.028, +0.032]"  # noqa: E501
    lowest = f"{trained}, lowest ECE: sparsemax at 0.033 against softmax at 0.035, a paired difference of -0.002 [-0.028, +0.024]"  # noqa: E501
    assert claims[highest].significant is True and claims[highest].figure == "crafted_scores.png"
    assert claims[lowest].significant is False
    nll = "NLL (nats per byte) as trained, 3 seeds: softmax ls0.1 at 2.007 against softmax at 1.910, a paired difference of +0.097 [+0.059, +0.135]"  # noqa: E501
    assert claims[nll].significant is True
    assert (
        "Targets given probability 0 as trained, 3 seeds: sparsemax 5.00% of the test bytes; on any seed where that "
        "share is above 0 the NLL is infinite; the NLL over the other targets (sparsemax 1.700) leaves out the "
        "targets given probability 0, so it is not comparable with softmax's 1.910"
    ) in claims
    scaling = next(c for c in claims if c.startswith("Temperature scaling"))
    assert "every T below 1" in scaling and "softmax 0.035 → 0.020 (T = 0.90; -0.015 [-0.027, -0.003])" in scaling


def test_calibration_findings_of_one_seed_settle_nothing():
    from attnlab.figures import calibration

    found = calibration.findings(_one_seed(_calibration()))
    _check_one_seed(found)
    assert (
        "ECE (15 equal-width bins) as trained, 1 seed, highest ECE: softmax ls0.1 at 0.070 against softmax at 0.040, "
        "a difference of +0.030 (one seed)"
    ) in _claims(found)


def _distillation():
    from attnlab.experiments import distillation

    config = distillation.Config(temperatures=(1.0, 4.0), weights=(0.5,), seeds=SEEDS)
    losses = {  # (model, T, w): validation loss per seed
        ("teacher", None, None): (1.80, 1.85, 1.90),
        ("baseline", None, 0.0): (2.20, 2.25, 2.30),
        ("student", 1.0, 0.5): (2.10, 2.16, 2.19),  # -0.1 [-0.125, -0.075]: a gain
        ("student", 4.0, 0.5): (2.25, 2.20, 2.33),  # +0.01, holds 0
    }
    records = [
        {"record": "training", "model": model, "temperature": t, "weight": w, "seed": seed,
         "validation_loss": values[seed], "token_accuracy": 0.4}
        for seed in SEEDS for (model, t, w), values in losses.items()
    ]  # fmt: skip
    return _payload(distillation, config, records)


def test_distillation_findings_give_the_gain_per_setting_and_the_best_one():
    from attnlab.figures import distillation

    claims = _claims(distillation.findings(_distillation()))
    context = "Validation loss (nats per byte), 3 seeds"
    best = (
        f"{context}, the best distilled student is T = 1, w = 0.5, at 2.150 against the student alone at 2.250, "
        "a paired difference of -0.100 [-0.125, -0.075]"
    )
    worst = (
        f"{context}, the worst distilled student is T = 4, w = 0.5, at 2.260 against the student alone at 2.250, "
        "a paired difference of +0.010 [-0.121, +0.141]"
    )
    assert claims[best].significant is True and claims[best].figure == "crafted_temperature.png"
    assert claims[worst].significant is False
    assert (
        "Gain over the student alone (its validation loss minus the distilled student's, nats per byte; > 0: the "
        "teacher helped), w = 0.5, 3 seeds: T = 1: +0.100 [+0.075, +0.125], T = 4: -0.010 [-0.141, +0.121]; "
        "interval above 0 (the teacher helped) at T = 1, none below 0"
    ) in claims
    teacher = next(c for c in claims if c.startswith(f"{context}: the teacher (4 layers × width 128) at 1.850"))
    assert "against the student alone (2 layers × width 64) at 2.250, a paired difference of -0.400" in teacher


def test_distillation_findings_of_one_seed_settle_nothing():
    from attnlab.figures import distillation

    found = distillation.findings(_one_seed(_distillation()))
    _check_one_seed(found)
    assert (
        "Validation loss (nats per byte), 1 seed, the best distilled student is T = 1, w = 0.5, at 2.100 against the "
        "student alone at 2.200, a difference of -0.100 (one seed)"
    ) in _claims(found)


def _mqar():
    from attnlab.experiments import mqar
    from attnlab.normalizers import NormalizerSpec

    config = mqar.Config(
        normalizers=(NormalizerSpec("softmax"), NormalizerSpec("sparsemax"), NormalizerSpec("ssmax")),
        widths=(16, 32),
        seeds=SEEDS,
    )
    accuracy = {  # (label, width): held-out accuracy per seed
        ("softmax", 16): (0.50, 0.60, 0.55),
        ("sparsemax", 16): (0.70, 0.81, 0.74),  # +0.2 [+0.175, +0.225]
        ("ssmax", 16): (0.45, 0.65, 0.52),  # -0.01, holds 0
        ("softmax", 32): (0.90, 0.95, 1.00),
        ("sparsemax", 32): (0.90, 0.95, 1.00),
        ("ssmax", 32): (0.80, 0.90, 0.95),
    }
    records = [
        {"record": "training", "normalizer": label, "width": width, "seed": seed, "accuracy": values[seed]}
        for seed in SEEDS for (label, width), values in accuracy.items()
    ]  # fmt: skip
    return _payload(mqar, config, records)


def test_mqar_findings_compare_accuracy_with_softmax_at_each_width():
    from attnlab.figures import mqar

    claims = _claims(mqar.findings(_mqar()))
    highest = "Width 16, 3 seeds, highest accuracy: sparsemax at 0.750 against softmax at 0.550, a paired difference of +0.200 [+0.175, +0.225]"  # noqa: E501
    lowest = "Width 16, 3 seeds, lowest accuracy: SSMax at 0.540 against softmax at 0.550, a paired difference of -0.010 [-0.141, +0.121]"  # noqa: E501
    assert claims[highest].significant is True and claims[highest].figure == "crafted_accuracy.png"
    assert claims[lowest].significant is False
    assert (
        "Held-out query accuracy at width 16 / 32, 3 seeds, means over seeds (guessing among the 4 pairs: 0.250): "
        "softmax 0.550 / 0.950; sparsemax 0.750 / 0.950; SSMax 0.540 / 0.883"
    ) in claims


def test_mqar_findings_of_one_seed_settle_nothing():
    from attnlab.figures import mqar

    found = mqar.findings(_one_seed(_mqar()))
    _check_one_seed(found)
    assert (
        "Width 16, 1 seed, highest accuracy: sparsemax at 0.700 against softmax at 0.500, a difference of +0.200 "
        "(one seed)"
    ) in _claims(found)


def test_extremes_name_the_groups_tied_with_a_pick():
    def row(label, mean, low, high):
        return findings.Row(label, {"mean": 1.0 - mean}, {"mean": mean, "low": low, "high": high})

    tied = [row("a", -0.2, -0.3, -0.1), row("b", 0.4, 0.2, 0.6), row("c", 0.4, 0.2, 0.6), row("d", 0.4, 0.2, 0.6)]
    low, high = findings.extremes("Width 64", "accuracy", ("base", {"mean": 0.6}, tied), None)
    assert "the same for" not in low.claim and low.significant is True
    assert high.claim.startswith("Width 64, highest accuracy: d at 0.600 against base at 0.600")
    assert high.claim.endswith("; the same for b and c")
    # Equal differences but another value (or the reverse) are not a tie.
    apart = [row("a", 0.4, 0.2, 0.6), findings.Row("b", {"mean": 0.5}, {"mean": 0.4, "low": 0.2, "high": 0.6})]
    assert all(
        "the same for" not in f.claim for f in findings.extremes("W", "accuracy", ("base", {"mean": 0.6}, apart), None)
    )
