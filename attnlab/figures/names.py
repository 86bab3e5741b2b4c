"""File names of figures: what a results file's figures are called."""

from __future__ import annotations

import re
from pathlib import Path


def figure_name(json_path: Path) -> str:
    """The stem every figure of a results file starts with: the file's own stem, reduced to
    A-Z a-z 0-9 . _ - (a results file's `experiment` field is not trusted for file names)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(json_path).stem).lstrip(".")[:100]
    return name or "results"
