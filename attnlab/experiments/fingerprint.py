"""The code that computes a result, as a fingerprint for its key.

A sweep point's records and a trained model are determined by their settings and by the code
that computes them: attnlab's own modules and the libraries they call. `code_fingerprint(module)`
names that code for `module` (a kind's module, or the one that trains models):

    {"source": <hash of the module and every attnlab module it imports, transitively>,
     "libraries": {<distribution>: <version or None when not installed>, ...},
     "python": "3.11"}

so a rerun after a change to any of that code computes anew instead of reusing records (or a
checkpoint) that the old code wrote, and a change elsewhere (another kind, the figures, the
command line) reuses them. Imports are read from the source (`ast`, every `import` statement,
function-level ones too); a module counts once it is imported by name, and the `__init__.py` of
each package above an imported module counts for its own code but not for what it re-exports
(an `experiments/__init__.py` that lists every kind must not tie one kind to another's code).
Docstrings, comments, asserts and layout do not count: the hash is of each module's bytecode,
compiled without docstrings and asserts, less its line numbers.

Libraries: the distributions of the third-party modules the same code imports (jax also brings
jaxlib and any installed jax plugin, e.g. jax-cuda13-plugin), less `DISPLAY_ONLY` (progress
display, which computes nothing).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sys
import types
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE = "attnlab"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds attnlab/
DISPLAY_ONLY = frozenset({"rich"})  # libraries that only draw progress bars
JAX_COMPANIONS = ("jaxlib",)  # what a jax computation also runs on (plugins are found by name)
PLUGIN_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")
HASH_LENGTH = 16
NO_SOURCE = "<no source>"


def module_file(name: str, root: Path) -> Path | None:
    """The source file of module `name` (dotted) under the folder `root`, or None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _code_text(code: types.CodeType) -> str:
    """A code object as text without its line numbers or file name: what it does, not where."""
    consts = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            consts.append(_code_text(const))
        elif isinstance(const, frozenset):  # iteration order follows string hashing: sort it
            consts.append("frozenset" + repr(sorted(map(repr, const))))
        else:
            consts.append(repr(const))
    parts = (code.co_name, code.co_code.hex(), code.co_names, code.co_varnames, code.co_freevars,
             code.co_cellvars, code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
             code.co_flags, code.co_exceptiontable.hex())  # fmt: skip
    return repr(parts) + "[" + ",".join(consts) + "]"


def _docstring(node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = node.body[0] if node.body else None
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


@functools.lru_cache(maxsize=4096)
def _read(text: str, package: str, root: Path) -> tuple[str, frozenset[str], frozenset[str]]:
    """(digest of the code, `package` modules imported by name, other top-level modules imported)
    of one module's source text. The digest is of the bytecode compiled without docstrings and
    asserts (`optimize=2`), less its line numbers: comments, docstrings and layout do not count."""
    tree = ast.parse(text)
    own, other = _imports(tree, package, root)
    for node in (tree, *_statements(tree)):  # a docstring left to the compiler leaves a NOP for its line
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and _docstring(node):
            node.body = node.body[1:] or [ast.copy_location(ast.Pass(), node.body[0])]
    code = compile(tree, "<attnlab>", "exec", optimize=2)
    return hashlib.sha256(_code_text(code).encode()).hexdigest(), frozenset(own), frozenset(other)


def _statements(node: ast.AST) -> Iterator[ast.stmt]:
    """Every statement in `node`, nested ones too (in functions, classes, if, try, with, ...);
    an import is a statement, so this finds them all without visiting the expressions."""
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, ()):
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                if isinstance(child, ast.stmt):
                    yield child
                yield from _statements(child)


def _imports(tree: ast.AST, package: str, root: Path) -> tuple[set[str], set[str]]:
    """(modules of `package` imported by name, top-level names of other modules imported)."""
    own, other = set(), set()
    for node in _statements(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (own if alias.name.split(".")[0] == package else other).add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != package:
                other.add(node.module)
                continue
            for alias in node.names:  # `from pkg import sub` imports the submodule, else pkg itself
                submodule = f"{node.module}.{alias.name}"
                own.add(submodule if module_file(submodule, root) else node.module)
    return own, {name.split(".")[0] for name in other}


def source_closure(module: str, *, package: str = PACKAGE, root: Path = PACKAGE_ROOT) -> dict[str, Any]:
    """The code of `module` and of every `package` module it imports, transitively.

    Returns {"modules": {name: digest of its code}, "imports": top-level names of the other
    modules they import}. `module` may lie outside `package` (a module already imported: its file
    is found through `sys.modules`); a module without a source file counts by name alone."""
    digests: dict[str, str] = {}
    others: set[str] = set()
    todo, parents = [module], set()
    while todo:
        name = todo.pop()
        if name in digests:
            continue
        path = _source_file(name, root)
        if path is None:
            digests[name] = NO_SOURCE
            continue
        digests[name], own, other = _read(path.read_text(encoding="utf-8"), package, root)
        others |= other
        todo.extend(sorted(own - set(digests)))
        parts = name.split(".")
        if parts[0] == package:
            parents |= {".".join(parts[:i]) for i in range(1, len(parts))}
    for name in sorted(parents - set(digests)):  # their own code, not what they re-export
        path = module_file(name, root)
        digests[name] = NO_SOURCE if path is None else _read(path.read_text(encoding="utf-8"), package, root)[0]
    return {"modules": digests, "imports": sorted(others - set(sys.stdlib_module_names) - {"__future__", package})}


def _source_file(name: str, root: Path) -> Path | None:
    """Module `name`'s source file: under `root`, else the file of the module as imported."""
    path = module_file(name, root)
    loaded = getattr(sys.modules.get(name), "__file__", None)
    if path is None and loaded and loaded.endswith(".py"):
        path = Path(loaded)
    return path if path is not None and path.is_file() else None


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@functools.cache
def _jax_plugins() -> tuple[str, ...]:
    names = {d.metadata["Name"] for d in metadata.distributions()}
    return tuple(sorted(n for n in names if n and n.lower().startswith(PLUGIN_PREFIXES)))


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def library_versions(imports: list[str]) -> dict[str, str | None]:
    """{distribution: version} of the modules `imports` (a module not installed: {module: None})."""
    found: dict[str, str | None] = {}
    for name in imports:
        if name in DISPLAY_ONLY:
            continue
        for distribution in _distributions().get(name, [name]):
            found[distribution] = _version(distribution)
    if "jax" in found:
        for distribution in (*JAX_COMPANIONS, *_jax_plugins()):
            found[distribution] = _version(distribution)
    return dict(sorted(found.items()))


def fingerprint_of(closure: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint (see the module docstring) of a `source_closure`."""
    text = "\n".join(f"{name} {digest}" for name, digest in sorted(closure["modules"].items()))
    return {
        "source": hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH],
        "libraries": library_versions(closure["imports"]),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


@functools.cache
def _fingerprint(module: str) -> str:
    return json.dumps(fingerprint_of(source_closure(module)))


def code_fingerprint(module: str) -> dict[str, Any]:
    """The fingerprint of the code that `module` runs, read once per process: the code this
    process imported (an edit while it runs is the next process's code)."""
    return json.loads(_fingerprint(module))


__all__ = ["code_fingerprint", "fingerprint_of", "library_versions", "source_closure"]
