"""Rewards and advantages for PPO-based RLHF: the pure math of docs/ppo.md §10-§15.

Everything here is a plain function of tensors (plus two tiny KL-coefficient controllers and
``Targets``, the container of a rollout's rewards, KL, returns and advantages) so that each
step can be tested against numbers worked out by hand. Batch statistics take a ``sum_across``
reduction (identity by default): a data-parallel run passes an all-reduce and gets the
statistics of every process's batch from the same code.

Longer than ~400 lines on purpose: about half of it is docstrings, each function carrying its
shapes, its reasons and its source next to the few lines of math, which is what the
hand-computed tests (tests/test_ppo_math.py) are checked against.

Shapes: ``B`` is the number of responses in the batch, ``T`` the number of response tokens
(the prompt is not part of these tensors). ``mask`` is always ``(B, T)``, bool or {0, 1}
float, with True / 1 marking a valid response token: every token up to and including the
stop token (EOS). Positions after it are padding; they contribute nothing to any statistic
and are 0 in every ``(B, T)`` output.

Sources:
- InstructGPT: Ouyang et al. 2022, arXiv 2203.02155, §3.5 and App. C.
- N+: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv 2403.17031.
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593.
- GAE: Schulman et al. 2016, arXiv 1506.02438.
- KL estimators: J. Schulman, "Approximating KL Divergence" (2020),
  http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch

__all__ = [
    "one_process_sum",
    "masked_mean",
    "masked_moments",
    "masked_var",
    "masked_whiten",
    "last_valid_index",
    "kl_penalty",
    "PerTokenRewards",
    "per_token_rewards",
    "normalize_scores",
    "Targets",
    "gae",
    "whiten_advantages",
    "FixedKLController",
    "AdaptiveKLController",
    "make_kl_controller",
]

KLEstimator = Literal["k1", "k3"]

# sum_across(t) -> t summed over the processes of a data-parallel run (an all-reduce)
SumAcross = Callable[[torch.Tensor], torch.Tensor]

# Added to the variance before the square root when whitening (same value as TRL / N+).
WHITEN_EPS = 1e-8


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a bool tensor (accepts bool or {0, 1} float/int)."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: same shape as ``x`` (or broadcastable to it); bool or {0, 1}.
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Returns:
        A 0-dim tensor (``dim=None``) or ``x`` reduced over ``dim``.

    Why: PPO losses and statistics must average over real response tokens only; padding
    after the stop token would otherwise dilute every mean by the amount of padding
    (N+, arXiv 2403.17031, "masked" losses). Masked entries are replaced by 0 with
    ``torch.where`` rather than multiplied by 0, so a NaN/inf sitting in a padded position
    cannot leak into the result (``inf * 0`` is NaN).

    An empty mask gives 0, not NaN (the count is clamped at 1): a statistic of nothing is
    reported as 0 rather than tripping the NaN health check with a misleading message.
    """
    m = _bool_mask(mask)
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return total.sum() / m.sum().clamp(min=1)
    return total.sum(dim) / m.sum(dim).clamp(min=1)


def one_process_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the processes of a run of one process: ``t`` itself.

    The default ``sum_across`` of :func:`masked_moments` and the whitening built on it; a
    data-parallel run passes ``rlhf.ppo.distributed.sum_across_processes`` instead.
    """
    return t


def masked_moments(
    x: torch.Tensor,
    mask: torch.Tensor,
    unbiased: bool = True,
    sum_across: SumAcross = one_process_sum,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``x`` over the valid positions of the whole batch.

    Args:
        x: any shape, e.g. ``(B, T)``: this process's part of the batch.
        mask: same shape as ``x``; bool or {0, 1}.
        unbiased: apply Bessel's correction ``n / (n - 1)`` (as TRL and N+ do).
        sum_across: sums a tensor over the processes that hold the rest of the batch
            (an all-reduce); the default, :func:`one_process_sum`, is the identity.

    Returns:
        ``(mean, var)``, two 0-dim tensors.

    Why: the statistics are built from sums (count and total, then the summed squared
    deviations from the mean), so several processes combine their parts with two
    reductions and get the statistics of their concatenated batches; one process is the
    same computation with nothing to add. Two passes (the mean first, then the deviations
    from it) rather than ``E[x²] - E[x]²``, which cancels badly when the mean is large.
    With fewer than two valid values the unbiased variance is undefined; it is returned
    as 0 (a single value has no spread), so whitening such a batch centres it instead of
    producing NaN. An empty mask gives mean 0 and variance 0.
    """
    m = _bool_mask(mask)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    n, total = sum_across(torch.stack([m.sum().to(x.dtype), torch.where(m, x, zero).sum()]))
    count = n.clamp(min=1)
    mean = total / count
    var = sum_across(torch.where(m, (x - mean) ** 2, zero).sum()) / count
    if unbiased:
        # n / (n - 1) for n >= 2; n < 2 gives var = 0 anyway (one value, no spread). The biased
        # variance times n / (n - 1), not the sum over n - 1: the two round differently, and this is
        # the order single-process runs have always used (their results stay bit-identical).
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), torch.zeros_like(var))
    return mean, var


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True
) -> torch.Tensor:
    """Variance of ``x`` over the positions where ``mask`` is true (a 0-dim tensor).

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: same shape as ``x``; bool or {0, 1}.
        unbiased: apply Bessel's correction ``n / (n - 1)`` (as TRL and N+ do).

    Why: advantage whitening (docs/ppo.md §15) needs the variance of the valid tokens only.
    With fewer than two valid values the variance is undefined; it is returned as 0
    (a single value has no spread). This process's values alone: see :func:`masked_moments`.
    """
    return masked_moments(x, mask, unbiased)[1]


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    sum_across: SumAcross = one_process_sum,
) -> torch.Tensor:
    """Whiten ``x`` using the mean and variance of its valid positions only.

    Args:
        x: ``(B, T)`` (any shape works).
        mask: same shape as ``x``; bool or {0, 1}.
        shift_mean: if True the result has mean 0 and unbiased variance 1 over the valid
            positions; if False the original mean is added back, so only the spread is
            normalised (TRL's ``whiten_rewards`` uses ``shift_mean=False``).
        sum_across: as in :func:`masked_moments`: with several processes, the statistics
            are those of every process's batch together (each process whitens its own part
            of it); the default is this batch alone.

    Returns:
        ``(B, T)``: ``(x - mean) / sqrt(var + 1e-8)`` (``+ mean`` if not ``shift_mean``)
        on valid positions, 0 on masked positions.

    Why: whitening advantages over the whole batch keeps the policy-gradient scale
    independent of the reward scale (N+, arXiv 2403.17031; docs/ppo.md §15). Statistics
    over padding would be wrong, hence the mask. With a single valid value the variance is
    taken as 0 and ``x - mean`` is exactly 0, so the result is 0 (``shift_mean``) or the
    value itself (not ``shift_mean``) — never NaN.
    """
    m = _bool_mask(mask)
    mean, var = masked_moments(x, m, unbiased=True, sum_across=sum_across)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position of each row.

    Args:
        mask: ``(B, T)``; bool or {0, 1}.

    Returns:
        ``(B,)`` long tensor. Raises ``ValueError`` if a row has no valid position.

    Why: the reward-model score belongs to the last real token of the response (the EOS
    when there is one), never to a pad position (docs/ppo.md §9; N+). Taking the last True
    position, rather than ``mask.sum() - 1``, stays correct even if a caller's mask is not a
    clean right-padded prefix.
    """
    m = _bool_mask(mask)
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    idx = torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=-1)
    if bool((idx < 0).any()):
        rows = torch.nonzero(idx < 0).flatten().tolist()
        raise ValueError(
            f"rows {rows} of the response mask have no valid token; every response must "
            "keep at least one token (the stop token counts)."
        )
    return idx


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: KLEstimator = "k1",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probabilities.

    Args:
        logprobs: ``(B, T)`` log π(a_t | s_t) of the sampled tokens under the policy.
        ref_logprobs: ``(B, T)`` the same under the reference (SFT) model.
        estimator: ``"k1"``: ``logp - logp_ref`` (unbiased, can be negative per token;
            the estimator of InstructGPT and N+, the default of docs/ppo.md §11).
            ``"k3"``: ``(exp(logp_ref - logp) - 1) - (logp_ref - logp)``, Schulman's
            estimator: unbiased, always >= 0, lower variance when the policies are close.
        mask: optional ``(B, T)``; if given, masked positions are set to 0.

    Returns:
        ``(B, T)`` per-token KL estimate.

    Why: the KL penalty keeps the policy near the SFT model so it cannot exploit the
    reward model (InstructGPT eq. 2, arXiv 2203.02155; Ziegler et al. 2019). Both
    estimators have expectation KL(π || π_ref) when tokens are sampled from π.
    Source of k3: J. Schulman, "Approximating KL Divergence" (2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k3":
        # r = π_ref / π; k3 = (r - 1) - log r, with log r = -log_ratio.
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'.")
    if mask is not None:
        kl = torch.where(_bool_mask(mask), kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    return kl


class PerTokenRewards(NamedTuple):
    """Output of :func:`per_token_rewards`; both fields ``(B, T)``, 0 on masked positions."""

    rewards: torch.Tensor
    """Total per-token reward: KL penalty on every valid token + score at the last one."""
    non_score_rewards: torch.Tensor
    """The KL-penalty part alone (``-kl_coef * kl``); logged as ``objective/non_score_reward``."""


def per_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> PerTokenRewards:
    """Build the per-token reward of docs/ppo.md §12.

    ``r_t = -kl_coef * kl_t`` on every valid token, plus the scalar score of the response
    added at its last valid token; 0 on masked positions.

    Args:
        scores: ``(B,)`` reward-model score per response (already normalised, see
            :func:`normalize_scores`).
        kl: ``(B, T)`` per-token KL estimate (see :func:`kl_penalty`).
        mask: ``(B, T)`` valid response tokens; every row needs at least one.
        kl_coef: β, a float or 0-dim tensor (default 0.05 in our config; InstructGPT 0.02).

    Returns:
        :class:`PerTokenRewards` ``(rewards, non_score_rewards)``, both ``(B, T)``.

    Why: InstructGPT's objective (arXiv 2203.02155, eq. 2) is r_θ(x, y) − β·log(π/π_ref);
    spreading the KL term over tokens and giving the sequence-level score to the final token
    is the standard dense form (Ziegler et al. 2019; N+, arXiv 2403.17031). The score goes
    to the last *valid* token, found from the mask (:func:`last_valid_index`), so it never
    lands on padding.
    """
    m = _bool_mask(mask)
    dtype = torch.promote_types(kl.dtype, scores.dtype)
    zero = torch.zeros((), dtype=dtype, device=kl.device)
    non_score = torch.where(m, -kl_coef * kl.to(dtype), zero)
    idx = last_valid_index(m)
    rewards = non_score.scatter_add(1, idx[:, None], scores.to(dtype)[:, None])
    return PerTokenRewards(rewards=rewards, non_score_rewards=non_score)


def normalize_scores(
    scores: torch.Tensor,
    mean: float | torch.Tensor,
    std: float | torch.Tensor | None = None,
    whiten: bool = False,
) -> torch.Tensor:
    """Normalise reward-model scores before they enter the per-token reward (docs/ppo.md §10).

    Args:
        scores: ``(B,)`` raw reward-model scores.
        mean: the mean score the RM stage recorded over its training responses.
        std: optional recorded standard deviation; if given, scores are divided by it.
        whiten: also rescale the batch to unit (unbiased) standard deviation, keeping its
            mean (``shift_mean=False``, as TRL's ``whiten_rewards``). Off by default: N+
            (arXiv 2403.17031) found that whitening rewards shortens outputs.

    Returns:
        ``(B,)`` normalised scores.

    Why: subtracting the RM's mean makes the SFT policy score about 0, so the score and the
    KL penalty start on the same footing and the value head's initial estimates are
    sensible (Ziegler et al. 2019 and N+ normalise the reward model to mean 0 on the SFT
    distribution; InstructGPT normalises the RM so that demonstrations score 0 on average).
    """
    out = scores - mean
    if std is not None:
        if float(std) <= 0:
            raise ValueError(f"reward std must be positive, got {float(std)}.")
        out = out / std
    if whiten:
        out = masked_whiten(out, torch.ones_like(out, dtype=torch.bool), shift_mean=False)
    return out


@dataclass
class Targets:
    """What one rollout's update trains towards, each ``(B, T)`` float32 (0 where masked) unless
    noted: the per-token rewards and their KL part, the value targets and the policy-gradient weights.

    Built by ``rlhf.ppo.algorithms.compute_targets``: for PPO from :func:`kl_penalty`,
    :func:`per_token_rewards`, :func:`gae` and :func:`whiten_advantages`; for the critic-free
    algorithms from ``rlhf.ppo.critic_free``.
    """

    advantages: torch.Tensor
    """The token-level policy loss's weights: whitened GAE advantages (PPO), whitened returns
    (REINFORCE++), or each response's advantage on every one of its tokens (RLOO, GRPO)."""
    returns: torch.Tensor | None
    """λ-returns from the unwhitened advantages (the value loss's targets); None without a critic."""
    rewards: torch.Tensor
    """Per-token reward: KL penalty on every token + the score at the last one."""
    kl: torch.Tensor
    """Per-token KL estimate between the policy and the reference."""
    non_score_rewards: torch.Tensor
    """The KL-penalty part of ``rewards`` (``-kl_coef * kl``)."""
    scores: torch.Tensor
    """``(B,)`` the scores used in the reward: centred, EOS-penalised, optionally whitened."""
    response_advantages: torch.Tensor | None = None
    """``(B,)`` one advantage per response (RLOO, GRPO: their losses take these); None otherwise."""


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (docs/ppo.md §14).

    ``δ_t = r_t + γ·V_{t+1} − V_t`` and ``A_t = δ_t + γ·λ·A_{t+1}``, computed backwards over
    ``T`` and vectorised over ``B``. ``returns = advantages + values`` (the λ-return),
    which is the value-function target.

    Args:
        rewards: ``(B, T)`` per-token rewards (see :func:`per_token_rewards`).
        values: ``(B, T)`` value estimates V(s_t) recorded at rollout time.
        mask: ``(B, T)`` valid response tokens.
        gamma: discount γ; 1.0 for RLHF (InstructGPT, N+).
        lam: GAE λ; 0.95 (N+, TRL).

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, 0 on masked positions.

    Why: the episode ends at the last valid token, so the value after it is 0 and nothing is
    bootstrapped from padding (N+, arXiv 2403.17031). Here any masked position ends the
    episode: its value and reward count as 0 and the advantage recursion restarts after it.
    For right-padded responses (the rollout's layout) that is exactly "V = 0 after EOS";
    left padding works too. Source of GAE: Schulman et al. 2016, arXiv 1506.02438.
    """
    m = _bool_mask(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(m, values, zero)
    rewards = torch.where(m, rewards.to(values.dtype), zero)
    T = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = torch.where(m[:, t], delta + gamma * lam * next_adv, zero)
        reversed_adv.append(adv_t)
        next_value, next_adv = values[:, t], adv_t
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def whiten_advantages(
    advantages: torch.Tensor, mask: torch.Tensor, sum_across: SumAcross = one_process_sum
) -> torch.Tensor:
    """Whiten advantages over the valid tokens of the whole batch (docs/ppo.md §15).

    Args:
        advantages: ``(B, T)`` from :func:`gae`.
        mask: ``(B, T)`` valid response tokens.
        sum_across: with several processes, whiten over every process's batch
            (see :func:`masked_moments`); the default is this batch alone.

    Returns:
        ``(B, T)`` with mean 0 and unbiased variance 1 over valid tokens, 0 elsewhere.

    Why: N+ (arXiv 2403.17031) and TRL whiten advantages once per rollout batch, after GAE
    and before the epochs of updates; this makes the clipped objective's scale independent
    of the reward scale. Returns are computed from the *unwhitened* advantages.
    """
    return masked_whiten(advantages, mask, shift_mean=True, sum_across=sum_across)


@dataclass
class FixedKLController:
    """A constant KL coefficient β (docs/ppo.md §13: ``kl_coef``, default 0.05).

    Same interface as :class:`AdaptiveKLController`, so the trainer never branches on it.
    """

    kl_coef: float

    def __post_init__(self) -> None:
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}.")

    @property
    def value(self) -> float:
        """The current β."""
        return self.kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the unchanged β."""
        return self.kl_coef

    def state_dict(self) -> dict[str, float]:
        """The mutable state (only β), as plain floats for checkpoints."""
        return {"kl_coef": float(self.kl_coef)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore β from :meth:`state_dict`."""
        self.kl_coef = float(state["kl_coef"])


@dataclass
class AdaptiveKLController:
    """Adaptive β of Ziegler et al. 2019 (arXiv 1909.08593, §2.2), off by default.

    After each rollout batch::

        e = clip(current_kl / target - 1, -0.2, 0.2)
        kl_coef *= 1 + e * n_steps / horizon

    so β grows when the measured KL is above ``target`` and shrinks when below, by at most
    20% per ``horizon`` samples. ``n_steps`` counts samples (responses) in the batch, as in
    Ziegler et al.'s and TRL's implementation (their horizon is 10000 samples).

    Only ``kl_coef`` is state (:meth:`state_dict`); ``target`` and ``horizon`` are
    configuration and come from the config on resume.
    """

    kl_coef: float
    target: float
    horizon: float

    def __post_init__(self) -> None:
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}.")
        if self.target <= 0:
            raise ValueError(f"target KL must be > 0, got {self.target}.")
        if self.horizon <= 0:
            raise ValueError(f"KL horizon must be > 0, got {self.horizon}.")

    @property
    def value(self) -> float:
        """The current β."""
        return self.kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move β towards the target KL.

        Args:
            current_kl: the batch's mean KL per response (sum over tokens, mean over B).
            n_steps: number of samples in the batch.

        Returns:
            The new β.
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + error * n_steps / self.horizon
        return self.kl_coef

    def state_dict(self) -> dict[str, float]:
        """The mutable state (only β), as plain floats for checkpoints."""
        return {"kl_coef": float(self.kl_coef)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore β from :meth:`state_dict`."""
        self.kl_coef = float(state["kl_coef"])


def make_kl_controller(
    kl_coef: float, target: float | None = None, horizon: float = 10000
) -> FixedKLController | AdaptiveKLController:
    """Build the KL controller from config: adaptive when a ``target`` KL is given.

    ``horizon`` defaults to 10000 samples (Ziegler et al. 2019; TRL).
    """
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
