"""PPO losses and the per-token quantities they need: the pure math of docs/ppo.md §16-§17.

Plain functions of tensors. Shapes: ``B`` responses, ``T`` response tokens, ``V`` vocabulary
size. ``mask`` is ``(B, T)``, bool or {0, 1} float, True / 1 on valid response tokens (up to
and including the stop token); every mean below is over valid tokens only.

Losses return ``(loss, stats)``: ``loss`` is a 0-dim tensor to backpropagate, ``stats`` a
dict of detached 0-dim tensors named as in the step metrics (docs/ppo.md §22) (kept as tensors so the
training loop does not force a device sync per micro-batch; call ``.item()`` when logging).

The critic-free algorithms' losses sit beside PPO's: :func:`sequence_policy_loss` (RLOO, as
TRL 1.16's RLOOTrainer) and :func:`grpo_policy_loss` (GRPO and Dr. GRPO); their advantages are in
``rlhf.ppo.critic_free``.

Sources:
- PPO: Schulman et al. 2017, arXiv 1707.06347.
- InstructGPT: Ouyang et al. 2022, arXiv 2203.02155.
- N+: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv 2403.17031.
- RLOO: Ahmadian et al. 2024, arXiv 2402.14740. GRPO: Shao et al. 2024 (DeepSeekMath),
  arXiv 2402.03300. Dr. GRPO: Liu et al. 2025, arXiv 2503.20783.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from rlhf.ppo.advantages import _bool_mask, kl_penalty, masked_mean, masked_var

__all__ = [
    "policy_loss",
    "sequence_policy_loss",
    "GRPOAggregation",
    "grpo_policy_loss",
    "value_loss",
    "logprobs_from_logits",
    "entropy_from_logits",
    "head_logprobs",
    "explained_variance",
]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss of PPO (docs/ppo.md §16).

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


def sequence_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate with one ratio per *response*: RLOO's loss (TRL 1.16 RLOOTrainer).

    ``ratio_b = exp(Σ_t (logp − logp_old))`` over the valid tokens of response ``b``;
    ``loss = mean_b max(−A_b·ratio_b, −A_b·clip(ratio_b, 1−ε, 1+ε))``.

    Args:
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens, current policy (with
            gradient).
        old_logprobs: ``(B, T)`` the same at rollout time.
        advantages: ``(B,)`` one advantage per response (``critic_free.rloo_advantages``).
        mask: ``(B, T)`` valid response tokens.
        clip_eps: ε, 0.2 (TRL 1.16 ``RLOOConfig.epsilon``).

    Returns:
        ``(loss, stats)``; ``stats``: ``approxkl`` (``0.5·mean_b(Σ_t log-ratio)²``, the
        sequence-level analogue of :func:`policy_loss`'s), ``clipfrac`` (fraction of responses
        whose clipped term is active), ``ratio_mean`` (mean sequence ratio).

    Why: RLOO treats the whole response as one action (Ahmadian et al. 2024, arXiv 2402.14740):
    its gradient at ratio 1 is ``−mean_b A_b · Σ_t ∇logp_t``, plain REINFORCE on the sequence
    log-probability, with no per-token averaging that would weight short responses'
    tokens more. The clip only matters from the second optimizer step on one batch. The
    log-ratio is zeroed on masked positions before the sum, so padding cannot make it inf.
    """
    m = _bool_mask(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    seq_log_ratio = torch.where(m, logprobs - old_logprobs, zero).sum(-1)
    ratio = torch.exp(seq_log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * (seq_log_ratio**2).mean(),
            "clipfrac": (clipped > unclipped).float().mean(),
            "ratio_mean": ratio.mean(),
        }
    return loss, stats


# How grpo_policy_loss turns per-token losses into one number:
# "sequence_mean": mean over each response's valid tokens, then over responses (GRPO, eq. 3 of
#   DeepSeekMath: 1/G Σ_i 1/|o_i| Σ_t);
# "constant": the sum over every valid token divided by B · max_length (Dr. GRPO: no 1/|o_i|).
GRPOAggregation = Literal["sequence_mean", "constant"]


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    aggregation: GRPOAggregation = "sequence_mean",
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss: token-level clipped surrogate plus ``β`` times the k3 KL to the reference.

    Per valid token: ``ℓ_t = max(−A·ratio_t, −A·clip(ratio_t, 1−ε, 1+ε)) + β·k3_t`` with
    ``ratio_t = exp(logp_t − logp_old_t)`` and
    ``k3_t = exp(logp_ref_t − logp_t) − (logp_ref_t − logp_t) − 1``; then aggregated
    (``aggregation``).

    Args:
        logprobs: ``(B, T)`` current policy (with gradient; the KL term's gradient flows through
            it too).
        old_logprobs: ``(B, T)`` at rollout time.
        ref_logprobs: ``(B, T)`` under the reference (SFT) model.
        advantages: ``(B,)`` per response (``critic_free.grpo_advantages``) or ``(B, T)``.
        mask: ``(B, T)`` valid response tokens.
        clip_eps: ε, 0.2 (TRL 1.16 ``GRPOConfig.epsilon``; PPO's value).
        kl_coef: β, 0.04 (DeepSeekMath §4.2; TRL 1.16 defaults to 0.0, i.e. no KL term).
        aggregation: ``"sequence_mean"`` (GRPO) or ``"constant"`` (Dr. GRPO).
        max_length: the constant for ``"constant"``: the longest response the sampler may
            produce (``ppo.response_length``; TRL's ``max_completion_length``). Required there.

    Returns:
        ``(loss, stats)``; ``stats``: ``approxkl``, ``clipfrac``, ``ratio_mean`` (means over
        valid tokens, as :func:`policy_loss`), ``kl`` (mean k3 over valid tokens) and
        ``pg_loss`` (the surrogate part alone, aggregated like the loss).

    Why: GRPO puts the KL in the loss instead of the reward, so the advantage stays the pure
    group-relative score, and uses k3, which is unbiased and never negative (Shao et al. 2024,
    arXiv 2402.03300, eq. 3-4; Schulman 2020). The per-response mean gives each response the
    same weight whatever its length, which favours short correct and long wrong answers; Dr.
    GRPO divides by a constant instead (Liu et al. 2025, arXiv 2503.20783). Log-ratios are
    zeroed on masked positions before any exponential, so padding cannot produce inf/NaN.
    """
    m = _bool_mask(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    log_ratio = torch.where(m, logprobs - old_logprobs, zero)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = torch.maximum(unclipped, clipped)
    # k3 on sanitised inputs: masked positions get logp = logp_ref, hence k3 = 0 and a finite gradient.
    kl = kl_penalty(torch.where(m, logprobs, ref_logprobs.to(logprobs.dtype)), ref_logprobs.to(logprobs.dtype), "k3", mask=m)

    def aggregate(per_token: torch.Tensor) -> torch.Tensor:
        per_token = torch.where(m, per_token, zero)
        if aggregation == "sequence_mean":
            return (per_token.sum(-1) / m.sum(-1).clamp(min=1)).mean()
        if aggregation == "constant":
            if max_length is None or max_length < 1:
                raise ValueError(f"the 'constant' aggregation needs max_length >= 1, got {max_length}.")
            return per_token.sum() / (per_token.shape[0] * max_length)
        raise ValueError(f"unknown aggregation {aggregation!r}; use 'sequence_mean' or 'constant'.")

    loss = aggregate(surrogate + kl_coef * kl)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, m),
            "clipfrac": masked_mean((clipped > unclipped).float(), m),
            "ratio_mean": masked_mean(ratio, m),
            "kl": masked_mean(kl, m),
            "pg_loss": aggregate(surrogate),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (docs/ppo.md §17).

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
        temperature: the sampling temperature (docs/ppo.md §6; default 0.7 in our config).

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
    logp = F.log_softmax(_scaled_float(logits, temperature), dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` at each position.

    Args:
        logits: ``(B, T, V)``.
        temperature: pass the sampling temperature to get the entropy of the distribution
            the tokens are actually drawn from (docs/ppo.md §6).

    Returns:
        ``(B, T)`` float32 entropies (nats); mask them with the response mask when averaging.

    Why: logged as ``objective/entropy`` to watch for collapse of the policy. Computed as
    ``H = -Σ p·log p`` from ``log_softmax`` (max-shifted internally), which stays precise
    for large logits; the textbook ``logsumexp(z) - Σ p·z`` (TRL) subtracts two numbers of
    the size of the logits and loses about 1e-4 nats in float32 at |z| ~ 1000. log p is
    clamped to the most negative finite float so that ``-inf`` logits (banned tokens) give
    ``0 · finite = 0`` instead of NaN, in the value and in the gradient.
    """
    return _entropy(F.log_softmax(_scaled_float(logits, temperature), dim=-1))


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(dim=-1)


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                  with_entropy: bool = False, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (and entropies) of ``tokens`` from hidden states through a frozen LM head,
    without ever holding the ``(B, T, V)`` logits.

    Args:
        hidden: ``(B, T, H)`` final hidden states (after the last norm), aligned with ``tokens``:
            ``hidden[:, t]`` is the state that predicts ``tokens[:, t]``.
        weight: ``(V, H)`` the LM head's weight, frozen (no gradient flows into it).
        tokens: ``(B, T)`` token ids.
        temperature: as :func:`logprobs_from_logits`.
        with_entropy: also return :func:`entropy_from_logits` (detached: it is only logged).
        chunk_rows: positions per chunk (default: ~64 MB of float32 logits per chunk).

    Returns:
        ``(B, T)`` float32 log-probabilities, with gradient to ``hidden``; ``(B, T)`` entropies
        or None.

    The same numbers as ``logprobs_from_logits(F.linear(hidden, weight), tokens, temperature)``:
    each chunk of positions goes through exactly those functions, under the autocast state of the
    call, and the backward pass recomputes a chunk's logits instead of keeping them. Why: the
    float32 copies of a micro-batch's logits were the largest tensors of an update (32 responses ×
    48 tokens × a 49k vocabulary is 0.3 GB per copy, and log-softmax, its gradient and the casts
    hold several); this keeps one chunk's, at the cost of one more head matmul per chunk in the
    backward (TRL's fused LM head and Liger's fused linear cross-entropy do the same).
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = tokens.reshape(-1)
    rows = chunk_rows or max(1, (1 << 24) // weight.shape[0])
    logprobs, entropy = _HeadLogprobs.apply(flat_h, weight, flat_t, temperature, rows, with_entropy)
    return logprobs.view(tokens.shape), entropy.view(tokens.shape) if with_entropy else None


class _HeadLogprobs(torch.autograd.Function):
    """head_logprobs' chunked forward and recomputing backward (gradient for the hidden states only).

    Both directions are written out rather than left to autograd, because the elementwise work over
    a chunk's (rows, V) float32 logits, not the head's matmul, was most of their time: autograd's
    recompute ran log-softmax again and its backward went through the gather's zero-filled
    scatter, log-softmax's backward, the division's and the cast's, one pass over the chunk each.
    Here the forward keeps only each row's log-sum-exp, and the backward turns the recomputed logits
    into the gradient in place: d log p_t / d z = onehot(t) - softmax(z), times the upstream
    gradient and 1/T. (The forward's values are log-softmax's own; the log-sum-exp is read back
    from them, one float32 rounding from a separate computation.)"""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, rows, with_entropy):
        device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        ctx.temperature, ctx.rows = temperature, rows
        logprobs, lse, entropy = [], [], []
        with torch.no_grad():
            for h, t in zip(hidden.split(rows), tokens.split(rows)):
                z = _scaled_float(F.linear(h, weight), temperature)
                logp = F.log_softmax(z, dim=-1)  # as logprobs_from_logits, so the values are its own
                index = t.long().unsqueeze(-1)
                row_logprobs = logp.gather(-1, index).squeeze(-1)
                logprobs.append(row_logprobs)
                lse.append(z.gather(-1, index).squeeze(-1) - row_logprobs)  # log-sum-exp, for the backward
                if with_entropy:  # from the same chunk of logits, not another head matmul
                    entropy.append(_entropy(logp))
        ctx.save_for_backward(hidden, weight, tokens, torch.cat(lse))
        entropy = torch.cat(entropy) if with_entropy else hidden.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(logprobs), entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, tokens, lse = ctx.saved_tensors
        enabled, dtype, device = ctx.autocast
        T = ctx.temperature
        grads = []
        for h, t, g, row_lse in zip(*(x.split(ctx.rows) for x in (hidden, tokens, grad_out, lse))):
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                logits = F.linear(h, weight)  # the forward's logits again, under its autocast state
            # grad_z = g * (onehot(t) - softmax(z)) with z = logits / T, then / T for the logits
            grad = _scaled_float(logits, T).sub_(row_lse.unsqueeze(-1)).exp_().mul_((-g / T).unsqueeze(-1))
            grad.scatter_add_(-1, t.long().unsqueeze(-1), (g / T).unsqueeze(-1))
            grads.append(grad.to(logits.dtype).mm(weight.to(logits.dtype)).to(h.dtype))
        return torch.cat(grads), None, None, None, None, None


def _scaled_float(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits.float() / temperature`` as a new tensor (in place on the float32 copy): the
    distribution every log-probability and entropy here is taken from."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    z = logits.float()
    return z.div_(temperature) if z is not logits else z / temperature


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
