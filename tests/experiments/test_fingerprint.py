"""The code in a result's key: what counts (imported code, libraries) and what does not (layout,
docstrings, other modules), and a rerun after a code or device change that computes anew."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab import cli, experiments
from attnlab.experiments import fingerprint, kind, results, runner

REPO = Path(__file__).resolve().parents[2]
FADING_QUICK = REPO / "experiments" / "fading_synthetic_quick.toml"
TINY_FADING = ["--set", "normalizers=['softmax']", "--set", "seeds=1", "--set", "sigmas=[1.0]", "--set", "lengths=[10]"]

# A package of five modules: `kind` imports `arith` at the top and `extra` inside a function;
# `other` is only re-exported by the package's __init__, which `kind` never imports by name.
PACKAGE = {
    "__init__.py": '"""A package."""\nfrom pkg import other\n\nVALUE = 1\n',
    "kind.py": (
        '"""A kind."""\nfrom pkg.arith import double\n\n\n'
        "def run(x):\n"
        '    """Run it."""\n'
        "    from pkg.extra import shift\n"
        "    return shift(double(x)) if x in {'a', 'b', 'c'} else x  # a comment\n"
    ),
    "arith.py": "import numpy\n\n\ndef double(x):\n    return 2 * x\n",
    "extra.py": "def shift(x):\n    return x + 1\n",
    "other.py": "def unrelated():\n    return 3\n",
}


def _package(root: Path, **edits: str) -> Path:
    folder = root / "pkg"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in {**PACKAGE, **edits}.items():
        (folder / name).write_text(text)
    return root


def _fingerprint(root: Path) -> dict:
    return fingerprint.fingerprint_of(fingerprint.source_closure("pkg.kind", package="pkg", root=root))


def test_the_source_closure_follows_imports_and_keeps_packages_own_code_only(tmp_path):
    closure = fingerprint.source_closure("pkg.kind", package="pkg", root=_package(tmp_path))
    # kind, what it imports (at the top and in a function), and its package's __init__; not `other`.
    assert set(closure["modules"]) == {"pkg", "pkg.kind", "pkg.arith", "pkg.extra"}
    assert closure["imports"] == ["numpy"]
    libraries = fingerprint.fingerprint_of(closure)["libraries"]
    assert libraries == {"numpy": fingerprint.library_versions(["numpy"])["numpy"]} and libraries["numpy"]


@pytest.mark.parametrize(
    ("edit", "counts"),
    [
        ({"kind.py": PACKAGE["kind.py"].replace('"""Run it."""', '"""Run it, twice over."""')}, False),
        ({"kind.py": PACKAGE["kind.py"].replace("# a comment", "# another comment\n\n")}, False),
        ({"kind.py": PACKAGE["kind.py"].replace("    from pkg", "    assert x is not None\n    from pkg")}, False),
        ({"kind.py": PACKAGE["kind.py"].replace("shift(double(x))", "shift(\n        double(x)\n    )")}, False),
        ({"other.py": "def unrelated():\n    return 4\n"}, False),
        ({"arith.py": PACKAGE["arith.py"].replace("2 * x", "x + x")}, True),
        ({"extra.py": "def shift(x):\n    return x + 2\n"}, True),
        ({"kind.py": PACKAGE["kind.py"].replace("'c'", "'d'")}, True),
        ({"__init__.py": PACKAGE["__init__.py"].replace("VALUE = 1", "VALUE = 2")}, True),
    ],
    ids=["docstring", "comment-and-blank-lines", "assert", "layout", "unimported", "imported", "imported-in-a-function",
         "a-constant-in-a-set", "package-init"],
)  # fmt: skip
def test_what_changes_the_code_fingerprint(tmp_path, edit, counts):
    before = _fingerprint(_package(tmp_path / "before"))
    after = _fingerprint(_package(tmp_path / "after", **edit))
    assert (before["source"] != after["source"]) == counts
    assert before["libraries"] == after["libraries"]


def test_the_fingerprint_does_not_depend_on_string_hashing(tmp_path):
    """A set of strings is a frozenset constant whose order follows PYTHONHASHSEED: it is sorted."""
    root = _package(tmp_path)
    script = (
        "import importlib.util, json, sys; from pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('fp', {str(REPO / 'attnlab/experiments/fingerprint.py')!r})\n"
        "fp = importlib.util.module_from_spec(spec); spec.loader.exec_module(fp)\n"
        f"print(json.dumps(fp.source_closure('pkg.kind', package='pkg', root=Path({str(root)!r}))['modules']))\n"
    )
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", script], env={"PYTHONHASHSEED": seed}, capture_output=True,
                                  text=True, check=True).stdout)
        for seed in ("1", "2", "3")
    ]  # fmt: skip
    assert runs[0] == runs[1] == runs[2]


def test_each_kind_is_keyed_by_its_own_code():
    throughput = fingerprint.source_closure(experiments.KINDS["throughput"].code_module)
    fading = fingerprint.source_closure(experiments.KINDS["fading_synthetic"].code_module)
    assert {"attnlab.attention.sparse_blocked", "attnlab.normalizers.thresholds"} <= set(throughput["modules"])
    assert not any(m.startswith(("attnlab.figures", "attnlab.cli")) for m in throughput["modules"])
    assert "attnlab.train.loop" not in fading["modules"] and "attnlab.experiments.throughput" not in fading["modules"]
    libraries = experiments.KINDS["throughput"].code()["libraries"]
    assert {"jax", "jaxlib", "numpy", "torch", "entmax"} <= set(libraries)  # its peers too, installed or not (None)
    assert "rich" not in experiments.KINDS["mqar"].code()["libraries"]  # progress display computes nothing


def _run(*args: str) -> int:
    return cli.main(["run", str(FADING_QUICK), *TINY_FADING, *args, "--no-progress", "--no-figures"])


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("change", ["code", "device"])
def test_a_rerun_after_a_code_or_device_change_computes_anew_and_keeps_the_earlier_file(
    tmp_path, monkeypatch, capsys, replace_run_point, change
):
    out = tmp_path / "out"
    path = out / "fading_synthetic_quick.json"
    assert _run("--out", str(out)) == 0
    first = _load(path)
    assert first["environment"]["code"] == experiments.KINDS["fading_synthetic"].code()

    with monkeypatch.context() as patch:
        if change == "code":
            edited = {**fingerprint.code_fingerprint("attnlab.experiments.fading_synthetic"), "source": "0" * 16}
            patch.setattr(kind, "code_fingerprint", lambda module: edited)
        else:
            patch.setattr(runner, "device", lambda: {**results.device(), "device_kind": "another device"})
        assert _run("--out", str(out)) == 0
        second = _load(path)
    assert "its records are not under this run's point keys" in capsys.readouterr().err
    # The same config's points, computed anew: no record of the first run in the new file.
    assert len(second["records"]) == len(first["records"])
    assert not {r["point_key"] for r in second["records"]} & {r["point_key"] for r in first["records"]}
    (archived,) = results.archived_versions(out, "fading_synthetic_quick")
    assert _load(archived)["records"] == first["records"]

    # Back on the first code and device: the archived records are reused, nothing recomputed.
    def fail(*args, **kwargs):
        raise AssertionError("a point whose records were archived was recomputed")

    replace_run_point("fading_synthetic", fail)
    assert _run("--out", str(out)) == 0
    assert _load(path)["records"] == first["records"]
    assert len(results.archived_versions(out, "fading_synthetic_quick")) == 2
