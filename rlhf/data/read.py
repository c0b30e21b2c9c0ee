"""Reading a data set into `Rows`: local files (.jsonl, .json, .parquet, .csv, or a folder of them)
and hub sets, the held-out carve and `max_rows` (`read_splits`), and a local set's first row
without reading the rest (`first_row`). Errors name the file and the line or row."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from rlhf.data.arrow import in_memory
from rlhf.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset

    from rlhf.config import DataConfig

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Columns that hold text or message lists. A number there is an error in every form; pyarrow reads
# an int in a column of floats as a float, which would misname its type in that error.
TEXT_COLUMNS = ("messages", "prompt", "completion", "text", "chosen", "rejected")


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
                    return Rows(str(path), in_memory(table), [f"line {n}" for n in numbers])
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

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    labels = [f"row {i + 1}" for i in range(table.num_rows)]
    try:
        return Rows(str(path), in_memory(table), labels)
    except (TypeError, ValueError, pa.ArrowException):  # a column type `datasets` does not take
        return Rows.from_list(str(path), table.to_pylist(), labels)


READERS: dict[str, Callable[[Path], Rows]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
}


def data_files(p: Path) -> list[Path]:
    return sorted(f for f in p.iterdir() if f.is_file() and f.suffix in READERS)


def read_local(path: str) -> Rows:
    import pyarrow as pa
    from datasets import concatenate_datasets

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: data file not found (paths are relative to the directory you run rlhf from)")
    if p.is_dir():
        files = data_files(p)
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


def load_hub(path: str, name: str | None, split: str, revision: str | None) -> Dataset:
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
    ds = load_hub(path, name, split, revision)
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


def first_row(path: str) -> dict[str, Any] | None:
    """The first row of a local file or folder, reading no further than it (None: no rows)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for f in data_files(p):
            row = first_row(str(f))
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
