"""PPO checkpoints: writing, finding and restoring checkpoints/step-N, and the RNG states in them.

A checkpoint (every `save_every` steps, written atomically) holds the policy and value adapters
and the value head (trainable.safetensors; the policy adapter alone for the critic-free
algorithms), the optimizer (parameter groups policy and, with a critic, value, each with its own
learning rate), the scheduler and every RNG state (optimizer.pt), and the KL
controller, the step and the config hash (state.json). The step fixes the data position (the
prompt order is a pure function of seed and step, trainer.prompt_indices), so resuming from step
N and running to M gives the same weights as an unbroken 0 → M run. In a multi-process run each
other process's RNG state is written next to them as rng-rank{r}.pt.
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.ppo.distributed import seed_everything, weights_digest
from rlhf.ppo.roles import Roles
from rlhf.atomic import save_atomically

log = logging.getLogger(__name__)

RESUMABLE_CHECKPOINTS = 2  # the newest checkpoints that keep their optimizer state


# ---------------------------------------------------------------------------- trained tensors


def trainable_state(roles: Roles) -> dict[str, torch.Tensor]:
    """Every trained tensor: policy and value LoRA weights and the value head (policy LoRA weights
    alone without a critic)."""
    state = {f"model.{n}": p.detach().cpu().clone() for n, p in roles.model.named_parameters() if p.requires_grad}
    if roles.value_head is not None:
        state.update({f"value_head.{n}": p.detach().cpu().clone() for n, p in roles.value_head.named_parameters()})
    return state


def load_trainable_state(roles: Roles, state: dict[str, torch.Tensor]) -> None:
    params = dict(roles.model.named_parameters())
    head = dict(roles.value_head.named_parameters()) if roles.value_head is not None else {}
    with torch.no_grad():
        for key, value in state.items():
            kind, name = key.split(".", 1)
            target = params[name] if kind == "model" else head[name]
            target.copy_(value)


# ---------------------------------------------------------------------------- RNG state


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


def _rank_rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rng-rank{rank}.pt"


def restore_rank_rng(ckpt: Path, rank: int, world_size: int, seed: int, start: int, generator: torch.Generator) -> None:
    """Process `rank` > 0 takes its own RNG state from the checkpoint (rank 0's is in optimizer.pt). A
    checkpoint written by fewer processes has none for it: seed it from (seed, step, rank) instead."""
    saved_world = 1 + len(list(ckpt.glob("rng-rank*.pt")))
    if saved_world != world_size and rank == 0:
        log.warning("resuming %s with %d processes; it was written by %d: the prompt order and sampling differ "
                    "from an unbroken run", ckpt, world_size, saved_world)
    if rank == 0:
        return
    path = _rank_rng_file(ckpt, rank)
    if path.is_file():
        _set_rng_state(torch.load(path, weights_only=True), generator)
    else:
        generator.manual_seed(seed_everything(seed + start, rank))


# ---------------------------------------------------------------------------- write


def save_checkpoint(ckpt_root: Path, step: int, roles: Roles, optimizer, scheduler, kl_ctl, generator, config_hash: str,
                    metrics: dict[str, float], rank_rng: list[bytes] | None = None) -> Path:
    """Write checkpoints/step-N atomically. The newest RESUMABLE_CHECKPOINTS keep their optimizer
    state, so a newest checkpoint found damaged (a crash before its files reached the disk) still
    leaves one to resume from; older ones keep their adapters (for evaluation along the run) only.
    `rank_rng`: the RNG states of processes 1.. of a multi-process run (torch.save bytes), written
    as rng-rank{r}.pt (process 0's goes into optimizer.pt)."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(trainable_state(roles), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(generator)}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "kl_controller": kl_ctl.state_dict(),
                                                    "config_hash": config_hash, "metrics": metrics}, indent=2))
        for r, rng in enumerate(rank_rng or [], start=1):
            _rank_rng_file(tmp, r).write_bytes(rng)

    out = save_atomically(ckpt_root / f"step-{step}", write)
    for old in checkpoint_dirs(ckpt_root)[:-RESUMABLE_CHECKPOINTS]:
        (old / "optimizer.pt").unlink(missing_ok=True)
    return out


def save_all_processes(ckpt_root: Path, step: int, roles: Roles, optimizer, scheduler, kl_ctl, generator,
                       config_hash: str, metrics: dict[str, float], state) -> None:
    """The main process writes the checkpoint (weights and optimizer are the same on every process);
    each other process's RNG state goes into it as rng-rank{r}.pt, so every process resumes exactly.
    `state`: accelerate's PartialState."""
    if state.num_processes == 1:
        save_checkpoint(ckpt_root, step, roles, optimizer, scheduler, kl_ctl, generator, config_hash, metrics)
        return
    from accelerate.utils import gather_object

    buf = io.BytesIO()  # serialised here: all_gather_object cannot unpickle tensors it sent itself
    torch.save(_rng_state(generator), buf)
    rng = gather_object([buf.getvalue()])
    digests = gather_object([weights_digest(trainable_state(roles))])
    if len(set(digests)) != 1:  # a bug in the gradient averaging; the checkpoint would hold rank 0's alone
        raise RuntimeError(f"PPO processes hold different weights after step {step}: {digests}")
    if state.is_main_process:
        log.info("step %d: trained weights identical on all %d processes (sha256 %s)", step, state.num_processes,
                 digests[0][:12])
    if state.is_main_process:
        save_checkpoint(ckpt_root, step, roles, optimizer, scheduler, kl_ctl, generator, config_hash, metrics,
                        rank_rng=rng[1:])
    state.wait_for_everyone()


# ---------------------------------------------------------------------------- find and read


def checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (all three files present), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.glob("step-*"):
        if d.name[5:].isdigit() and (d / "state.json").is_file() and (d / "trainable.safetensors").is_file():
            found.append(d)
    return sorted(found, key=lambda d: int(d.name[5:]))


def latest_resumable(ckpt_root: Path, config_hash: str) -> Path | None:
    """The newest checkpoint of this config that still has its optimizer state, or None.

    Checkpoints are written to step-N.tmp-* and renamed, so a kill mid-write leaves a temp folder
    (skipped with a warning) and the previous checkpoint; a renamed checkpoint whose files do not
    read back whole (damaged on disk) is skipped with a warning too."""
    from rlhf.atomic import file_problem

    for torn in sorted(Path(ckpt_root).glob("step-*.tmp-*")) if Path(ckpt_root).is_dir() else []:
        log.warning("skipping incomplete checkpoint %s (the run was killed while writing it)", torn)
    ours = False  # a checkpoint of this config was found (resumable or not)
    for d in reversed(checkpoint_dirs(ckpt_root)):
        try:
            state = json.loads((d / "state.json").read_text())
        except (json.JSONDecodeError, OSError):
            log.warning("skipping unreadable checkpoint %s", d)
            continue
        ours = ours or state.get("config_hash") == config_hash
        if state.get("config_hash") != config_hash or not (d / "optimizer.pt").is_file():
            continue
        problem = file_problem(d / "trainable.safetensors") or file_problem(d / "optimizer.pt")
        if problem:
            log.warning("skipping damaged checkpoint %s (%s)", d, problem)
            continue
        return d
    if ours:
        log.warning("none of the checkpoints in %s can be resumed from; PPO starts again from step 0", ckpt_root)
    return None


def load_checkpoint(ckpt: Path, roles: Roles, optimizer, scheduler, kl_ctl, generator) -> int:
    """Restore a checkpoint written by save_checkpoint; returns the number of finished steps."""
    from safetensors.torch import load_file

    load_trainable_state(roles, load_file(str(ckpt / "trainable.safetensors")))
    extra = torch.load(ckpt / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"], generator)
    state = json.loads((ckpt / "state.json").read_text())
    kl_ctl.load_state_dict(state["kl_controller"])
    return int(state["step"])

