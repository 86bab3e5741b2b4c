"""attnlab.data: the corpus (files, split, windows) and the synthetic tasks (MQAR, needle), by their layouts."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.data import (
    EXCLUDED_DIRS,
    FILE_SEPARATOR,
    Batch,
    DataError,
    MQARConfig,
    NeedleConfig,
    default_corpus_root,
    eval_batches,
    list_corpus_files,
    load_corpus,
    mqar_batch,
    needle_batch,
    split_position,
    spread_batches,
    task_accuracy,
    train_batches,
)


def write(root: Path, relative: str, content: bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def many_files(root: Path, count: int) -> dict[str, bytes]:
    files = {f"pkg{i % 7}/module_{i:03d}.py": f"# module {i}\nx = {i}\n".encode() for i in range(count)}
    for relative, content in files.items():
        write(root, relative, content)
    return files


def as_bytes(tokens: np.ndarray) -> bytes:
    return np.asarray(tokens, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------- corpus: the default


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus()


def test_default_corpus_is_the_stdlib_without_tests_or_site_packages(stdlib):
    assert stdlib.source.startswith("python-stdlib ") and str(default_corpus_root()) in stdlib.source
    assert stdlib.split == "files"
    assert stdlib.train.size + stdlib.validation.size > 1_000_000
    assert stdlib.train_files + stdlib.validation_files >= 100
    assert stdlib.train_files > 0 and stdlib.validation_files > 0
    assert not set(stdlib.train_paths) & set(stdlib.validation_paths)
    for path in stdlib.train_paths + stdlib.validation_paths:
        assert path.endswith(".py") and not set(path.split("/")[:-1]) & set(EXCLUDED_DIRS), path
    assert 0.02 <= stdlib.validation_files / (stdlib.train_files + stdlib.validation_files) <= 0.1
    assert stdlib.train.dtype == np.uint8 and not stdlib.train.flags.writeable
    # The default is cached: the same object comes back, which is safe because it is read-only.
    assert load_corpus() is stdlib


def test_default_corpus_holds_exactly_the_listed_files(stdlib):
    root = default_corpus_root()
    listed = list_corpus_files(root)
    assert tuple(sorted(stdlib.train_paths + stdlib.validation_paths)) == listed
    expected = b"".join((root / path).read_bytes() + FILE_SEPARATOR for path in stdlib.validation_paths)
    assert as_bytes(stdlib.validation) == expected


def test_capped_stdlib_load_is_deterministic_and_capped():
    first = load_corpus(default_corpus_root(), max_bytes=300_000)
    second = load_corpus(default_corpus_root(), max_bytes=300_000)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.validation, second.validation)
    assert first.train_paths == second.train_paths and first.validation_paths == second.validation_paths
    separators = len(FILE_SEPARATOR) * (first.train_files + first.validation_files)
    assert first.train.size + first.validation.size - separators == 300_000


# ---------------------------------------------------------------- corpus: user folders and files


def test_folder_skips_excluded_dirs_and_other_patterns(tmp_path):
    write(tmp_path, "a.py", b"KEEP_A\n")
    write(tmp_path, "pkg/b.py", b"KEEP_B\n")
    write(tmp_path, "pkg/test/t.py", b"EXCLUDED_TEST\n")
    write(tmp_path, "tests/u.py", b"EXCLUDED_TESTS\n")
    write(tmp_path, "idlelib/idle_test/i.py", b"EXCLUDED_IDLE\n")
    write(tmp_path, "lib/site-packages/s.py", b"EXCLUDED_SITE\n")
    write(tmp_path, "lib/dist-packages/d.py", b"EXCLUDED_DIST\n")
    write(tmp_path, "notes.txt", b"EXCLUDED_TXT\n")
    write(tmp_path, "test_helpers.py", b"KEEP_TEST_NAMED_FILE\n")
    corpus = load_corpus(tmp_path)
    text = as_bytes(corpus.train) + as_bytes(corpus.validation)
    assert sorted(corpus.train_paths + corpus.validation_paths) == ["a.py", "pkg/b.py", "test_helpers.py"]
    assert b"EXCLUDED" not in text and text.count(b"KEEP") == 3
    assert corpus.source == str(tmp_path.resolve())
    # Another pattern reads other files; no exclusions reads them all.
    text_files = load_corpus(tmp_path, pattern="*.txt")
    assert text_files.train_paths == ("notes.txt",) and text_files.split == "bytes"
    assert len(list_corpus_files(tmp_path, exclude_dirs=())) == 8


def test_split_is_by_file_hash_in_sorted_order_with_separators(tmp_path):
    files = many_files(tmp_path, 200)
    corpus = load_corpus(tmp_path, validation_fraction=0.2)
    held_out = sorted(path for path in files if split_position(path) < 0.2)
    assert list(corpus.validation_paths) == held_out
    assert list(corpus.train_paths) == sorted(set(files) - set(held_out))
    assert 20 <= len(held_out) <= 60
    assert as_bytes(corpus.train) == b"".join(files[path] + FILE_SEPARATOR for path in corpus.train_paths)
    assert as_bytes(corpus.validation) == b"".join(files[path] + FILE_SEPARATOR for path in held_out)
    assert all(0 <= split_position(path) < 1 for path in files)


def test_a_files_split_does_not_depend_on_the_other_files(tmp_path):
    many_files(tmp_path, 60)
    before = load_corpus(tmp_path, validation_fraction=0.3)
    for i in range(40):
        write(tmp_path, f"extra/new_{i}.py", b"y = 1\n")
    after = load_corpus(tmp_path, validation_fraction=0.3)
    assert set(before.validation_paths) <= set(after.validation_paths)
    assert set(before.train_paths) <= set(after.train_paths)


def test_both_splits_are_non_empty_by_the_documented_rule(tmp_path):
    write(tmp_path, "one.py", b"1\n")
    write(tmp_path, "two.py", b"2\n")
    by_position = sorted(["one.py", "two.py"], key=split_position)
    tiny = load_corpus(tmp_path, validation_fraction=1e-12)
    assert tiny.validation_paths == (by_position[0],) and tiny.train_paths == (by_position[1],)
    huge = load_corpus(tmp_path, validation_fraction=1 - 1e-12)
    assert huge.train_paths == (by_position[1],) and huge.validation_paths == (by_position[0],)


def test_single_file_is_split_by_bytes(tmp_path):
    content = bytes(range(256)) * 4
    write(tmp_path, "book.txt", content)
    corpus = load_corpus(tmp_path / "book.txt", validation_fraction=0.25)
    assert corpus.split == "bytes" and corpus.train_paths == corpus.validation_paths == ("book.txt",)
    assert as_bytes(corpus.train) == content[:768] and as_bytes(corpus.validation) == content[768:]
    assert corpus.describe()["validation_bytes"] == 256
    assert (
        as_bytes(load_corpus(tmp_path / "book.txt", max_bytes=100, validation_fraction=0.1).validation)
        == (content[90:100])
    )


def test_max_bytes_takes_files_in_sorted_order_and_cuts_the_last(tmp_path):
    for name in ("c.py", "a.py", "b.py", "d.py"):
        write(tmp_path, name, name[0].encode() * 10)
    corpus = load_corpus(tmp_path, max_bytes=25, validation_fraction=0.5)
    text = as_bytes(corpus.train) + as_bytes(corpus.validation)
    assert sorted(corpus.train_paths + corpus.validation_paths) == ["a.py", "b.py", "c.py"]
    assert text.count(b"a") == 10 and text.count(b"b") == 10 and text.count(b"c") == 5 and b"d" not in text
    assert corpus.describe()["max_bytes"] == 25


def test_describe_is_json_ready(tmp_path):
    import json

    many_files(tmp_path, 10)
    summary = load_corpus(tmp_path).describe()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["train_files"] + summary["validation_files"] == 10


# ---------------------------------------------------------------- corpus: errors


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*does not exist"):
        load_corpus(tmp_path / "nowhere")


def test_folder_without_matching_files_is_named(tmp_path):
    write(tmp_path, "readme.md", b"hello")
    write(tmp_path, "test/only.py", b"x = 1")
    with pytest.raises(DataError, match=r"no files matching pattern='\*\.py'"):
        load_corpus(tmp_path)


def test_empty_corpus_is_refused(tmp_path):
    write(tmp_path, "empty.txt", b"")
    with pytest.raises(DataError, match=r"empty\.txt holds 0 bytes"):
        load_corpus(tmp_path / "empty.txt")
    write(tmp_path, "pkg/__init__.py", b"")
    write(tmp_path, "pkg/other.py", b"")
    with pytest.raises(DataError, match=r"holds 0 bytes \(2 file\(s\), all empty\)"):
        load_corpus(tmp_path / "pkg")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever the mode")
def test_unreadable_file_is_named_chmod(tmp_path):
    write(tmp_path, "a.py", b"x = 1")
    write(tmp_path, "secret.py", b"y = 2")
    (tmp_path / "secret.py").chmod(0)
    try:
        with pytest.raises(DataError, match=r"secret\.py: permission denied"):
            load_corpus(tmp_path)
    finally:
        (tmp_path / "secret.py").chmod(0o644)


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    write(tmp_path, "a.py", b"x = 1")
    write(tmp_path, "secret.py", b"y = 2")
    read_bytes = Path.read_bytes

    def refuse_secret(self):
        if self.name == "secret.py":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse_secret)
    with pytest.raises(DataError, match=r"secret\.py: permission denied"):
        load_corpus(tmp_path)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, math.nan, True, "0.1"])
def test_bad_validation_fraction_is_named(tmp_path, fraction):
    with pytest.raises(DataError, match=re.escape(f"validation_fraction={fraction!r}")):
        load_corpus(tmp_path, validation_fraction=fraction)


def test_bad_max_bytes_and_pattern_are_named(tmp_path):
    with pytest.raises(DataError, match=r"max_bytes=0"):
        load_corpus(tmp_path, max_bytes=0)
    with pytest.raises(DataError, match=r"pattern=''"):
        load_corpus(tmp_path, pattern="")


# ---------------------------------------------------------------- windows

# 256 distinct bytes: a window's first input says where it starts.
DISTINCT = np.random.default_rng(0).permutation(256).astype(np.uint8)
POSITION_OF = np.argsort(DISTINCT)


def test_train_windows_are_data_slices_shifted_by_one():
    seq_len = 200
    starts = []
    stream = train_batches(DISTINCT, seq_len=seq_len, batch_size=8, seed=3)
    for _ in range(50):
        batch = next(stream)
        assert batch.inputs.shape == batch.targets.shape == batch.loss_mask.shape == (8, seq_len)
        assert batch.inputs.dtype == batch.targets.dtype == np.int32 and batch.loss_mask.all()
        assert batch.needle_mask is None
        for inputs, targets in zip(batch.inputs, batch.targets, strict=True):
            start = int(POSITION_OF[inputs[0]])
            assert np.array_equal(inputs, DISTINCT[start : start + seq_len])
            assert np.array_equal(targets, DISTINCT[start + 1 : start + seq_len + 1])
            starts.append(start)
    # Every start in [0, n - seq_len - 1] is possible: both ends are drawn.
    assert min(starts) == 0 and max(starts) == DISTINCT.size - seq_len - 1


def test_train_batches_follow_the_seed():
    def first_three(seed):
        stream = train_batches(DISTINCT, seq_len=16, batch_size=4, seed=seed)
        return np.stack([next(stream).inputs for _ in range(3)])

    assert np.array_equal(first_three(7), first_three(7))
    assert not np.array_equal(first_three(7), first_three(8))


def test_eval_windows_tile_the_data_in_order():
    batches = list(eval_batches(DISTINCT, seq_len=10, batch_size=4))
    assert len(batches) == (DISTINCT.size - 1) // 10 // 4 == 6
    inputs = np.concatenate([b.inputs for b in batches]).ravel()
    targets = np.concatenate([b.targets for b in batches]).ravel()
    assert np.array_equal(inputs, DISTINCT[:240]) and np.array_equal(targets, DISTINCT[1:241])
    again = list(eval_batches(DISTINCT, seq_len=10, batch_size=4))
    assert all(np.array_equal(a.inputs, b.inputs) for a, b in zip(batches, again, strict=True))
    capped = list(eval_batches(DISTINCT, seq_len=10, batch_size=4, max_batches=2))
    assert len(capped) == 2 and np.array_equal(capped[1].inputs, batches[1].inputs)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_eval_batch_count_drops_only_the_partial_batch(count):
    # n - 1 = count * B * L + (B * L - 1): one window short of another full batch.
    data = np.zeros(count * 12 + 11 + 1, dtype=np.uint8)
    assert len(list(eval_batches(data, seq_len=3, batch_size=4))) == count


def test_windows_longer_than_the_data_are_named():
    short = np.zeros(64, dtype=np.uint8)
    with pytest.raises(DataError, match=r"seq_len=64 needs seq_len \+ 1 = 65 bytes; the validation split has only 64"):
        eval_batches(short, seq_len=64, batch_size=1, name="validation split")
    with pytest.raises(DataError, match=r"seq_len=100 needs seq_len \+ 1 = 101 bytes; the data has only 64"):
        train_batches(short, seq_len=100, batch_size=1, seed=0)
    with pytest.raises(DataError, match=r"batch_size=8 needs batch_size \* seq_len \+ 1 = 129 bytes"):
        eval_batches(short, seq_len=16, batch_size=8)


@pytest.mark.parametrize("field, value", [("seq_len", 0), ("seq_len", True), ("batch_size", -1), ("batch_size", 2.0)])
def test_bad_window_sizes_are_named(field, value):
    arguments = {"seq_len": 4, "batch_size": 2, field: value}
    with pytest.raises(DataError, match=re.escape(f"{field}={value!r}")):
        train_batches(DISTINCT, seed=0, **arguments)
    with pytest.raises(DataError, match=re.escape(f"{field}={value!r}")):
        eval_batches(DISTINCT, **arguments)


# ---------------------------------------------------------------- MQAR


def check_mqar(config: MQARConfig, batch: Batch) -> None:
    pairs, half = config.num_pairs, config.vocab_size // 2
    assert batch.inputs.shape == batch.targets.shape == batch.loss_mask.shape == (batch.inputs.shape[0], config.seq_len)
    assert np.array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    for inputs, targets, mask in zip(batch.inputs, batch.targets, batch.loss_mask, strict=True):
        keys, values = inputs[0 : 2 * pairs : 2], inputs[1 : 2 * pairs : 2]
        assert len(set(keys.tolist())) == pairs and ((keys >= 1) & (keys < half)).all()
        assert ((values >= half) & (values < config.vocab_size)).all()
        value_of = dict(zip(keys.tolist(), values.tolist(), strict=True))
        scored = np.flatnonzero(mask)
        assert scored.size == config.query_count and (scored >= 2 * pairs).all()
        asked = inputs[scored].tolist()
        assert len(set(asked)) == len(asked) and set(asked) <= set(value_of)
        assert targets[scored].tolist() == [value_of[key] for key in asked]
        # Outside the queries the tail is filler.
        tail = np.ones(config.seq_len, dtype=bool)
        tail[: 2 * pairs] = False
        tail[scored] = tail[np.minimum(scored + 1, config.seq_len - 1)] = False
        assert (inputs[tail] == 0).all()


def test_mqar_targets_are_the_paired_values():
    config = MQARConfig(seq_len=64, num_pairs=8, num_queries=5)
    check_mqar(config, mqar_batch(config, batch_size=32, seed=0))


@settings(max_examples=40, deadline=None)
@given(
    pairs=st.integers(1, 6),
    extra_queries=st.integers(0, 5),
    room=st.integers(0, 9),
    vocab=st.integers(16, 256),
    power_a=st.sampled_from([0.01, 0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**32),
)
def test_mqar_layout_holds_for_any_config(pairs, extra_queries, room, vocab, power_a, seed):
    queries = min(pairs, 1 + extra_queries)
    config = MQARConfig(
        seq_len=2 * pairs + 2 * queries + room, num_pairs=pairs, num_queries=queries, vocab_size=vocab, power_a=power_a
    )
    check_mqar(config, mqar_batch(config, batch_size=3, seed=seed))


def test_mqar_follows_the_seed_and_num_queries_defaults_to_num_pairs():
    config = MQARConfig(seq_len=48, num_pairs=4)
    a, b, c = (mqar_batch(config, batch_size=8, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True) if x is not None)
    assert not np.array_equal(a.inputs, c.inputs)
    assert (a.loss_mask.sum(axis=1) == 4).all() and a.needle_mask is None


def test_mqar_power_law_puts_queries_earlier_than_uniform():
    def mean_position(power_a):
        config = MQARConfig(seq_len=256, num_pairs=4, num_queries=4, power_a=power_a)
        return np.nonzero(mqar_batch(config, batch_size=200, seed=0).loss_mask)[1].mean()

    # Uniform slots average near the middle of the query region [8, 256); a = 0.01 stays far earlier.
    assert abs(mean_position(1.0) - 132) < 10
    assert mean_position(0.01) < 80


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"seq_len": 20, "num_pairs": 6, "num_queries": 5}, r"num_queries = 22 tokens; seq_len=20"),
        ({"num_pairs": 4, "num_queries": 5}, r"num_queries=5 > num_pairs=4"),
        ({"num_pairs": 8, "vocab_size": 16}, r"num_pairs=8 needs .* vocab_size=16 has 7"),
        ({"vocab_size": 512}, r"vocab_size=512; accepted: at most 256"),
        ({"vocab_size": 2, "num_pairs": 1, "seq_len": 4}, r"vocab_size=2 has 0"),
        ({"num_pairs": True}, r"num_pairs=True"),
        ({"power_a": 0.0}, r"power_a=0.0"),
    ],
)
def test_mqar_config_errors_are_named(fields, message):
    with pytest.raises(DataError, match=message):
        MQARConfig(**fields)


# ---------------------------------------------------------------- needle


NEEDLE = re.compile(rb" The magic number for ([a-z]+) is ([0-9]+)\. ")


def parse_needle(config: NeedleConfig, batch: Batch, row: int) -> tuple[int, bytes, bytes]:
    """(needle start, key, value) read back from the inputs, checking the question and the answer."""
    text = as_bytes(batch.inputs[row])
    haystack, question = text[: config.haystack_length], text[config.haystack_length :]
    found = list(NEEDLE.finditer(haystack))
    assert len(found) == 1, haystack
    key, value = found[0].group(1), found[0].group(2)
    assert len(key) == config.key_length and len(value) == config.value_length
    assert question == b" The magic number for " + key + b" is " + value[:-1]
    return found[0].start(), key, value


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_answer_is_the_value_in_the_needle(depth):
    config = NeedleConfig(seq_len=120, depth=depth)
    batch = needle_batch(config, batch_size=6, seed=1)
    assert batch.inputs.shape == batch.needle_mask.shape == (6, 120) and batch.inputs.dtype == np.int32
    assert np.array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    for row in range(6):
        start, _, value = parse_needle(config, batch, row)
        assert np.flatnonzero(batch.loss_mask[row]).tolist() == list(range(120 - config.value_length, 120))
        assert as_bytes(batch.targets[row][batch.loss_mask[row]]) == value
        assert np.flatnonzero(batch.needle_mask[row]).tolist() == list(range(start, start + config.needle_length))
        assert start == round(depth * (config.haystack_length - config.needle_length))
    if depth == 0.0:
        assert config.needle_start == 0
    if depth == 1.0:
        assert config.needle_start + config.needle_length == config.haystack_length


def test_needle_depth_extremes_touch_the_start_and_the_question():
    first = needle_batch(NeedleConfig(seq_len=100, depth=0.0), batch_size=1, seed=0)
    last = needle_batch(NeedleConfig(seq_len=100, depth=1.0), batch_size=1, seed=0)
    assert as_bytes(first.inputs[0]).startswith(b" The magic number for ")
    assert re.search(rb"[0-9]\.  The magic number for [a-z]+ is [0-9]+$", as_bytes(last.inputs[0]))


def test_needle_lengths_follow_the_text():
    config = NeedleConfig(seq_len=100, key_length=3, value_length=6)
    assert config.needle_length == len(b" The magic number for abc is 123456. ")
    assert config.question_length == len(b" The magic number for abc is ")
    tight = NeedleConfig(seq_len=config.needle_length + config.question_length + 5, key_length=3, value_length=6)
    assert tight.filler_length == 0
    parse_needle(tight, needle_batch(tight, batch_size=2, seed=0), 0)


def test_random_filler_is_letters_and_spaces():
    config = NeedleConfig(seq_len=200, depth=0.5)
    batch = needle_batch(config, batch_size=4, seed=2)
    outside = batch.inputs[:, : config.haystack_length][~batch.needle_mask[:, : config.haystack_length]]
    assert set(as_bytes(outside)) <= set(b"abcdefghijklmnopqrstuvwxyz ")


def test_corpus_filler_is_a_window_of_the_corpus():
    corpus = np.frombuffer(b"".join(f"line {i}: some text.\n".encode() for i in range(400)), dtype=np.uint8)
    config = NeedleConfig(seq_len=200, depth=0.3, filler="corpus")
    batch = needle_batch(config, batch_size=5, seed=4, corpus=corpus)
    text = corpus.tobytes()
    for row in range(5):
        start, _, _ = parse_needle(config, batch, row)
        haystack = as_bytes(batch.inputs[row, : config.haystack_length])
        filler = haystack[:start] + haystack[start + config.needle_length :]
        assert len(filler) == config.filler_length and filler in text


def test_needle_follows_the_seed():
    config = NeedleConfig(seq_len=128)
    a, b, c = (needle_batch(config, batch_size=4, seed=s) for s in (5, 5, 6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"seq_len": 60}, r"the needle \(36 bytes\), the question \(30\) .* need seq_len >= 69; got seq_len=60"),
        ({"seq_len": 100, "key_length": 30}, r"key_length=30 .* need seq_len >= 121"),
        ({"depth": -0.1}, r"depth=-0.1; accepted: a number in \[0, 1\]"),
        ({"depth": 1.5}, r"depth=1.5"),
        ({"depth": math.nan}, r"depth=nan"),
        ({"value_length": 0}, r"value_length=0"),
        ({"filler": "lorem"}, r"filler='lorem'; accepted: 'random', 'corpus'"),
    ],
)
def test_needle_config_errors_are_named(fields, message):
    with pytest.raises(DataError, match=message):
        NeedleConfig(**fields)


def test_needle_corpus_errors_are_named():
    with pytest.raises(DataError, match=r"filler='corpus' needs corpus="):
        needle_batch(NeedleConfig(filler="corpus"), batch_size=1, seed=0)
    with pytest.raises(DataError, match=r"needs 187 bytes of filler per example; the corpus has only 10 bytes"):
        needle_batch(NeedleConfig(seq_len=256, filler="corpus"), batch_size=1, seed=0, corpus=np.zeros(10, np.uint8))
    with pytest.raises(DataError, match=r"filler='random' does not use it"):
        needle_batch(NeedleConfig(), batch_size=1, seed=0, corpus=np.zeros(1000, np.uint8))


# ---------------------------------------------------------------- accuracy


def test_task_accuracy_on_a_known_batch():
    targets = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    mask = np.array([[False, True, True, False], [True, False, False, True], [False, False, False, False]])
    batch = Batch(np.zeros_like(targets), targets, mask)
    predictions = targets.copy()
    predictions[1, 3] = 0  # one of four scored tokens wrong, in row 1
    predictions[0, 0] = 0  # unscored: does not count
    predictions[2] = 0  # row 2 has nothing scored: left out of the sequence accuracy
    assert task_accuracy(predictions, batch) == (0.75, 0.5)
    assert task_accuracy(targets, batch) == (1.0, 1.0)


def test_task_accuracy_scores_a_perfect_needle_and_mqar_model():
    needle = needle_batch(NeedleConfig(seq_len=100), batch_size=3, seed=0)
    mqar = mqar_batch(MQARConfig(seq_len=40, num_pairs=4), batch_size=3, seed=0)
    assert task_accuracy(needle.targets, needle) == task_accuracy(mqar.targets, mqar) == (1.0, 1.0)
    # Echoing the input fails every row: the question's last byte is a space, its target a digit.
    assert task_accuracy(needle.inputs, needle)[1] == 0.0


def test_task_accuracy_errors_are_named():
    batch = Batch(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32), np.zeros((2, 3), bool))
    with pytest.raises(DataError, match=r"shape \(2, 4\); accepted: the batch's shape \(2, 3\)"):
        task_accuracy(np.zeros((2, 4)), batch)
    with pytest.raises(DataError, match=r"loss_mask is all False"):
        task_accuracy(np.zeros((2, 3)), batch)


def test_spread_batches_cover_the_data_from_its_start_to_its_end():
    tokens = np.arange(1000) % 251
    batches = spread_batches(tokens, seq_len=16, count=12, batch_size=4)
    assert len(batches) == 3 and all(b.inputs.shape == (4, 16) and b.loss_mask.all() for b in batches)
    inputs = np.concatenate([b.inputs for b in batches])
    targets = np.concatenate([b.targets for b in batches])
    np.testing.assert_array_equal(inputs[0], tokens[:16])
    np.testing.assert_array_equal(targets[-1], tokens[-16:])  # the last window ends with the data
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    starts = np.linspace(0, 1000 - 17, 12).round().astype(int)  # evenly spaced, in order
    np.testing.assert_array_equal(inputs, tokens[starts[:, None] + np.arange(16)])
    with pytest.raises(DataError, match="count=10 must be a multiple of batch_size=4"):
        spread_batches(tokens, seq_len=16, count=10, batch_size=4)
    with pytest.raises(DataError, match="too short for 990 windows of 16 bytes"):
        spread_batches(tokens, seq_len=16, count=990, batch_size=10, name="validation split")
