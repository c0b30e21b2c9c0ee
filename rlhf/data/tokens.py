"""Token ids, as the trainers make them: `render` (the text a model sees), and per stage the
columns its trainer trains on (`sft_token_ids`, `preference_token_ids`, `prompt_token_ids`) plus
`n_tokens`, the length the length rule counts; `tokenized` puts them beside a stage's records."""

from __future__ import annotations

import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

from rlhf.data.arrow import map_batched

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def is_conversational(value: Any) -> bool:
    return isinstance(value, list)


def render(tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any = None) -> str:
    """The text a model sees for prompt (+ completion), through the chat template when conversational."""
    if is_conversational(prompt):
        if completion is None:
            return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    return prompt + (completion or "")


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


def sft_token_ids(tokenizer: PreTrainedTokenizerBase, batch: dict[str, list], completion_only_loss: bool = True,
                  max_length: int | None = None) -> dict[str, list]:
    """SFT records → the columns trl.SFTTrainer (1.16) trains on, as its own preparation makes them,
    so the stage can hand it the set with that preparation skipped (`skip_prepare_dataset`; its
    per-token Python passes cost more than our whole tokenization at hub scale): `input_ids` and
    `labels`, truncated to `max_length` from the end (TRL's `truncation_mode="keep_start"`).

    Tokens as TRL tokenizes: conversational rows through the chat template (the prompt alone with
    the generation prompt), text rows with the EOS appended and the tokenizer's special tokens. For
    prompt + completion rows with `completion_only_loss`, `labels` is -100 on the prompt's tokens,
    up to where the tokenized prompt and the tokenized prompt + completion diverge (TRL's
    `common_prefix_length`); otherwise `labels` equals `input_ids`. Plus `n_tokens`, the length the
    length rule counts (see rlhf.data's docstring), and `n_loss_tokens`, the tokens left with a
    label after truncation (TRL drops a row with none)."""
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
        n_masked = []  # per row: the prompt tokens that get no label
        for (n_prompt, prefix), x in zip(lengths, ids):
            _warn_if_prompt_is_not_a_prefix(n_prompt, prefix)
            n_masked.append(prefix if completion_only_loss else 0)
    elif "messages" in batch:
        ids = _chat_ids(tokenizer, batch["messages"])
        counts, n_masked = [len(x) for x in ids], [0] * len(ids)
    else:
        texts = batch["text"]
        ids = _text_ids(tokenizer, _with_eos(tokenizer, texts), True)
        counts, n_masked = [len(x) for x in _text_ids(tokenizer, texts, False)], [0] * len(ids)
    # List slices, no per-token Python: the masked tokens are always a prefix.
    ids = [x[:max_length] for x in ids] if max_length is not None else ids
    labels = [[-100] * min(m, len(x)) + x[m:] for m, x in zip(n_masked, ids)]
    return {"input_ids": ids, "labels": labels, "n_tokens": counts,
            "n_loss_tokens": [max(0, len(x) - m) for m, x in zip(n_masked, ids)]}


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


TOKEN_COLUMNS = {"sft": ("input_ids", "labels"), "rm": ("chosen_ids", "rejected_ids"),
                 "ppo": ("prompt_ids", "prompt_text")}
TOKEN_IDS = {"sft": sft_token_ids, "rm": preference_token_ids, "ppo": prompt_token_ids}


TOKEN_FEATURES = {  # compact storage (the trainers' collators make int64 tensors of them)
    "input_ids": "int32", "chosen_ids": "int32", "rejected_ids": "int32", "prompt_ids": "int32",
    "labels": "int32", "n_tokens": "int32", "n_loss_tokens": "int32", "prompt_text": "string",
}
# Per-row columns beside the token columns: lengths the row rules read.
LENGTH_COLUMNS = {"sft": ("n_tokens", "n_loss_tokens"), "rm": ("n_tokens",), "ppo": ("n_tokens",)}


def tokenized(records: Dataset, tokenizer, stage: str, what: str, **params: Any) -> Dataset:
    """The records with the stage's token columns beside them (and LENGTH_COLUMNS). The map writes
    the new columns only; they join the records' columns without copying them. `params`: the stage
    function's own settings (SFT: completion_only_loss, max_length)."""
    from datasets import Features, List, Value, concatenate_datasets

    if not len(records):
        return records
    fn = TOKEN_IDS[stage]
    columns = (*TOKEN_COLUMNS[stage], *LENGTH_COLUMNS[stage])
    features = Features({c: Value(TOKEN_FEATURES[c]) if c in (*LENGTH_COLUMNS[stage], "prompt_text")
                         else List(Value(TOKEN_FEATURES[c])) for c in columns})
    tokens = map_batched(records, lambda batch: fn(tokenizer, batch, **params), f"Tokenizing {what} rows",
                         features=features, remove_columns=records.column_names)
    if records._indices is not None:  # rows dropped before (RM): the kept rows, in one table
        records = records.flatten_indices(new_fingerprint=uuid.uuid4().hex)
    return concatenate_datasets([records, tokens], axis=1)
