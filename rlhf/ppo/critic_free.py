"""Advantages of the critic-free algorithms: RLOO, GRPO (with Dr. GRPO) and REINFORCE++.

Plain functions of tensors, each tested against numbers worked out by hand
(tests/test_critic_free_math.py). Their losses are in ``rlhf.ppo.losses``
(:func:`~rlhf.ppo.losses.sequence_policy_loss` for RLOO, :func:`~rlhf.ppo.losses.grpo_policy_loss`
for GRPO; REINFORCE++ uses PPO's token-level :func:`~rlhf.ppo.losses.policy_loss`).

**Layout of a group.** A step samples ``k`` responses for each of ``N`` prompts: ``B = N·k``
rows, and the ``k`` samples of a prompt are *contiguous*: prompt ``p``'s samples are rows
``p·k … p·k + k − 1`` (the layout of ``torch.repeat_interleave(prompts, k)``, of
:func:`repeat_per_prompt`, and of TRL's ``RepeatSampler`` and OpenRLHF). Every function here
that takes ``k`` assumes it; :func:`group_rows` turns a ``(B, ...)`` tensor into
``(N, k, ...)``. A group never spans two processes (a prompt's ``k`` samples are generated on
one), so the group statistics need no communication; only REINFORCE++'s whitening is over the
whole batch, across processes (``sum_across``).

Shapes: ``B`` responses, ``T`` response tokens; ``mask`` is ``(B, T)``, bool or {0, 1}, true on
valid response tokens (up to and including the stop token), as in ``rlhf.ppo.advantages``.

Sources:
- RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
  Learning from Human Feedback in LLMs", arXiv 2402.14740. The sequence-level KL in the reward
  follows TRL 1.16's ``RLOOTrainer`` (``rewards - beta * (per_token_kl * mask).sum(-1)``, k1 KL).
- GRPO: Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, §4.1.
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
  arXiv 2503.20783: no division by the group std, no per-response length normalisation.
- REINFORCE++: Hu et al. 2025, arXiv 2501.03262; details as its reference implementation,
  OpenRLHF (``openrlhf/trainer/ppo_utils/experience_maker.py``: per-token ``-beta·KL`` plus the
  score at the last token, cumulative returns with γ, one whitening of the advantages over the
  valid tokens of the whole batch; the "baseline" variant subtracts the group-mean score first).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, TypeVar

import torch

from rlhf.ppo.advantages import SumAcross, _bool_mask, masked_whiten, one_process_sum, per_token_rewards

__all__ = [
    "repeat_per_prompt",
    "group_rows",
    "sequence_kl",
    "kl_penalised_scores",
    "rloo_advantages",
    "GRPO_STD_EPS",
    "grpo_advantages",
    "group_mean_baseline",
    "discounted_returns",
    "ReinforcePPAdvantages",
    "reinforce_pp_advantages",
    "token_advantages",
]

T_ = TypeVar("T_")

# Added to the group std before dividing (TRL 1.16 GRPOTrainer: `std_rewards + 1e-4`): a group
# whose k scores are all equal has std 0 and gets advantages 0 / 1e-4 = 0, not NaN.
GRPO_STD_EPS = 1e-4


def repeat_per_prompt(items: Sequence[T_], k: int) -> list[T_]:
    """Each item ``k`` times in a row: ``[a, b], 2 -> [a, a, b, b]`` (the group layout above).

    Args:
        items: ``N`` prompts (token-id lists, texts, indices...).
        k: samples per prompt, ``>= 1``.

    Returns:
        A list of ``N·k`` items, prompt ``p`` at positions ``p·k … p·k + k − 1``.
    """
    if k < 1:
        raise ValueError(f"samples per prompt must be >= 1, got {k}.")
    return [item for item in items for _ in range(k)]


def group_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """View a ``(N·k, ...)`` tensor as ``(N, k, ...)``: row ``p`` holds prompt ``p``'s samples.

    Raises ``ValueError`` when the first dimension is not a multiple of ``k`` (a batch that
    does not hold whole groups would silently mix prompts).
    """
    if k < 1:
        raise ValueError(f"samples per prompt must be >= 1, got {k}.")
    if x.shape[0] % k:
        raise ValueError(f"a batch of {x.shape[0]} responses does not hold whole groups of {k} samples per prompt.")
    return x.reshape(x.shape[0] // k, k, *x.shape[1:])


def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response KL: the per-token estimates summed over the valid tokens.

    Args:
        kl: ``(B, T)`` per-token KL estimate (``rlhf.ppo.advantages.kl_penalty``).
        mask: ``(B, T)`` valid response tokens.

    Returns:
        ``(B,)``. Why a sum: the KL between two sequence distributions is the sum of the
        per-token KLs along the sequence (chain rule), which is what a sequence-level penalty
        charges (TRL 1.16 RLOOTrainer: ``(per_token_kl * completion_mask).sum(-1)``).
    """
    m = _bool_mask(mask)
    return torch.where(m, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum(-1)


def kl_penalised_scores(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor
) -> torch.Tensor:
    """RLOO's reward: ``r = score − β · Σ_t KL_t``, one scalar per response.

    Args:
        scores: ``(B,)`` final scores (RM score centred, missing-EOS rule applied).
        kl: ``(B, T)`` per-token KL estimate; TRL's RLOO uses k1 (``logp − logp_ref``), which
            may be negative per token.
        mask: ``(B, T)`` valid response tokens.
        kl_coef: β; 0.05 is TRL 1.16 ``RLOOConfig.beta``'s default.

    Returns:
        ``(B,)`` rewards. The KL is folded in *before* the leave-one-out baseline, as in TRL,
        so the baseline also averages the siblings' KL (Ahmadian et al. 2024 treat the whole
        response as one action whose reward is the KL-regularised score).
    """
    dtype = torch.promote_types(scores.dtype, kl.dtype)
    return scores.to(dtype) - kl_coef * sequence_kl(kl.to(dtype), mask)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out advantages: ``A_i = r_i − mean_{j≠i} r_j`` within each prompt's group.

    Args:
        rewards: ``(N·k,)`` one reward per response, groups contiguous.
        k: samples per prompt, ``>= 2`` (with one sample there is nobody to leave out).

    Returns:
        ``(N·k,)``. Equals ``k / (k − 1) · (r_i − mean_j r_j)``. Not normalised: neither the
        paper nor TRL 1.16 (``normalize_advantages=False`` by default) rescales them.

    Why: the mean of the other ``k − 1`` samples is a baseline independent of sample ``i``, so
    the REINFORCE estimator stays unbiased while its variance drops (Ahmadian et al. 2024,
    arXiv 2402.14740; Kool et al. 2019).
    """
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {k}.")
    grouped = group_rows(rewards, k)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others_mean).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, k: int, scale_by_std: bool = True, eps: float = GRPO_STD_EPS) -> torch.Tensor:
    """GRPO's group-relative advantage ``(r_i − mean_group) / (std_group + eps)``.

    Args:
        rewards: ``(N·k,)`` one score per response, groups contiguous.
        k: samples per prompt, ``>= 2`` (a group of one has no spread to normalise by).
        scale_by_std: divide by the group's (unbiased) standard deviation: GRPO (Shao et al.
            2024, §4.1.2). ``False`` is Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): the std
            division weights prompts by how little their samples disagree (a difficulty bias),
            so only the group mean is subtracted.
        eps: added to the std, 1e-4 as TRL 1.16 (the paper gives none).

    Returns:
        ``(N·k,)`` advantages, one per response (every token of the response gets it).
        A group of identical scores gets 0.

    Why: the group mean replaces the learned value as a baseline, so no critic is trained
    (Shao et al. 2024, arXiv 2402.03300). The std is Bessel-corrected, as TRL's ``nanstd``.
    """
    if k < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, got {k}.")
    grouped = group_rows(rewards, k)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centred.reshape(-1)


def group_mean_baseline(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``score_i − mean_group(score)``: REINFORCE++-baseline's shaping, before the KL is added.

    Args:
        scores: ``(N·k,)``, groups contiguous; ``k >= 1`` (``k = 1`` gives all zeros).

    Returns:
        ``(N·k,)``. OpenRLHF's ``reinforce_baseline`` subtracts the group mean of the scores
        only (no std division: a baseline needs none to reduce variance), then adds the
        per-token KL penalty and whitens over the batch like plain REINFORCE++.
    """
    grouped = group_rows(scores, k)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go ``G_t = r_t + γ · G_{t+1}`` over the response tokens (REINFORCE, no critic).

    Args:
        rewards: ``(B, T)`` per-token rewards (``rlhf.ppo.advantages.per_token_rewards``).
        mask: ``(B, T)`` valid response tokens; masked positions count as reward 0.
        gamma: discount; 1.0 in REINFORCE++ (Hu 2025) and OpenRLHF.

    Returns:
        ``(B, T)``, 0 on masked positions. With γ = 1 the return at token ``t`` is the score
        minus β times the KL of tokens ``t … end`` (Hu 2025): each token is charged for
        the divergence it and its successors cause, not for the tokens before it.
    """
    m = _bool_mask(mask)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(m, rewards, zero)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return torch.where(m, out, zero)


class ReinforcePPAdvantages(NamedTuple):
    """Output of :func:`reinforce_pp_advantages`; every field ``(B, T)``, 0 on masked positions."""

    advantages: torch.Tensor
    """Returns whitened over the valid tokens of the whole batch (all processes)."""
    returns: torch.Tensor
    """Unwhitened return-to-go (logged; REINFORCE++ has no value target)."""
    rewards: torch.Tensor
    """Per-token reward: ``-β·KL_t`` on every valid token, plus the (baselined) score at the last."""
    non_score_rewards: torch.Tensor
    """The ``-β·KL_t`` part alone (``objective/non_score_reward``)."""


def reinforce_pp_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    gamma: float = 1.0,
    k: int = 1,
    group_baseline: bool = False,
    sum_across: SumAcross = one_process_sum,
) -> ReinforcePPAdvantages:
    """REINFORCE++ advantages (Hu 2025, arXiv 2501.03262), as OpenRLHF computes them.

    1. with ``group_baseline`` (REINFORCE++-baseline, ``k >= 2``): ``score − mean_group(score)``;
    2. per-token reward ``r_t = −β·KL_t``, plus the score at the last valid token (the same
       dense reward as PPO: ``rlhf.ppo.advantages.per_token_rewards``);
    3. return-to-go with γ (:func:`discounted_returns`);
    4. whiten the returns over the valid tokens of the *whole* batch: mean 0, unbiased
       variance 1 (OpenRLHF divides by ``n``, not ``n − 1``; the difference is ``1/n``), with
       the same :func:`~rlhf.ppo.advantages.masked_whiten` as PPO's advantages.

    Args:
        scores: ``(B,)`` final scores; groups contiguous when ``k > 1``.
        kl: ``(B, T)`` per-token KL estimate (OpenRLHF's default estimator is k1).
        mask: ``(B, T)`` valid response tokens.
        kl_coef: β (OpenRLHF's default ``init_kl_coef`` 0.01).
        gamma: discount, 1.0.
        k: samples per prompt (used by ``group_baseline`` only).
        group_baseline: subtract the group-mean score first (needs ``k >= 2``).
        sum_across: sums a tensor over the processes of a run (identity for one process), so
            the whitening statistics are those of the global batch; every process must call
            this function at the same point.

    Returns:
        :class:`ReinforcePPAdvantages`.

    Why global: normalising each prompt's group by its own statistics is a biased estimator
    and overfits easy prompts; one mean and std over the whole batch keeps every prompt on the
    same scale, and the bias vanishes as the batch grows (Hu 2025).
    """
    if group_baseline:
        if k < 2:
            raise ValueError(f"the REINFORCE++ group baseline needs at least 2 samples per prompt, got {k}.")
        scores = group_mean_baseline(scores, k)
    rewards, non_score = per_token_rewards(scores, kl, mask, kl_coef)
    returns = discounted_returns(rewards, mask, gamma)
    advantages = masked_whiten(returns, mask, shift_mean=True, sum_across=sum_across)
    return ReinforcePPAdvantages(advantages, returns, rewards, non_score)


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give each response's scalar advantage to every one of its valid tokens.

    Args:
        advantages: ``(B,)`` (RLOO, GRPO).
        mask: ``(B, T)`` valid response tokens.

    Returns:
        ``(B, T)``: ``advantages[b]`` on valid positions, 0 elsewhere (for the token-level
        losses and for logging with the same shapes as PPO's advantages).
    """
    m = _bool_mask(mask)
    return torch.where(m, advantages[:, None], torch.zeros((), dtype=advantages.dtype, device=advantages.device))
