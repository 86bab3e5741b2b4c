"""Results files: the config as run, the environment, timestamps and keyed records.

`<out>/<name>.json` holds

    {"experiment": name, "kind": kind, "config": {...}, "command": "attnlab run ...",
     "environment": {...}, "started_at": ISO time, "updated_at": ISO time,
     "finished_at": ISO time or null, "run_seconds": seconds,
     "records": [{<point>, "point_key": "...", <measurements>}, ...]}

Every record carries its sweep point and the point's key (a hash of everything that determines
it, see :meth:`attnlab.experiments.kind.Kind.point_key`). A rerun reuses the records whose key
matches, from this file or from an earlier version of it, and runs the other points.

Nothing finished is lost: when the config changed, or the same config's records were computed by
other code or on another device (their keys are not this run's), the earlier file is copied to
`<out>/archive/<name>/<its started_at>.json` before the new run's first point replaces it, and an
archived version is never overwritten. Writes are atomic (a temporary file, then a rename) and the
JSON is strict: a non-finite number is written as null, and the record says which value it was
under "nonfinite" ({"path": "nan" | "inf" | "-inf"}).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Collection
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

import attnlab
from attnlab.atomic import write_atomic

ARCHIVE = "archive"


class ResultsError(RuntimeError):
    """A results file that cannot be read or used; the message names the file and what to do."""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(attnlab.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def device() -> dict[str, Any]:
    """The backend and device kind this process computes on (part of every point's key)."""
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}


def environment() -> dict[str, Any]:
    """Versions, code commit, backend and device of this process, for the results file."""
    return {
        "attnlab": attnlab.__version__,
        "commit": _git_commit(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        **device(),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def strict(value: Any, path: str = "", found: dict[str, str] | None = None) -> Any:
    """`value` with every non-finite float replaced by None; `found[path] = "nan" | "inf" | "-inf"`
    for each one replaced (path like "history[3].loss")."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found[path or "value"] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, dict):
        return {k: strict(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record as strict JSON values, with "nonfinite" naming the values that were not finite."""
    found: dict[str, str] = {}
    out = strict(record, "", found)
    if found:
        out["nonfinite"] = {**out.get("nonfinite", {}), **found}
    return out


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write `payload` as strict JSON to `path` through a temporary file and a rename (a
    non-finite float raises ValueError: pass records through `strict_record` first)."""

    def write(handle: Any) -> None:
        json.dump(payload, handle, indent=1, allow_nan=False)
        handle.write("\n")

    write_atomic(path, write)


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON number {name}")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or ResultsError naming the file and what is wrong with it.
    Bare NaN/Infinity (written by attnlab before results were strict) are read as floats."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        payload = json.loads(text)
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except IsADirectoryError:
        raise ResultsError(f"{path}: is a folder, not a results file") from None
    except UnicodeDecodeError as err:
        raise ResultsError(f"{path}: not a results file (not UTF-8 text: {err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ResultsError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "move it aside or delete it to run this experiment anew"
        ) from None
    except OSError as err:
        raise ResultsError(f"{path}: cannot be read ({err.strerror})") from None
    if not isinstance(payload, dict):
        raise ResultsError(f"{path}: not a results file (a JSON {type(payload).__name__}, not an object)")
    return payload


def _stamp(payload: dict[str, Any]) -> str:
    """A file-name-safe time stamp for an archived version: its started_at (or updated_at)."""
    text = str(payload.get("started_at") or payload.get("updated_at") or "unknown")
    return re.sub(r"[^0-9A-Za-z]+", "", text.replace("+00:00", "Z"))[:32] or "unknown"


def archive_dir(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / ARCHIVE / name


def archived_versions(out_dir: Path, name: str) -> list[Path]:
    """The archived versions of results `name`, oldest first."""
    folder = archive_dir(out_dir, name)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def archive(path: Path, payload: dict[str, Any], out_dir: Path, name: str) -> Path:
    """Copy the results file `path` (whose content is `payload`) into the archive, under a name no
    other version has; returns the archived path. An identical copy already there is reused."""
    folder = archive_dir(out_dir, name)
    data = Path(path).read_bytes()
    stem = _stamp(payload)
    for i in range(1000):
        target = folder / (f"{stem}.json" if i == 0 else f"{stem}-{i}.json")
        if not target.exists():
            write_atomic(target, lambda handle: handle.write(data), binary=True)
            return target
        if target.read_bytes() == data:
            return target
    raise ResultsError(f"{folder}: 1000 archived versions share the time stamp {stem}; clean the folder up")


def replace_results(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as the results file `path` (a benchmark's), the version there archived first
    (results/archive/<stem>/), never overwritten."""
    path = Path(path)
    if path.exists():
        archive(path, read_json(path), path.parent, path.stem)
    write_json_atomic(path, payload)


def _records_by_key(payload: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in payload.get("records", []):
        key = record.get("point_key") if isinstance(record, dict) else None
        if isinstance(key, str):
            grouped.setdefault(key, []).append(record)
    return grouped


def _resumable(
    existing: dict[str, Any] | None, kind: str, config: dict[str, Any], keys: Collection[str] | None
) -> bool:
    """Whether `existing` is this run interrupted or finished: same kind and config, every record
    keyed, and (given this run's point `keys`) under one of them: a file of the same config written
    by other code or on another device is an earlier version, not this run."""
    if existing is None or existing.get("kind") != kind or existing.get("config") != config:
        return False
    records = existing.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) and "point_key" in r for r in records):
        return False
    return keys is None or all(r["point_key"] in keys for r in records)


class ResultsFile:
    """An experiment's results on disk, reusable by point key.

    `done(key)` says whether the point's records are in the current payload; `reuse(key)` copies
    them in from an earlier version (the file as it was, or an archived one) when one has them;
    `add(point, key, records)` appends a finished point and saves. The earlier file, when its
    config differs or its records are under keys that are not this run's (`keys`: other code,
    another device), is archived at the first `add` or `reuse` (not before: a run that fails
    before its first point leaves everything as it was): one file never mixes two runs' records.
    `environment_extra` joins the file's environment (the mesh, the code's fingerprint). With
    write=False (every process but process 0 of a multi-process run) the payload is kept up to
    date in memory and nothing is written: `_save` is the one place the file and its archive are
    written.
    """

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        kind: str,
        config: dict[str, Any],
        command: str = "",
        write: bool = True,
        keys: Collection[str] | None = None,
        environment_extra: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        self.write = write
        self.out_dir = self.path.parent
        self.name = name
        existing = read_json(self.path) if self.path.exists() else None
        self.earlier: dict[str, list[dict[str, Any]]] = {}
        for version in archived_versions(self.out_dir, name):
            self.earlier.update(_records_by_key(read_json(version)))
        self._to_archive: dict[str, Any] | None = None
        if existing is not None:
            self.earlier.update(_records_by_key(existing))
        self.replaced_because: str | None = None
        if _resumable(existing, kind, config, None if keys is None else set(keys)):
            self.payload = existing
            self.payload["finished_at"] = None
        else:
            self._to_archive = existing
            if existing is not None:
                same = existing.get("kind") == kind and existing.get("config") == config
                self.replaced_because = (
                    "its records are not under this run's point keys (other code or another device)"
                    if same
                    else "another config wrote it"
                )
            self.payload = {
                "experiment": name,
                "kind": kind,
                "config": config,
                "started_at": now(),
                "updated_at": now(),
                "finished_at": None,
                "records": [],
            }
        self.payload["command"] = command
        self.payload["environment"] = {**environment(), **(environment_extra or {})}
        self._keys = set(_records_by_key(self.payload))

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.payload["records"]

    @property
    def replaces(self) -> Path | None:
        """Where the earlier file (of another config, code or device) goes when this run writes its first point."""
        return (
            None
            if self._to_archive is None
            else archive_dir(self.out_dir, self.name) / f"{_stamp(self._to_archive)}.json"
        )

    def done(self, key: str) -> bool:
        return key in self._keys

    def reusable(self, key: str) -> bool:
        return key in self.earlier

    def reuse(self, keys: list[str]) -> None:
        """Copy an earlier version's records of the points `keys` into this file and save (once)."""
        if keys:
            self._append({key: [dict(r) for r in self.earlier[key]] for key in keys})

    def add(self, point: dict[str, Any], key: str, records: list[dict[str, Any]]) -> None:
        """Append the records of one finished point (each tagged with the point and its key) and save."""
        self._append({key: [strict_record({**point, **r, "point_key": key}) for r in records]})

    def _archive_earlier(self) -> None:
        """Archive the earlier file (another config, code or device), once, before this run first writes."""
        if self._to_archive is not None:
            archive(self.path, self._to_archive, self.out_dir, self.name)
            self._to_archive = None

    def _save(self) -> None:
        """Archive the earlier file (once), then write the payload; nothing when write=False."""
        if self.write:
            self._archive_earlier()
            write_json_atomic(self.path, self.payload)

    def _append(self, by_key: dict[str, list[dict[str, Any]]]) -> None:
        for key, records in by_key.items():
            self.records.extend(records)
            self._keys.add(key)
        self.payload["updated_at"] = now()
        self._save()

    def finish(self, run_seconds: float, summary: dict[str, Any] | None = None) -> None:
        """Mark the sweep finished, with the kind's summary of its records (if it has one)."""
        self.payload["run_seconds"] = round(self.payload.get("run_seconds", 0.0) + run_seconds, 2)
        self.payload["finished_at"] = now()
        if summary is not None:
            self.payload["summary"] = strict(summary, "summary")
        self._save()  # a sweep of no new points still replaces the earlier file
