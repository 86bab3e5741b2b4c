"""Synthetic recall tasks as byte-token batches, each a pure function of a frozen config and a seed.

Both tasks yield `Batch`es in the corpus's format (targets[:, :-1] == inputs[:, 1:], teacher
forcing), so a model trained on text can be fine-tuned or evaluated on them unchanged; only the
answer positions are scored (`loss_mask`). `task_accuracy` scores argmax predictions.

Multi-query associative recall (MQAR), after Zoology (Arora et al. 2023,
HazyResearch/zoology, zoology/data/associative_recall.py). Layout of one sequence s of
L + 1 tokens (inputs = s[:L], targets = s[1:]), with N pairs, Q queries, V the vocabulary size:

    s[0 : 2N]        k_1 v_1 k_2 v_2 ... k_N v_N      keys distinct in [1, V//2), values distinct in [V//2, V)
    s[2N : L + 1]    0 (filler), except Q queries:    s[2N + 2j] = k_i, s[2N + 2j + 1] = v_i

Query slots j are distinct, drawn from 0 .. (L - 2N)//2 - 1 with probability proportional to
(j + 1)^(power_a - 1) without replacement, as Zoology draws its gaps (power_a = 1: uniform; the
default 0.01, Zoology's, favours short gaps, i.e. queries soon after the pairs). Each query asks a
distinct key, once. The value is written as the input after its query key (Zoology leaves that
slot blank), so the target at the query key's position is its value; loss_mask is True exactly
there, Q positions per row.

Needle in a haystack (passkey retrieval), ASCII bytes. With key a string of key_length lowercase
letters and value one of value_length digits, one sequence s of L + 1 bytes reads

    s[0 : H]         filler, with the needle  b" The magic number for {key} is {value}. "
                     at s[p : p + needle_length]
    s[H : H + Q]     the question             b" The magic number for {key} is "
    s[H + Q : L + 1] the answer               {value}

where Q = question_length, H = L + 1 - Q - value_length (the haystack length) and
p = round(depth * (H - needle_length)) (Python's round, half to even): depth 0 puts the needle
at the start, depth 1 right before the question. inputs = s[:L], targets = s[1:]: the last
value_length positions (the question's final space and the first value_length - 1 digits) have
the answer digits as targets and are the scored ones. needle_mask marks the whole needle
sentence, s[p : p + needle_length], spaces included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from attnlab.data.batch import Batch, DataError, check_positive_int, check_seed, is_real

NEEDLE_PREFIX = b" The magic number for "
NEEDLE_IS = b" is "
NEEDLE_END = b". "
KEY_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
VALUE_ALPHABET = b"0123456789"
RANDOM_FILLER_ALPHABET = b"abcdefghijklmnopqrstuvwxyz "
FILLERS = ("random", "corpus")
MAX_VOCAB = 256


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """Multi-query associative recall (layout in the module docstring).

    Fields:
      seq_len: L, tokens per sequence.
      num_pairs: N, key-value pairs at the start (2N tokens).
      num_queries: Q <= N queries, each a distinct key; None means Q = N.
      vocab_size: V <= 256; keys come from [1, V//2), values from [V//2, V), 0 is the filler.
      power_a: the power law of the query slots, p(j) proportional to (j + 1)^(power_a - 1); 1 is
        uniform, Zoology's 0.01 (the default) favours queries close after the pairs.

    Needs 2N + 2Q <= L and N <= V//2 - 1; bad values raise DataError naming the field.
    """

    seq_len: int = 128
    num_pairs: int = 8
    num_queries: int | None = None
    vocab_size: int = 256
    power_a: float = 0.01

    def __post_init__(self):
        for field in ("seq_len", "num_pairs", "vocab_size"):
            check_positive_int(getattr(self, field), f"MQARConfig.{field}")
        if self.num_queries is not None:
            check_positive_int(self.num_queries, "MQARConfig.num_queries")
            if self.num_queries > self.num_pairs:
                raise DataError(
                    f"MQARConfig.num_queries={self.num_queries} > num_pairs={self.num_pairs}; each query asks "
                    "a distinct key, so accepted: 1 <= num_queries <= num_pairs (or None for num_pairs)"
                )
        if self.vocab_size > MAX_VOCAB:
            raise DataError(f"MQARConfig.vocab_size={self.vocab_size}; accepted: at most {MAX_VOCAB} (byte tokens)")
        if self.key_count < self.num_pairs:
            raise DataError(
                f"MQARConfig.num_pairs={self.num_pairs} needs that many distinct keys but vocab_size="
                f"{self.vocab_size} has {max(self.key_count, 0)} (keys are 1 .. vocab_size//2 - 1); "
                f"accepted: vocab_size >= {2 * self.num_pairs + 2}"
            )
        if 2 * self.num_pairs + 2 * self.query_count > self.seq_len:
            raise DataError(
                f"MQARConfig: num_pairs={self.num_pairs} and num_queries={self.query_count} need "
                f"2 * num_pairs + 2 * num_queries = {2 * self.num_pairs + 2 * self.query_count} tokens; "
                f"seq_len={self.seq_len} is too short"
            )
        if not is_real(self.power_a) or self.power_a <= 0:
            raise DataError(f"MQARConfig.power_a={self.power_a!r}; accepted: a finite number > 0 (1 is uniform)")

    @property
    def query_count(self) -> int:
        """Q: num_queries, or num_pairs when num_queries is None."""
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def key_count(self) -> int:
        """How many distinct keys the vocabulary offers: vocab_size//2 - 1 (ids 1 .. vocab_size//2 - 1)."""
        return self.vocab_size // 2 - 1


def _random_subsets(rng: np.random.Generator, population: int, size: int, batch_size: int) -> np.ndarray:
    """int [batch_size, size]: per row, `size` distinct draws from range(population) in random order."""
    return np.argsort(rng.random((batch_size, population)), axis=1)[:, :size]


def mqar_batch(config: MQARConfig, *, batch_size: int, seed: int) -> Batch:
    """B MQAR sequences (layout in the module docstring), a pure function of (config, seed).

    Returns a Batch of int32 [B, L] inputs and targets and a bool [B, L] loss_mask with
    num_queries True per row, at the query keys' positions; needle_mask is None.
    """
    if not isinstance(config, MQARConfig):
        raise DataError(f"mqar_batch: config={config!r}; accepted: an MQARConfig")
    batch_size = check_positive_int(batch_size, "mqar_batch: batch_size")
    rng = np.random.default_rng(check_seed(seed, "mqar_batch: seed"))
    pairs, queries, length, half = config.num_pairs, config.query_count, config.seq_len, config.vocab_size // 2
    keys = 1 + _random_subsets(rng, config.key_count, pairs, batch_size)
    values = half + _random_subsets(rng, config.vocab_size - half, pairs, batch_size)
    asked = _random_subsets(rng, pairs, queries, batch_size)
    # Gumbel top-k draws distinct slots with the same law as sequential sampling without
    # replacement at p(j) proportional to (j + 1)^(a - 1), which is how Zoology draws its gaps.
    slot_count = (length - 2 * pairs) // 2
    log_weight = (config.power_a - 1.0) * np.log(np.arange(1, slot_count + 1))
    slots = np.argsort(-(log_weight + rng.gumbel(size=(batch_size, slot_count))), axis=1)[:, :queries]
    positions = 2 * pairs + 2 * slots

    sequence = np.zeros((batch_size, length + 1), dtype=np.int32)
    sequence[:, 0 : 2 * pairs : 2] = keys
    sequence[:, 1 : 2 * pairs : 2] = values
    rows = np.arange(batch_size)[:, None]
    sequence[rows, positions] = np.take_along_axis(keys, asked, axis=1)
    sequence[rows, positions + 1] = np.take_along_axis(values, asked, axis=1)
    loss_mask = np.zeros((batch_size, length), dtype=bool)
    loss_mask[rows, positions] = True
    return Batch(*_shifted(sequence), loss_mask)


def _shifted(sequence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) = (s[:, :-1], s[:, 1:]) as separate arrays, so editing one leaves the other alone."""
    return np.ascontiguousarray(sequence[:, :-1]), np.ascontiguousarray(sequence[:, 1:])


@dataclasses.dataclass(frozen=True)
class NeedleConfig:
    """Needle in a haystack, byte-level ASCII (layout in the module docstring).

    Fields:
      seq_len: L, input tokens per sequence.
      depth: where the needle starts, as a fraction of the room the haystack leaves it, in [0, 1]:
        0 at the very start, 1 ending right before the question.
      key_length: letters in the key (random lowercase a-z).
      value_length: digits in the value, the answer (random 0-9, leading zeros allowed).
      filler: "random" (uniform bytes from a-z and space) or "corpus" (a window of the corpus
        passed to `needle_batch`, at a seeded random offset per example).

    Needs seq_len >= needle_length + question_length + value_length - 1; bad values raise
    DataError naming the field.
    """

    seq_len: int = 256
    depth: float = 0.5
    key_length: int = 4
    value_length: int = 4
    filler: str = "random"

    def __post_init__(self):
        for field in ("seq_len", "key_length", "value_length"):
            check_positive_int(getattr(self, field), f"NeedleConfig.{field}")
        if not is_real(self.depth) or not 0 <= self.depth <= 1:
            raise DataError(
                f"NeedleConfig.depth={self.depth!r}; accepted: a number in [0, 1] "
                "(0: needle at the start, 1: right before the question)"
            )
        if self.filler not in FILLERS:
            raise DataError(f"NeedleConfig.filler={self.filler!r}; accepted: {', '.join(map(repr, FILLERS))}")
        needed = self.needle_length + self.question_length + self.value_length - 1
        if needed > self.seq_len:
            raise DataError(
                f"NeedleConfig: with key_length={self.key_length} and value_length={self.value_length} the needle "
                f"({self.needle_length} bytes), the question ({self.question_length}) and the answer's first "
                f"value_length - 1 = {self.value_length - 1} digits need seq_len >= {needed}; "
                f"got seq_len={self.seq_len}"
            )

    @property
    def needle_length(self) -> int:
        """Bytes in b" The magic number for {key} is {value}. "."""
        return len(NEEDLE_PREFIX) + self.key_length + len(NEEDLE_IS) + self.value_length + len(NEEDLE_END)

    @property
    def question_length(self) -> int:
        """Bytes in b" The magic number for {key} is "."""
        return len(NEEDLE_PREFIX) + self.key_length + len(NEEDLE_IS)

    @property
    def haystack_length(self) -> int:
        """H = seq_len + 1 - question_length - value_length: the input positions before the question."""
        return self.seq_len + 1 - self.question_length - self.value_length

    @property
    def filler_length(self) -> int:
        """Filler bytes per example, haystack_length - needle_length."""
        return self.haystack_length - self.needle_length

    @property
    def needle_start(self) -> int:
        """p = round(depth * (haystack_length - needle_length)), the needle's first input position."""
        return round(self.depth * self.filler_length)


def _constant(text: bytes, batch_size: int) -> np.ndarray:
    return np.broadcast_to(np.frombuffer(text, dtype=np.uint8), (batch_size, len(text)))


def needle_batch(config: NeedleConfig, *, batch_size: int, seed: int, corpus: np.ndarray | None = None) -> Batch:
    """B needle-in-a-haystack sequences (layout in the module docstring), a pure function of its arguments.

    Args:
      config: the task.
      batch_size: B.
      seed: an integer >= 0; draws the keys, the values and the filler (or the corpus offsets).
      corpus: uint8 [n] with n >= config.filler_length, e.g. Corpus.validation; needed for
        filler="corpus" and refused otherwise.

    Returns a Batch of int32 [B, L] inputs and targets, a bool [B, L] loss_mask True on the last
    value_length positions, and a bool [B, L] needle_mask True on the needle sentence.
    """
    if not isinstance(config, NeedleConfig):
        raise DataError(f"needle_batch: config={config!r}; accepted: a NeedleConfig")
    batch_size = check_positive_int(batch_size, "needle_batch: batch_size")
    rng = np.random.default_rng(check_seed(seed, "needle_batch: seed"))
    filler_length = config.filler_length
    text = _check_corpus(corpus, config)

    letters = np.frombuffer(KEY_ALPHABET, dtype=np.uint8)
    digits = np.frombuffer(VALUE_ALPHABET, dtype=np.uint8)
    key = letters[rng.integers(0, letters.size, size=(batch_size, config.key_length))]
    value = digits[rng.integers(0, digits.size, size=(batch_size, config.value_length))]
    if text is None:
        alphabet = np.frombuffer(RANDOM_FILLER_ALPHABET, dtype=np.uint8)
        filler = alphabet[rng.integers(0, alphabet.size, size=(batch_size, filler_length))]
    else:
        starts = rng.integers(0, text.size - filler_length + 1, size=batch_size)
        filler = text[starts[:, None] + np.arange(filler_length)]

    prefix = _constant(NEEDLE_PREFIX, batch_size)
    is_ = _constant(NEEDLE_IS, batch_size)
    needle = np.concatenate([prefix, key, is_, value, _constant(NEEDLE_END, batch_size)], axis=1)
    question = np.concatenate([prefix, key, is_], axis=1)
    start = config.needle_start
    sequence = np.concatenate([filler[:, :start], needle, filler[:, start:], question, value], axis=1)
    sequence = sequence.astype(np.int32)

    length = config.seq_len
    loss_mask = np.zeros((batch_size, length), dtype=bool)
    loss_mask[:, length - config.value_length :] = True
    needle_mask = np.zeros((batch_size, length), dtype=bool)
    needle_mask[:, start : start + config.needle_length] = True
    return Batch(*_shifted(sequence), loss_mask, needle_mask)


def _check_corpus(corpus: Any, config: NeedleConfig) -> np.ndarray | None:
    if config.filler == "random":
        if corpus is not None:
            raise DataError(
                "needle_batch: corpus was given but NeedleConfig.filler='random' does not use it; "
                "set filler='corpus' to fill the haystack with corpus text"
            )
        return None
    if corpus is None:
        raise DataError("needle_batch: NeedleConfig.filler='corpus' needs corpus=, e.g. load_corpus().validation")
    text = np.asarray(corpus)
    if text.ndim != 1 or not np.issubdtype(text.dtype, np.integer):
        raise DataError(
            f"needle_batch: corpus must be a 1-D integer array of bytes; got dtype {text.dtype}, shape {text.shape}"
        )
    if text.size < config.filler_length:
        raise DataError(
            f"needle_batch: seq_len={config.seq_len} needs {config.filler_length} bytes of filler per example; "
            f"the corpus has only {text.size} bytes"
        )
    if text.size and (text.min() < 0 or text.max() >= MAX_VOCAB):
        raise DataError(
            f"needle_batch: corpus holds values in [{text.min()}, {text.max()}]; accepted: bytes, 0 .. {MAX_VOCAB - 1}"
        )
    return text


def task_accuracy(predictions: Any, batch: Batch) -> tuple[float, float]:
    """(token accuracy, sequence accuracy) of predicted tokens on a batch's scored positions.

    predictions: int [B, L], e.g. logits.argmax(-1). With m = batch.loss_mask and
    c = (predictions == batch.targets):

        token accuracy    = sum(c & m) / sum(m)
        sequence accuracy = mean over rows with some scored position of all(c[b] where m[b])

    Raises DataError for a shape mismatch or a batch with no scored position.
    """
    predicted = np.asarray(predictions)
    mask = np.asarray(batch.loss_mask, dtype=bool)
    if predicted.shape != mask.shape:
        raise DataError(
            f"task_accuracy: predictions have shape {predicted.shape}; accepted: the batch's shape {mask.shape}"
        )
    if not mask.any():
        raise DataError("task_accuracy: the batch's loss_mask is all False, so there is nothing to score")
    correct = predicted == np.asarray(batch.targets)
    token = (correct & mask).sum() / mask.sum()
    scored_rows = mask.any(axis=1)
    row_right = np.all(correct | ~mask, axis=1)
    return float(token), float(row_right[scored_rows].mean())


def needle_train_batches(
    config: NeedleConfig, *, batch_size: int, seed: int, corpus: np.ndarray | None = None
) -> Iterator[Batch]:
    """An endless stream of needle batches for training: every example has its own depth, drawn
    uniformly from [0, 1] (config.depth is ignored), and its own key, value and filler; batch i is
    a pure function of (config, batch_size, seed, i)."""
    batch_size = check_positive_int(batch_size, "needle_train_batches: batch_size")
    rng = np.random.default_rng(check_seed(seed, "needle_train_batches: seed"))
    while True:
        depths = rng.uniform(0.0, 1.0, size=batch_size)
        seeds = rng.integers(0, 2**31, size=batch_size)
        examples = [
            needle_batch(dataclasses.replace(config, depth=float(depth)), batch_size=1, seed=int(s), corpus=corpus)
            for depth, s in zip(depths, seeds, strict=True)
        ]
        yield Batch(*(np.concatenate(parts) for parts in zip(*examples, strict=True)))
