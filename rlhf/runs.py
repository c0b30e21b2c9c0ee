"""The run directory: layout, stage manifests, atomic writes, and "is this stage up to date?".

runs/<run_name>/<stage>/manifest.json records the stage's config hash, its upstream stages'
hashes, its status and final metrics. A stage is marked `done` only after all its outputs are
written (each by an atomic rename), so a crash never leaves a `done` stage with partial outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlhf.config import UPSTREAM, PipelineConfig, changed_keys, dump_config, stage_hash
from rlhf.errors import UserError

MANIFEST = "manifest.json"
STAGE_COMMAND = {"sft": "rlhf sft", "rm": "rlhf rm", "ppo": "rlhf ppo"}


def current_umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file_atomically(path: Path, write: Callable[[Any], None], mode: str = "w", suffix: str = "") -> None:
    """Call `write(f)` on a temp file next to `path`, fsync, rename: readers see the old file or the
    whole new one. The file gets the usual permissions (0666 minus the umask; mkstemp alone would
    make it private to its owner). `suffix`: for writers that look at the extension (savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomically(path: Path, data: Any) -> None:
    """JSON through write_file_atomically."""

    def write(f) -> None:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")

    write_file_atomically(path, write)


def write_jsonl_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line through write_file_atomically."""
    write_file_atomically(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG through write_file_atomically (a reader never sees half a PNG)."""
    write_file_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), mode="wb")


def replace_dir(tmp: Path, out_dir: Path) -> Path:
    """Move a finished folder into place by renames only, so `out_dir` is never half-written."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def save_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` and rename it to `out_dir`: a reader sees the old folder or the whole new one."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private to its owner
        write(tmp)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def file_problem(path: Path) -> str | None:
    """Why a written file is unusable (missing, or cut short by a kill mid-write), or None when it reads
    back whole. Checks structure only and unpickles nothing: safetensors header and data length, JSON
    syntax, and the CRC of every member of a torch.save zip (.pt, .pth, .bin)."""
    import struct
    import zipfile

    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return f"{path.name} is truncated"
                (n,) = struct.unpack("<Q", head)
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + n + end:
                return f"{path.name} is truncated"
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{path.name} is damaged ({bad})"
    except (OSError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile, EOFError) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    return None


def weights_fingerprint(model_dir: Path) -> str | None:
    """sha256 over a model folder's *.safetensors files (names and bytes), or None when it has none:
    the identity of the weights a downstream stage was trained on."""
    import hashlib

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for file in files:
        h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a torn manifest counts as no manifest: the stage reruns


def _stage_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    dumped = cfg.model_dump(mode="json")
    return {"model": dumped["model"], "lora": dumped["lora"], "seed": dumped["seed"], stage: dumped[stage]}


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
        keys = changed_keys(manifest.get("config", {}), _stage_config(cfg, stage))
        upstream_changed = [u for u in UPSTREAM[stage] if manifest.get("upstream", {}).get(u) != stage_hash(cfg, u)]
        why = []
        if keys:
            why.append("changed: " + ", ".join(keys))
        if upstream_changed:
            why.append("upstream changed: " + ", ".join(upstream_changed))
        return StageState("stale", "; ".join(why) or "data files changed", manifest)
    return StageState("done", "", manifest)


def require_upstream(cfg: PipelineConfig, stage: str) -> None:
    """Fail early, with the command to run, if an upstream stage is missing, unfinished or stale."""
    for up in UPSTREAM[stage]:
        state = stage_state(cfg, up)
        if state.status != "done":
            raise UserError(
                f"the {stage} stage needs a finished {up} stage in {cfg.stage_dir(up)} ({state.status}: {state.reason}); "
                f"run `{STAGE_COMMAND[up]} --config {cfg.source or 'pipeline.yaml'}` first (or `rlhf run-all`)"
            )
    if stage == "ppo":
        check_same_base(cfg)


def check_same_base(cfg: PipelineConfig) -> None:
    """PPO puts the reward adapter on sft/model: refuse an RM whose manifest records other SFT weights
    (e.g. the SFT stage was forced to rerun and came out different; hashes of configs cannot see that)."""
    recorded = (read_manifest(cfg.stage_dir("rm")) or {}).get("base_weights")
    if recorded is None:
        return  # a run folder from before this check: nothing recorded to compare
    current = weights_fingerprint(cfg.stage_dir("sft") / "model")
    if current != recorded:
        raise UserError(
            f"{cfg.stage_dir('rm') / MANIFEST}: the reward model was trained on other SFT weights than "
            f"{cfg.stage_dir('sft') / 'model'} holds now (sha256 {recorded[:12]} vs {str(current)[:12]}); retrain it: "
            f"`rlhf run-all --from rm --config {cfg.source or 'pipeline.yaml'}`"
        )


def begin_stage(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """Mark a stage as running and write the resolved config of this invocation beside the run."""
    stage_dir = cfg.stage_dir(stage)
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
        probe = stage_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir: cannot write to {stage_dir} ({e.strerror}); choose a writable output_dir") from None
    resolved = cfg.run_dir / "pipeline.yaml"
    tmp = resolved.with_name(f"{resolved.name}.tmp-{os.getpid()}")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    os.replace(tmp, resolved)  # a kill mid-write leaves the previous file, never half of one
    manifest = {
        "stage": stage,
        "status": "running",
        "config_hash": stage_hash(cfg, stage),
        "upstream": {u: stage_hash(cfg, u) for u in UPSTREAM[stage]},
        "config": _stage_config(cfg, stage),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if stage in ("rm", "ppo"):  # both train on sft/model; PPO checks the RM saw the same weights
        manifest["base_weights"] = weights_fingerprint(cfg.stage_dir("sft") / "model")
    write_json_atomically(stage_dir / MANIFEST, manifest)
    return manifest


def finish_stage(cfg: PipelineConfig, stage: str, manifest: dict[str, Any], metrics: dict[str, Any], outputs: dict[str, str]) -> None:
    """Mark a stage done; call only after every output has been written."""
    manifest = dict(manifest, status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), metrics=metrics, outputs=outputs)
    from rlhf.model_card import write_stage_cards

    write_stage_cards(cfg, stage, manifest)  # README.md in model/ and adapter/: the held-out figures are known now
    write_json_atomically(cfg.stage_dir(stage) / MANIFEST, manifest)


def fail_stage(cfg: PipelineConfig, stage: str, manifest: dict[str, Any], error: str) -> None:
    manifest = dict(manifest, status="failed", error=error, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json_atomically(cfg.stage_dir(stage) / MANIFEST, manifest)
