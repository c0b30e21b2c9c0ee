"""The stage-3 loop: rollout → targets (rewards, KL, advantages; returns for PPO) → `ppo_epochs` ×
mini-batches × micro-batches of clipped policy updates, plus the value updates of PPO's critic.

One loop for every `ppo.algorithm` (ALGORITHMS): what differs between PPO, RLOO, GRPO and
REINFORCE++ (the targets and the policy loss) is algorithms.py. This module owns the order of a
step and the update itself: the scores entering the reward (final_scores), the optimizer and the
gradient steps (ppo_update), and the prompts of each step (prompt_indices, step_prompt_indices).
Around it: checkpoint.py writes and restores the state of a run (resuming from step N and running
to M gives the same weights as an unbroken 0 → M run), distributed.py holds what several processes
share, metrics.py what a step reports and checks.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from rlhf.config import PPOConfig
from rlhf.errors import TrainingDiverged
from rlhf.ppo.advantages import SumAcross, Targets, make_kl_controller, masked_whiten, normalize_scores, one_process_sum
from rlhf.ppo.algorithms import ALGORITHMS, compute_targets, needs_critic, policy_objective
from rlhf.ppo.checkpoint import latest_resumable, load_checkpoint, restore_rank_rng, save_all_processes
from rlhf.ppo.critic_free import repeat_per_prompt
from rlhf.ppo.distributed import (
    ONE_PROCESS,
    Agreement,
    GradientAverager,
    average_metrics,
    mean_across_processes,
    seed_everything,
    sum_across_processes,
)
from rlhf.ppo.losses import value_loss
from rlhf.ppo.metrics import check_finite, health_warnings, step_metrics, write_samples
from rlhf.ppo.roles import Roles
from rlhf.ppo.rollout import Rollout, collect_rollout, response_logprobs, token_values
from rlhf.sampling import left_pad, stop_token_id

__all__ = ["ALGORITHMS", "compute_targets", "final_scores", "ppo_update", "make_optimizer", "prompt_indices",
           "step_prompt_indices", "run_loop"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- scores and targets


def final_scores(raw: torch.Tensor, has_stop: torch.Tensor, ppo: PPOConfig, rm_mean: float,
                 sum_across: SumAcross = one_process_sum, rm_std: float = 1.0) -> torch.Tensor:
    """(B,) scores entering the reward: RM score minus the RM's training mean (docs/ppo.md §10), then the
    missing-stop-token rule (§8), then optional batch whitening (`sum_across`: statistics over
    every process's batch, distributed.sum_across_processes; the default: this batch alone).

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
        every = torch.ones_like(scores, dtype=torch.bool)
        scores = masked_whiten(scores, every, shift_mean=False, sum_across=sum_across)
    return scores


# ---------------------------------------------------------------------------- update


def ppo_update(roles: Roles, rollout: Rollout, targets: Targets, optimizer, scheduler, ppo: PPOConfig,
               generator: torch.Generator, agreement: Agreement = ONE_PROCESS,
               kl_coef: float | None = None) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout, reshuffled each epoch (docs/ppo.md §18); one optimizer
    step per mini-batch, micro-batches accumulate gradients. Returns mean statistics. `agreement`:
    every process checks each loss with the others before its backward (which averages gradients).
    The policy loss is the algorithm's (algorithms.policy_objective); the value loss only with a
    critic. kl_coef: the current β, for GRPO's KL loss term (default ppo.kl_coef)."""
    kl_coef = ppo.kl_coef if kl_coef is None else kl_coef
    B = rollout.response_ids.shape[0]
    mini = B // ppo.num_mini_batches
    micro = min(ppo.micro_batch_size, mini)
    n_micro = mini // micro
    R = rollout.response_ids.shape[1]
    stats: dict[str, list[float]] = {}
    policy_params, value_params = roles.policy_parameters(), roles.value_parameters()
    for _epoch in range(ppo.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for m in range(ppo.num_mini_batches):
            mini_idx = order[m * mini:(m + 1) * mini]
            for k in range(n_micro):
                idx = mini_idx[k * micro:(k + 1) * micro].to(rollout.response_ids.device)
                mb = rollout.select(idx)
                mask = mb.response_mask
                vf = vf_stats = None
                # Each forward and its backward run in one training_pass, with the adapter that built the
                # graph (activation checkpointing recomputes the layers inside backward()).
                if not roles.has_critic:
                    with roles.training_pass("policy"):
                        new_logprobs, _, _ = response_logprobs(roles, mb.input_ids, mb.attention_mask,
                                                               mb.response_ids, ppo.temperature, "policy")
                        pg, pg_stats = policy_objective(new_logprobs, mb, targets, idx, ppo, kl_coef)
                        _backward(pg / n_micro, pg, None, agreement)
                elif roles.value_on_policy:
                    # One forward gives logits and values; the value's gradient stops at the policy's
                    # features, so this joint backward trains the policy with the policy loss alone.
                    with roles.training_pass("policy"):
                        new_logprobs, _, new_values = response_logprobs(roles, mb.input_ids, mb.attention_mask,
                                                                        mb.response_ids, ppo.temperature, "policy",
                                                                        True)
                        pg, pg_stats = policy_objective(new_logprobs, mb, targets, idx, ppo, kl_coef)
                        vf, vf_stats = value_loss(new_values, mb.values, targets.returns[idx], mask, ppo.value_clip)
                        _backward((pg + ppo.vf_coef * vf) / n_micro, pg, vf, agreement)
                else:
                    # Separate adapters, separate graphs: backward each before building the next, so
                    # only one model's activations are alive at a time (the gradients are the same).
                    with roles.training_pass("policy"):
                        new_logprobs, _, _ = response_logprobs(roles, mb.input_ids, mb.attention_mask,
                                                               mb.response_ids, ppo.temperature, "policy")
                        pg, pg_stats = policy_objective(new_logprobs, mb, targets, idx, ppo, kl_coef)
                        _backward(pg / n_micro, pg, None, agreement)
                        del new_logprobs
                    with roles.training_pass("value"):
                        new_values = token_values(roles, mb.input_ids, mb.attention_mask, R)
                        vf, vf_stats = value_loss(new_values, mb.values, targets.returns[idx], mask, ppo.value_clip)
                        _backward(ppo.vf_coef * vf / n_micro, pg, vf, agreement)
                step_stats = {"pg_loss": pg_stats.get("pg_loss", pg), "approxkl": pg_stats["approxkl"],
                              "clipfrac": pg_stats["clipfrac"], "ratio": pg_stats["ratio_mean"]}
                if "kl" in pg_stats:  # GRPO's KL loss term
                    step_stats["kl_loss"] = pg_stats["kl"]
                if vf is not None:
                    step_stats.update(vf_loss=vf, vf_clipfrac=vf_stats["clipfrac"])
                for name, value in step_stats.items():
                    stats.setdefault(name, []).append(value.item())
            torch.nn.utils.clip_grad_norm_(policy_params, ppo.max_grad_norm)
            if value_params:
                torch.nn.utils.clip_grad_norm_(value_params, ppo.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=False)  # the buffers stay where make_optimizer put them
            release_freed_memory()  # once per optimizer step: after every backward cost ~25 % of a step
    return {k: float(np.mean(v)) for k, v in stats.items()}


def allocate_gradients(params: list[torch.nn.Parameter]) -> None:
    """Give each parameter its zeroed gradient buffer now, before any forward pass, to be kept for the
    whole run (ppo_update zeroes it in place rather than freeing it).

    Why: gradients made by each backward land between the pass's activations in glibc's heap and
    live until the optimizer step, so every step splits the heap's free memory at new places and
    it grows: measured on bench/ppo_vs_trl.py's float32 run, the heap reached 3.1 GB while at most
    0.97 GB of it was in use; with the buffers made first and kept, 2.2 GB, and the peak resident
    memory went 3.34 -> 2.81 GB. The values are the same bit for bit: a backward adds its gradient to
    the zeros (x + 0 = x), and every parameter given to the optimizer here gets a gradient before
    every optimizer step, so AdamW never sees a zero that stands for "no gradient". A parameter that
    already has a gradient keeps it."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def release_freed_memory() -> None:
    """Hand memory that PyTorch has freed back to the OS (glibc `malloc_trim`; no-op elsewhere).

    On CPU, activations of every forward pass come from the glibc heap; the sizes vary from pass
    to pass, so freed blocks fragment and resident memory ratchets up across passes (measured:
    3.6 GB peak for one SmolLM2 PPO step, 2.9 GB with a trim after each backward). Called after
    the rollout and once per optimizer step: a trim after every backward made the next pass
    fault its memory back in, 22.0 s per step of bench/ppo_vs_trl.py against 18.3 s once per
    optimizer step, both at 2.03 GB peak (16.7 s and 2.51 GB with no trim)."""
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


def make_optimizer(roles: Roles, ppo: PPOConfig, total_updates: int):
    """AdamW (eps 1e-5, docs/ppo.md §19) with a policy group and, with a critic, a value group; linear
    decay to 0."""
    groups = [{"params": roles.policy_parameters(), "lr": ppo.learning_rate, "name": "policy"}]
    if roles.has_critic:
        groups.append({"params": roles.value_parameters(), "lr": ppo.value_learning_rate or ppo.learning_rate,
                       "name": "value"})
    optimizer = torch.optim.AdamW(groups, eps=ppo.adam_eps, weight_decay=0.0)
    allocate_gradients([p for g in groups for p in g["params"]])
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


def step_prompt_indices(n_prompts: int, ppo: PPOConfig, step: int, seed: int, rank: int = 0,
                        world: int = 1) -> list[int]:
    """This process's prompts at step `step`, each samples_per_prompt (k) times in a row: rollout_batch_size
    indices, prompt-major (prompt p's samples are rows p·k … p·k + k − 1, critic_free's group layout).

    The step's prompts (prompt_indices, prompts_per_step × world of them) are split into consecutive
    shares, one per process, before the repetition: a prompt's k samples are on one process, so the
    group statistics of RLOO and GRPO need no communication. With k = 1 (PPO) this is the plain slice."""
    n = ppo.prompts_per_step
    idx = prompt_indices(n_prompts, n * world, step, seed)[rank * n:(rank + 1) * n]
    return repeat_per_prompt(idx, ppo.samples_per_prompt)


def run_loop(roles: Roles, tokenizer, prompts: list[list[int]], prompt_texts: list[str], ppo: PPOConfig, *, seed: int,
             rm_mean: float, ckpt_root: Path, config_hash: str, metrics_writer, samples_path: Path,
             tracker=None, resume: bool = True, stop_after: int | None = None,
             reward_fn=None, score_suffix: list[int] | None = None, rm_std: float = 1.0) -> dict[str, float]:
    """Run steps of `ppo.algorithm` from the latest checkpoint (or 0) to `ppo.steps` (or `stop_after`,
    for tests). `roles` has a critic exactly when the algorithm trains one (algorithms.needs_critic).

    Under `accelerate launch` every process runs this loop on its own share of the prompts (see
    distributed.py); only the main process writes metrics, samples and checkpoints, and
    the caller gives the others a disabled metrics_writer and no tracker. `reward_fn` replaces the
    reward model's score (see rollout.RewardFn). `rm_mean`, `rm_std`: the RM's score mean and std
    over its training responses (final_scores). Returns the last step's metrics (over all processes)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    if ppo.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {ppo.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    if roles.has_critic != needs_critic(ppo.algorithm):
        raise ValueError(f"algorithm '{ppo.algorithm}' {'trains' if needs_critic(ppo.algorithm) else 'trains no'} "
                         f"critic: build the roles with critic={needs_critic(ppo.algorithm)}")
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
            restore_rank_rng(ckpt, rank, world, seed, start, generator)
        log.info("resuming PPO from %s (step %d of %d)", ckpt, start, ppo.steps)
    device = next(roles.model.parameters()).device
    sum_across, averager, agreement = one_process_sum, None, ONE_PROCESS
    if world > 1:
        sum_across, agreement = sum_across_processes, Agreement(rank, world, sum_across_processes)
        averager = GradientAverager([roles.policy_parameters(), roles.value_parameters()], optimizer)
    stop_id = stop_token_id(ppo.stop_token, tokenizer)
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
            # This process's share of the step's prompts, k samples each: rollout_batch_size responses
            # per process (docs/ppo.md §25).
            idx = step_prompt_indices(len(prompts), ppo, step, seed, rank, world)
            query_ids, query_mask = left_pad([prompts[i] for i in idx], pad_id, device)
            rollout = collect_rollout(roles, query_ids, query_mask, response_length=ppo.response_length,
                                      temperature=ppo.temperature, stop_id=stop_id, pad_id=pad_id,
                                      micro_batch_size=ppo.micro_batch_size, reward_fn=reward_fn,
                                      score_suffix=score_suffix)
            release_freed_memory()
            check_finite(agreement, scores=rollout.scores, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs)
            scores = final_scores(rollout.scores, rollout.has_stop, ppo, rm_mean, sum_across, rm_std)
            targets = compute_targets(rollout, scores, ppo, kl_ctl.value, sum_across)
            check_finite(agreement, kl=targets.kl, advantages=targets.advantages)
            t1 = time.perf_counter()
            update = ppo_update(roles, rollout, targets, optimizer, scheduler, ppo, generator, agreement, kl_ctl.value)
            t2 = time.perf_counter()
            episode = (step + 1) * ppo.rollout_batch_size * world
            metrics = step_metrics(rollout, targets, update, kl_ctl.value, scheduler.get_last_lr()[0], episode, t1 - t0, t2 - t1)
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
                for warning in health_warnings(metrics, rollout, ppo, (targets.kl * rollout.response_mask).sum(1),
                                               first_step=step == 0, rm_std=rm_std, scores_used=targets.scores):
                    log.warning("step %d: %s", step + 1, warning)
            metrics_writer.write(step + 1, metrics)
            if tracker is not None:
                tracker.log(metrics, step=step + 1)
            if state.is_main_process and ((step + 1) % ppo.sample_every == 0 or step + 1 == end):
                write_samples(samples_path, step + 1, idx, prompt_texts, rollout, tokenizer, tracker)
            if (step + 1) % ppo.save_every == 0 or step + 1 == end:
                save_all_processes(ckpt_root, step + 1, roles, optimizer, scheduler, kl_ctl, generator, config_hash,
                                   metrics, state)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}",
                            len=f"{metrics['response/length_mean']:.0f}")
    finally:
        if averager is not None:
            averager.remove()
    return metrics
