"""The PPO loop: rollout → rewards and advantages → `ppo_epochs` × mini-batches × micro-batches.

Checkpoints (every `save_every` steps, atomic) hold the policy and value adapters, the value
head, the optimizer (two parameter groups: policy and value, each with its own learning rate)
and scheduler, the KL controller, the step (which fixes the data position: the prompt order is a
pure function of seed and step), and every RNG state. Resuming from step N and running to M
gives the same weights as an unbroken 0 → M run.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rlhf.config import PPOConfig
from rlhf.errors import UserError
from rlhf.ppo.advantages import (
    WHITEN_EPS,
    gae,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    normalize_scores,
    per_token_rewards,
    whiten_advantages,
)
from rlhf.ppo.losses import explained_variance, policy_loss, value_loss
from rlhf.ppo.rollout import Rollout, collect_rollout, left_pad, response_logprobs, token_values
from rlhf.ppo.roles import Roles
from rlhf.atomic import save_atomically

log = logging.getLogger(__name__)

RANK_SEED_STRIDE = 100003  # per-process seed = seed + rank * stride (PPO.md item 15)


class TrainingDiverged(UserError):
    """NaN or inf in the loss, KL or scores: the run stops, keeping the last good checkpoint."""

    exit_code = 3


# ---------------------------------------------------------------------------- rewards and advantages


# whiten(x, mask, shift_mean) -> x whitened over its valid positions (see masked_whiten)
Whiten = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclass
class Advantages:
    """Per-token training targets of a rollout, each (B, R) float32 (0 where masked)."""

    advantages: torch.Tensor
    returns: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    non_score_rewards: torch.Tensor
    scores: torch.Tensor  # (B,) the scores used in the reward: centred, EOS-penalised, optionally whitened


def final_scores(raw: torch.Tensor, has_stop: torch.Tensor, ppo: PPOConfig, rm_mean: float,
                 whiten: Whiten | None = None, rm_std: float = 1.0) -> torch.Tensor:
    """(B,) scores entering the reward: RM score minus the RM's training mean (PPO.md item 9), then the
    missing-stop-token rule (item 6), then optional batch whitening (`whiten`: statistics over every
    process's batch, see cross_process_whiten; None: this batch alone).

    raw, has_stop: (B,). The missing-EOS rule is in units of `rm_std`, the RM's score std over its
    training responses: a response without the stop token scores missing_eos_score · rm_std (on the
    centred scale), or loses missing_eos_penalty · rm_std. OpenAI's lm-human-preferences normalised
    the RM to std 1 on policy samples, which is where N+ set −1; scaled so, −1 weighs the same against
    a weak RM whose scores spread ±0.3 as against a strong one."""
    scores = normalize_scores(raw, rm_mean)
    if ppo.stop_token is not None:
        if ppo.missing_eos_penalty is not None:
            scores = torch.where(has_stop, scores, scores - ppo.missing_eos_penalty * rm_std)
        elif ppo.missing_eos_score is not None:
            scores = torch.where(has_stop, scores, torch.full_like(scores, ppo.missing_eos_score * rm_std))
    if ppo.whiten_scores:
        if whiten is None:
            scores = normalize_scores(scores, 0.0, whiten=True)
        else:
            scores = whiten(scores, torch.ones_like(scores, dtype=torch.bool), False)
    return scores


def compute_advantages(rollout: Rollout, scores: torch.Tensor, ppo: PPOConfig, kl_coef: float,
                       whiten: Whiten | None = None) -> Advantages:
    """`whiten`: advantage whitening with statistics over every process's batch (cross_process_whiten);
    None whitens over this batch alone."""
    mask = rollout.response_mask
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, ppo.kl_estimator, mask=mask)
    rewards, non_score = per_token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = gae(rewards, rollout.values, mask, gamma=ppo.gamma, lam=ppo.lam)
    advantages = whiten_advantages(advantages, mask) if whiten is None else whiten(advantages, mask, True)
    return Advantages(advantages, returns, rewards, kl, non_score, scores)


# ---------------------------------------------------------------------------- update


@dataclass(frozen=True)
class Agreement:
    """This process's place among the processes of a run, for the checks they must decide together.

    A process that raised alone (e.g. on a NaN only it saw) would leave the others waiting forever
    in their next collective (gradient averaging, whitening); so every finiteness check is summed
    over the processes first, and all of them raise, at the same point, or none does."""

    rank: int = 0
    world: int = 1
    sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None  # needed when world > 1

    def nonfinite(self, values: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """For each named tensor, the ranks of the processes where it holds NaN or inf (all processes
        get the same answer; one small all-reduce when world > 1)."""
        device = next(iter(values.values())).device
        flags = torch.zeros((len(values), self.world), dtype=torch.float32, device=device)
        for i, value in enumerate(values.values()):
            flags[i, self.rank] = 0.0 if bool(torch.isfinite(value).all()) else 1.0
        if self.world > 1:
            flags = self.sum_across(flags)
        return {name: [r for r in range(self.world) if flags[i, r] > 0] for i, name in enumerate(values)}

    def where(self, ranks: list[int]) -> str:
        """'' for one process, else ' on process 1 of 2' (for messages every process prints alike)."""
        if self.world == 1:
            return ""
        return f" on process{'es' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {self.world}"


ONE_PROCESS = Agreement()


def ppo_update(roles: Roles, rollout: Rollout, adv: Advantages, optimizer, scheduler, ppo: PPOConfig,
               generator: torch.Generator, agreement: Agreement = ONE_PROCESS) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout, reshuffled each epoch (PPO.md item 13); one optimizer
    step per mini-batch, micro-batches accumulate gradients. Returns mean statistics. `agreement`:
    every process checks each loss with the others before its backward (which averages gradients)."""
    B = rollout.response_ids.shape[0]
    mini = B // ppo.num_mini_batches
    micro = min(ppo.micro_batch_size, mini)
    n_micro = mini // micro
    R = rollout.response_ids.shape[1]
    stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "approxkl", "clipfrac", "vf_clipfrac", "ratio")}
    policy_params, value_params = roles.policy_parameters(), roles.value_parameters()
    for _epoch in range(ppo.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for m in range(ppo.num_mini_batches):
            mini_idx = order[m * mini:(m + 1) * mini]
            for k in range(n_micro):
                idx = mini_idx[k * micro:(k + 1) * micro].to(rollout.response_ids.device)
                mb = rollout.select(idx)
                mask = mb.response_mask
                adv_mb, ret_mb = adv.advantages[idx], adv.returns[idx]
                if roles.value_on_policy:
                    # One forward gives logits and values; the value's gradient stops at the policy's
                    # features, so this joint backward trains the policy with the policy loss alone.
                    new_logprobs, _, new_values = response_logprobs(roles, mb.input_ids, mb.attention_mask,
                                                                    mb.response_ids, ppo.temperature, "policy", True)
                    pg, pg_stats = policy_loss(new_logprobs, mb.logprobs, adv_mb, mask, ppo.clip_eps)
                    vf, vf_stats = value_loss(new_values, mb.values, ret_mb, mask, ppo.value_clip)
                    _backward((pg + ppo.vf_coef * vf) / n_micro, pg, vf, agreement)
                else:
                    # Separate adapters, separate graphs: backward each before building the next, so
                    # only one model's activations are alive at a time (the gradients are the same).
                    new_logprobs, _, _ = response_logprobs(roles, mb.input_ids, mb.attention_mask, mb.response_ids,
                                                           ppo.temperature, "policy")
                    pg, pg_stats = policy_loss(new_logprobs, mb.logprobs, adv_mb, mask, ppo.clip_eps)
                    _backward(pg / n_micro, pg, None, agreement)
                    del new_logprobs
                    new_values = token_values(roles, mb.input_ids, mb.attention_mask, R)
                    vf, vf_stats = value_loss(new_values, mb.values, ret_mb, mask, ppo.value_clip)
                    _backward(ppo.vf_coef * vf / n_micro, pg, vf, agreement)
                stats["pg_loss"].append(pg.item())
                stats["vf_loss"].append(vf.item())
                stats["approxkl"].append(pg_stats["approxkl"].item())
                stats["clipfrac"].append(pg_stats["clipfrac"].item())
                stats["ratio"].append(pg_stats["ratio_mean"].item())
                stats["vf_clipfrac"].append(vf_stats["clipfrac"].item())
            torch.nn.utils.clip_grad_norm_(policy_params, ppo.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(value_params, ppo.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return {k: float(np.mean(v)) for k, v in stats.items()}


def release_freed_memory() -> None:
    """Hand memory that PyTorch has freed back to the OS (glibc `malloc_trim`; no-op elsewhere).

    On CPU, activations of every forward pass come from the glibc heap; the sizes vary from pass
    to pass, so freed blocks fragment and resident memory ratchets up across passes (measured:
    3.6 GB peak for one SmolLM2 PPO step, 2.9 GB with a trim after each backward, at no
    measurable cost in time)."""
    if torch.cuda.is_available():
        return
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _backward(loss: torch.Tensor, pg: torch.Tensor, vf: torch.Tensor | None, agreement: Agreement = ONE_PROCESS) -> None:
    bad = agreement.nonfinite({"loss": loss})["loss"]
    if bad and agreement.world == 1:
        vf_text = "" if vf is None else f", value {vf.item()}"
        raise TrainingDiverged(f"PPO loss is {loss.item()} (policy {pg.item()}{vf_text})")
    if bad:
        raise TrainingDiverged(f"PPO loss is NaN or inf{agreement.where(bad)}")
    loss.backward()
    release_freed_memory()


def make_optimizer(roles: Roles, ppo: PPOConfig, total_updates: int):
    """AdamW (eps 1e-5, PPO.md item 14) with a policy group and a value group; linear decay to 0."""
    groups = [{"params": roles.policy_parameters(), "lr": ppo.learning_rate, "name": "policy"},
              {"params": roles.value_parameters(), "lr": ppo.value_learning_rate or ppo.learning_rate, "name": "value"}]
    optimizer = torch.optim.AdamW(groups, eps=ppo.adam_eps, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / max(1, total_updates)))
    return optimizer, scheduler


# ---------------------------------------------------------------------------- data order


def prompt_indices(n_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The prompts of step `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch).

    A pure function of the step, so resuming needs no data-loader state."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
        take = min(batch_size - len(out), n_prompts - offset)
        out.extend(order[offset:offset + take])
    return out


# ---------------------------------------------------------------------------- checkpoints


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


def trainable_state(roles: Roles) -> dict[str, torch.Tensor]:
    """Every trained tensor: policy and value LoRA weights and the value head."""
    state = {f"model.{n}": p.detach().cpu().clone() for n, p in roles.model.named_parameters() if p.requires_grad}
    state.update({f"value_head.{n}": p.detach().cpu().clone() for n, p in roles.value_head.named_parameters()})
    return state


def load_trainable_state(roles: Roles, state: dict[str, torch.Tensor]) -> None:
    params = dict(roles.model.named_parameters())
    head = dict(roles.value_head.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            kind, name = key.split(".", 1)
            target = params[name] if kind == "model" else head[name]
            target.copy_(value)


RESUMABLE_CHECKPOINTS = 2  # the newest checkpoints that keep their optimizer state


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


def checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (all three files present), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.glob("step-*"):
        if d.name[5:].isdigit() and (d / "state.json").is_file() and (d / "trainable.safetensors").is_file():
            found.append(d)
    return sorted(found, key=lambda d: int(d.name[5:]))


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


# ---------------------------------------------------------------------------- health


SFT_EOS_RATE_WARN = 0.5  # below this share of SFT responses reaching the stop token, the missing-EOS rule dominates


def sft_eos_warning(eos_rate: float, ppo: PPOConfig, rm_std: float = 1.0) -> str | None:
    """The first-step warning (a fresh run's first rollout is the SFT policy's own): with fewer than
    half of the responses reaching the stop token within response_length, most rewards are the
    missing-EOS score, not the RM's judgement, and PPO mostly learns to stop earlier. None when
    the share is at least SFT_EOS_RATE_WARN or there is no stop token."""
    if ppo.stop_token is None or eos_rate >= SFT_EOS_RATE_WARN:
        return None
    if ppo.missing_eos_penalty is not None:
        rule = (f"the rest lose missing_eos_penalty × RM score_std = {ppo.missing_eos_penalty * rm_std:.3g}, "
                "which then dominates the reward (PPO learns mostly to stop earlier)")
    elif ppo.missing_eos_score is not None:
        rule = (f"the rest score missing_eos_score × RM score_std = {ppo.missing_eos_score * rm_std:+.3g}, "
                "which then dominates the reward (PPO learns mostly to stop earlier)")
    else:
        rule = "the rest are scored cut off (missing_eos_score: null), so the reward mostly judges unfinished answers"
    return (f"only {eos_rate:.0%} of the SFT policy's responses reach the stop token within "
            f"ppo.response_length={ppo.response_length} tokens: {rule}; raise ppo.response_length "
            f"(e.g. to {2 * ppo.response_length})")


def health_warnings(metrics: dict[str, float], rollout: Rollout, ppo: PPOConfig, kl_per_response: torch.Tensor,
                    first_step: bool = False, rm_std: float = 1.0) -> list[str]:
    """Warnings for a step's metrics (PPO.md, Health); NaN/inf are raised separately.

    kl_per_response: (B,) summed KL of each response. "Negative beyond noise" means the batch mean
    is below -3 standard errors (k1 is unbiased but noisy per sample; a clearly negative mean
    points at mismatched log-probs, e.g. dropout or different temperatures). `first_step`: the
    rollout is a fresh run's first, the SFT policy's own (sft_eos_warning replaces the plain
    no-stop-token warning there)."""
    warnings = []
    B = kl_per_response.numel()
    noise = 3 * kl_per_response.std().item() / B**0.5 if B > 1 else 0.0
    if metrics["objective/kl"] < -max(noise, 1e-3):
        warnings.append(f"KL is negative ({metrics['objective/kl']:.3f}): the policy and reference log-probs disagree beyond noise")
    if metrics["objective/kl"] > ppo.kl_warn_bound:
        warnings.append(f"KL {metrics['objective/kl']:.2f} exceeds kl_warn_bound={ppo.kl_warn_bound}; consider a larger kl_coef")
    sft_eos = sft_eos_warning(metrics["response/eos_fraction"], ppo, rm_std) if first_step else None
    if sft_eos is not None:
        warnings.append(sft_eos)
    elif ppo.stop_token is not None and metrics["response/eos_fraction"] == 0.0:
        warnings.append("no response ended with the stop token; raise response_length or check stop_token")
    responses = {tuple(r[m].tolist()) for r, m in zip(rollout.response_ids, rollout.response_mask)}
    if len(responses) == 1 and rollout.response_ids.shape[0] > 1:
        warnings.append("every response in the batch is identical: the policy may have collapsed")
    return warnings


def check_finite(agreement: Agreement = ONE_PROCESS, **values: torch.Tensor) -> None:
    """Raise TrainingDiverged, on every process alike, if a value holds NaN or inf on any process."""
    for name, ranks in agreement.nonfinite(values).items():
        if ranks:
            raise TrainingDiverged(f"{name} contains NaN or inf{agreement.where(ranks)}")


def step_metrics(rollout: Rollout, adv: Advantages, update: dict[str, float], kl_coef: float, lr: float, episode: int,
                 rollout_s: float, update_s: float) -> dict[str, float]:
    """The PPO.md metric set for one step (names stable for W&B)."""
    mask = rollout.response_mask
    lengths = mask.sum(1).float()
    kl_per_response = (adv.kl * mask).sum(1)
    non_score = adv.non_score_rewards.sum(1)
    generated = float(lengths.sum())
    return {
        "objective/scores": rollout.scores.mean().item(),
        "objective/scores_used": adv.scores.mean().item(),
        "objective/kl": kl_per_response.mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (adv.scores + non_score).mean().item(),
        "objective/entropy": masked_mean(rollout.entropy, mask).item(),
        "objective/kl_coef": kl_coef,
        "policy/approxkl": update["approxkl"],
        "policy/clipfrac": update["clipfrac"],
        "policy/ratio_mean": update["ratio"],
        "loss/policy": update["pg_loss"],
        "loss/value": update["vf_loss"],
        "value/clipfrac": update["vf_clipfrac"],
        "value/explained_variance": float(explained_variance(rollout.values, adv.returns, mask)),
        "response/length_mean": lengths.mean().item(),
        "response/eos_fraction": rollout.has_stop.float().mean().item(),
        "lr": lr,
        "episode": episode,
        "time/rollout_s": rollout_s,
        "time/update_s": update_s,
        "throughput/tokens_per_s": generated / max(rollout_s + update_s, 1e-9),
    }


def seed_everything(seed: int, rank: int = 0) -> int:
    process_seed = seed + rank * RANK_SEED_STRIDE
    random.seed(process_seed)
    np.random.seed(process_seed % (2**32))
    torch.manual_seed(process_seed)
    return process_seed


# ---------------------------------------------------------------------------- several processes
#
# Data parallel without a wrapper: every process draws its own prompts (a disjoint slice of the
# step's prompts) and samples with its own seed, then trains on its own rollout; gradients are
# averaged across processes before each optimizer step, so the processes, started from the same
# initial adapters, hold the same weights throughout. Whitening uses the statistics of all the
# processes' batches, metrics are averaged, the KL controller sees the global KL, and only the main
# process writes files. DDP cannot wrap the model: the policy and the value are two adapters of one
# module, trained by separate backward passes (see ppo_update), and DDP expects one forward and one
# backward per step. The collectives are accelerate's (gloo on CPUs, NCCL on GPUs).


def sum_across_processes(t: torch.Tensor) -> torch.Tensor:
    from accelerate.utils import reduce

    return reduce(t, reduction="sum")


def mean_across_processes(t: torch.Tensor) -> torch.Tensor:
    from accelerate.utils import reduce

    return reduce(t, reduction="mean")


def global_masked_moments(x: torch.Tensor, mask: torch.Tensor,
                          sum_across: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of `x` over the valid positions of every process's batch.

    x, mask: (B, T) (any shape) this process's values and valid positions. `sum_across` sums a
    tensor over the processes (the identity for one process). Two passes like masked_var: the
    global mean first, then the summed squared deviations from it; with fewer than two valid values
    in all, the variance is 0. Returns two 0-dim tensors."""
    m = mask.bool()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    n, total = sum_across(torch.stack([m.sum().to(x.dtype), torch.where(m, x, zero).sum()]))
    mean = total / n.clamp(min=1)
    squares = sum_across(torch.where(m, (x - mean) ** 2, zero).sum())
    var = torch.where(n > 1, squares / (n - 1).clamp(min=1), zero)
    return mean, var


def whiten_with(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    """masked_whiten with given statistics: (x - mean) / sqrt(var + eps) (+ mean unless shift_mean) on valid
    positions, 0 elsewhere. x, mask: (B, T); mean, var: 0-dim."""
    m = mask.bool()
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=x.device))


def cross_process_whiten(sum_across: Callable[[torch.Tensor], torch.Tensor] = sum_across_processes) -> Whiten:
    """A Whiten for final_scores/compute_advantages that uses every process's batch (global_masked_moments)."""

    def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool) -> torch.Tensor:
        mean, var = global_masked_moments(x, mask, sum_across)
        return whiten_with(x, mask, mean, var, shift_mean)

    return whiten


class GradientAverager:
    """Average the gradients of groups of parameters across processes after each backward pass.

    ppo_update accumulates gradients over micro-batches, one backward per adapter (or one joint
    backward with value_head_on_policy), then clips and steps. A post-accumulate-grad hook on each
    parameter notes its arrival; when the last parameter of a group has its gradient, the group's
    gradients are averaged in one flat all-reduce. Averaging after every backward equals averaging
    once before clipping, because the mean is linear: mean_r(ḡ + g_r) = ḡ + mean_r(g_r) for an
    already averaged ḡ; so clipping and the step see the same averaged gradient on every process.
    An optimizer step with a group half-arrived is a bug (a parameter outside the graph) and raises."""

    def __init__(self, groups: list[list[torch.nn.Parameter]], optimizer,
                 mean_across: Callable[[torch.Tensor], torch.Tensor] = mean_across_processes):
        self.mean_across = mean_across
        self.groups = [list(g) for g in groups if g]
        self.arrived: list[set[int]] = [set() for _ in self.groups]
        self.handles = []
        for gi, group in enumerate(self.groups):
            for p in group:
                self.handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._arrive, gi)))
        self.handles.append(optimizer.register_step_pre_hook(self._check_complete))

    def _arrive(self, gi: int, param: torch.nn.Parameter) -> None:
        self.arrived[gi].add(id(param))
        if len(self.arrived[gi]) == len(self.groups[gi]):
            self.arrived[gi].clear()
            self.average(self.groups[gi])

    def average(self, params: list[torch.nn.Parameter]) -> None:
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        with torch.no_grad():
            for grads in buckets.values():
                flat = self.mean_across(torch.cat([g.reshape(-1) for g in grads]))
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

    def _check_complete(self, optimizer, args, kwargs) -> None:
        waiting = sum(len(a) for a in self.arrived)
        if waiting:
            raise RuntimeError(f"{waiting} parameters received gradients that were not averaged across processes "
                               "(their group did not complete a backward pass)")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def average_metrics(metrics: dict[str, float], mean_across: Callable[[torch.Tensor], torch.Tensor],
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Every metric averaged over the processes (exact for per-response means: every process has the
    same number of responses; a mean of per-process means for per-token ones)."""
    names = list(metrics)
    values = mean_across(torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64, device=device))
    return dict(zip(names, values.tolist()))


def weights_digest(roles: Roles) -> str:
    """sha256 of every trained tensor (trainable_state): equal on every process of a data-parallel run."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(trainable_state(roles).items()):
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rank_rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rng-rank{rank}.pt"


def _restore_rank_rng(ckpt: Path, rank: int, world_size: int, seed: int, start: int, generator: torch.Generator) -> None:
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


def run_loop(roles: Roles, tokenizer, prompts: list[list[int]], prompt_texts: list[str], ppo: PPOConfig, *, seed: int,
             rm_mean: float, ckpt_root: Path, config_hash: str, metrics_writer, samples_path: Path,
             tracker=None, resume: bool = True, stop_after: int | None = None,
             reward_fn=None, score_suffix: list[int] | None = None, rm_std: float = 1.0) -> dict[str, float]:
    """Run PPO steps from the latest checkpoint (or 0) to `ppo.steps` (or `stop_after`, for tests).

    Under `accelerate launch` every process runs this loop on its own share of the prompts (see
    "several processes" above); only the main process writes metrics, samples and checkpoints, and
    the caller gives the others a disabled metrics_writer and no tracker. `reward_fn` replaces the
    reward model's score (see rollout.RewardFn). `rm_mean`, `rm_std`: the RM's score mean and std
    over its training responses (final_scores). Returns the last step's metrics (over all processes)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState()
    rank, world = state.process_index, state.num_processes
    process_seed = seed_everything(seed, rank)
    generator = torch.Generator().manual_seed(process_seed)
    total_updates = ppo.steps * ppo.ppo_epochs * ppo.num_mini_batches
    optimizer, scheduler = make_optimizer(roles, ppo, total_updates)
    kl_ctl = make_kl_controller(ppo.kl_coef, ppo.target_kl if ppo.adaptive_kl else None, ppo.kl_horizon)
    start = 0
    ckpt = latest_resumable(ckpt_root, config_hash) if resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, roles, optimizer, scheduler, kl_ctl, generator)
        if world > 1:
            _restore_rank_rng(ckpt, rank, world, seed, start, generator)
        log.info("resuming PPO from %s (step %d of %d)", ckpt, start, ppo.steps)
    device = next(roles.model.parameters()).device
    whiten, averager, agreement = None, None, ONE_PROCESS
    if world > 1:
        agreement = Agreement(rank, world, sum_across_processes)
        whiten = cross_process_whiten()
        averager = GradientAverager([roles.policy_parameters(), roles.value_parameters()], optimizer)
    stop_id = None
    if ppo.stop_token is not None:
        stop_id = tokenizer.eos_token_id if ppo.stop_token == "eos" else tokenizer.convert_tokens_to_ids(ppo.stop_token)
    pad_id = tokenizer.pad_token_id
    end = ppo.steps if stop_after is None else min(ppo.steps, stop_after)
    # A run resumed at its last step (killed during the final export) trains no step: its final
    # metrics are the ones its checkpoint recorded.
    metrics: dict[str, float] = json.loads((ckpt / "state.json").read_text())["metrics"] if ckpt is not None else {}
    bar = tqdm(range(start, end), initial=start, total=ppo.steps, desc="PPO", unit="step", dynamic_ncols=True,
               disable=not state.is_main_process)
    try:
        for step in bar:
            t0 = time.perf_counter()
            # This process's slice of the step's prompts: rollout_batch_size is per process (PPO.md).
            idx = prompt_indices(len(prompts), ppo.rollout_batch_size * world, step, seed)
            idx = idx[rank * ppo.rollout_batch_size:(rank + 1) * ppo.rollout_batch_size]
            query_ids, query_mask = left_pad([prompts[i] for i in idx], pad_id, device)
            rollout = collect_rollout(roles, query_ids, query_mask, response_length=ppo.response_length,
                                      temperature=ppo.temperature, stop_id=stop_id, pad_id=pad_id,
                                      micro_batch_size=ppo.micro_batch_size, reward_fn=reward_fn,
                                      score_suffix=score_suffix)
            release_freed_memory()
            check_finite(agreement, scores=rollout.scores, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs)
            scores = final_scores(rollout.scores, rollout.has_stop, ppo, rm_mean, whiten, rm_std)
            adv = compute_advantages(rollout, scores, ppo, kl_ctl.value, whiten)
            check_finite(agreement, kl=adv.kl, advantages=adv.advantages)
            t1 = time.perf_counter()
            update = ppo_update(roles, rollout, adv, optimizer, scheduler, ppo, generator, agreement)
            t2 = time.perf_counter()
            episode = (step + 1) * ppo.rollout_batch_size * world
            kl_coef_used = kl_ctl.value
            metrics = step_metrics(rollout, adv, update, kl_coef_used, scheduler.get_last_lr()[0], episode, t1 - t0, t2 - t1)
            if world > 1:
                tokens_per_s = metrics["throughput/tokens_per_s"]
                metrics = average_metrics(metrics, mean_across_processes, device)
                metrics["episode"] = episode
                metrics["throughput/tokens_per_s"] = tokens_per_s * world  # every process generates at once
            kl_ctl.update(metrics["objective/kl"], ppo.rollout_batch_size * world)
            for name, value in metrics.items():
                if not math.isfinite(value) and name != "value/explained_variance":
                    raise TrainingDiverged(f"{name} is {value} at step {step + 1}")
            if state.is_main_process:
                for warning in health_warnings(metrics, rollout, ppo, (adv.kl * rollout.response_mask).sum(1),
                                               first_step=step == 0, rm_std=rm_std):
                    log.warning("step %d: %s", step + 1, warning)
            metrics_writer.write(step + 1, metrics)
            if tracker is not None:
                tracker.log(metrics, step=step + 1)
            if state.is_main_process and ((step + 1) % ppo.sample_every == 0 or step + 1 == end):
                write_samples(samples_path, step + 1, idx, prompt_texts, rollout, tokenizer, tracker)
            if (step + 1) % ppo.save_every == 0 or step + 1 == end:
                _save_all_processes(ckpt_root, step + 1, roles, optimizer, scheduler, kl_ctl, generator, config_hash,
                                    metrics, state)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}",
                            len=f"{metrics['response/length_mean']:.0f}")
    finally:
        if averager is not None:
            averager.remove()
    return metrics


def _save_all_processes(ckpt_root: Path, step: int, roles: Roles, optimizer, scheduler, kl_ctl, generator,
                        config_hash: str, metrics: dict[str, float], state) -> None:
    """The main process writes the checkpoint (weights and optimizer are the same on every process);
    each other process's RNG state goes into it as rng-rank{r}.pt, so every process resumes exactly."""
    if state.num_processes == 1:
        save_checkpoint(ckpt_root, step, roles, optimizer, scheduler, kl_ctl, generator, config_hash, metrics)
        return
    import io

    from accelerate.utils import gather_object

    buf = io.BytesIO()  # serialised here: all_gather_object cannot unpickle tensors it sent itself
    torch.save(_rng_state(generator), buf)
    rng = gather_object([buf.getvalue()])
    digests = gather_object([weights_digest(roles)])
    if len(set(digests)) != 1:  # a bug in the gradient averaging; the checkpoint would hold rank 0's alone
        raise RuntimeError(f"PPO processes hold different weights after step {step}: {digests}")
    if state.is_main_process:
        log.info("step %d: trained weights identical on all %d processes (sha256 %s)", step, state.num_processes,
                 digests[0][:12])
    if state.is_main_process:
        save_checkpoint(ckpt_root, step, roles, optimizer, scheduler, kl_ctl, generator, config_hash, metrics,
                        rank_rng=rng[1:])
    state.wait_for_everyone()


def write_samples(path: Path, step: int, idx: list[int], prompt_texts: list[str], rollout: Rollout, tokenizer, tracker) -> None:
    rows = []
    for row, i in enumerate(idx):
        ids = rollout.response_ids[row][rollout.response_mask[row]]
        rows.append({"step": step, "prompt": prompt_texts[i], "response": tokenizer.decode(ids, skip_special_tokens=True),
                     "score": round(rollout.scores[row].item(), 4), "has_stop": bool(rollout.has_stop[row])})
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if tracker is not None:
        tracker.log_samples(rows, step)


def clear_checkpoints(ckpt_root: Path) -> None:
    shutil.rmtree(ckpt_root, ignore_errors=True)

