"""The documentation runs: every ```python block of README.md and of each docs/*.md page, in order,
one namespace per file; every ```toml config in them passes the config checks; and the README opens
with the two set-up commands that `.ci/run` reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attnlab.normalizers import registry

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", flags=re.S | re.M)
TOML_BLOCK = re.compile(r"^```toml\n(.*?)^```$", flags=re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text())


def test_every_page_is_found_and_linked_from_the_readme():
    assert len(PAGES) > 1, "docs/ has no pages"
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_python_blocks_run_in_order(page: Path, monkeypatch):
    blocks = python_blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} has no python blocks")
    monkeypatch.chdir(ROOT)  # examples name files as a user in the repository root does
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    # A page may register a normalizer (docs/normalizers.md shows how): the registry is global, so it
    # goes back to what it was, and other tests in this process see only the built-in names.
    built_in = set(registry.NAMES)
    try:
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"{page.name} python block {i}", "exec"), namespace)
            except Exception as err:  # the message is the point
                raise AssertionError(f"{page.name} python block {i} failed: {err!r}\n{block}") from err
    finally:
        for name in set(registry.NAMES) - built_in:
            registry.unregister(name)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_toml_configs_pass_the_checks(page: Path, tmp_path: Path):
    from attnlab.experiments import load

    configs = [block for block in TOML_BLOCK.findall(page.read_text()) if "kind =" in block]
    if not configs:
        pytest.skip(f"{page.name} has no toml configs")
    for i, block in enumerate(configs):
        path = tmp_path / f"{page.stem}_{i}.toml"
        path.write_text(block)
        load(path)  # ConfigError lists every problem


def test_readme_opens_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1).splitlines()
    assert "attnlab run" in first_block[0] and "pip install" in first_block[0]
    assert "pytest" in first_block[1] and "pip install -e '.[test]'" in first_block[1]


def test_ci_runs_the_readme_test_command():
    # .ci/run takes the first line holding "pytest" in any ```bash block: it must be the set-up line above.
    bash_lines = [line for block in re.findall(r"^```bash\n(.*?)^```$", (ROOT / "README.md").read_text(), re.S | re.M)
                  for line in block.splitlines()]  # fmt: skip
    first = next(line for line in bash_lines if "pytest" in line)
    assert "pip install -e '.[test]'" in first and first == bash_lines[1]
