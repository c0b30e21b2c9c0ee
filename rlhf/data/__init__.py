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
- SFT: rows longer than `sft.max_length` tokens are dropped (truncating would cut the reply);
  then rows that the truncation of the trained ids to `sft.max_length` leaves with no label (the
  ids of a text row hold the special tokens the count leaves out; TRL drops such rows silently).
- RM: rows whose chosen or rejected is empty, whose chosen equals rejected, or whose longer side
  exceeds `rm.max_length` tokens are dropped.
- PPO: prompts longer than `ppo.max_prompt_length` tokens are dropped.
A data set with no usable rows left is an error.

How a stage's data is prepared, all of it on `datasets.Dataset` (Arrow) objects:
read (a file becomes an Arrow table; JSON lines through pyarrow, with Python's `json` as the
fallback that finds and words the errors) → held-out carve and `max_rows` (one seeded
permutation of the row numbers) → records (`map`: each row checked and put in TRL's format) →
the row rules that need no model → token ids (`map`, batched: exactly the ids and, for SFT, the
labels the stage's trainer trains on, truncated as TRL truncates, so TRL neither tokenizes nor
builds labels again; and the length the length rule counts) → the length rule. Token lengths count the rendered text without the tokenizer's added special tokens: for
conversational rows that is the length of the trained ids; text rows are counted apart (TRL adds
BOS/EOS there). The result is cached under $RLHF_CACHE/data/, keyed by the data files' contents,
the data settings, the tokenizer and the library versions, and is prepared under accelerate's
`main_process_first`: in a multi-process stage the main process prepares it, the others load it
(memory-mapped). A rerun of the stage, and `rlhf eval`, load it too.
"""

from rlhf.data.prepare import StageData, needs_chat_template, ppo_data, rm_data, sft_data
from rlhf.data.tokens import render

__all__ = ["StageData", "needs_chat_template", "ppo_data", "render", "rm_data", "sft_data"]
