"""What differs between the stage-3 algorithms (`ppo.algorithm`): the targets of a rollout and the
policy loss. Everything else (sampling, scores, the order of a step, checkpoints, several
processes, metrics) is the same loop, rlhf.ppo.trainer.

Per step, with the rollout's per-token KL estimate ``KL_t`` (``ppo.kl_estimator``) and the final
scores (trainer.final_scores: centred, missing-EOS rule):

- ppo: per-token reward −β·KL_t plus the score at the last token, GAE over the critic's values,
  advantages whitened over the batch (all processes); token-level clipped loss, plus the value loss
  (trainer.ppo_update).
- rloo: reward = score − β·Σ_t KL_t, leave-one-out baseline within the prompt's k samples; one
  clipped ratio per response (losses.sequence_policy_loss).
- grpo: advantage = (score − group mean) / (group std + 1e-4), or score − group mean with dr_grpo;
  token-level clipped loss plus β·k3 KL to the reference as a loss term (losses.grpo_policy_loss),
  averaged per response (GRPO) or summed ÷ (responses × response_length) (Dr. GRPO).
- reinforce_pp: per-token reward −β·KL_t plus the (optionally group-baselined) score, return-to-go,
  whitened over the whole batch (all processes); PPO's token-level clipped loss.

Plain functions dispatching on the algorithm's name; the math is in advantages.py, critic_free.py
and losses.py.
"""

from __future__ import annotations

import torch

from rlhf.config import PPOConfig
from rlhf.ppo.advantages import (
    SumAcross,
    Targets,
    gae,
    kl_penalty,
    one_process_sum,
    per_token_rewards,
    whiten_advantages,
)
from rlhf.ppo.critic_free import (
    grpo_advantages,
    kl_penalised_scores,
    reinforce_pp_advantages,
    rloo_advantages,
    token_advantages,
)
from rlhf.ppo.losses import grpo_policy_loss, policy_loss, sequence_policy_loss
from rlhf.ppo.rollout import Rollout

ALGORITHMS = ("ppo", "rloo", "grpo", "reinforce_pp")  # every ppo.algorithm the loop trains


def needs_critic(algorithm: str) -> bool:
    """PPO trains a value model; the others are critic-free (no value adapter, no value head)."""
    return algorithm == "ppo"


def compute_targets(rollout: Rollout, scores: torch.Tensor, ppo: PPOConfig, kl_coef: float,
                    sum_across: SumAcross = one_process_sum) -> Targets:
    """The rollout's per-token KL, rewards and advantages (and PPO's returns) for `ppo.algorithm`.

    scores: (B,) final scores, groups of samples_per_prompt contiguous. kl_coef: the current β (the
    KL controller's). `sum_across`: the batch statistics (PPO's and REINFORCE++'s whitening) over
    every process's batch (distributed.sum_across_processes); the default is this batch alone. The
    group statistics of RLOO and GRPO need none: a prompt's samples are on one process.

    `rewards` and `non_score_rewards` are the per-token form of the KL-penalised reward for every
    algorithm, so objective/non_score_reward and objective/rlhf_reward mean the same everywhere; for
    grpo, whose KL is a loss term, they report that term's value at the rollout."""
    mask = rollout.response_mask
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, ppo.kl_estimator, mask=mask)
    rewards, non_score = per_token_rewards(scores, kl, mask, kl_coef)
    k = ppo.samples_per_prompt
    if ppo.algorithm == "ppo":
        advantages, returns = gae(rewards, rollout.values, mask, gamma=ppo.gamma, lam=ppo.lam)
        return Targets(whiten_advantages(advantages, mask, sum_across), returns, rewards, kl, non_score, scores)
    if ppo.algorithm == "reinforce_pp":
        out = reinforce_pp_advantages(scores, kl, mask, kl_coef, gamma=ppo.gamma, k=k,
                                      group_baseline=ppo.reinforce_pp_baseline, sum_across=sum_across)
        return Targets(out.advantages, None, out.rewards, kl, out.non_score_rewards, scores)
    if ppo.algorithm == "rloo":
        per_response = rloo_advantages(kl_penalised_scores(scores, kl, mask, kl_coef), k)
    elif ppo.algorithm == "grpo":
        per_response = grpo_advantages(scores, k, scale_by_std=not ppo.dr_grpo)
    else:
        raise ValueError(f"unknown algorithm {ppo.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    return Targets(token_advantages(per_response, mask), None, rewards, kl, non_score, scores, per_response)


def policy_objective(new_logprobs: torch.Tensor, mb: Rollout, targets: Targets, idx: torch.Tensor, ppo: PPOConfig,
                     kl_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of micro-batch `mb` (rows `idx` of the step's rollout and `targets`).

    new_logprobs: (b, R) under the current policy, with gradient. Returns (loss, stats): stats has
    approxkl, clipfrac, ratio_mean, and for grpo `kl` (mean k3 per valid token, the loss's KL term
    before β) and `pg_loss` (the clipped surrogate alone, aggregated like the loss)."""
    mask = mb.response_mask
    if ppo.algorithm == "rloo":
        return sequence_policy_loss(new_logprobs, mb.logprobs, targets.response_advantages[idx], mask, ppo.clip_eps)
    if ppo.algorithm == "grpo":
        return grpo_policy_loss(new_logprobs, mb.logprobs, mb.ref_logprobs, targets.response_advantages[idx], mask,
                                clip_eps=ppo.clip_eps, kl_coef=kl_coef,
                                aggregation="constant" if ppo.dr_grpo else "sequence_mean",
                                max_length=ppo.response_length)
    return policy_loss(new_logprobs, mb.logprobs, targets.advantages[idx], mask, ppo.clip_eps)
