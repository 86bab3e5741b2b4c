"""Results files: the config as run, the environment, timestamps and flat records.

`results/<name>.json` holds

    {"experiment": name, "kind": kind, "config": {...}, "environment": {...},
     "started_at": ISO time, "updated_at": ISO time, "finished_at": ISO time or null,
     "records": [{...}, ...]}

Every write goes to a temporary file in the same folder and is renamed over the old one, so an
interrupted run leaves the last complete file. Each record carries the sweep point it belongs
to under the keys of `point`, so a rerun with the same config skips the points already there.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

import attnlab
from attnlab.atomic import write_atomic


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


def environment() -> dict[str, Any]:
    """Versions, backend and device of this process, for the results file."""
    device = jax.devices()[0]
    return {
        "attnlab": attnlab.__version__,
        "commit": _git_commit(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write `payload` as JSON to `path` through a temporary file and a rename."""

    def write(handle: Any) -> None:
        json.dump(payload, handle, indent=1, allow_nan=True)
        handle.write("\n")

    write_atomic(path, write)


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        return json.load(handle)


class ResultsFile:
    """An experiment's results on disk, resumable by sweep point."""

    def __init__(self, path: Path, *, name: str, kind: str, config: dict[str, Any]):
        self.path = Path(path)
        self.previous: Path | None = None
        existing = read_json(self.path) if self.path.exists() else None
        if existing is not None and existing.get("config") == config:
            self.payload = existing
            self.payload["environment"] = environment()
            self.payload["finished_at"] = None
        else:
            if existing is not None:
                # A different config: keep the old results beside the new ones, never drop them.
                self.previous = self.path.with_suffix(".previous.json")
                os.replace(self.path, self.previous)
            self.payload = {
                "experiment": name,
                "kind": kind,
                "config": config,
                "environment": environment(),
                "started_at": now(),
                "updated_at": now(),
                "finished_at": None,
                "records": [],
            }

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.payload["records"]

    def done(self, point: dict[str, Any]) -> bool:
        return any(all(r.get(k) == v for k, v in point.items()) for r in self.records)

    def add(self, point: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """Append the records of one sweep point (each tagged with the point) and save."""
        self.records.extend({**point, **r} for r in records)
        self.payload["updated_at"] = now()
        write_json_atomic(self.path, self.payload)

    def finish(self) -> None:
        self.payload["finished_at"] = now()
        write_json_atomic(self.path, self.payload)
