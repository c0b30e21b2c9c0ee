"""Statistics of `rlhf eval` and the RM gate: pure functions of numbers, no models, no files.

Paired comparisons over prompts (outcomes, prompt_means, paired_comparison, winner_agreement),
standard errors (stderr of a mean, binomial_se of an accuracy), summaries (describe,
response_stats), where a score gain comes from (eos_change_split, length_regression,
gain_decomposition), the over-optimisation test (overoptimisation_check), reward-model
calibration (sigmoid, calibration_bins) and the KL of a sampled response (kl_per_response, the
one torch function; torch is imported only there, so the RM gate and the console stay light).
Each is tested against hand-computed values in tests/test_evaluate.py and tests/test_rm_gate.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

CALIBRATION_BINS = 6


def outcomes(base: Sequence[float], new: Sequence[float]) -> list[float]:
    """Per-item result of `new` against `base`: 1 if new > base, 0.5 on an exact tie, 0 otherwise.

    base, new: (N,) scores of the same N items (e.g. the SFT and the PPO response to each prompt)."""
    if len(base) != len(new):
        raise ValueError(f"outcomes: {len(base)} base scores but {len(new)} new scores")
    return [1.0 if n > b else 0.5 if n == b else 0.0 for b, n in zip(base, new)]


def prompt_means(values: Sequence[float], samples_per_prompt: int) -> list[float]:
    """(N·k,) values in prompt-major order (the k samples of prompt 0, then prompt 1's, ...) -> (N,)
    per-prompt means. k = samples_per_prompt; the length must be a multiple of k."""
    k = samples_per_prompt
    if k < 1 or len(values) % k:
        raise ValueError(f"prompt_means: {len(values)} values are not a whole number of groups of {k}")
    return [math.fsum(float(v) for v in values[i:i + k]) / k for i in range(0, len(values), k)]


def paired_comparison(base: Sequence[float], new: Sequence[float], samples_per_item: int = 1) -> dict[str, float]:
    """Win rate and score gain of `new` over `base` on paired scores.

    base, new: (N·k,) floats in item-major order (k = samples_per_item samples of item 0, then of
    item 1, ...), sample j of item i scored under both (e.g. the SFT and the PPO response to prompt
    i drawn with the same seed). Each item's k scores are averaged first (prompt_means), so the
    items, not the samples, are the independent units. Returns n (items), n_samples (N·k),
    samples_per_item, win_rate (mean of `outcomes` of the per-item means: ties 0.5), wins, ties,
    losses, win_rate_stderr (sample std of the outcomes / sqrt(N); 0 for N = 1), gain_mean (mean of
    new - base), gain_stderr (the paired standard error: sample std of the per-item mean
    differences / sqrt(N)), base_mean and new_mean. N = 0 gives NaNs."""
    base = prompt_means(base, samples_per_item)
    new = prompt_means(new, samples_per_item)
    n = len(base)
    out = outcomes(base, new)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "n_samples": 0, "samples_per_item": samples_per_item, "win_rate": nan, "wins": 0, "ties": 0,
                "losses": 0, "win_rate_stderr": nan, "gain_mean": nan, "gain_stderr": nan, "base_mean": nan,
                "new_mean": nan}
    gains = [b2 - b1 for b1, b2 in zip(base, new)]
    return {
        "n": n,
        "n_samples": n * samples_per_item,
        "samples_per_item": samples_per_item,
        "win_rate": math.fsum(out) / n,
        "wins": sum(1 for o in out if o == 1.0),
        "ties": sum(1 for o in out if o == 0.5),
        "losses": sum(1 for o in out if o == 0.0),
        "win_rate_stderr": stderr(out),
        "gain_mean": math.fsum(gains) / n,
        "gain_stderr": stderr(gains),
        "base_mean": math.fsum(base) / n,
        "new_mean": math.fsum(new) / n,
    }


def winner_agreement(a: list[float], b: list[float]) -> float:
    """Share of items where two scorers pick the same winner: a, b are (N,) `outcomes` of the same
    comparison under each scorer (e.g. the RM and the judge); a tie on either side counts 0.5."""
    if not a:
        return float("nan")
    return sum(1.0 if x == y else 0.5 if 0.5 in (x, y) else 0.0 for x, y in zip(a, b)) / len(a)


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample std (ddof=1) / sqrt(N); 0 for N = 1, NaN for N = 0."""
    n = len(values)
    if n == 0:
        return float("nan")
    if n == 1:
        return 0.0
    m = math.fsum(values) / n
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1) / n)


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on n pairs: sqrt(p·(1 - p) / n); NaN for n = 0."""
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n) if n > 0 else float("nan")


def kl_per_response(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(policy‖reference) of each sampled response, k1 estimator: Σ_t mask · (log π − log π_ref).

    logprobs, ref_logprobs: (B, R) log-probs of the sampled tokens (same temperature); mask: (B, R)
    bool, True on response tokens (up to and including the stop token). Returns (B,) float32.
    Unbiased for samples drawn from the policy; one sample can be negative."""
    from rlhf.ppo.advantages import kl_penalty

    # The k1 estimator PPO penalises (advantages.kl_penalty), summed: eval measures the KL PPO paid for.
    return kl_penalty(logprobs.float(), ref_logprobs.float(), "k1", mask.bool()).sum(dim=1)


def describe(values: Sequence[float]) -> dict[str, float]:
    """mean, stderr, median, min and max of N values (NaN for N = 0)."""
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "stderr": nan, "median": nan, "min": nan, "max": nan}
    median = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    return {"mean": math.fsum(xs) / n, "stderr": stderr(xs), "median": median, "min": xs[0], "max": xs[-1]}


def response_stats(lengths: Sequence[int], has_stop: Sequence[bool]) -> dict[str, float]:
    """lengths: (N,) response tokens (the stop token included); has_stop: (N,) reached the stop token.
    Returns length_mean, length_min, length_max and eos_rate (share of responses that stopped)."""
    n = len(lengths)
    if n == 0:
        nan = float("nan")
        return {"length_mean": nan, "length_min": nan, "length_max": nan, "eos_rate": nan}
    return {"length_mean": sum(lengths) / n, "length_min": min(lengths), "length_max": max(lengths),
            "eos_rate": sum(1 for s in has_stop if s) / n}


def eos_change_split(base_stop: Sequence[bool], new_stop: Sequence[bool], gains: Sequence[float]) -> dict[str, Any]:
    """The score gain split by how each pair's stop-token (EOS) status changed from base to new.

    base_stop, new_stop: (M,) whether the base (SFT) and the new (PPO) response of pair m reached the
    stop token; gains: (M,) new − base score of pair m. Groups: both_stop, neither_stop,
    gained_stop (base cut off at the length limit, new stopped) and lost_stop (the reverse); per
    group n, share (n / M), gain_mean (NaN when empty) and contribution (Σ of its gains / M). The
    four contributions add up to the mean gain; `changed_*` sums the two groups whose status changed
    (the gain that comes with EOS changes), `unchanged_gain_mean` is the mean gain of the others."""
    if not len(base_stop) == len(new_stop) == len(gains):
        raise ValueError(f"eos_change_split: {len(base_stop)}, {len(new_stop)} and {len(gains)} values")
    m = len(gains)
    nan = float("nan")
    members: dict[str, list[float]] = {"both_stop": [], "neither_stop": [], "gained_stop": [], "lost_stop": []}
    for b, n, g in zip(base_stop, new_stop, gains):
        key = ("both_stop" if n else "lost_stop") if b else ("gained_stop" if n else "neither_stop")
        members[key].append(float(g))
    groups = {k: {"n": len(v), "share": len(v) / m if m else nan, "gain_mean": math.fsum(v) / len(v) if v else nan,
                  "contribution": math.fsum(v) / m if m else nan} for k, v in members.items()}
    changed = members["gained_stop"] + members["lost_stop"]
    unchanged = members["both_stop"] + members["neither_stop"]
    return {"n_pairs": m, "groups": groups, "changed_share": len(changed) / m if m else nan,
            "changed_contribution": math.fsum(changed) / m if m else nan,
            "unchanged_gain_mean": math.fsum(unchanged) / len(unchanged) if unchanged else nan}


def length_regression(length_diff: Sequence[float], gains: Sequence[float]) -> dict[str, float]:
    """How much of a mean score gain goes with the change in length: the least-squares line
    gain = a + b · Δlength over N items (per-prompt means of new − base).

    length_diff, gains: (N,). Returns n, length_diff_mean, slope (b: score per extra token),
    gain_at_equal_length (a: the gain predicted at Δlength = 0) with its OLS standard error
    (gain_at_equal_length_stderr, NaN for N < 3), from_length (b · mean Δlength), length_share
    (from_length / mean gain; NaN for a zero gain) and r2. The mean gain = gain_at_equal_length +
    from_length exactly. Δlength without spread leaves b unidentified: b = 0 when every Δlength is
    0 (all of the gain is at equal length), else b and a are NaN."""
    x = [float(v) for v in length_diff]
    y = [float(v) for v in gains]
    if len(x) != len(y):
        raise ValueError(f"length_regression: {len(x)} length differences but {len(y)} gains")
    n = len(x)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "length_diff_mean": nan, "slope": nan, "gain_at_equal_length": nan,
                "gain_at_equal_length_stderr": nan, "from_length": nan, "length_share": nan, "r2": nan}
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxx = math.fsum((v - mx) ** 2 for v in x)
    sxy = math.fsum((u - mx) * (v - my) for u, v in zip(x, y))
    syy = math.fsum((v - my) ** 2 for v in y)
    if sxx > 0:
        slope = sxy / sxx
    else:
        slope = 0.0 if mx == 0 else nan
    intercept = my - slope * mx
    sse = math.fsum((v - intercept - slope * u) ** 2 for u, v in zip(x, y))
    if n >= 3 and sxx > 0:
        se = math.sqrt(sse / (n - 2) * (1 / n + mx ** 2 / sxx))
    elif n >= 2 and sxx == 0 and mx == 0:
        se = stderr(y)  # no length change at all: the intercept is the plain mean gain
    else:
        se = nan
    from_length = slope * mx
    return {"n": n, "length_diff_mean": mx, "slope": slope, "gain_at_equal_length": intercept,
            "gain_at_equal_length_stderr": se, "from_length": from_length,
            "length_share": from_length / my if my != 0 else nan,
            "r2": 1 - sse / syy if syy > 0 and sxx > 0 else nan}


def gain_decomposition(base_scores: Sequence[float], new_scores: Sequence[float], base_lengths: Sequence[int],
                       new_lengths: Sequence[int], base_stop: Sequence[bool], new_stop: Sequence[bool],
                       samples_per_prompt: int) -> dict[str, Any]:
    """How much of the new-over-base score gain comes with length and EOS changes. Every argument is
    (N·k,) in prompt-major order, sample j of prompt i drawn with the same seed on both sides.

    `eos`: eos_change_split over the N·k sample pairs. `length`: length_regression of the per-prompt
    mean gain on the per-prompt mean length difference (new − base tokens, the stop token counted)."""
    k = samples_per_prompt
    gains = [float(b2) - float(b1) for b1, b2 in zip(base_scores, new_scores)]
    diffs = [float(l2) - float(l1) for l1, l2 in zip(base_lengths, new_lengths)]
    return {"eos": eos_change_split(base_stop, new_stop, gains),
            "length": length_regression(prompt_means(diffs, k), prompt_means(gains, k))}


def overoptimisation_check(points: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Does the judge (the gold score) fall while the RM score rises over the PPO checkpoints?

    points: the over-optimisation curve in step order (step 0 = SFT first), each with step,
    rm_score_mean, judge_mean and judge_stderr. The last checkpoint is compared with the earlier
    point of best judge mean: `flag` is true when that best judge mean exceeds the last one by more
    than the last point's judge standard error while the last RM score is higher than at the best
    point (Gao et al. 2023: proxy up, gold down). None without a judge or with fewer than two points."""
    if len(points) < 2 or any("judge_mean" not in p for p in points):
        return None
    last = points[-1]
    best = max(points[:-1], key=lambda p: p["judge_mean"])  # the first of equal bests
    drop = best["judge_mean"] - last["judge_mean"]
    flag = drop > last["judge_stderr"] and last["rm_score_mean"] > best["rm_score_mean"]
    return {"flag": bool(flag), "last_step": last["step"], "best_step": best["step"], "judge_last": last["judge_mean"],
            "judge_best": best["judge_mean"], "judge_drop": drop, "judge_stderr": last["judge_stderr"],
            "rm_last": last["rm_score_mean"], "rm_at_best": best["rm_score_mean"]}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def calibration_bins(diffs: Sequence[float], n_bins: int = CALIBRATION_BINS) -> list[dict[str, float]]:
    """Reward-model calibration: pairs sorted by |chosen − rejected| and cut into `n_bins` bins of
    (nearly) equal count.

    diffs: (N,) score(chosen) − score(rejected). Per non-empty bin: n, abs_diff_min, abs_diff_max,
    abs_diff_mean, accuracy (share with diff > 0, ties 0.5) and predicted (mean of σ(|diff|), the
    Bradley-Terry probability that the higher-scored response is the preferred one). A calibrated
    RM has accuracy ≈ predicted in every bin; a useful one has accuracy rising with |diff|."""
    d = [float(x) for x in diffs]
    order = sorted(range(len(d)), key=lambda i: abs(d[i]))
    n_bins = max(1, min(n_bins, len(d)))
    bins = []
    for b in range(n_bins):
        idx = order[b * len(d) // n_bins:(b + 1) * len(d) // n_bins]
        if not idx:
            continue
        absd = [abs(d[i]) for i in idx]
        acc = outcomes([0.0] * len(idx), [d[i] for i in idx])
        bins.append({"n": len(idx), "abs_diff_min": min(absd), "abs_diff_max": max(absd),
                     "abs_diff_mean": math.fsum(absd) / len(idx), "accuracy": math.fsum(acc) / len(idx),
                     "predicted": math.fsum(sigmoid(a) for a in absd) / len(idx)})
    return bins
