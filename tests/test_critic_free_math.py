"""Hand-computed tests for the critic-free math: rlhf.ppo.critic_free and the RLOO / GRPO losses
in rlhf.ppo.losses.

As in test_ppo_math.py, every expected value is worked out by hand with the arithmetic in a
comment, never the same formula run again. Layout: the k samples of a prompt are contiguous
rows. Padding positions hold absurd values (9.9, 1000, inf) to show they contribute nothing.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from rlhf.ppo.critic_free import (
    discounted_returns,
    grpo_advantages,
    group_mean_baseline,
    group_rows,
    kl_penalised_scores,
    reinforce_pp_advantages,
    repeat_per_prompt,
    rloo_advantages,
    sequence_kl,
    token_advantages,
)
from rlhf.ppo.losses import grpo_policy_loss, sequence_policy_loss


def t(data) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.float32)


def close(actual, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), rtol=0.0, atol=atol)


INF = float("inf")
# Two responses, T = 3: row 0 has 2 valid tokens, row 1 has 1.
MASK = torch.tensor([[True, True, False], [True, False, False]])


# ---------------------------------------------------------------- groups


def test_repeat_per_prompt_keeps_a_prompts_samples_contiguous():
    assert repeat_per_prompt(["a", "b"], 2) == ["a", "a", "b", "b"]
    assert repeat_per_prompt([[1, 2], [3]], 3) == [[1, 2], [1, 2], [1, 2], [3], [3], [3]]
    assert repeat_per_prompt(["a"], 1) == ["a"]
    with pytest.raises(ValueError, match=">= 1"):
        repeat_per_prompt(["a"], 0)


def test_group_rows_views_prompt_major_layout():
    x = t([1, 2, 3, 4, 5, 6])
    close(group_rows(x, 3), [[1, 2, 3], [4, 5, 6]])
    close(group_rows(x, 2), [[1, 2], [3, 4], [5, 6]])
    two_d = t([[1, 1], [2, 2], [3, 3], [4, 4]])
    assert group_rows(two_d, 2).shape == (2, 2, 2)
    close(group_rows(two_d, 2)[1], [[3, 3], [4, 4]])
    with pytest.raises(ValueError, match="does not hold whole groups of 4"):
        group_rows(x, 4)


# ---------------------------------------------------------------- RLOO


def test_sequence_kl_sums_valid_tokens_only():
    kl = t([[0.1, 0.2, 9.9], [0.5, 1000.0, INF]])
    # 0.1 + 0.2 = 0.3 ; 0.5
    close(sequence_kl(kl, MASK), [0.3, 0.5])
    close(sequence_kl(kl, MASK.float()), [0.3, 0.5])


def test_kl_penalised_scores_fold_the_sequence_kl_into_the_reward():
    kl = t([[0.1, 0.2, 9.9], [0.5, 1000.0, INF]])
    # 1 - 0.5 * 0.3 = 0.85 ; 2 - 0.5 * 0.5 = 1.75
    close(kl_penalised_scores(t([1.0, 2.0]), kl, MASK, 0.5), [0.85, 1.75])
    # k1 KL can be negative: a response less likely under the policy than the reference gains
    close(kl_penalised_scores(t([1.0]), t([[-0.4, 0.1]]), torch.ones(1, 2, dtype=torch.bool), 0.5), [1.15])


def test_rloo_leave_one_out_by_hand():
    rewards = t([1, 2, 3, 6, 0, 0, 4, 4])
    # group [1, 2, 3, 6], sum 12: 1 - 11/3 = -8/3 ; 2 - 10/3 = -4/3 ; 3 - 9/3 = 0 ; 6 - 6/3 = 4
    # group [0, 0, 4, 4], sum 8: 0 - 8/3 ; 0 - 8/3 ; 4 - 4/3 = 8/3 ; 8/3
    close(rloo_advantages(rewards, 4), [-8 / 3, -4 / 3, 0, 4, -8 / 3, -8 / 3, 8 / 3, 8 / 3])
    # k = 2: each sample's baseline is its sibling: [1, 3] -> [-2, 2]; [6, 6] -> [0, 0]
    close(rloo_advantages(t([1, 3, 6, 6]), 2), [-2, 2, 0, 0])
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(t([1, 2]), 1)
    with pytest.raises(ValueError, match="whole groups"):
        rloo_advantages(t([1, 2, 3]), 2)


def test_rloo_reward_then_baseline_end_to_end():
    # two samples of one prompt, equal scores, sequence KLs 0.2 and 0.6, beta 0.5:
    # rewards 1 - 0.1 = 0.9 and 1 - 0.3 = 0.7 ; leave-one-out: 0.9 - 0.7 = 0.2, 0.7 - 0.9 = -0.2
    kl = t([[0.2, 0.0], [0.3, 0.3]])
    rewards = kl_penalised_scores(t([1.0, 1.0]), kl, torch.ones(2, 2, dtype=torch.bool), 0.5)
    close(rloo_advantages(rewards, 2), [0.2, -0.2])


# ---------------------------------------------------------------- GRPO


def test_grpo_group_normalised_advantages_by_hand():
    rewards = t([1, 2, 3, 5, 5, 5, 0, 4, 8])
    # group [1, 2, 3]: mean 2, deviations -1, 0, 1, unbiased var (1 + 0 + 1) / 2 = 1, std 1
    # group [5, 5, 5]: all deviations 0 -> 0 (no NaN: 0 / (0 + 1e-4))
    # group [0, 4, 8]: mean 4, deviations -4, 0, 4, unbiased var 32 / 2 = 16, std 4
    e = 1e-4
    close(grpo_advantages(rewards, 3),
          [-1 / (1 + e), 0, 1 / (1 + e), 0, 0, 0, -4 / (4 + e), 0, 4 / (4 + e)])
    # Dr. GRPO: the deviations alone; the spread of the third group is no longer divided away
    close(grpo_advantages(rewards, 3, scale_by_std=False), [-1, 0, 1, 0, 0, 0, -4, 0, 4])
    with pytest.raises(ValueError, match="at least 2 samples"):
        grpo_advantages(t([1.0]), 1)


# ---------------------------------------------------------------- REINFORCE++


def test_group_mean_baseline():
    # [1, 2] mean 1.5 -> -0.5, 0.5 ; [3, 6] mean 4.5 -> -1.5, 1.5
    close(group_mean_baseline(t([1, 2, 3, 6]), 2), [-0.5, 0.5, -1.5, 1.5])
    close(group_mean_baseline(t([1, 2]), 1), [0, 0])


def test_discounted_returns_by_hand():
    rewards = t([[1.0, 2.0, 3.0], [4.0, 9.9, INF]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # gamma 1: row 0: 1+2+3 = 6, 2+3 = 5, 3 ; row 1: 4, padding 0
    close(discounted_returns(rewards, mask), [[6, 5, 3], [4, 0, 0]])
    # gamma 0.5: G2 = 3 ; G1 = 2 + 0.5*3 = 3.5 ; G0 = 1 + 0.5*3.5 = 2.75
    close(discounted_returns(rewards, mask, gamma=0.5), [[2.75, 3.5, 3], [4, 0, 0]])


KL_RPP = t([[0.2, 0.4, 9.9], [1.0, 9.9, INF]])


def test_reinforce_pp_token_kl_returns_and_global_whitening_by_hand():
    out = reinforce_pp_advantages(t([1.0, 2.0]), KL_RPP, MASK, kl_coef=0.5)
    # per-token reward -0.5*KL, score at the last valid token:
    # row 0: -0.1, -0.2 + 1.0 = 0.8 ; row 1: -0.5 + 2.0 = 1.5
    close(out.rewards, [[-0.1, 0.8, 0], [1.5, 0, 0]])
    close(out.non_score_rewards, [[-0.1, -0.2, 0], [-0.5, 0, 0]])
    # returns (gamma 1): row 0: -0.1 + 0.8 = 0.7, 0.8 ; row 1: 1.5
    close(out.returns, [[0.7, 0.8, 0], [1.5, 0, 0]])
    # whitening over the 3 valid tokens: mean (0.7 + 0.8 + 1.5) / 3 = 1.0 ; deviations -0.3, -0.2, 0.5 ;
    # squares 0.09 + 0.04 + 0.25 = 0.38, unbiased var 0.38 / 2 = 0.19
    s = math.sqrt(0.19 + 1e-8)
    close(out.advantages, [[-0.3 / s, -0.2 / s, 0], [0.5 / s, 0, 0]], atol=1e-5)


def test_reinforce_pp_baseline_subtracts_the_group_mean_score_before_the_kl():
    out = reinforce_pp_advantages(t([1.0, 3.0]), KL_RPP, MASK, kl_coef=0.5, k=2, group_baseline=True)
    # scores [1, 3] -> group mean 2 -> -1, 1 ; rewards row 0: -0.1, -0.2 - 1 = -1.2 ; row 1: -0.5 + 1 = 0.5
    close(out.rewards, [[-0.1, -1.2, 0], [0.5, 0, 0]])
    # returns: row 0: -1.3, -1.2 ; row 1: 0.5 ; mean (-1.3 - 1.2 + 0.5) / 3 = -2/3
    close(out.returns, [[-1.3, -1.2, 0], [0.5, 0, 0]])
    d = [-1.3 + 2 / 3, -1.2 + 2 / 3, 0.5 + 2 / 3]  # -0.6333, -0.5333, 1.1667
    s = math.sqrt((d[0] ** 2 + d[1] ** 2 + d[2] ** 2) / 2 + 1e-8)
    close(out.advantages, [[d[0] / s, d[1] / s, 0], [d[2] / s, 0, 0]], atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        reinforce_pp_advantages(t([1.0, 3.0]), KL_RPP, MASK, kl_coef=0.5, k=1, group_baseline=True)


def test_reinforce_pp_whitening_spans_processes():
    """Two threads stand for two processes, each holding one response; their sum_across is a real
    all-reduce (both contributions summed behind a barrier). Each process's advantages must equal
    its rows of the one-process result on the whole batch."""
    scores, kl, mask = t([1.0, 2.0]), KL_RPP, MASK
    whole = reinforce_pp_advantages(scores, kl, mask, kl_coef=0.5).advantages
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def run(rank: int) -> None:
        def sum_across(x: torch.Tensor) -> torch.Tensor:
            slots[rank] = x
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # nobody overwrites a slot before both have read it
            return total

        results[rank] = reinforce_pp_advantages(scores[rank:rank + 1], kl[rank:rank + 1], mask[rank:rank + 1],
                                                kl_coef=0.5, sum_across=sum_across).advantages

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    close(torch.cat(results), whole)
    # alone, the process with one valid token would whiten it to 0: the global statistics matter
    alone = reinforce_pp_advantages(scores[1:], kl[1:], mask[1:], kl_coef=0.5).advantages
    close(alone, [[0, 0, 0]])
    assert results[1][0, 0] > 1.0


def test_token_advantages_broadcast_to_valid_tokens():
    close(token_advantages(t([2.0, -1.0]), MASK), [[2, 2, 0], [-1, 0, 0]])


# ---------------------------------------------------------------- RLOO loss (sequence ratio)


def test_sequence_policy_loss_at_ratio_one_is_reinforce_on_the_sequence():
    logp = t([[-1.0, -2.0, 1000.0], [-0.5, -1000.0, INF]]).requires_grad_(True)
    old = t([[-1.0, -2.0, -1000.0], [-0.5, 5.0, 0.0]])
    adv = t([1.0, -2.0])
    loss, stats = sequence_policy_loss(logp, old, adv, MASK)
    # ratio 1 everywhere: loss = mean(-A) = (-1 + 2) / 2 = 0.5
    close(loss, 0.5)
    loss.backward()
    # d loss / d logp_t = -A_b / B on valid tokens: row 0: -1/2 ; row 1: 2/2 = 1 ; padding 0
    close(logp.grad, [[-0.5, -0.5, 0], [1.0, 0, 0]])
    close(stats["ratio_mean"], 1.0)
    close(stats["clipfrac"], 0.0)


def test_sequence_policy_loss_clips_the_sequence_ratio_by_hand():
    old = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logp = t([[0.1, 0.2, 1000.0], [-0.5, -1000.0, 0.0]])
    loss, stats = sequence_policy_loss(logp, old, t([1.0, -2.0]), MASK, clip_eps=0.2)
    # row 0: log-ratio 0.1 + 0.2 = 0.3, ratio e^0.3 = 1.3499, A = 1: max(-1.3499, -1.2) = -1.2 (clipped)
    # row 1: ratio e^-0.5 = 0.6065, A = -2: max(1.2131, 2 * 0.8 = 1.6) = 1.6 (clipped)
    close(loss, (-1.2 + 1.6) / 2, atol=1e-6)
    close(stats["clipfrac"], 1.0)
    close(stats["approxkl"], 0.5 * (0.09 + 0.25) / 2)  # 0.085
    # inside the clip range the unclipped term is used: log-ratio 0.1, A = 1 -> -e^0.1 = -1.10517
    inside, inside_stats = sequence_policy_loss(t([[0.1]]), t([[0.0]]), t([1.0]), torch.ones(1, 1, dtype=torch.bool))
    close(inside, -math.exp(0.1))
    close(inside_stats["clipfrac"], 0.0)


# ---------------------------------------------------------------- GRPO loss


def test_grpo_loss_aggregations_at_ratio_one_by_hand():
    logp = t([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    adv = t([1.0, 2.0])
    seq, _ = grpo_policy_loss(logp, logp, logp, adv, MASK, kl_coef=0.1)
    # every valid token has -A: per-response means -1 and -2, mean over responses -1.5
    close(seq, -1.5)
    const, stats = grpo_policy_loss(logp, logp, logp, adv, MASK, kl_coef=0.1, aggregation="constant", max_length=4)
    # sum over tokens: 2 * (-1) + 1 * (-2) = -4, divided by B * max_length = 2 * 4: -0.5
    close(const, -0.5)
    close(stats["pg_loss"], -0.5)
    close(stats["kl"], 0.0)
    with pytest.raises(ValueError, match="max_length"):
        grpo_policy_loss(logp, logp, logp, adv, MASK, aggregation="constant")


def test_grpo_loss_k3_kl_term_and_its_gradient_by_hand():
    ln2 = math.log(2.0)
    # policy == old (ratio 1), A = 0: only the KL term remains. d = ref - logp per valid token:
    # row 0: 0, ln 2 ; row 1: -ln 2. Padding holds logp = -1e4 against ref 0 (e^1e4 = inf if not masked).
    logp = t([[-1.0, -1.0, -1e4], [-1.0, -1e4, -1e4]]).requires_grad_(True)
    ref = t([[-1.0, -1.0 + ln2, 0.0], [-1.0 - ln2, 0.0, 0.0]])
    zero_adv = t([0.0, 0.0])
    loss, stats = grpo_policy_loss(logp, logp.detach(), ref, zero_adv, MASK, kl_coef=0.1)
    # k3 = e^d - d - 1: d = 0 -> 0 ; d = ln 2 -> 2 - ln 2 - 1 = 0.306853 ; d = -ln 2 -> 0.5 + ln 2 - 1 = 0.193147
    # sequence_mean: row 0 (0 + 0.306853) / 2 = 0.153426 ; row 1 0.193147 ; mean 0.173287 ; * 0.1
    close(loss, 0.1 * ((1 - ln2) / 2 + (ln2 - 0.5)) / 2)
    # mean k3 over the 3 valid tokens: (0.306853 + 0.193147) / 3 = 0.5 / 3
    close(stats["kl"], 0.5 / 3)
    loss.backward()
    # d k3 / d logp = 1 - e^d: d = 0 -> 0 ; ln 2 -> -1 ; -ln 2 -> 0.5 ; weights 0.1 * (1 / |o_i|) * (1 / B)
    close(logp.grad, [[0.0, 0.1 * -1 / 2 / 2, 0.0], [0.1 * 0.5 / 1 / 2, 0.0, 0.0]])
    const, _ = grpo_policy_loss(logp, logp.detach(), ref, zero_adv, MASK, kl_coef=0.1, aggregation="constant",
                                max_length=4)
    # (0.306853 + 0.193147) / (2 * 4) = 0.0625 ; * 0.1
    close(const, 0.00625)


def test_grpo_loss_clips_per_token_by_hand():
    old = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logp = t([[0.5, 0.0, 1000.0], [-0.5, 0.0, 0.0]])
    loss, stats = grpo_policy_loss(logp, old, logp, t([1.0, 1.0]), MASK, clip_eps=0.2, kl_coef=0.0)
    # row 0: token 0 ratio e^0.5 = 1.6487 -> max(-1.6487, -1.2) = -1.2 (clipped) ; token 1 ratio 1 -> -1 ; mean -1.1
    # row 1: ratio e^-0.5 = 0.60653, A > 0: max(-0.60653, -0.8) = -0.60653 (unclipped) ; mean over rows
    close(loss, (-1.1 - math.exp(-0.5)) / 2, atol=1e-6)
    close(stats["clipfrac"], 1 / 3)
    close(stats["pg_loss"], loss)
