"""Each row checked and put in TRL's format, one record function per stage: SFT records
({prompt, completion}, {messages} or {text}), preference records ({prompt, chosen, rejected[,
margin]}) and PPO prompt records ({prompt}). The first bad row raises a UserError naming its file,
line or row, and column."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from rlhf.data.arrow import map_batched
from rlhf.data.read import Rows
from rlhf.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset

ROLES = ("system", "user", "assistant", "tool")


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

    return map_batched(ds, batch, f"Checking {what} rows", with_indices=True, input_columns=present,
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
