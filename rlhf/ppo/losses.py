"""PPO losses and the per-token quantities they need: the pure math of PPO.md items 11-12.

Plain functions of tensors. Shapes: ``B`` responses, ``T`` response tokens, ``V`` vocabulary
size. ``mask`` is ``(B, T)``, bool or {0, 1} float, True / 1 on valid response tokens (up to
and including the stop token); every mean below is over valid tokens only.

Losses return ``(loss, stats)``: ``loss`` is a 0-dim tensor to backpropagate, ``stats`` a
dict of detached 0-dim tensors named as in PPO.md's metrics (kept as tensors so the
training loop does not force a device sync per micro-batch; call ``.item()`` when logging).

Sources:
- PPO: Schulman et al. 2017, arXiv 1707.06347.
- InstructGPT: Ouyang et al. 2022, arXiv 2203.02155.
- N+: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv 2403.17031.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.ppo.advantages import _bool_mask, masked_mean, masked_var

__all__ = [
    "policy_loss",
    "value_loss",
    "logprobs_from_logits",
    "entropy_from_logits",
    "explained_variance",
]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss of PPO (PPO.md item 11).

    ``ratio = exp(logp - logp_old)``;
    ``loss = masked_mean(max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)))``.

    Args:
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens under the current
            policy (with gradient).
        old_logprobs: ``(B, T)`` the same, recorded at rollout time (no gradient).
        advantages: ``(B, T)`` whitened advantages (no gradient).
        mask: ``(B, T)`` valid response tokens.
        clip_eps: ε, 0.2 (PPO; N+).

    Returns:
        ``(loss, stats)``; ``stats`` has ``approxkl`` (``0.5·mean((logp - logp_old)²)``,
        the estimator TRL and N+ log), ``clipfrac`` (fraction of valid tokens where the
        clipped term is the active one) and ``ratio_mean``.

    Why: the pessimistic max of the unclipped and clipped losses removes the incentive to
    move the ratio outside [1-ε, 1+ε], which keeps several epochs on one rollout batch
    stable (Schulman et al. 2017). The mean is over valid tokens of the whole micro-batch
    (N+, arXiv 2403.17031). The log-ratio is set to 0 on masked positions *before* the
    exponential, so garbage log-probabilities in padding cannot produce inf/NaN in the
    forward or backward pass. At ratio == 1 the loss equals ``-masked_mean(A)``.
    """
    m = _bool_mask(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(m, logprobs - old_logprobs, zero)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, m),
            "clipfrac": masked_mean((clipped > unclipped).float(), m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO.md item 12).

    ``V_clip = clip(V, V_old - c, V_old + c)``;
    ``loss = 0.5 · masked_mean(max((V - R)², (V_clip - R)²))``.

    Args:
        values: ``(B, T)`` current value predictions (with gradient).
        old_values: ``(B, T)`` values recorded at rollout time.
        returns: ``(B, T)`` GAE returns (targets), from the unwhitened advantages.
        mask: ``(B, T)`` valid response tokens.
        clip_range: c, 0.2 (N+; TRL ``cliprange_value``).

    Returns:
        ``(loss, stats)``; ``stats`` has ``clipfrac``: the fraction of valid tokens where
        the clipped squared error is the larger one (the clipped term is active).

    Why: clipping the value update around the rollout-time value mirrors the policy clip
    and keeps the critic from jumping far in one batch; the max makes it pessimistic
    (N+, arXiv 2403.17031; OpenAI baselines). The caller multiplies by ``vf_coef`` (0.1).
    """
    m = _bool_mask(mask)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), m)}
    return loss, stats


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``(B, T, V)``, already aligned with ``tokens``: ``logits[:, t]`` must be the
            prediction *for* ``tokens[:, t]`` (with a causal LM's output, slice the logits
            one position to the left of the response tokens).
        tokens: ``(B, T)`` token ids.
        temperature: the sampling temperature (PPO.md item 4; default 0.7 in our config).

    Returns:
        ``(B, T)`` float32 log-probabilities.

    Why: every log-probability — policy, reference and inside the update — must come from
    the same distribution the tokens were sampled from, i.e. logits / T; otherwise the
    ratio is not 1 on the first minibatch and the KL is biased (N+, arXiv 2403.17031).
    Logits are upcast to float32 first: bf16 log-softmax is too coarse for ratios near 1.
    Memory: log_softmax then gather keeps one ``(B, T, V)`` float32 temporary alive, which
    is the peak; slice the logits to the response positions before calling, and chunk over
    ``B`` if that still does not fit.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` at each position.

    Args:
        logits: ``(B, T, V)``.
        temperature: pass the sampling temperature to get the entropy of the distribution
            the tokens are actually drawn from (PPO.md item 4).

    Returns:
        ``(B, T)`` float32 entropies (nats); mask them with the response mask when averaging.

    Why: logged as ``objective/entropy`` to watch for collapse of the policy. Computed as
    ``H = -Σ p·log p`` from ``log_softmax`` (max-shifted internally), which stays precise
    for large logits; the textbook ``logsumexp(z) - Σ p·z`` (TRL) subtracts two numbers of
    the size of the logits and loses about 1e-4 nats in float32 at |z| ~ 1000. log p is
    clamped to the most negative finite float so that ``-inf`` logits (banned tokens) give
    ``0 · finite = 0`` instead of NaN, in the value and in the gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(dim=-1)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Explained variance of the value predictions, ``1 - Var(R - V) / Var(R)``.

    Args:
        values: ``(B, T)`` value predictions.
        returns: ``(B, T)`` return targets.
        mask: ``(B, T)`` valid response tokens.

    Returns:
        A 0-dim float tensor: 1 for a perfect critic, 0 for one no better than a constant,
        negative for a worse one. NaN when the returns have no variance (undefined; NaN, as
        in Stable-Baselines3, rather than a plausible-looking number).

    Why: logged as ``value/explained_variance``, the usual health signal for the critic
    (N+, arXiv 2403.17031; OpenAI baselines). Variances are over valid tokens only.
    """
    m = _bool_mask(mask)
    values = values.detach().float()
    returns = returns.detach().float()
    var_returns = masked_var(returns, m)
    var_residual = masked_var(returns - values, m)
    nan = torch.full((), float("nan"), device=values.device)
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns, nan)
