"""Helpers over `datasets.Dataset` that every preparation step shares: a Dataset over an Arrow
table read here, `map` with the package's defaults, and progress bars only for steps worth watching."""

from __future__ import annotations

import contextlib
import uuid
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset

QUIET_BELOW = 10_000  # rows under which the `datasets` progress bars stay off (a step that takes < 1 s)


@contextlib.contextmanager
def progress_bars(n_rows: int) -> Iterator[None]:
    """`datasets` progress bars only for steps long enough to watch."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    if n_rows < QUIET_BELOW and was:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


def in_memory(table: pa.Table) -> Dataset:
    """A Dataset over an Arrow table read here. Its fingerprint is drawn, not computed: `datasets`
    would hash the whole table for it (a copy of the data: 4× the table's size at peak)."""
    from datasets import Dataset

    return Dataset(table, fingerprint=uuid.uuid4().hex)


def map_batched(ds: Dataset, fn: Callable, desc: str, **kwargs) -> Dataset:
    """Dataset.map with our defaults: batched, a fresh fingerprint (hashing closures that hold a
    tokenizer or a data set costs more than the step; our own cache key says what a result is),
    and no silent JSON-encoding of a column whose values come out in mixed types."""
    with progress_bars(len(ds)):
        return ds.map(fn, batched=True, new_fingerprint=uuid.uuid4().hex, on_mixed_types=None, desc=desc, **kwargs)
