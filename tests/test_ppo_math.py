"""Hand-computed tests for the pure PPO math (rlhf.ppo.advantages, rlhf.ppo.losses).

Every expected value is a literal worked out by hand, with the arithmetic in a comment,
never the same formula run again. Mask convention: (B, T), True / 1 = valid response
token; positions after the last valid token are padding and hold deliberately absurd values
(9.9, 1000, inf) to show they contribute nothing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.ppo.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalty,
    last_valid_index,
    make_kl_controller,
    masked_mean,
    masked_moments,
    masked_var,
    masked_whiten,
    normalize_scores,
    per_token_rewards,
    whiten_advantages,
)
from rlhf.ppo.losses import (
    entropy_from_logits,
    explained_variance,
    head_logprobs,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)


def t(data) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.float32)


def close(actual, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        rtol=0.0,
        atol=atol,
    )


# Two rows, T = 3: row 0 has 2 valid tokens, row 1 has 1.
MASK = torch.tensor([[True, True, False], [True, False, False]])
MASK_DTYPES = [torch.bool, torch.float32]


# ---------------------------------------------------------------- masked statistics


@pytest.mark.parametrize("dtype", MASK_DTYPES)
def test_masked_mean_ignores_padding(dtype):
    x = t([[1.0, 2.0, float("nan")], [4.0, 1000.0, float("inf")]])
    mask = MASK.to(dtype)
    # valid values 1, 2, 4: (1 + 2 + 4) / 3 = 7/3
    close(masked_mean(x, mask), 7.0 / 3.0)
    # per row: (1 + 2) / 2 = 1.5 ; 4 / 1 = 4
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    close(masked_mean(t([[5.0, 6.0]]), torch.tensor([[False, False]])), 0.0)


def test_masked_var():
    x = t([[1.0, 2.0, 99.0], [4.0, -99.0, 99.0]])
    # valid 1, 2, 4; mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    # unbiased: (42/9) / 2 = 7/3 ; biased: (42/9) / 3 = 14/9
    close(masked_var(x, MASK), 7.0 / 3.0)
    close(masked_var(x, MASK, unbiased=False), 14.0 / 9.0)


def test_masked_var_single_value_is_zero():
    close(masked_var(t([[3.0, 8.0]]), torch.tensor([[True, False]])), 0.0)


@pytest.mark.parametrize("dtype", MASK_DTYPES)
def test_masked_whiten_uses_valid_tokens_only(dtype):
    x = t([[1.0, 3.0, 1000.0], [5.0, -1000.0, 7.0]])
    mask = MASK.to(dtype)
    # valid 1, 3, 5: mean 3; unbiased var (4 + 0 + 4) / 2 = 4, std 2
    # whitened (x - 3) / 2 = -1, 0, 1 ; padding -> 0
    out = masked_whiten(x, mask)
    close(out, [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # mean 0 and variance 1 over the valid tokens: (-1 + 0 + 1)/3 = 0; (1 + 0 + 1)/2 = 1
    close(masked_mean(out, mask), 0.0)
    close(masked_var(out, mask), 1.0)
    # shift_mean=False keeps the mean: (x - 3) / 2 + 3 = 2, 3, 4
    close(masked_whiten(x, mask, shift_mean=False), [[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]])


def test_masked_whiten_single_valid_token_has_no_nan():
    x = t([[5.0, 7.0]])
    mask = torch.tensor([[True, False]])
    # one value: var taken as 0, x - mean = 0 exactly -> 0 (centred), or 5 (mean kept)
    close(masked_whiten(x, mask), [[0.0, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False), [[5.0, 0.0]])


def test_masked_moments_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), 7.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    mean, var = masked_moments(x, mask)  # valid: 1, 2, 3
    assert mean.item() == pytest.approx(2.0) and var.item() == pytest.approx(1.0)  # ((1 + 0 + 1) / (3 - 1))
    out = masked_whiten(x, mask, shift_mean=True)
    assert torch.allclose(out, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-6)
    one = masked_moments(torch.tensor([5.0]), torch.tensor([True]))
    assert one[0].item() == 5.0 and one[1].item() == 0.0  # a single value has no spread
    # Two processes holding the same batch (their sums double): valid 1, 2, 3, 1, 2, 3 -> mean 2,
    # unbiased var (1 + 0 + 1) * 2 / (6 - 1) = 0.8.
    mean, var = masked_moments(x, mask, sum_across=lambda t: 2 * t)
    assert mean.item() == pytest.approx(2.0) and var.item() == pytest.approx(0.8)


# ---------------------------------------------------------------- KL and rewards


def test_kl_k1_and_k3_by_hand():
    logp = t([[-1.0, -2.0]])
    ref = t([[-1.5, -1.0]])
    # k1 = logp - ref = -1 + 1.5 = 0.5 ; -2 + 1 = -1
    close(kl_penalty(logp, ref, "k1"), [[0.5, -1.0]])
    # k3 = (exp(ref - logp) - 1) - (ref - logp) with ref - logp = -0.5 and 1.0:
    #   exp(-0.5) - 1 + 0.5 = 0.6065306597 - 0.5 = 0.1065306597
    #   exp(1) - 1 - 1      = 2.7182818285 - 2   = 0.7182818285
    close(kl_penalty(logp, ref, "k3"), [[0.1065306597, 0.7182818285]])


def test_kl_is_exactly_zero_for_identical_policies_and_masked():
    logp = t([[-0.3, -2.7, -5.0]])
    for est in ("k1", "k3"):
        assert torch.equal(kl_penalty(logp, logp.clone(), est), torch.zeros(1, 3))
    # k1 = 2 - 0 = 2 on the valid token; padding -> 0 even though its value is 10 - 0
    masked = kl_penalty(t([[2.0, 10.0]]), t([[0.0, 0.0]]), "k1", mask=torch.tensor([[1, 0]]))
    close(masked, [[2.0, 0.0]])
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, logp, "k2")  # type: ignore[arg-type]


def test_last_valid_index():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 1, 0]])
    # last 1 at index 2, 1, 0, 1
    assert last_valid_index(mask).tolist() == [2, 1, 0, 1]
    with pytest.raises(ValueError, match="no valid token"):
        last_valid_index(torch.tensor([[1, 0], [0, 0]]))


@pytest.mark.parametrize("dtype", MASK_DTYPES)
def test_per_token_rewards_score_at_last_valid_token(dtype):
    scores = t([1.0, 2.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9]])  # 9.9 sits on padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).to(dtype)
    rewards, non_score = per_token_rewards(scores, kl, mask, kl_coef=0.5)
    # non-score: -0.5 * kl = -0.05, -0.1, -0.15 ; -0.2, -0.25, (padding) 0
    close(non_score, [[-0.05, -0.10, -0.15], [-0.20, -0.25, 0.0]])
    # score added at the last valid token: row 0 index 2: -0.15 + 1 = 0.85
    #                                      row 1 index 1: -0.25 + 2 = 1.75
    close(rewards, [[-0.05, -0.10, 0.85], [-0.20, 1.75, 0.0]])


def test_per_token_rewards_single_token_response_and_tensor_coef():
    # a response that is only its EOS: reward = -0.1 * 2 + 3 = 2.8
    rewards, non_score = per_token_rewards(
        t([3.0]), t([[2.0, 7.0]]), torch.tensor([[True, False]]), torch.tensor(0.1)
    )
    close(rewards, [[2.8, 0.0]])
    close(non_score, [[-0.2, 0.0]])


def test_normalize_scores():
    scores = t([1.0, 3.0])
    # subtract the RM's recorded mean 0.5: 0.5, 2.5
    close(normalize_scores(scores, mean=0.5), [0.5, 2.5])
    # and divide by a recorded std of 2: 0.25, 1.25
    close(normalize_scores(scores, mean=0.5, std=2.0), [0.25, 1.25])
    # whiten (mean kept): 1, 3 -> batch mean 2, unbiased var ((1)^2 + (1)^2)/1 = 2
    #   (x - 2) / sqrt(2) + 2 = 2 -/+ 0.7071067812 = 1.2928932188, 2.7071067812
    close(normalize_scores(scores, mean=0.0, whiten=True), [1.2928932188, 2.7071067812])
    with pytest.raises(ValueError, match="std"):
        normalize_scores(scores, mean=0.0, std=0.0)


# ---------------------------------------------------------------- GAE


def test_gae_gamma1_lam095_by_hand():
    rewards = t([[0.0, 0.0, 1.0], [0.2, 1.0, 5.0]])  # 5.0 and 9.0 sit on padding
    values = t([[0.5, 0.6, 0.7], [0.4, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0 (episode ends after t=2, so V_3 = 0):
    #   t=2: d = 1 + 0 - 0.7 = 0.3                   A2 = 0.3
    #   t=1: d = 0 + 0.7 - 0.6 = 0.1                 A1 = 0.1 + 0.95*0.3   = 0.385
    #   t=0: d = 0 + 0.6 - 0.5 = 0.1                 A0 = 0.1 + 0.95*0.385 = 0.46575
    # row 1 (last valid t=1; the value 9.0 after it is not bootstrapped):
    #   t=1: d = 1.0 + 0 - 0.3 = 0.7                 A1 = 0.7
    #   t=0: d = 0.2 + 0.3 - 0.4 = 0.1               A0 = 0.1 + 0.95*0.7   = 0.765
    close(adv, [[0.46575, 0.385, 0.3], [0.765, 0.7, 0.0]])
    # returns = A + V: 0.96575, 0.985, 1.0 ; 1.165, 1.0, (padding) 0
    close(ret, [[0.96575, 0.985, 1.0], [1.165, 1.0, 0.0]])


def test_gae_with_lambda1_gives_discounted_monte_carlo_returns():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)
    #   t=2: A2 = 1 - 0.7 = 0.3
    #   t=1: d = 0 + 0.5*0.7 - 0.6 = -0.25 ; A1 = -0.25 + 0.5*0.3  = -0.1
    #   t=0: d = 0 + 0.5*0.6 - 0.5 = -0.2  ; A0 = -0.2 + 0.5*(-0.1) = -0.25
    close(adv, [[-0.25, -0.1, 0.3]])
    # lam = 1: returns are the discounted reward-to-go: 0.25*1, 0.5*1, 1
    close(ret, [[0.25, 0.5, 1.0]])


def test_whiten_advantages_over_valid_tokens_only():
    adv = t([[2.0, 4.0, 1000.0], [6.0, -1000.0, 1000.0]])
    # valid 2, 4, 6: mean 4, unbiased var (4 + 0 + 4)/2 = 4 -> (x - 4)/2 = -1, 0, 1
    out = whiten_advantages(adv, MASK)
    close(out, [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])


# ---------------------------------------------------------------- policy loss

# (advantage, ratio, per-token loss max(-A*r, -A*clip(r, 0.8, 1.2)), clipped term active?)
POLICY_CASES = [
    # A > 0, r above 1 + eps: max(-1.5, -1.2) = -1.2 -> clipped (no gain beyond 1.2)
    (1.0, 1.5, -1.2, True),
    # A > 0, r below 1 - eps: max(-0.5, -0.8) = -0.5 -> unclipped (pessimistic)
    (1.0, 0.5, -0.5, False),
    # A < 0, r above 1 + eps: max(1.5, 1.2) = 1.5 -> unclipped (pessimistic)
    (-1.0, 1.5, 1.5, False),
    # A < 0, r below 1 - eps: max(0.5, 0.8) = 0.8 -> clipped
    (-1.0, 0.5, 0.8, True),
    # inside the trust region: -2*1.1 = -2.2 ; 2*0.9 = 1.8
    (2.0, 1.1, -2.2, False),
    (-2.0, 0.9, 1.8, False),
]


@pytest.mark.parametrize("adv,ratio,expected,is_clipped", POLICY_CASES)
def test_policy_loss_regimes(adv, ratio, expected, is_clipped):
    old = t([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, stats = policy_loss(logp, old, t([[adv]]), torch.ones(1, 1), clip_eps=0.2)
    close(loss, expected, atol=1e-5)
    close(stats["clipfrac"], 1.0 if is_clipped else 0.0)
    loss.backward()
    # d/dlogp of -A*r is -A*r; the clipped term is flat, so its gradient is 0
    close(logp.grad, [[0.0 if is_clipped else -adv * ratio]], atol=1e-5)


def test_policy_loss_batch_masked_mean_and_stats():
    ratios = [[1.5, 0.5, 1.5, 1.0], [0.5, 1.1, 0.9, 1.0]]
    advs = [[1.0, 1.0, -1.0, 50.0], [-1.0, 2.0, -2.0, 50.0]]  # column 3 is padding
    old = t([[-1.0] * 4, [-2.0] * 4])
    logp = old + torch.log(t(ratios))
    logp[:, 3] = float("inf")  # garbage on padding must not reach loss or gradient
    logp.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, t(advs), mask)
    # per-token losses from POLICY_CASES: -1.2, -0.5, 1.5, 0.8, -2.2, 1.8
    # mean = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2 + 1.8) / 6 = 0.2 / 6 = 0.0333333
    close(loss, 0.2 / 6, atol=1e-5)
    # clipped tokens: (A=1, r=1.5) and (A=-1, r=0.5): 2 / 6
    close(stats["clipfrac"], 2.0 / 6.0)
    # ratio mean: (1.5 + 0.5 + 1.5 + 0.5 + 1.1 + 0.9) / 6 = 6 / 6 = 1
    close(stats["ratio_mean"], 1.0, atol=1e-5)
    # approxkl = 0.5 * mean(log r ^ 2): ln1.5^2 = 0.1644020, ln0.5^2 = 0.4804530,
    #   ln1.1^2 = 0.0090840, ln0.9^2 = 0.0111008
    #   sum = 2*0.1644020 + 2*0.4804530 + 0.0090840 + 0.0111008 = 1.3098948
    #   0.5 * 1.3098948 / 6 = 0.1091579
    close(stats["approxkl"], 0.1091579, atol=1e-6)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    close(logp.grad[:, 3], [0.0, 0.0])
    assert not stats["approxkl"].requires_grad


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    logp = t([[-0.7, -1.3, -2.0], [-0.1, -4.0, -9.0]])
    adv = t([[1.0, -2.0, 3.0], [0.5, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = policy_loss(logp, logp.clone(), adv, mask)
    # -(1 - 2 + 3 + 0.5) / 4 = -2.5 / 4 = -0.625
    close(loss, -0.625)
    close(stats["clipfrac"], 0.0)
    close(stats["approxkl"], 0.0)
    close(stats["ratio_mean"], 1.0)


# ---------------------------------------------------------------- value loss


def test_value_loss_clipping_by_hand():
    # c = 0.2. per token (V, V_old, R) -> V_clip, (V-R)^2, (V_clip-R)^2, max
    #   (1.0, 0.5, 1.0) -> 0.7, 0.00, 0.09, 0.09  clipped term active
    #   (0.6, 0.5, 0.0) -> 0.6, 0.36, 0.36, 0.36  inside the range
    #   (1.0, 0.5, 0.0) -> 0.7, 1.00, 0.49, 1.00  unclipped larger
    #   (0.0, 0.5, 0.5) -> 0.3, 0.25, 0.04, 0.25  unclipped larger
    #   (0.0, 0.5, 0.0) -> 0.3, 0.00, 0.09, 0.09  clipped term active
    #   padding (50, 0, -50) ignored
    values = t([[1.0, 0.6, 1.0], [0.0, 0.0, 50.0]]).requires_grad_(True)
    old = t([[0.5, 0.5, 0.5], [0.5, 0.5, 0.0]])
    returns = t([[1.0, 0.0, 0.0], [0.5, 0.0, -50.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    # 0.5 * (0.09 + 0.36 + 1.0 + 0.25 + 0.09) / 5 = 0.5 * 1.79 / 5 = 0.179
    close(loss, 0.179)
    # 2 of 5 tokens have the clipped term active
    close(stats["clipfrac"], 0.4)
    loss.backward()
    # clipped-active tokens and padding get no gradient (V_clip is flat in V);
    # unclipped: d/dV 0.5*(V-R)^2/5 = (V-R)/5: (0.6-0)/5 = 0.12, (1-0)/5 = 0.2, (0-0.5)/5 = -0.1
    close(values.grad, [[0.0, 0.12, 0.2], [-0.1, 0.0, 0.0]])


# ---------------------------------------------------------------- logits


def test_logprobs_from_logits_with_temperature():
    ln3 = 1.0986122887
    # softmax([0, ln3]) = [1/4, 3/4]: log 1/4 = -1.3862944, log 3/4 = -0.2876821
    logits = t([[[0.0, ln3], [0.0, ln3]]])  # (B=1, T=2, V=2)
    close(logprobs_from_logits(logits, torch.tensor([[0, 1]])), [[-1.3862944, -0.2876821]])
    # temperature 2 on [0, 2 ln3] is softmax([0, ln3]) again
    out = logprobs_from_logits((2 * logits).bfloat16(), torch.tensor([[1, 0]]), temperature=2.0)
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    close(out, [[-0.2876821, -1.3862944]], atol=2e-2)  # bf16 input: ln3 rounds to 3 digits
    close(logprobs_from_logits(2 * logits, torch.tensor([[1, 0]]), 2.0), [[-0.2876821, -1.3862944]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_logprobs_equal_the_full_logits_path_in_value_and_gradient(dtype):
    """Chunked through the head (3 positions per chunk of 2 × 4), log-probs, entropies and the
    gradient to the hidden states equal log-softmax over the full logits and autograd's gradient,
    in float32 and under bfloat16 autocast (a bf16 base's update): the values bit for bit (each chunk
    runs the same ops), the written-out gradient to a float32 rounding, and under autocast to one
    bfloat16 step (both cast the logits' gradient to bfloat16 for the head's matmul, and a value on
    a rounding boundary may land either side)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 4, 8, generator=g).to(dtype)
    weight = torch.randn(11, 8, generator=g).to(dtype)
    tokens = torch.randint(0, 11, (2, 4), generator=g)
    upstream = torch.randn(2, 4, generator=g)

    def run(chunked: bool):
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if chunked:
                lp, ent = head_logprobs(h, weight, tokens, 0.7, with_entropy=True, chunk_rows=3)
            else:
                logits = F.linear(h, weight)
                lp, ent = logprobs_from_logits(logits, tokens, 0.7), entropy_from_logits(logits.detach(), 0.7)
        (lp * upstream).sum().backward()
        return lp.detach(), ent, h.grad

    ours, full = run(True), run(False)
    assert ours[0].dtype == torch.float32 and ours[0].shape == (2, 4)
    assert torch.equal(ours[0], full[0]) and torch.equal(ours[1], full[1])
    assert ours[2].dtype == dtype
    grad_tol = 1e-6 if dtype == torch.float32 else 1e-2  # bfloat16: one step is 2^-8 relative
    torch.testing.assert_close(ours[2], full[2], rtol=grad_tol, atol=grad_tol)
    assert not ours[1].requires_grad
    # The rollout's pass (no gradients) and the update's forward give the same log-probs exactly:
    # with a fresh policy, PPO's ratio is exactly 1 (docs/ppo.md).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        rollout_lp, _ = head_logprobs(hidden, weight, tokens, 0.7, chunk_rows=3)
    assert torch.equal(rollout_lp, ours[0])


def test_entropy_from_logits():
    ln3 = 1.0986122887
    logits = t([[[0.0, ln3], [1000.0, 1000.0], [1000.0, 0.0]]])  # (1, 3, 2)
    # p = [1/4, 3/4]: H = 0.25*ln4 + 0.75*ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    # [1000, 1000]: uniform over 2 -> ln2 = 0.6931472 (no overflow)
    # [1000, 0]: all mass on one token -> 0
    close(entropy_from_logits(logits), [[0.5623351, 0.6931472, 0.0]])
    # temperature 2 on doubled logits gives the same distribution
    close(entropy_from_logits(2 * logits[:, :1], temperature=2.0), [[0.5623351]])
    # a banned token (-inf logit) has p = 0 and adds nothing: [0, 0, -inf] -> ln2, no NaN
    banned = t([[[0.0, 0.0, float("-inf")]]]).requires_grad_(True)
    h = entropy_from_logits(banned)
    close(h, [[0.6931472]])
    h.sum().backward()
    assert torch.isfinite(banned.grad).all()


def test_explained_variance():
    returns = t([[1.0, 2.0, 99.0], [3.0, -99.0, 0.0]])  # valid R = 1, 2, 3 (var 1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # perfect critic: R - V = 0 -> 1 - 0/1 = 1
    close(explained_variance(t([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), returns, mask), 1.0)
    # constant critic V = 2: R - V = -1, 0, 1 has var 1 -> 1 - 1/1 = 0
    close(explained_variance(t([[2.0, 2.0, 5.0], [2.0, 5.0, 5.0]]), returns, mask), 0.0)
    # V = 1.5, 2, 2.5: R - V = -0.5, 0, 0.5, var (0.25 + 0 + 0.25)/2 = 0.25 -> 1 - 0.25 = 0.75
    close(explained_variance(t([[1.5, 2.0, 0.0], [2.5, 0.0, 0.0]]), returns, mask), 0.75)
    # constant returns: undefined -> NaN
    assert torch.isnan(explained_variance(t([[0.0, 1.0]]), t([[4.0, 4.0]]), torch.ones(1, 2)))


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_update():
    ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    # kl 9: error 9/6 - 1 = 0.5, clipped to 0.2; 0.1 * (1 + 0.2*1000/10000) = 0.1 * 1.02 = 0.102
    assert ctl.update(9.0, n_steps=1000) == pytest.approx(0.102)
    # kl 5.4: error 0.9 - 1 = -0.1; 0.102 * (1 - 0.1*0.1) = 0.102 * 0.99 = 0.10098
    assert ctl.update(5.4, n_steps=1000) == pytest.approx(0.10098)
    # kl 0: error -1, clipped to -0.2; 0.10098 * 0.98 = 0.0989604
    assert ctl.update(0.0, n_steps=1000) == pytest.approx(0.0989604)
    assert ctl.value == pytest.approx(0.0989604)


def test_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=1000)  # 0.102
    state = json.loads(json.dumps(ctl.state_dict()))  # plain, serialisable state
    resumed = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(state)
    assert resumed.value == ctl.value == pytest.approx(0.102)
    assert resumed.update(5.4, 1000) == ctl.update(5.4, 1000)

    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, n_steps=1000) == 0.05  # never moves
    other = FixedKLController(0.5)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_make_kl_controller():
    assert isinstance(make_kl_controller(0.05), FixedKLController)
    ctl = make_kl_controller(0.05, target=6.0)
    assert isinstance(ctl, AdaptiveKLController) and ctl.horizon == 10000
    with pytest.raises(ValueError, match="target"):
        make_kl_controller(0.05, target=0.0)


@pytest.mark.parametrize("temperature", [0.0, -0.7])
def test_log_probs_and_entropies_refuse_a_temperature_that_is_not_positive(temperature):
    hidden, weight, tokens = torch.randn(1, 2, 4), torch.randn(5, 4), torch.tensor([[1, 3]])
    logits = torch.nn.functional.linear(hidden, weight)
    for call in (lambda: logprobs_from_logits(logits, tokens, temperature),
                 lambda: entropy_from_logits(logits, temperature),
                 lambda: head_logprobs(hidden, weight, tokens, temperature)):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            call()
