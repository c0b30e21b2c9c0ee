"""Is a stage up to date? What its output depends on, hashed, against what its manifest recorded.

A stage's hash covers its own config section, the shared sections it uses (model, lora, seed),
the contents of its local data files and its upstream stages' hashes; fields declared with
`affects_output=False` (logging cadence, trackers, launchers) are left out, so changing them makes
nothing stale. `runs/<run_name>/<stage>/manifest.json` records the hash a stage was trained with
(rlhf.runs writes it); `stage_state` compares the two. The evaluation records its inputs in
`eval/eval.json` instead (`eval_state`).

Reading only, and cheap: nothing here imports torch, so `rlhf run-all` on a finished run and
`rlhf status` answer in well under a second. A file's content hash is kept for the rest of the
process while the file's size and modification time stay the same, so a large data set is read
once per command, not once per stage hash that includes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rlhf.config import STAGES, UPSTREAM, PipelineConfig
from rlhf.data.read import LOCAL_SUFFIXES
from rlhf.errors import UserError

MANIFEST = "manifest.json"
EVAL_DIR = "eval"
EVAL_FILE = "eval.json"


# ---------------------------------------------------------------------------- fingerprints


_DIGESTS: dict[tuple, str] = {}  # (what, path, stat of each file) -> sha256, for this process
RECENT_NS = 2_000_000_000  # a file modified this recently may change again within its mtime's resolution


def _sha256_files(files: list[Path], with_names: bool) -> str:
    """sha256 over the files' bytes in order (each preceded by its name and a NUL when `with_names`)."""
    h = hashlib.sha256()
    for file in files:
        if with_names:
            h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _digest(what: str, root: Path, files: list[Path], with_names: bool) -> str:
    """`_sha256_files`, computed once per process for files whose identity (device, inode, size,
    modification time) has not changed since; a file modified in the last RECENT_NS is always read
    again (its next change could keep the same mtime)."""
    stats = [os.stat(f) for f in files]
    identity = tuple((f.name, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for f, s in zip(files, stats))
    key = (what, str(root.resolve()), identity)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = _sha256_files(files, with_names)
    if all(time.time_ns() - s.st_mtime_ns > RECENT_NS for s in stats):
        _DIGESTS[key] = digest
    return digest


def file_fingerprint(path: str | None) -> str | None:
    """sha256 of a local data file, or of the data files in a local folder (their names and
    contents), so editing the data makes a stage stale; None for hub ids."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        return _digest("data", p, sorted(f for f in p.iterdir() if f.is_file() and f.suffix in LOCAL_SUFFIXES), True)
    if p.is_file():
        return _digest("data", p, [p], False)
    return None


def weights_fingerprint(model_dir: Path) -> str | None:
    """sha256 over a model folder's *.safetensors files (names and bytes), or None when it has none:
    the identity of the weights a downstream stage was trained on."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    return _digest("weights", Path(model_dir), files, True)


# ---------------------------------------------------------------------------- stage hashes


def output_relevant(section: BaseModel) -> dict[str, Any]:
    """The fields of a section that change what a stage produces (logging cadence and the like excluded)."""
    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if field.exclude or not extra.get("affects_output", True):
            continue
        value = getattr(section, name)
        out[name] = output_relevant(value) if isinstance(value, BaseModel) else value
    return out


def stage_hash(cfg: PipelineConfig, stage: str) -> str:
    """Hash of everything that determines a stage's output: its own section, the shared sections
    it uses (model, lora, seed), the contents of its local data files, and its upstream stages' hashes."""
    section = getattr(cfg, stage)
    if section is None:
        raise UserError(f"{cfg.source}: no '{stage}' section; add one to run the {stage} stage")
    payload = {
        "stage": stage,
        "section": output_relevant(section),
        "model": output_relevant(cfg.model),
        "lora": output_relevant(cfg.lora),
        "seed": cfg.seed,
        "data": [file_fingerprint(section.data.path), file_fingerprint(section.data.eval_path)],
        "upstream": {u: stage_hash(cfg, u) for u in UPSTREAM[stage]},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The resolved config a manifest records (for 'stale because these keys changed')."""
    dumped = cfg.model_dump(mode="json")
    return {"model": dumped["model"], "lora": dumped["lora"], "seed": dumped["seed"], stage: dumped[stage]}


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (for 'stale because ...')."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


# ---------------------------------------------------------------------------- where a stage stands


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a torn manifest counts as no manifest: the stage reruns


@dataclass
class StageState:
    """Where a stage stands relative to the current config."""

    status: str  # done | stale | missing | interrupted | failed
    reason: str = ""
    manifest: dict[str, Any] | None = None


def stage_state(cfg: PipelineConfig, stage: str) -> StageState:
    manifest = read_manifest(cfg.stage_dir(stage))
    if manifest is None:
        return StageState("missing", "never run")
    if manifest.get("status") != "done":
        return StageState(manifest.get("status", "interrupted"), manifest.get("error", "did not finish"), manifest)
    if manifest.get("config_hash") != stage_hash(cfg, stage):
        keys = changed_keys(manifest.get("config", {}), stage_config(cfg, stage))
        upstream_changed = [u for u in UPSTREAM[stage] if manifest.get("upstream", {}).get(u) != stage_hash(cfg, u)]
        why = []
        if keys:
            why.append("changed: " + ", ".join(keys))
        if upstream_changed:
            why.append("upstream changed: " + ", ".join(upstream_changed))
        return StageState("stale", "; ".join(why) or "data files changed", manifest)
    return StageState("done", "", manifest)


def eval_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """What an evaluation depends on: the stage hashes and the eval section (less `enabled`)."""
    inputs = {s: stage_hash(cfg, s) for s in STAGES if getattr(cfg, s) is not None}
    settings = json.dumps(cfg.eval.model_dump(mode="json", exclude={"enabled"}), sort_keys=True)
    inputs["eval"] = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return inputs


def eval_state(cfg: PipelineConfig) -> tuple[bool, str]:
    """(up to date, why not): eval.json exists and was computed from the current stages and settings."""
    path = cfg.stage_dir(EVAL_DIR) / EVAL_FILE
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("inputs")
    except (OSError, json.JSONDecodeError):
        return False, "never run"
    if old != eval_inputs(cfg):
        return False, "a stage or the eval settings changed"
    return True, ""
