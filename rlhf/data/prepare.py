"""A stage's data, prepared once: read → records → the row rules → token ids → the length rule
(`filter_*`), both splits (`_build`), cached under $RLHF_CACHE/data/ keyed by what shapes the
result (`fingerprint`, `tokenizer_fingerprint`), under accelerate's `main_process_first`. The
stage entry points `sft_data`, `rm_data`, `ppo_data`; `needs_chat_template`; `check_data` for
`rlhf validate`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from rlhf.data.arrow import progress_bars
from rlhf.data.read import data_files, first_row, is_local, load_hub, read_splits
from rlhf.data.records import preference_records, prompt_records, sft_records
from rlhf.data.rules import RM_RULES_WITHOUT_MODEL, DropReport, Rule, apply_rules, longer_than
from rlhf.data.tokens import LENGTH_COLUMNS, TOKEN_COLUMNS, is_conversational, tokenized
from rlhf.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from rlhf.config import DataConfig

log = logging.getLogger(__name__)

PREP_VERSION = 2  # bump when what a prepared set holds changes: it is part of the cache key
CACHE_KEEP = 16  # prepared sets kept in the cache (least recently used go first)
TRAINER_COLUMNS = {"rm": ("margin",)}  # record columns the trainer reads too


def _prepare(records: Dataset, labels: list[str], tokenizer, stage: str, max_length: int, reason: str,
             rules: Sequence[Rule], what: str, token_rules: Sequence[Rule] = (),
             params: dict[str, Any] | None = None) -> tuple[Dataset, DropReport]:
    """The rules that need no model, then token ids (`params` go to the stage's token function),
    then the length rule and `token_rules`."""
    kept, labels, positions, report = apply_rules(records, labels, rules)
    if tokenizer is None:
        return kept, report
    tokens = tokenized(kept, tokenizer, stage, what, **(params or {}))
    kept, *_, report = apply_rules(tokens, labels, [Rule(reason, ("n_tokens",), longer_than(max_length)), *token_rules],
                                   report, positions)
    return kept, report


def filter_sft(records: Dataset, labels: list[str], tokenizer, max_length: int,
               completion_only_loss: bool = True) -> tuple[Dataset, DropReport]:
    """The SFT row rules: too long, then nothing left to train on within max_length (TRL drops such
    rows too). Returns the rows kept, with their token columns (sft_token_ids), and the report."""
    nothing = Rule(f"no token left to train on within max_length={max_length}", ("n_loss_tokens",),
                   lambda counts: [n == 0 for n in counts])
    return _prepare(records, labels, tokenizer, "sft", max_length, f"longer than max_length={max_length} tokens", (),
                    "SFT", (nothing,), {"completion_only_loss": completion_only_loss, "max_length": max_length})


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
    stage's trainer takes them (SFT: input_ids, labels; RM: chosen_ids, rejected_ids[,
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
    tokens = (*TOKEN_COLUMNS[stage], *LENGTH_COLUMNS[stage])
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
    files = data_files(p) if p.is_dir() else [p] if p.is_file() else []
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
        return fingerprint(path) if is_local(path) else load_hub(path, data.name, split, data.revision)._fingerprint

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
            with progress_bars(len(ds)):
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
        first = first_row(data.path)
    else:
        ds = load_hub(data.path, data.name, data.split, data.revision)
        first = ds[0] if len(ds) else None
    return first is not None and any(isinstance(first.get(c), list) for c in ("messages", "prompt", "chosen", "completion"))


def sft_data(cfg, tokenizer) -> StageData:
    s = cfg.sft
    return _stage_data("sft", cfg, tokenizer, s.data, {"completion_only_loss": s.completion_only_loss,
                                                       "max_length": s.max_length},
                       lambda rows: sft_records(rows, s.completion_only_loss),
                       lambda recs, labels: filter_sft(recs, labels, tokenizer, s.max_length, s.completion_only_loss),
                       "SFT")


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
