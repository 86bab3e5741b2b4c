"""A byte-level text corpus that needs no download, and the batches drawn from it.

The default corpus is the Python standard library's own source: every `*.py` file under the
running interpreter's stdlib folder (`default_corpus_root()`), recursively, except the folders
named in `EXCLUDED_DIRS` (site-packages, dist-packages and the test suites: any folder named
test, tests or idle_test, e.g. idlelib/idle_test). About 730 files and 12 MB on CPython 3.11.
A user file or folder is read the same way; a folder's files are those matching `pattern`.

Layout. Files are sorted by their path relative to the root (posix form), so the result never
depends on the order the filesystem lists them. Each split is the bytes of its files in that
order, each file followed by `FILE_SEPARATOR` = b"\\n\\n" (a blank line; Python source is full of
blank lines, so file boundaries are not recoverable from the bytes: the file lists are kept in
`Corpus.train_paths` and `Corpus.validation_paths`). Token id = byte value, vocabulary 256.

Split rule (by file, so no file is in both splits). A file goes to validation iff

    u(path) = int(blake2b(path.encode(), digest_size=8)) / 2**64  <  validation_fraction,

with `path` its relative posix path. u is a fixed hash of the name alone, so a file's split never
depends on which other files exist. With two or more files both splits are kept non-empty: if no
file falls below the fraction, the file with the smallest u goes to validation; if every file
does, the file with the largest u goes to train. A corpus of exactly one file (a user file, a
folder holding one matching file, or a `max_bytes` cap that admits one) cannot be split by file:
its last round(validation_fraction * n) bytes (at least 1, at most n - 1) are the validation
split, the rest train, with no separator added.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attnlab.data.batch import Batch, DataError, check_positive_int, check_seed, is_real

FILE_SEPARATOR = b"\n\n"
EXCLUDED_DIRS = ("dist-packages", "idle_test", "site-packages", "test", "tests")


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Train and validation bytes of a text corpus (see the module docstring for the layout).

    Fields:
      source: where the text came from: "python-stdlib <version> at <path>" for the default
        corpus, else the resolved path of the user's file or folder.
      train: uint8 [n_train], read-only: the train files, each followed by FILE_SEPARATOR.
      validation: uint8 [n_validation], read-only: likewise for the validation files.
      train_paths, validation_paths: the files of each split, relative posix paths, sorted. For
        a one-file corpus split by bytes, both hold that one file.
      split: "files" (the hash rule) or "bytes" (a one-file corpus).
      validation_fraction: the fraction the split rule used.
      max_bytes: the cap on file bytes read, or None.

    Arrays are compared by identity (eq=False): compare `train` and `validation` with np.array_equal.
    """

    source: str
    train: np.ndarray
    validation: np.ndarray
    train_paths: tuple[str, ...]
    validation_paths: tuple[str, ...]
    split: str
    validation_fraction: float
    max_bytes: int | None = None

    @property
    def train_files(self) -> int:
        """Number of files in the train split."""
        return len(self.train_paths)

    @property
    def validation_files(self) -> int:
        """Number of files in the validation split."""
        return len(self.validation_paths)

    @functools.cached_property
    def digest(self) -> str:
        """A BLAKE2b hash of both splits' bytes (hex, 16 digits): what a trained model's key
        records of its data, so a model is never reused on a corpus that changed."""
        hasher = hashlib.blake2b(digest_size=8)
        for part in (self.train, self.validation):
            hasher.update(np.ascontiguousarray(part).tobytes())
            hasher.update(b"|")
        return hasher.hexdigest()

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for results files: source, split rule, bytes and files per split."""
        return {
            "source": self.source,
            "split": self.split,
            "validation_fraction": self.validation_fraction,
            "max_bytes": self.max_bytes,
            "file_separator": FILE_SEPARATOR.decode(),
            "train_bytes": int(self.train.size),
            "validation_bytes": int(self.validation.size),
            "train_files": self.train_files,
            "validation_files": self.validation_files,
        }


def default_corpus_root() -> Path:
    """The running interpreter's standard library folder, `sysconfig.get_paths()["stdlib"]`."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_position(relative_path: str) -> float:
    """u in [0, 1): a fixed hash of a file's relative posix path; the file is validation iff u < fraction."""
    digest = hashlib.blake2b(relative_path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def list_corpus_files(
    root: str | os.PathLike, *, pattern: str = "*.py", exclude_dirs: Iterable[str] = EXCLUDED_DIRS
) -> tuple[str, ...]:
    """Relative posix paths of the files under folder `root` that `load_corpus` reads, sorted.

    A file is listed when its name matches `pattern` (recursively, `Path.rglob`), it is a regular
    file (symlinks followed) and none of its folders below `root` is named in `exclude_dirs`.
    """
    root = Path(root)
    excluded = frozenset(exclude_dirs)
    paths = []
    for path in root.rglob(pattern):
        relative = path.relative_to(root)
        if excluded.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        paths.append(relative.as_posix())
    return tuple(sorted(paths))


def load_corpus(
    source: str | os.PathLike | None = None,
    *,
    validation_fraction: float = 0.05,
    pattern: str = "*.py",
    max_bytes: int | None = None,
    exclude_dirs: Iterable[str] = EXCLUDED_DIRS,
) -> Corpus:
    """Read a corpus and split it into train and validation (rules in the module docstring).

    Args:
      source: None for the Python standard library (`default_corpus_root()`), a text file, or a
        folder (its files matching `pattern`, recursively, outside `exclude_dirs`).
      validation_fraction: the share of files (of bytes, for a one-file corpus) held out, in (0, 1).
      pattern: glob for a folder's files; ignored for a single file.
      max_bytes: a cap on the file bytes read (separators not counted): files are taken in sorted
        order and the one that crosses the cap is cut short. The split rule is unchanged.
      exclude_dirs: folder names whose contents are skipped, at any depth below the root.

    The default corpus is cached in-process per argument set, so later calls are free (its arrays
    are read-only, so sharing them is safe).

    Raises DataError (a ValueError) for a missing or unreadable path, a folder with no matching
    files, a corpus of 0 bytes, or a bad argument; the message names the value.
    """
    if not is_real(validation_fraction) or not 0 < validation_fraction < 1:
        raise DataError(
            f"load_corpus: validation_fraction={validation_fraction!r}; accepted: a number strictly between 0 and 1"
        )
    if not isinstance(pattern, str) or not pattern:
        raise DataError(f"load_corpus: pattern={pattern!r}; accepted: a non-empty glob such as '*.py' or '*.txt'")
    if max_bytes is not None:
        max_bytes = check_positive_int(max_bytes, "load_corpus: max_bytes")
    if isinstance(exclude_dirs, str) or not all(isinstance(name, str) for name in exclude_dirs):
        raise DataError(f"load_corpus: exclude_dirs={exclude_dirs!r}; accepted: a collection of folder names")
    excluded = tuple(sorted(set(exclude_dirs)))
    fraction = float(validation_fraction)
    if source is None:
        return _load_default(str(default_corpus_root()), fraction, pattern, max_bytes, excluded)
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"load_corpus: source={source!r}; accepted: a path to a text file or folder, or None")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"load_corpus: source={str(source)!r} does not exist; accepted: a text file, a folder "
            f"(its files matching pattern={pattern!r}), or None for the Python standard library"
        )
    if path.is_dir():
        return _load_folder(path, str(path.resolve()), fraction, pattern, max_bytes, excluded)
    content = _read(path)
    if max_bytes is not None:
        content = content[:max_bytes]
    return _split(str(path.resolve()), [(path.name, content)], fraction, max_bytes)


@functools.lru_cache(maxsize=8)
def _load_default(root: str, fraction: float, pattern: str, max_bytes: int | None, excluded: tuple[str, ...]) -> Corpus:
    source = f"python-stdlib {platform.python_version()} at {root}"
    return _load_folder(Path(root), source, fraction, pattern, max_bytes, excluded)


def _load_folder(
    root: Path, source: str, fraction: float, pattern: str, max_bytes: int | None, excluded: tuple[str, ...]
) -> Corpus:
    paths = list_corpus_files(root, pattern=pattern, exclude_dirs=excluded)
    if not paths:
        raise DataError(
            f"load_corpus: folder {root} has no files matching pattern={pattern!r} "
            f"(searched recursively, skipping folders named {', '.join(excluded) or 'nothing'})"
        )
    files = []
    total = 0
    for relative in paths:
        if max_bytes is not None and total >= max_bytes:
            break
        content = _read(root / relative)
        if max_bytes is not None:
            content = content[: max_bytes - total]
        files.append((relative, content))
        total += len(content)
    return _split(source, files, fraction, max_bytes)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError as err:
        raise DataError(
            f"load_corpus: cannot read {path}: permission denied; make it readable or move it out of the corpus"
        ) from err
    except OSError as err:
        raise DataError(f"load_corpus: cannot read {path}: {err.strerror or err}") from err


def _split(source: str, files: list[tuple[str, bytes]], fraction: float, max_bytes: int | None) -> Corpus:
    total = sum(len(content) for _, content in files)
    if total == 0:
        raise DataError(
            f"load_corpus: {source} holds 0 bytes ({len(files)} file(s), all empty); a corpus needs some text"
        )
    if len(files) == 1:
        name, content = files[0]
        if len(content) < 2:
            raise DataError(f"load_corpus: {source} holds 1 byte; splitting it into train and validation needs >= 2")
        held_out = min(len(content) - 1, max(1, round(fraction * len(content))))
        return Corpus(
            source=source,
            train=_as_tokens([content[:-held_out]]),
            validation=_as_tokens([content[-held_out:]]),
            train_paths=(name,),
            validation_paths=(name,),
            split="bytes",
            validation_fraction=fraction,
            max_bytes=max_bytes,
        )
    position = {name: split_position(name) for name, _ in files}
    held_out = {name for name in position if position[name] < fraction}
    if not held_out:
        held_out = {min(position, key=position.__getitem__)}
    elif len(held_out) == len(position):
        held_out.remove(max(position, key=position.__getitem__))
    train = [(name, content) for name, content in files if name not in held_out]
    validation = [(name, content) for name, content in files if name in held_out]
    return Corpus(
        source=source,
        train=_as_tokens([content + FILE_SEPARATOR for _, content in train]),
        validation=_as_tokens([content + FILE_SEPARATOR for _, content in validation]),
        train_paths=tuple(name for name, _ in train),
        validation_paths=tuple(name for name, _ in validation),
        split="files",
        validation_fraction=fraction,
        max_bytes=max_bytes,
    )


def _as_tokens(chunks: list[bytes]) -> np.ndarray:
    # frombuffer over an immutable bytes object is read-only, which keeps cached corpora safe to share.
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def _check_data(data: Any, seq_len: int, where: str, name: str) -> np.ndarray:
    array = np.asarray(data)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"{where}: the {name} must be a 1-D integer array of byte tokens (e.g. Corpus.train); "
            f"got dtype {array.dtype}, shape {array.shape}"
        )
    if array.size < seq_len + 1:
        raise DataError(
            f"{where}: seq_len={seq_len} needs seq_len + 1 = {seq_len + 1} bytes; "
            f"the {name} has only {array.size} bytes"
        )
    return array


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    window = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    inputs, targets = np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])
    return Batch(inputs, targets, np.ones((starts.size, seq_len), dtype=bool))


def train_batches(data: np.ndarray, *, seq_len: int, batch_size: int, seed: int, name: str = "data") -> Iterator[Batch]:
    """An endless stream of batches of random windows of `data`.

    Each batch draws batch_size start offsets o uniformly from [0, n - seq_len - 1] with
    np.random.default_rng(seed) (n = len(data)); row b is the window w = data[o_b : o_b + seq_len + 1],
    inputs[b] = w[:-1], targets[b] = w[1:], loss_mask all True. Same seed, same stream.

    Args:
      data: int [n], byte tokens, e.g. Corpus.train.
      seq_len, batch_size: L and B, integers >= 1.
      seed: an integer >= 0.
      name: what `data` is, for error messages (e.g. "train split").

    Returns an iterator of Batch with int32 [B, L] inputs and targets. Arguments are checked when
    it is called, not at the first batch.
    """
    seq_len = check_positive_int(seq_len, "train_batches: seq_len")
    batch_size = check_positive_int(batch_size, "train_batches: batch_size")
    seed = check_seed(seed, "train_batches: seed")
    array = _check_data(data, seq_len, "train_batches", name)
    return _endless_windows(array, seq_len, batch_size, np.random.default_rng(seed))


def _endless_windows(data: np.ndarray, seq_len: int, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
    while True:
        yield _windows(data, rng.integers(0, data.size - seq_len, size=batch_size), seq_len)


def eval_batches(
    data: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int | None = None, name: str = "data"
) -> Iterator[Batch]:
    """Batches of contiguous, non-overlapping windows of `data`, from the start, in order.

    Window k (k = 0, 1, ...) is data[k L : k L + L + 1]: inputs data[k L : (k + 1) L], targets shifted by
    one, so consecutive windows' inputs tile the data. There are floor((n - 1) / L) windows and
    floor((n - 1) / L) // B batches (batch j holds windows jB .. jB + B - 1): a last partial batch is
    dropped, so every batch has the same shape and the same weight in an average. `max_batches`
    keeps only the first ones. Deterministic.

    Args:
      data: int [n], byte tokens, e.g. Corpus.validation.
      seq_len, batch_size: L and B, integers >= 1.
      max_batches: None (all) or an integer >= 1.
      name: what `data` is, for error messages (e.g. "validation split").

    Raises DataError when data cannot fill one batch, n < B L + 1.
    """
    seq_len = check_positive_int(seq_len, "eval_batches: seq_len")
    batch_size = check_positive_int(batch_size, "eval_batches: batch_size")
    if max_batches is not None:
        max_batches = check_positive_int(max_batches, "eval_batches: max_batches")
    array = _check_data(data, seq_len, "eval_batches", name)
    count = (array.size - 1) // seq_len // batch_size
    if count == 0:
        raise DataError(
            f"eval_batches: seq_len={seq_len}, batch_size={batch_size} needs batch_size * seq_len + 1 = "
            f"{batch_size * seq_len + 1} bytes for one batch; the {name} has only {array.size} bytes"
        )
    if max_batches is not None:
        count = min(count, max_batches)
    return (_windows(array, seq_len * np.arange(j * batch_size, (j + 1) * batch_size), seq_len) for j in range(count))


def spread_batches(data: np.ndarray, *, seq_len: int, count: int, batch_size: int, name: str = "data") -> list[Batch]:
    """`count` windows of seq_len bytes at evenly spaced offsets over the whole of `data`, so they
    sample every part of it (a validation split's last files too, not only its first), in
    count / batch_size batches, in order.

    Window k starts at round(k (n - L - 1) / (count - 1)) (n = len(data)): inputs
    data[o : o + L], targets shifted by one, loss_mask all True. Deterministic.

    Args:
      data: int [n], byte tokens, e.g. Corpus.validation.
      seq_len, count, batch_size: L, the number of windows and B, integers >= 1, count a multiple of B.
      name: what `data` is, for error messages.

    Raises DataError when count is not a multiple of batch_size or data is shorter than L + count.
    """
    seq_len = check_positive_int(seq_len, "spread_batches: seq_len")
    count = check_positive_int(count, "spread_batches: count")
    batch_size = check_positive_int(batch_size, "spread_batches: batch_size")
    if count % batch_size:
        raise DataError(f"spread_batches: count={count} must be a multiple of batch_size={batch_size}")
    array = _check_data(data, seq_len, "spread_batches", name)
    if array.size < seq_len + count:
        raise DataError(
            f"spread_batches: the {name} ({array.size} bytes) is too short for {count} windows of {seq_len} bytes"
        )
    starts = np.linspace(0, array.size - seq_len - 1, count).round().astype(int)
    return [_windows(array, chunk, seq_len) for chunk in np.split(starts, count // batch_size)]
