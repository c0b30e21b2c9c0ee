"""Data sets for the three stages, from local files or the hub, in TRL's standard formats.

Accepted forms (TRL's names):
- SFT: conversational `messages`; `prompt` + `completion` (text or conversational); plain `text`.
  With `sft.completion_only_loss` (default), `messages` rows become prompt = every turn but the
  last, completion = the last (assistant) turn, so the loss covers the reply only.
- RM: `chosen` + `rejected` with an explicit `prompt`, or an implicit prompt (the shared prefix of
  chosen and rejected, extracted as TRL does); text or conversational; optional margin column.
- PPO: `prompt` (text or conversational); `messages` rows are accepted too (a final assistant
  turn, if present, is dropped).

Local files: .jsonl, .json (a list of objects), .parquet, .csv (text columns only). Errors name
the file, the line or row, and the column. Rules for rows that cannot train, one function each,
applied in `prepare_*` order and reported with a count and the first row numbers:
- SFT: rows longer than `sft.max_length` tokens are dropped (truncating would cut the reply).
- RM: rows whose chosen or rejected is empty, whose chosen equals rejected, or whose longer side
  exceeds `rm.max_length` tokens are dropped.
- PPO: prompts longer than `ppo.max_prompt_length` tokens are dropped.
A data set with no usable rows left is an error.

How a stage's data is prepared, all of it on `datasets.Dataset` (Arrow) objects:
read (a file becomes an Arrow table; JSON lines through pyarrow, with Python's `json` as the
fallback that finds and words the errors) → held-out carve and `max_rows` (one seeded
permutation of the row numbers) → records (`map`: each row checked and put in TRL's format) →
the row rules that need no model → token ids (`map`, batched: exactly the ids the stage's trainer
trains on, so TRL does not tokenize again, and the length the length rule counts) → the length
rule. Token lengths count the rendered text without the tokenizer's added special tokens: for
conversational rows that is the length of the trained ids; text rows are counted apart (TRL adds
BOS/EOS there). The result is cached under $RLHF_CACHE/data/, keyed by the data files' contents,
the data settings, the tokenizer and the library versions, and is prepared under accelerate's
`main_process_first`: in a multi-process stage the main process prepares it, the others load it
(memory-mapped). A rerun of the stage, and `rlhf eval`, load it too.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from rlhf.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from rlhf.config import DataConfig

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ROLES = ("system", "user", "assistant", "tool")
# Columns that hold text or message lists. A number there is an error in every form; pyarrow reads
# an int in a column of floats as a float, which would misname its type in that error.
TEXT_COLUMNS = ("messages", "prompt", "completion", "text", "chosen", "rejected")
PREP_VERSION = 1  # bump when what a prepared set holds changes: it is part of the cache key
CACHE_KEEP = 16  # prepared sets kept in the cache (least recently used go first)
QUIET_BELOW = 10_000  # rows under which the `datasets` progress bars stay off (a step that takes < 1 s)


@dataclass
class Rows:
    """Rows read from one source, with the label each row is reported by (`line 7`, `row 7`)."""

    source: str
    dataset: Dataset
    labels: list[str]

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, i: int) -> str:
        return f"{self.source}, {self.labels[i]}"

    def select(self, indices: Sequence[int]) -> Rows:
        return Rows(self.source, self.dataset.select(indices), [self.labels[i] for i in indices])

    def to_list(self) -> list[dict[str, Any]]:
        return self.dataset.to_list()

    @classmethod
    def from_list(cls, source: str, rows: list[dict[str, Any]], labels: list[str]) -> Rows:
        """Rows parsed in Python. The columns are every key seen (first-seen order); a column whose
        values do not share one Arrow type is stored as JSON and reads back as the Python values,
        so every row reaches the checks as it was written."""
        from datasets import Dataset, Json

        columns: dict[Any, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))
        mapping = {str(c): [row.get(c) for row in rows] for c in columns}
        # Arrow would store ints among floats as floats: a text column's type error would misname them
        as_json = [c for c in TEXT_COLUMNS if c in mapping and {int, float} <= {type(v) for v in mapping[c]}]
        for c in as_json:
            mapping[c] = [json.dumps(v) for v in mapping[c]]
        ds = Dataset.from_dict(mapping, on_mixed_types="use_json")
        for c in as_json:
            ds = ds.cast_column(c, Json())
        return cls(source, ds, labels)


@dataclass
class DropReport:
    """What a preparation step dropped, by reason, for the log and the stage manifest."""

    kept: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)
    first_position: dict[str, int] = field(default_factory=dict)  # reasons are reported in row order

    def drop(self, reason: str, label: str, position: int = 0) -> None:
        """Count row `label` (at `position` in its split) under `reason`; call in row order per reason."""
        if reason not in self.dropped:
            self.first_position[reason] = position
            self.dropped = dict(sorted({**self.dropped, reason: []}.items(), key=lambda kv: self.first_position[kv[0]]))
        self.dropped[reason].append(label)

    def summary(self) -> dict[str, Any]:
        return {"kept": self.kept, "dropped": {k: len(v) for k, v in self.dropped.items()}}

    def describe(self, what: str) -> str:
        parts = [f"{what}: {self.kept} rows kept"]
        for reason, labels in self.dropped.items():
            first = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
            parts.append(f"{len(labels)} dropped ({reason}; first: {first})")
        return "; ".join(parts)


@contextlib.contextmanager
def _progress_bars(n_rows: int) -> Iterator[None]:
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


def _in_memory(table: pa.Table) -> Dataset:
    """A Dataset over an Arrow table read here. Its fingerprint is drawn, not computed: `datasets`
    would hash the whole table for it (a copy of the data: 4× the table's size at peak)."""
    from datasets import Dataset

    return Dataset(table, fingerprint=uuid.uuid4().hex)


def _map(ds: Dataset, fn: Callable, desc: str, **kwargs) -> Dataset:
    """Dataset.map with our defaults: batched, a fresh fingerprint (hashing closures that hold a
    tokenizer or a data set costs more than the step; our own cache key says what a result is),
    and no silent JSON-encoding of a column whose values come out in mixed types."""
    with _progress_bars(len(ds)):
        return ds.map(fn, batched=True, new_fingerprint=uuid.uuid4().hex, on_mixed_types=None, desc=desc, **kwargs)


# ---------------------------------------------------------------------------- reading


def is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return p.exists() or path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~"))


def _parse_jsonl_line(path: Path, n: int, raw: bytes) -> dict[str, Any] | None:
    """One line of a .jsonl file: its object, None for a blank line, or the UserError naming it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}, line {n}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{path}, line {n}: expected a JSON object per line, got {type(row).__name__}")
    return row


def _read_jsonl_python(path: Path) -> Rows:
    rows, labels = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            row = _parse_jsonl_line(path, n, raw)
            if row is not None:
                rows.append(row)
                labels.append(f"line {n}")
    return Rows.from_list(str(path), rows, labels)


def _plain_json_types(schema: pa.Schema) -> bool:
    """Whether pyarrow read the file as Python's json would: strings, numbers, booleans, nulls,
    lists and objects only (pyarrow turns strings that look like dates into timestamps), and no
    number read as a float in a text column."""
    import pyarrow as pa

    def plain(t: pa.DataType) -> bool:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return plain(t.value_type)
        if pa.types.is_struct(t):
            return all(plain(t.field(i).type) for i in range(t.num_fields))
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)
                or pa.types.is_int64(t) or pa.types.is_float64(t) or pa.types.is_null(t))

    return all(plain(f.type) and not (f.name in TEXT_COLUMNS and pa.types.is_floating(f.type)) for f in schema)


def _read_jsonl(path: Path) -> Rows:
    """pyarrow's multi-threaded JSON reader; where it fails or reads differently from Python's json
    (a malformed line, mixed types in a column, a byte-order mark), the file is read line by line
    in Python, which also finds and words any error."""
    import pyarrow as pa
    import pyarrow.json as paj
    from datasets import Dataset

    with open(path, "rb") as f:
        bom = f.read(3) == b"\xef\xbb\xbf"
    if not bom:
        try:
            table = paj.read_json(str(path))
            table.validate(full=True)  # the reader passes bytes that are not UTF-8 through
        except (pa.ArrowException, UnicodeDecodeError, OSError):
            table = None
        pa.default_memory_pool().release_unused()  # the parser's buffers, kept by the allocator otherwise
        if table is not None and _plain_json_types(table.schema):
            with open(path, "rb") as f:  # the line number of each row (blank lines are skipped)
                numbers = [n for n, raw in enumerate(f, start=1) if raw.strip()]
            if len(numbers) == table.num_rows:
                try:
                    return Rows(str(path), _in_memory(table), [f"line {n}" for n in numbers])
                except (TypeError, ValueError, pa.ArrowException):  # a type `datasets` does not take
                    pass
    return _read_jsonl_python(path)


def _read_json(path: Path) -> Rows:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}}); for one object per line use .jsonl")
    return Rows.from_list(str(path), data, [f"row {i + 1}" for i in range(len(data))])


def _read_csv(path: Path) -> Rows:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path}: malformed CSV ({e})") from None
    return Rows.from_list(str(path), rows, [f"row {i + 2}" for i in range(len(rows))])  # row 1 is the header


def _read_parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    labels = [f"row {i + 1}" for i in range(table.num_rows)]
    try:
        return Rows(str(path), _in_memory(table), labels)
    except (TypeError, ValueError, pa.ArrowException):  # a column type `datasets` does not take
        return Rows.from_list(str(path), table.to_pylist(), labels)


READERS: dict[str, Callable[[Path], Rows]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
}


def _data_files(p: Path) -> list[Path]:
    return sorted(f for f in p.iterdir() if f.is_file() and f.suffix in READERS)


def read_local(path: str) -> Rows:
    import pyarrow as pa
    from datasets import concatenate_datasets

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: data file not found (paths are relative to the directory you run rlhf from)")
    if p.is_dir():
        files = _data_files(p)
        if not files:
            raise UserError(f"{path}: folder holds no {', '.join(LOCAL_SUFFIXES)} files")
        parts = [read_local(str(f)) for f in files]
        labels = [f"{Path(part.source).name} {lab}" for part in parts for lab in part.labels]
        try:
            return Rows(str(p), concatenate_datasets([part.dataset for part in parts]), labels)
        except (TypeError, ValueError, pa.ArrowException):  # the files' columns have different types
            return Rows.from_list(str(p), [row for part in parts for row in part.to_list()], labels)
    reader = READERS.get(p.suffix)
    if reader is None:
        raise UserError(f"{path}: unsupported file type '{p.suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}")
    return reader(p)


def _load_hub(path: str, name: str | None, split: str, revision: str | None) -> Dataset:
    """A hub data set split (network needed the first time; `datasets` caches it, memory-mapped)."""
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split, revision=revision)
    except Exception as e:
        raise UserError(
            f"data set '{path}' (config {name}, split {split}) could not be loaded from the hub: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def read_hub(path: str, name: str | None, split: str, revision: str | None) -> Rows:
    ds = _load_hub(path, name, split, revision)
    return Rows(f"{path}[{split}]", ds, [f"row {i + 1}" for i in range(len(ds))])


def read_splits(data: DataConfig, seed: int) -> tuple[Rows, Rows | None]:
    """Training rows and held-out rows as the DataConfig describes them.

    The held-out carve and `max_rows` take one permutation of the row numbers from
    `random.Random(seed)`: the first `eval_split` of it is held out, `max_rows` of the rest train.
    (`Dataset.train_test_split` would draw another permutation: the rows every existing run was
    trained and evaluated on would change, and a run's held-out rows become training rows of its
    rerun.) Both splits keep file order; the trainers shuffle."""
    local = is_local(data.path)
    train = read_local(data.path) if local else read_hub(data.path, data.name, data.split, data.revision)
    if not len(train):
        raise UserError(f"{train.source}: the data set is empty")
    held: Rows | None = None
    if data.eval_path:
        held = read_local(data.eval_path) if is_local(data.eval_path) else read_hub(data.eval_path, data.name, data.split, data.revision)
    elif isinstance(data.eval_split, str):
        if local:
            raise UserError(f"eval_split '{data.eval_split}' names a hub split, but {data.path} is a local file; "
                            "give a fraction (e.g. 0.05) or eval_path")
        held = read_hub(data.path, data.name, data.eval_split, data.revision)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    if isinstance(data.eval_split, float) and not data.eval_path:
        n_eval = max(1, round(len(order) * data.eval_split))
        if len(order) - n_eval < 1:
            raise UserError(f"{train.source}: {len(order)} rows are too few to hold out {data.eval_split:.0%}; add rows or set eval_split: null")
        held = train.select(order[:n_eval])
        order = order[n_eval:]
    if data.max_rows:
        order = order[: data.max_rows]
    order.sort()  # keep file order for reporting; the trainers shuffle
    return (train if order == list(range(len(train))) else train.select(order)), held


def _first_row(path: str) -> dict[str, Any] | None:
    """The first row of a local file or folder, reading no further than it (None: no rows)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for f in _data_files(p):
            row = _first_row(str(f))
            if row is not None:
                return row
        return None
    if p.suffix == ".jsonl" and p.is_file():
        with open(p, "rb") as f:
            for n, raw in enumerate(f, start=1):
                row = _parse_jsonl_line(p, n, raw)
                if row is not None:
                    return row
        return None
    if p.suffix == ".parquet" and p.is_file():
        import pyarrow.parquet as pq

        try:
            batch = next(pq.ParquetFile(p).iter_batches(batch_size=1), None)
        except Exception:  # the reader words the error when the stage reads the file
            return None
        return batch.to_pylist()[0] if batch is not None and batch.num_rows else None
    rows = read_local(path)  # .json is one document; .csv holds text only; errors are the reader's
    return rows.dataset[0] if len(rows) else None


# ---------------------------------------------------------------------------- checking rows


def _check_messages(value: Any, where: str, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: column '{column}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        # a missing key and a null read the same from Arrow (a message struct has every key seen)
        if not isinstance(m, dict) or m.get("role") is None or m.get("content") is None:
            raise UserError(f"{where}: {column}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: {column}[{i}] has role '{m['role']}'; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: {column}[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text_or_messages(row: dict[str, Any], column: str, where: str) -> str | list[dict[str, str]]:
    value = row.get(column)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_messages(value, where, column)
    if value is None:
        raise UserError(f"{where}: column '{column}' is empty")
    raise UserError(f"{where}: column '{column}' must be a string or a list of messages, got {type(value).__name__}")


def _require_columns(rows: Rows, options: list[tuple[str, ...]], what: str) -> tuple[str, ...]:
    """The first column set in `options` that the data set has; an error at the first row naming
    all options otherwise. (Arrow gives every row every column a row of the set has, a missing key
    read as null, so the columns are the set's; a row without one is then "column ... is empty".)"""
    have = rows.dataset.column_names
    for cols in options:
        if all(c in have for c in cols):
            return cols
    wanted = " or ".join("+".join(c) for c in options)
    raise UserError(f"{rows.where(0)}: {what} data needs columns {wanted}; found: {', '.join(have) or 'none'}")


def _records(rows: Rows, columns: Sequence[str], to_record: Callable[[dict[str, Any], str], dict[str, Any]],
             what: str) -> Dataset:
    """`to_record(row, where)` over every row, in order, as one batched map: the records (TRL's
    format) in place of the columns read. The first bad row raises its UserError."""
    ds = rows.dataset
    present = [c for c in columns if c in ds.column_names]

    def batch(*args):
        *values, indices = args
        out = [to_record(dict(zip(present, row)), rows.where(i)) for *row, i in zip(*values, indices)]
        return {k: [r[k] for r in out] for k in out[0]} if out else {}

    return _map(ds, batch, f"Checking {what} rows", with_indices=True, input_columns=present,
                remove_columns=ds.column_names)


def sft_records(rows: Rows, completion_only_loss: bool) -> Dataset:
    """Rows → TRL SFT records: {prompt, completion}, {messages} or {text}."""
    cols = _require_columns(rows, [("messages",), ("prompt", "completion"), ("text",)], "SFT")

    def record(row: dict[str, Any], where: str) -> dict[str, Any]:
        if cols == ("messages",):
            messages = _check_messages(row.get("messages"), where, "messages")
            if messages[-1]["role"] != "assistant":
                raise UserError(f"{where}: the last message must be the assistant's reply (role 'assistant')")
            if completion_only_loss:
                if len(messages) < 2:
                    raise UserError(f"{where}: a conversation needs a prompt turn before the assistant's reply")
                return {"prompt": messages[:-1], "completion": messages[-1:]}
            return {"messages": messages}
        if cols == ("prompt", "completion"):
            prompt, completion = _text_or_messages(row, "prompt", where), _text_or_messages(row, "completion", where)
            if type(prompt) is not type(completion):
                raise UserError(f"{where}: prompt and completion must both be text or both be message lists")
            return {"prompt": prompt, "completion": completion}
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: column 'text' must be a non-empty string")
        return {"text": text}

    return _records(rows, cols, record, "SFT")


def preference_records(rows: Rows, margin_column: str | None = None) -> Dataset:
    """Rows → explicit-prompt preference records {prompt, chosen, rejected[, margin]}.

    An implicit prompt (no `prompt` column) is the shared prefix of chosen and rejected, found as
    TRL's `extract_prompt` does."""
    from trl.data_utils import extract_prompt

    cols = _require_columns(rows, [("prompt", "chosen", "rejected"), ("chosen", "rejected")], "preference")

    def record(row: dict[str, Any], where: str) -> dict[str, Any]:
        chosen, rejected = _text_or_messages(row, "chosen", where), _text_or_messages(row, "rejected", where)
        if type(chosen) is not type(rejected):
            raise UserError(f"{where}: chosen and rejected must both be text or both be message lists")
        if "prompt" in cols:
            prompt = _text_or_messages(row, "prompt", where)
            if type(prompt) is not type(chosen):
                raise UserError(f"{where}: prompt, chosen and rejected must all be text or all be message lists")
            rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        else:
            rec = extract_prompt({"chosen": chosen, "rejected": rejected})
        if margin_column:
            margin = row.get(margin_column)
            if not isinstance(margin, (int, float)) or isinstance(margin, bool):
                raise UserError(f"{where}: margin column '{margin_column}' must hold a number, got {margin!r}")
            rec["margin"] = float(margin)
        return rec

    return _records(rows, cols + ((margin_column,) if margin_column else ()), record, "preference")


def prompt_records(rows: Rows) -> Dataset:
    """Rows → PPO prompt records {prompt}: text, or messages ending with a non-assistant turn."""
    cols = _require_columns(rows, [("prompt",), ("messages",)], "PPO")

    def record(row: dict[str, Any], where: str) -> dict[str, Any]:
        if cols == ("prompt",):
            prompt = _text_or_messages(row, "prompt", where)
        else:
            prompt = _check_messages(row.get("messages"), where, "messages")
            if prompt[-1]["role"] == "assistant":
                prompt = prompt[:-1]
            if not prompt:
                raise UserError(f"{where}: the conversation has no prompt turn before the assistant's reply")
        if isinstance(prompt, str) and not prompt.strip():
            raise UserError(f"{where}: column 'prompt' is empty")
        return {"prompt": prompt}

    return _records(rows, cols, record, "PPO")


# ---------------------------------------------------------------------------- rules for rows that cannot train


@dataclass(frozen=True)
class Rule:
    """A reason to drop a row: `drops(*columns)` takes a batch of the named columns and says, per
    row, whether to drop it."""

    reason: str
    columns: tuple[str, ...]
    drops: Callable[..., list[bool]]


def _empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def empty_side(chosen: list[Any], rejected: list[Any]) -> list[bool]:
    """Pairs with an empty chosen or rejected response (text, or messages with no content)."""
    return [_empty(c) or _empty(r) for c, r in zip(chosen, rejected)]


def same_sides(chosen: list[Any], rejected: list[Any]) -> list[bool]:
    """Pairs whose chosen response equals the rejected one: nothing to prefer."""
    return [c == r for c, r in zip(chosen, rejected)]


def longer_than(limit: int) -> Callable[[list[int]], list[bool]]:
    """Rows whose token count (the `n_tokens` column) exceeds `limit`."""
    return lambda n_tokens: [n > limit for n in n_tokens]


RM_RULES_WITHOUT_MODEL = (
    Rule("chosen or rejected is empty", ("chosen", "rejected"), empty_side),
    Rule("chosen == rejected", ("chosen", "rejected"), same_sides),
)


def apply_rules(ds: Dataset, labels: list[str], rules: Sequence[Rule], report: DropReport | None = None,
                positions: list[int] | None = None) -> tuple[Dataset, list[str], list[int], DropReport]:
    """Drop the rows each rule names, rule after rule (a row is counted under the first rule that
    drops it); returns the rows kept, their labels, their positions in the rows first given
    (`positions`, default 0, 1, ...) and the report (`report` is added to)."""
    report = report or DropReport()
    positions = list(range(len(ds))) if positions is None else positions
    for rule in rules:
        if not len(ds):
            break
        flags = _map(ds, lambda *cols: {"drop": rule.drops(*cols)}, f"Rule: {rule.reason}",
                     input_columns=list(rule.columns), remove_columns=ds.column_names)["drop"]
        kept = [i for i, f in enumerate(flags) if not f]
        if len(kept) < len(ds):
            for i, f in enumerate(flags):
                if f:
                    report.drop(rule.reason, labels[i], positions[i])
            ds, labels, positions = ds.select(kept), [labels[i] for i in kept], [positions[i] for i in kept]
    report.kept = len(ds)
    return ds, labels, positions, report


# ---------------------------------------------------------------------------- token ids, as the trainers make them


def is_conversational(value: Any) -> bool:
    return isinstance(value, list)


def render(tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any = None) -> str:
    """The text a model sees for prompt (+ completion), through the chat template when conversational."""
    if is_conversational(prompt):
        if completion is None:
            return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    return prompt + (completion or "")


def n_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_texts(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_ids(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[list[int]]:
    """apply_chat_template(conversation, tokenize=True) of each conversation, batched: the template
    renders each, the tokenizer encodes the texts in one call without adding special tokens (what
    apply_chat_template does for one)."""
    texts = _chat_texts(tokenizer, conversations, add_generation_prompt)
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _splitting_tokens(tokenizer) -> tuple[re.Pattern, dict[str, int]] | None:
    """The added tokens a fast tokenizer cuts raw text at before anything else (not normalised, no
    stripping), as a pattern matching leftmost-longest, and their ids; None when there are none."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "split_special_tokens", False):
        return None
    ids = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()
           if not (t.normalized or t.lstrip or t.rstrip or t.single_word)}
    if not ids:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True))), ids


def _prompt_lengths(tokenizer, prompt_texts: list[str], full_texts: list[str], full) -> list[tuple[int, int]]:
    """(len(prompt_ids), common_prefix_length(prompt_ids, full_ids)) per row, prompt_ids being the
    tokens of the rendered prompt alone, as TRL's SFT tokenization measures where a completion starts.

    The prompt is not tokenized again where that is provably the same: a chat template renders the
    prompt as the start of the full text and ends it shortly after an added token (ChatML's
    `<|im_start|>assistant\n`); a fast tokenizer cuts text at such a token before normalising, so
    the prompt's tokens are the full text's up to that token, then the tokens of the short tail
    (tokenized behind the same token, so it is not the text's first piece). Elsewhere, and for the
    whole batch if its first row's prompt tokenized directly disagrees, the prompts are tokenized."""
    from trl.data_utils import common_prefix_length

    full_ids = full["input_ids"]
    out: list[tuple[int, int] | None] = [None] * len(prompt_texts)
    splitting, tails = _splitting_tokens(tokenizer), {}
    for i, (prompt, text) in enumerate(zip(prompt_texts, full_texts)):
        cut = [m for m in splitting[0].finditer(prompt)][-1:] if splitting and text.startswith(prompt) else []
        if not cut:
            continue
        start, end = cut[0].span()
        j = full.char_to_token(i, start)
        if j is None or full_ids[i][j] != splitting[1][cut[0].group()] or tuple(full.token_to_chars(i, j)) != (start, end):
            continue
        key = (cut[0].group(), prompt[end:])
        if key not in tails:
            behind = tokenizer(key[0] + key[1], add_special_tokens=False)["input_ids"]
            tails[key] = behind[1:] if behind[:1] == [splitting[1][key[0]]] else None
        if tails[key] is not None:
            out[i] = (j + 1 + len(tails[key]), j + 1 + common_prefix_length(tails[key], full_ids[i][j + 1:]))
    check = next((i for i, o in enumerate(out) if o is not None), None)
    if check is not None:
        direct = tokenizer(prompt_texts[check], add_special_tokens=False)["input_ids"]
        if out[check] != (len(direct), common_prefix_length(direct, full_ids[check])):
            log.debug("tokenizing the prompts directly: the full text's prefix tokens differ for this tokenizer")
            out = [None] * len(out)
    todo = [i for i, o in enumerate(out) if o is None]
    for i, ids in zip(todo, _text_ids(tokenizer, [prompt_texts[i] for i in todo], False)):
        out[i] = (len(ids), common_prefix_length(ids, full_ids[i]))
    return out


def _text_ids(tokenizer, texts: list[str], special_tokens: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special_tokens)["input_ids"] if texts else []


def _with_eos(tokenizer, texts: list[str]) -> list[str]:
    """TRL's add_eos: the EOS token appended to text that does not already end with it."""
    eos = tokenizer.eos_token
    return [t if t.endswith(eos) else t + eos for t in texts]


_warned_prefix: list[bool] = []  # once per process, as TRL's own warning


def _warn_if_prompt_is_not_a_prefix(n_prompt: int, prefix: int) -> None:
    if prefix < n_prompt and not _warned_prefix:
        _warned_prefix.append(True)
        log.warning("the tokenized prompt is not a prefix of the tokenized prompt + completion (the chat template "
                    "renders the prompt alone differently, or tokens merge across the boundary): the completion "
                    "starts where they diverge, and the prompt's last %d tokens are left out of the training sequence",
                    n_prompt - prefix)


def sft_token_ids(tokenizer: PreTrainedTokenizerBase, batch: dict[str, list]) -> dict[str, list]:
    """SFT records → the columns trl.SFTTrainer (1.16) trains on, as its own tokenization makes
    them (it skips tokenizing a set that has `input_ids`): `input_ids`, and for prompt + completion
    rows `completion_mask` (1 on the completion's tokens, from where the tokenized prompt and the
    tokenized prompt + completion diverge, as TRL's `common_prefix_length`). Conversational rows
    go through the chat template (the prompt alone with the generation prompt); text rows get the
    EOS appended and the tokenizer's special tokens, as TRL adds them. Plus `n_tokens`, the length
    the length rule counts (see the module docstring)."""
    from trl.data_utils import common_prefix_length

    if "prompt" in batch:
        prompts, completions = batch["prompt"], batch["completion"]
        if prompts and is_conversational(prompts[0]):
            prompt_texts = _chat_texts(tokenizer, prompts, add_generation_prompt=True)
            full_texts = _chat_texts(tokenizer, [list(p) + list(c) for p, c in zip(prompts, completions)])
            full = tokenizer(full_texts, add_special_tokens=False)
            ids = full["input_ids"]
            lengths = _prompt_lengths(tokenizer, prompt_texts, full_texts, full)
            counts = [len(x) for x in ids]
        else:
            prompt_ids = _text_ids(tokenizer, prompts, special_tokens=True)
            ids = _text_ids(tokenizer, [p + c for p, c in zip(prompts, _with_eos(tokenizer, completions))], True)
            lengths = [(len(p), common_prefix_length(p, x)) for p, x in zip(prompt_ids, ids)]
            counts = [len(x) for x in _text_ids(tokenizer, [p + c for p, c in zip(prompts, completions)], False)]
        masks = []
        for (n_prompt, prefix), x in zip(lengths, ids):
            _warn_if_prompt_is_not_a_prefix(n_prompt, prefix)
            masks.append([0] * prefix + [1] * (len(x) - prefix))
        return {"input_ids": ids, "completion_mask": masks, "n_tokens": counts}
    if "messages" in batch:
        ids = _chat_ids(tokenizer, batch["messages"])
        return {"input_ids": ids, "n_tokens": [len(x) for x in ids]}
    texts = batch["text"]
    return {"input_ids": _text_ids(tokenizer, _with_eos(tokenizer, texts), True),
            "n_tokens": [len(x) for x in _text_ids(tokenizer, texts, False)]}


def preference_token_ids(tokenizer: PreTrainedTokenizerBase, batch: dict[str, list]) -> dict[str, list]:
    """Preference records → `chosen_ids` and `rejected_ids` as trl.RewardTrainer (1.16) makes them
    (it skips tokenizing a set that has them): prompt + response through the chat template with no
    generation prompt, or text prompt + response + EOS with the tokenizer's special tokens (as
    rlhf.rm.encode). `n_tokens`: the longer side's length as the length rule counts it."""
    prompts = batch["prompt"]
    out: dict[str, list] = {}
    counts: list[int] = [0] * len(prompts)
    for side in ("chosen", "rejected"):
        responses = batch[side]
        if prompts and is_conversational(prompts[0]):
            ids = _chat_ids(tokenizer, [list(p) + list(r) for p, r in zip(prompts, responses)])
            lengths = [len(x) for x in ids]
        else:
            ids = _text_ids(tokenizer, [p + r for p, r in zip(prompts, _with_eos(tokenizer, responses))], True)
            lengths = [len(x) for x in _text_ids(tokenizer, [p + r for p, r in zip(prompts, responses)], False)]
        out[f"{side}_ids"] = ids
        counts = [max(a, b) for a, b in zip(counts, lengths)]
    out["n_tokens"] = counts
    return out


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, batch: dict[str, list]) -> dict[str, list]:
    """PPO prompt records → `prompt_text` (rendered with the generation prompt when conversational)
    and `prompt_ids` (its tokens, no special tokens added: what the PPO loop generates from)."""
    prompts = batch["prompt"]
    if prompts and is_conversational(prompts[0]):
        texts = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
    else:
        texts = list(prompts)
    ids = _text_ids(tokenizer, texts, False)
    return {"prompt_text": texts, "prompt_ids": ids, "n_tokens": [len(x) for x in ids]}


TOKEN_COLUMNS = {"sft": ("input_ids", "completion_mask"), "rm": ("chosen_ids", "rejected_ids"),
                 "ppo": ("prompt_ids", "prompt_text")}
TRAINER_COLUMNS = {"rm": ("margin",)}  # record columns the trainer reads too
TOKEN_IDS = {"sft": sft_token_ids, "rm": preference_token_ids, "ppo": prompt_token_ids}


TOKEN_FEATURES = {  # compact storage (the trainers' collators make int64 tensors of them)
    "input_ids": "int32", "chosen_ids": "int32", "rejected_ids": "int32", "prompt_ids": "int32",
    "completion_mask": "int8", "n_tokens": "int32", "prompt_text": "string",
}


def _tokenized(records: Dataset, tokenizer, stage: str, what: str) -> Dataset:
    """The records with the stage's token columns beside them (and `n_tokens`). The map writes the
    new columns only; they join the records' columns without copying them."""
    from datasets import Features, List, Value, concatenate_datasets

    if not len(records):
        return records
    fn = TOKEN_IDS[stage]
    columns = [c for c in (*TOKEN_COLUMNS[stage], "n_tokens")
               if not (c == "completion_mask" and "prompt" not in records.column_names)]
    features = Features({c: Value(TOKEN_FEATURES[c]) if c in ("n_tokens", "prompt_text") else List(Value(TOKEN_FEATURES[c]))
                         for c in columns})
    tokens = _map(records, lambda batch: fn(tokenizer, batch), f"Tokenizing {what} rows", features=features,
                  remove_columns=records.column_names)
    if records._indices is not None:  # rows dropped before (RM): the kept rows, in one table
        records = records.flatten_indices(new_fingerprint=uuid.uuid4().hex)
    return concatenate_datasets([records, tokens], axis=1)


def _prepare(records: Dataset, labels: list[str], tokenizer, stage: str, max_length: int, reason: str,
             rules: Sequence[Rule], what: str) -> tuple[Dataset, DropReport]:
    """The rules that need no model, then token ids, then the length rule."""
    kept, labels, positions, report = apply_rules(records, labels, rules)
    if tokenizer is None:
        return kept, report
    tokens = _tokenized(kept, tokenizer, stage, what)
    kept, *_, report = apply_rules(tokens, labels, [Rule(reason, ("n_tokens",), longer_than(max_length))], report,
                                   positions)
    return kept, report


def filter_sft(records: Dataset, labels: list[str], tokenizer, max_length: int) -> tuple[Dataset, DropReport]:
    """The SFT row rule (too long). Returns the rows kept, with their token columns, and the report."""
    return _prepare(records, labels, tokenizer, "sft", max_length, f"longer than max_length={max_length} tokens", (),
                    "SFT")


def filter_preferences(records: Dataset, labels: list[str], tokenizer, max_length: int) -> tuple[Dataset, DropReport]:
    """The RM's row rules. `tokenizer` None applies the rules that need no model (empty side,
    chosen == rejected) and skips the length rule: what `rlhf validate` checks."""
    return _prepare(records, labels, tokenizer, "rm", max_length, f"longer than max_length={max_length} tokens",
                    RM_RULES_WITHOUT_MODEL, "RM")


def filter_prompts(records: Dataset, labels: list[str], tokenizer, max_length: int) -> tuple[Dataset, DropReport]:
    return _prepare(records, labels, tokenizer, "ppo", max_length,
                    f"prompt longer than max_prompt_length={max_length} tokens", (), "PPO")


# ---------------------------------------------------------------------------- per stage


@dataclass
class StageData:
    """A stage's training and held-out data sets, plus what was dropped (for the manifest).

    `train`/`eval`: the records in TRL's format. `train_ids`/`eval_ids`: the same rows as the
    stage's trainer takes them (SFT: input_ids[, completion_mask]; RM: chosen_ids, rejected_ids[,
    margin]; PPO: prompt_ids, prompt_text)."""

    train: Dataset
    eval: Dataset | None
    report: dict[str, Any]
    conversational: bool
    train_ids: Dataset | None = None
    eval_ids: Dataset | None = None


def _views(stage: str, full: Dataset | None) -> tuple[Dataset | None, Dataset | None]:
    """A prepared split → (records, token columns), both column selections of one table."""
    if full is None:
        return None, None
    tokens = (*TOKEN_COLUMNS[stage], "n_tokens")
    records = [c for c in full.column_names if c not in tokens]
    ids = [c for c in (*TOKEN_COLUMNS[stage], *TRAINER_COLUMNS.get(stage, ())) if c in full.column_names]
    return full.select_columns(records), full.select_columns(ids)


def _build(data: DataConfig, seed: int, to_records, keep, what: str) -> tuple[dict[str, Dataset], dict, list[str]]:
    """Read, check and filter both splits: ({split: prepared set}, {split: drop summary}, log lines)."""
    train_rows, eval_rows = read_splits(data, seed)
    out, report, lines = {}, {}, []
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if rows is None:
            continue
        if not len(rows):
            raise UserError(f"{rows.source}: the held-out data set is empty")
        records, drops = keep(to_records(rows), rows.labels)
        lines.append(drops.describe(f"{what} {split} data ({rows.source})"))
        log.info(lines[-1])
        report[split] = drops.summary()
        if not len(records):
            raise UserError(f"{rows.source}: no usable {split} rows left ({drops.describe(what)})")
        out[split] = records
    return out, report, lines


def fingerprint(path: str | None) -> str | None:
    """sha256 of a local data file, or of the data files in a local folder (names and contents);
    None for a hub id or a missing path."""
    if not path:
        return None
    p = Path(path).expanduser()
    files = _data_files(p) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        return None
    h = hashlib.sha256()
    for file in files:
        if p.is_dir():
            h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides a tokenizer's ids: its vocabulary, merges, normaliser, pre-tokeniser
    and post-processor (the fast tokenizer's spec, less its call-time truncation and padding), its
    special tokens and its chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.special_tokens_map,
                         getattr(tokenizer, "split_special_tokens", None)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_key(stage: str, data: DataConfig, seed: int, params: dict[str, Any], tokenizer) -> str:
    """What decides a stage's prepared data: the sources' contents (a local path's files; a hub
    set's `datasets` fingerprint, which changes with the revision downloaded), the data settings,
    the stage's settings that filter or shape rows, the tokenizer and the library versions."""
    import datasets
    import tokenizers
    import transformers
    import trl

    def source(path: str | None, split: str) -> str | None:
        if not path:
            return None
        return fingerprint(path) if is_local(path) else _load_hub(path, data.name, split, data.revision)._fingerprint

    sources = [source(data.path, data.split), source(data.eval_path, data.split)]
    if isinstance(data.eval_split, str) and not data.eval_path and not is_local(data.path):
        sources.append(source(data.path, data.eval_split))
    payload = {"version": PREP_VERSION, "stage": stage, "data": data.model_dump(), "seed": seed, "params": params,
               "sources": sources, "tokenizer": tokenizer_fingerprint(tokenizer),
               "libraries": [datasets.__version__, tokenizers.__version__, transformers.__version__, trl.__version__]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def data_cache_dir() -> Path:
    from rlhf.models import cache_dir

    return cache_dir() / "data"


@contextlib.contextmanager
def _main_process_first() -> Iterator[None]:
    """The global main process first, then each machine's local main, then the rest (as TRL
    prepares its data sets): with a shared cache every other process loads what the main one wrote;
    on machines without one, one process per machine prepares."""
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first(), state.local_main_process_first():
        yield


def _load_cached(folder: Path, stage: str, replay_log: bool = True) -> StageData | None:
    from datasets import load_from_disk

    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        sets = {split: load_from_disk(str(folder / split)) for split in meta["splits"]}
    except Exception as e:  # a damaged entry is prepared again, never trusted
        log.warning("ignoring the prepared data in %s (%s: %s); preparing it again", folder, type(e).__name__, e)
        return None
    with contextlib.suppress(OSError):
        os.utime(folder)  # recently used: pruned last
    for line in meta["log"] if replay_log else ():  # what preparing it logged
        log.info(line)
    log.debug("prepared %s data loaded from %s", stage, folder)
    train, train_ids = _views(stage, sets["train"])
    held, held_ids = _views(stage, sets.get("eval"))
    return StageData(train, held, meta["report"], meta["conversational"], train_ids, held_ids)


def _save(folder: Path, sets: dict[str, Dataset], meta: dict[str, Any]) -> bool:
    """Write the prepared sets beside each other and move them into place at once; False (and a
    warning) where the cache cannot be written: the stage then runs on what it has in memory."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        tmp.mkdir(parents=True)
        for split, ds in sets.items():
            with _progress_bars(len(ds)):
                ds.save_to_disk(str(tmp / split))
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process wrote the same key first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(folder.parent, keep=folder.name)
        return True
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not cache the prepared data in %s (%s); each process prepares its own", folder, e)
        return False


def _prune(root: Path, keep: str) -> None:
    """At most CACHE_KEEP prepared sets: the least recently used go (never `keep`)."""
    entries = sorted((p for p in root.iterdir() if p.is_dir() and ".tmp-" not in p.name),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[CACHE_KEEP:]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def _stage_data(stage: str, cfg, tokenizer, data: DataConfig, params: dict[str, Any], to_records, keep,
                what: str) -> StageData:
    with _main_process_first():
        folder = data_cache_dir() / _cache_key(stage, data, cfg.seed, params, tokenizer)
        cached = _load_cached(folder, stage)
        if cached is not None:
            return cached
        sets, report, lines = _build(data, cfg.seed, to_records, keep, what)
        first = sets["train"][0]
        conversational = is_conversational(first.get("prompt", first.get("messages", first.get("chosen"))))
        meta = {"splits": list(sets), "report": report, "conversational": conversational, "log": lines}
        if _save(folder, sets, meta):
            reloaded = _load_cached(folder, stage, replay_log=False) if folder.is_dir() else None
            if reloaded is not None:  # memory-mapped: the in-memory copy goes
                return reloaded
    train, train_ids = _views(stage, sets["train"])
    held, held_ids = _views(stage, sets.get("eval"))
    return StageData(train, held, report, conversational, train_ids, held_ids)


def needs_chat_template(data: DataConfig, seed: int | None = None) -> bool:
    """Whether a data set is conversational, from its first row (read before the tokenizer loads;
    a data set is conversational or not as a whole, so which row comes first in training, and with
    it `seed`, does not matter)."""
    if is_local(data.path):
        first = _first_row(data.path)
    else:
        ds = _load_hub(data.path, data.name, data.split, data.revision)
        first = ds[0] if len(ds) else None
    return first is not None and any(isinstance(first.get(c), list) for c in ("messages", "prompt", "chosen", "completion"))


def sft_data(cfg, tokenizer) -> StageData:
    s = cfg.sft
    return _stage_data("sft", cfg, tokenizer, s.data, {"completion_only_loss": s.completion_only_loss,
                                                       "max_length": s.max_length},
                       lambda rows: sft_records(rows, s.completion_only_loss),
                       lambda recs, labels: filter_sft(recs, labels, tokenizer, s.max_length), "SFT")


def rm_data(cfg, tokenizer) -> StageData:
    s = cfg.rm
    return _stage_data("rm", cfg, tokenizer, s.data, {"margin_column": s.margin_column, "max_length": s.max_length},
                       lambda rows: preference_records(rows, s.margin_column),
                       lambda recs, labels: filter_preferences(recs, labels, tokenizer, s.max_length), "RM")


def ppo_data(cfg, tokenizer) -> StageData:
    s = cfg.ppo
    return _stage_data("ppo", cfg, tokenizer, s.data, {"max_prompt_length": s.max_prompt_length}, prompt_records,
                       lambda recs, labels: filter_prompts(recs, labels, tokenizer, s.max_prompt_length), "PPO")


def check_data(data: DataConfig, seed: int, to_records, keep=None, what: str = "") -> int:
    """For `rlhf validate`: read and check every row's columns and types, then apply `keep`, the
    stage's row rules that need no model (records, labels) -> (kept, DropReport), if any; a split
    with no usable rows left is the same error the stage would raise. Returns the training row count."""
    train, held = read_splits(data, seed)
    for split, rows in (("train", train), ("eval", held)):
        if rows is None:
            continue
        if not len(rows):
            raise UserError(f"{rows.source}: the held-out data set is empty")
        records = to_records(rows)
        if keep is not None:
            kept, drops = keep(records, rows.labels)
            if not len(kept):
                raise UserError(f"{rows.source}: no usable {split} rows left ({drops.describe(what)})")
    return len(train)
