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
the file, the line or row, and the column. Rules for rows that cannot train, applied in
`prepare_*` and reported with a count and the first row numbers:
- SFT: rows longer than `sft.max_length` tokens are dropped (truncating would cut the reply).
- RM: rows whose chosen equals rejected, whose chosen or rejected is empty, or whose longer side
  exceeds `rm.max_length` tokens are dropped.
- PPO: prompts longer than `ppo.max_prompt_length` tokens are dropped.
A data set with no usable rows left is an error.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rlhf.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from rlhf.config import DataConfig

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Rows:
    """Rows read from one source, with the label each row is reported by (`line 7`, `row 7`)."""

    source: str
    rows: list[dict[str, Any]]
    labels: list[str]

    def where(self, i: int) -> str:
        return f"{self.source}, {self.labels[i]}"


@dataclass
class DropReport:
    """What a preparation step dropped, by reason, for the log and the stage manifest."""

    kept: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, label: str) -> None:
        self.dropped.setdefault(reason, []).append(label)

    def summary(self) -> dict[str, Any]:
        return {"kept": self.kept, "dropped": {k: len(v) for k, v in self.dropped.items()}}

    def describe(self, what: str) -> str:
        parts = [f"{what}: {self.kept} rows kept"]
        for reason, labels in self.dropped.items():
            first = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
            parts.append(f"{len(labels)} dropped ({reason}; first: {first})")
        return "; ".join(parts)


# ---------------------------------------------------------------------------- reading


def is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return p.exists() or path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~"))


def _read_jsonl(path: Path) -> Rows:
    rows, labels = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}, line {n}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {n}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
            labels.append(f"line {n}")
    return Rows(str(path), rows, labels)


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
    return Rows(str(path), data, [f"row {i + 1}" for i in range(len(data))])


def _read_csv(path: Path) -> Rows:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path}: malformed CSV ({e})") from None
    return Rows(str(path), rows, [f"row {i + 2}" for i in range(len(rows))])  # row 1 is the header


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    return Rows(str(path), rows, [f"row {i + 1}" for i in range(len(rows))])


READERS: dict[str, Callable[[Path], Rows]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
}


def read_local(path: str) -> Rows:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: data file not found (paths are relative to the directory you run rlhf from)")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in READERS)
        if not files:
            raise UserError(f"{path}: folder holds no {', '.join(LOCAL_SUFFIXES)} files")
        parts = [read_local(str(f)) for f in files]
        return Rows(str(p), [r for part in parts for r in part.rows],
                    [f"{Path(part.source).name} {lab}" for part in parts for lab in part.labels])
    reader = READERS.get(p.suffix)
    if reader is None:
        raise UserError(f"{path}: unsupported file type '{p.suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}")
    return reader(p)


def read_hub(path: str, name: str | None, split: str, revision: str | None) -> Rows:
    """Load a hub data set split (network needed; cached by `datasets` afterwards)."""
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split, revision=revision)
    except Exception as e:
        raise UserError(
            f"data set '{path}' (config {name}, split {split}) could not be loaded from the hub: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return Rows(f"{path}[{split}]", ds.to_list(), [f"row {i + 1}" for i in range(len(ds))])


def read_splits(data: DataConfig, seed: int) -> tuple[Rows, Rows | None]:
    """Training rows and held-out rows as the DataConfig describes them."""
    import random

    local = is_local(data.path)
    train = read_local(data.path) if local else read_hub(data.path, data.name, data.split, data.revision)
    if not train.rows:
        raise UserError(f"{train.source}: the data set is empty")
    held: Rows | None = None
    if data.eval_path:
        held = read_local(data.eval_path) if is_local(data.eval_path) else read_hub(data.eval_path, data.name, data.split, data.revision)
    elif isinstance(data.eval_split, str):
        if local:
            raise UserError(f"eval_split '{data.eval_split}' names a hub split, but {data.path} is a local file; "
                            "give a fraction (e.g. 0.05) or eval_path")
        held = read_hub(data.path, data.name, data.eval_split, data.revision)
    order = list(range(len(train.rows)))
    random.Random(seed).shuffle(order)
    if isinstance(data.eval_split, float) and not data.eval_path:
        n_eval = max(1, round(len(order) * data.eval_split))
        if len(order) - n_eval < 1:
            raise UserError(f"{train.source}: {len(order)} rows are too few to hold out {data.eval_split:.0%}; add rows or set eval_split: null")
        held = Rows(train.source, [train.rows[i] for i in order[:n_eval]], [train.labels[i] for i in order[:n_eval]])
        order = order[n_eval:]
    if data.max_rows:
        order = order[: data.max_rows]
    order.sort()  # keep file order for reporting; the trainers shuffle
    return Rows(train.source, [train.rows[i] for i in order], [train.labels[i] for i in order]), held


# ---------------------------------------------------------------------------- checking rows


def _check_messages(value: Any, where: str, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: column '{column}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
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
    """The first column set in `options` present in the first row; an error naming all options otherwise."""
    first = rows.rows[0] if rows.rows else {}
    for cols in options:
        if all(c in first for c in cols):
            return cols
    wanted = " or ".join("+".join(c) for c in options)
    have = ", ".join(first) or "none"
    raise UserError(f"{rows.where(0)}: {what} data needs columns {wanted}; found: {have}")


def sft_records(rows: Rows, completion_only_loss: bool) -> list[dict[str, Any]]:
    """Rows → TRL SFT records: {prompt, completion}, {messages} or {text}."""
    cols = _require_columns(rows, [("messages",), ("prompt", "completion"), ("text",)], "SFT")
    out = []
    for i, row in enumerate(rows.rows):
        where = rows.where(i)
        if cols == ("messages",):
            messages = _check_messages(row.get("messages"), where, "messages")
            if messages[-1]["role"] != "assistant":
                raise UserError(f"{where}: the last message must be the assistant's reply (role 'assistant')")
            if completion_only_loss:
                if len(messages) < 2:
                    raise UserError(f"{where}: a conversation needs a prompt turn before the assistant's reply")
                out.append({"prompt": messages[:-1], "completion": messages[-1:]})
            else:
                out.append({"messages": messages})
        elif cols == ("prompt", "completion"):
            prompt, completion = _text_or_messages(row, "prompt", where), _text_or_messages(row, "completion", where)
            if type(prompt) is not type(completion):
                raise UserError(f"{where}: prompt and completion must both be text or both be message lists")
            out.append({"prompt": prompt, "completion": completion})
        else:
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{where}: column 'text' must be a non-empty string")
            out.append({"text": text})
    return out


def preference_records(rows: Rows, margin_column: str | None = None) -> list[dict[str, Any]]:
    """Rows → explicit-prompt preference records {prompt, chosen, rejected[, margin]}.

    An implicit prompt (no `prompt` column) is the shared prefix of chosen and rejected, found as
    TRL's `extract_prompt` does."""
    from trl.data_utils import extract_prompt

    cols = _require_columns(rows, [("prompt", "chosen", "rejected"), ("chosen", "rejected")], "preference")
    out = []
    for i, row in enumerate(rows.rows):
        where = rows.where(i)
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
        out.append(rec)
    return out


def prompt_records(rows: Rows) -> list[dict[str, Any]]:
    """Rows → PPO prompt records {prompt}: text, or messages ending with a non-assistant turn."""
    cols = _require_columns(rows, [("prompt",), ("messages",)], "PPO")
    out = []
    for i, row in enumerate(rows.rows):
        where = rows.where(i)
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
        out.append({"prompt": prompt})
    return out


# ---------------------------------------------------------------------------- token lengths


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


def _empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def filter_sft(records: list[dict[str, Any]], labels: list[str], tokenizer, max_length: int) -> tuple[list[dict], DropReport]:
    report = DropReport()
    kept = []
    for rec, label in zip(records, labels):
        if "text" in rec:
            text = rec["text"]
        elif "messages" in rec:
            text = render(tokenizer, rec["messages"][:-1], rec["messages"][-1:])
        else:
            text = render(tokenizer, rec["prompt"], rec["completion"])
        if n_tokens(tokenizer, text) > max_length:
            report.drop(f"longer than max_length={max_length} tokens", label)
        else:
            kept.append(rec)
    report.kept = len(kept)
    return kept, report


def filter_preferences(records: list[dict[str, Any]], labels: list[str], tokenizer, max_length: int) -> tuple[list[dict], DropReport]:
    """The RM's row rules. `tokenizer` None applies the rules that need no model (empty side,
    chosen == rejected) and skips the length rule: what `rlhf validate` checks."""
    report = DropReport()
    kept = []
    for rec, label in zip(records, labels):
        if _empty(rec["chosen"]) or _empty(rec["rejected"]):
            report.drop("chosen or rejected is empty", label)
        elif rec["chosen"] == rec["rejected"]:
            report.drop("chosen == rejected", label)
        elif tokenizer is not None and max(
                n_tokens(tokenizer, render(tokenizer, rec["prompt"], rec[side])) for side in ("chosen", "rejected")) > max_length:
            report.drop(f"longer than max_length={max_length} tokens", label)
        else:
            kept.append(rec)
    report.kept = len(kept)
    return kept, report


def filter_prompts(records: list[dict[str, Any]], labels: list[str], tokenizer, max_length: int) -> tuple[list[dict], DropReport]:
    report = DropReport()
    kept = []
    for rec, label in zip(records, labels):
        if n_tokens(tokenizer, render(tokenizer, rec["prompt"])) > max_length:
            report.drop(f"prompt longer than max_prompt_length={max_length} tokens", label)
        else:
            kept.append(rec)
    report.kept = len(kept)
    return kept, report


# ---------------------------------------------------------------------------- per stage


@dataclass
class StageData:
    """A stage's training and held-out data sets, plus what was dropped (for the manifest)."""

    train: Dataset
    eval: Dataset | None
    report: dict[str, Any]
    conversational: bool


def _build(data: DataConfig, seed: int, to_records, keep, what: str) -> StageData:
    from datasets import Dataset

    train_rows, eval_rows = read_splits(data, seed)
    out, report = {}, {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if rows is None:
            continue
        if not rows.rows:
            raise UserError(f"{rows.source}: the held-out data set is empty")
        records, drops = keep(to_records(rows), rows.labels)
        log.info(drops.describe(f"{what} {split} data ({rows.source})"))
        report[split] = drops.summary()
        if not records:
            raise UserError(f"{rows.source}: no usable {split} rows left ({drops.describe(what)})")
        out[split] = Dataset.from_list(records)
    first = out["train"][0]
    conversational = is_conversational(first.get("prompt", first.get("messages", first.get("chosen"))))
    return StageData(out["train"], out.get("eval"), report, conversational)


def needs_chat_template(data: DataConfig, seed: int) -> bool:
    """Whether a data set is conversational (checked on its first rows before the tokenizer loads)."""
    rows, _ = read_splits(data, seed)
    first = rows.rows[0]
    return any(isinstance(first.get(c), list) for c in ("messages", "prompt", "chosen", "completion"))


def sft_data(cfg, tokenizer) -> StageData:
    s = cfg.sft
    return _build(s.data, cfg.seed, lambda rows: sft_records(rows, s.completion_only_loss),
                  lambda recs, labels: filter_sft(recs, labels, tokenizer, s.max_length), "SFT")


def rm_data(cfg, tokenizer) -> StageData:
    s = cfg.rm
    return _build(s.data, cfg.seed, lambda rows: preference_records(rows, s.margin_column),
                  lambda recs, labels: filter_preferences(recs, labels, tokenizer, s.max_length), "RM")


def ppo_data(cfg, tokenizer) -> StageData:
    s = cfg.ppo
    return _build(s.data, cfg.seed, prompt_records,
                  lambda recs, labels: filter_prompts(recs, labels, tokenizer, s.max_prompt_length), "PPO")


def check_data(data: DataConfig, seed: int, to_records, keep=None, what: str = "") -> int:
    """For `rlhf validate`: read and check every row's columns and types, then apply `keep`, the
    stage's row rules that need no model (records, labels) -> (kept, DropReport), if any; a split
    with no usable rows left is the same error the stage would raise. Returns the training row count."""
    train, held = read_splits(data, seed)
    for split, rows in (("train", train), ("eval", held)):
        if rows is None:
            continue
        if not rows.rows:
            raise UserError(f"{rows.source}: the held-out data set is empty")
        records = to_records(rows)
        if keep is not None:
            kept, drops = keep(records, rows.labels)
            if not kept:
                raise UserError(f"{rows.source}: no usable {split} rows left ({drops.describe(what)})")
    return len(train.rows)
