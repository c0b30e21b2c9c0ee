"""What a PPO step reports and checks: the metric set, the health warnings, the finiteness checks
(NaN or inf stops the run with TrainingDiverged, every process alike) and the samples file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf.config import GROUP_ALGORITHMS, PPOConfig
from rlhf.errors import TrainingDiverged
from rlhf.ppo.advantages import Targets, masked_mean
from rlhf.ppo.distributed import ONE_PROCESS, Agreement
from rlhf.ppo.losses import explained_variance
from rlhf.ppo.rollout import Rollout

SFT_EOS_RATE_WARN = 0.5  # below this share of SFT responses reaching the stop token, the missing-EOS rule dominates


def step_metrics(rollout: Rollout, targets: Targets, update: dict[str, float], kl_coef: float, lr: float, episode: int,
                 rollout_s: float, update_s: float) -> dict[str, float]:
    """The metric set (docs/ppo.md §22) for one step (names stable for W&B), the same names for every algorithm
    where the quantity is the same. Only with a critic (PPO): loss/value, value/clipfrac,
    value/explained_variance. Only for GRPO: loss/kl, the mean k3 KL per token of its loss term."""
    mask = rollout.response_mask
    lengths = mask.sum(1).float()
    kl_per_response = (targets.kl * mask).sum(1)
    non_score = targets.non_score_rewards.sum(1)
    generated = float(lengths.sum())
    metrics = {
        "objective/scores": rollout.scores.mean().item(),
        "objective/scores_used": targets.scores.mean().item(),
        "objective/kl": kl_per_response.mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (targets.scores + non_score).mean().item(),
        "objective/entropy": masked_mean(rollout.entropy, mask).item(),
        "objective/kl_coef": kl_coef,
        "policy/approxkl": update["approxkl"],
        "policy/clipfrac": update["clipfrac"],
        "policy/ratio_mean": update["ratio"],
        "loss/policy": update["pg_loss"],
    }
    if "kl_loss" in update:
        metrics["loss/kl"] = update["kl_loss"]
    if targets.returns is not None and rollout.values is not None:
        metrics.update({
            "loss/value": update["vf_loss"],
            "value/clipfrac": update["vf_clipfrac"],
            "value/explained_variance": float(explained_variance(rollout.values, targets.returns, mask)),
        })
    return metrics | {
        "response/length_mean": lengths.mean().item(),
        "response/eos_fraction": rollout.has_stop.float().mean().item(),
        "lr": lr,
        "episode": episode,
        "time/rollout_s": rollout_s,
        "time/update_s": update_s,
        "throughput/tokens_per_s": generated / max(rollout_s + update_s, 1e-9),
    }


# ---------------------------------------------------------------------------- health


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
                    first_step: bool = False, rm_std: float = 1.0,
                    scores_used: torch.Tensor | None = None) -> list[str]:
    """Warnings for a step's metrics (docs/ppo.md §24); NaN/inf are raised separately.

    kl_per_response: (B,) summed KL of each response. "Negative beyond noise" means the batch mean
    is below -3 standard errors (k1 is unbiased but noisy per sample; a clearly negative mean
    points at mismatched log-probs, e.g. dropout or different temperatures). `first_step`: the
    rollout is a fresh run's first, the SFT policy's own (sft_eos_warning replaces the plain
    no-stop-token warning there). `scores_used`: (B,) the scores entering the reward (groups of
    samples_per_prompt contiguous); for rloo and grpo, a step where every prompt's samples scored
    alike has no learning signal (their baselines cancel it), which is worth a line."""
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
    if ppo.algorithm in GROUP_ALGORITHMS and scores_used is not None:
        groups = scores_used.reshape(-1, ppo.samples_per_prompt)
        if bool((groups == groups[:, :1]).all()):
            warnings.append(f"every prompt's {ppo.samples_per_prompt} samples got the same score (when none reaches the "
                            "stop token, all get missing_eos_score): the group baseline leaves no learning signal")
    responses = {tuple(r[m].tolist()) for r, m in zip(rollout.response_ids, rollout.response_mask)}
    if len(responses) == 1 and rollout.response_ids.shape[0] > 1:
        warnings.append("every response in the batch is identical: the policy may have collapsed")
    return warnings


def check_finite(agreement: Agreement = ONE_PROCESS, **values: torch.Tensor) -> None:
    """Raise TrainingDiverged, on every process alike, if a value holds NaN or inf on any process."""
    for name, ranks in agreement.nonfinite(values).items():
        if ranks:
            raise TrainingDiverged(f"{name} contains NaN or inf{agreement.where(ranks)}")


# ---------------------------------------------------------------------------- samples


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
