"""Byte-level data for attnlab: a text corpus that needs no download, and two synthetic recall tasks.

Every source yields `Batch(inputs, targets, loss_mask, needle_mask)`: int32 [B, L] byte tokens
(vocabulary 256, token id = byte value), targets the next token (teacher forcing), and a bool
[B, L] mask of the scored positions.

- Corpus (`load_corpus`, `train_batches`, `eval_batches`, `spread_batches`): the Python standard
  library's own `*.py` files, or a user file or folder, split into train and validation by a fixed
  hash of each file's path. `train_batches` streams random windows from a seed; `eval_batches` walks
  contiguous windows in order; `spread_batches` takes windows evenly spaced over all of the data.
- Multi-query associative recall (`MQARConfig`, `mqar_batch`): key-value pairs, then queries of
  those keys; the model must answer each query with its value (as in Zoology).
- Needle in a haystack (`NeedleConfig`, `needle_batch`): b" The magic number for {key} is
  {value}. " hidden at a chosen depth in random or corpus text; the question at the end asks
  for the value's digits.
- `task_accuracy` scores argmax predictions on a batch's scored positions.

Everything is NumPy and deterministic from a seed; errors are `DataError`, a ValueError.
"""

from attnlab.data.batch import Batch, DataError
from attnlab.data.corpus import (
    EXCLUDED_DIRS,
    FILE_SEPARATOR,
    Corpus,
    default_corpus_root,
    eval_batches,
    list_corpus_files,
    load_corpus,
    split_position,
    spread_batches,
    train_batches,
)
from attnlab.data.tasks import (
    MQARConfig,
    NeedleConfig,
    mqar_batch,
    needle_batch,
    needle_train_batches,
    task_accuracy,
)

__all__ = [
    "EXCLUDED_DIRS",
    "FILE_SEPARATOR",
    "Batch",
    "Corpus",
    "DataError",
    "MQARConfig",
    "NeedleConfig",
    "default_corpus_root",
    "eval_batches",
    "list_corpus_files",
    "load_corpus",
    "mqar_batch",
    "needle_batch",
    "needle_train_batches",
    "split_position",
    "spread_batches",
    "task_accuracy",
    "train_batches",
]
