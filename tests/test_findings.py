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
