"""Evaluation: did each stage do its job? (`rlhf eval`, also run at the end of `rlhf run-all`).

- RM: accuracy on the held-out preference pairs (ties count 0.5), mean margin, and a
  calibration-style view: pairs binned by |score difference| against the empirical accuracy in
  each bin, beside the Bradley-Terry prediction σ(|difference|) -> eval/rm_calibration.png.
- Policy: for each held-out PPO prompt (the first `eval.max_prompts`), `eval.samples_per_prompt`
  (k) responses from the SFT model and k from the PPO policy, sampled with the same settings and,
  sample for sample, the same seeds, all scored by the reward model exactly as PPO scores its
  rollouts. Over prompts, on per-prompt means: win rate of PPO over SFT (ties 0.5) and the mean
  score gain, each with its (paired) standard error; KL(PPO‖SFT) per response, lengths and EOS
  rates; and how much of the gain comes with length and EOS changes (gain_decomposition).
- Judge (optional): `eval.judge: "package.module:function"`, called as function(prompt, response)
  -> float on every response; the same figures as the RM's, beside them.
- Over-optimisation: every PPO checkpoint (and step 0, the SFT model) on the first
  `eval.overopt_prompts` held-out prompts, one sample each: mean RM score (and judge score)
  against mean KL -> eval/overoptimisation.png; with a judge, a warning when the judge falls
  while the RM score rises (overoptimisation_check).

The models are the PPO roles (rlhf.ppo.roles.build_roles): `sft/model` loaded once, the reward
adapter and head from `rm/adapter`, and the policy adapter loaded with the trained PPO weights. The
SFT model is that base with the adapters off (the PPO reference), so "SFT" here is exactly the
model PPO measured its KL against, and scores are read as PPO reads them (chat-template suffix
appended after a stop token, score at the last real token).

Outputs under runs/<name>/eval/: eval.json {settings, inputs, rm, policy, judge, overoptimisation,
overoptimisation_check, warnings}, samples.jsonl (one row per prompt and sample: prompt_index,
sample, prompt, sft_response, ppo_response, sft_score, ppo_score, kl, sft/ppo_has_stop,
sft/ppo_length, and sft_judge/ppo_judge with a judge), rm_calibration.png, overoptimisation.png.

`generate_text` is `rlhf generate`: a stage's merged model folder with plain transformers.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhf.atomic import save_figure, write_json_atomically, write_jsonl_atomically
from rlhf.config import PipelineConfig
from rlhf.errors import UserError
from rlhf.runs import stage_run
from rlhf.staleness import EVAL_DIR, EVAL_FILE, eval_inputs, stage_hash

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
CALIBRATION_PNG = "rm_calibration.png"
OVEROPT_PNG = "overoptimisation.png"
CALIBRATION_BINS = 6


# ---------------------------------------------------------------------------- pure math


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


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample std (ddof=1) / sqrt(N); 0 for N = 1, NaN for N = 0."""
    n = len(values)
    if n == 0:
        return float("nan")
    if n == 1:
        return 0.0
    m = math.fsum(values) / n
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1) / n)


def kl_per_response(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(policy‖reference) of each sampled response, k1 estimator: Σ_t mask · (log π − log π_ref).

    logprobs, ref_logprobs: (B, R) log-probs of the sampled tokens (same temperature); mask: (B, R)
    bool, True on response tokens (up to and including the stop token). Returns (B,) float32.
    Unbiased for samples drawn from the policy; one sample can be negative."""
    diff = (logprobs.float() - ref_logprobs.float()).masked_fill(~mask.bool(), 0.0)
    return diff.sum(dim=1)


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


def overoptimisation_warning(check: dict[str, Any] | None) -> str | None:
    """The one warning line for a flagged overoptimisation_check, else None."""
    if not check or not check["flag"]:
        return None
    earlier = "the SFT model" if check["best_step"] == 0 else f"the step-{check['best_step']} checkpoint"
    return (f"over-optimisation: from step {check['best_step']} to step {check['last_step']} the RM score rose "
            f"({check['rm_at_best']:+.3f} -> {check['rm_last']:+.3f}) while the judge fell ({check['judge_best']:+.3f} -> "
            f"{check['judge_last']:+.3f}, more than its standard error {check['judge_stderr']:.3f}): PPO is exploiting "
            f"the reward model; prefer {earlier}, a larger ppo.kl_coef, fewer ppo.steps or a better RM")


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


# ---------------------------------------------------------------------------- judge plug-in


def load_judge(spec: str) -> Callable[[Any, str], float]:
    """Import `package.module:function` (eval.judge); UserError if it cannot be imported or called."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise UserError(f"eval.judge {spec!r}: cannot import module '{module_name}' ({type(e).__name__}: {e}); "
                        "make it importable (install it, or add its folder to PYTHONPATH)") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"eval.judge {spec!r}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise UserError(f"eval.judge {spec!r}: '{attr}' is not a function (a {type(fn).__name__})")
    return fn


def judge_scores(judge: Callable, spec: str, prompts: Sequence[Any], responses: Sequence[str], which: str,
                 indices: Sequence[int] | None = None) -> list[float]:
    """judge(prompt, response) for each pair, as floats. A judge that raises, or returns anything but
    a finite number, is a UserError naming the judge, the held-out prompt's index and `which` side."""
    out = []
    for k, (p, r) in enumerate(zip(prompts, responses)):
        i = indices[k] if indices is not None else k
        try:
            value = judge(p, r)
        except Exception as e:  # noqa: BLE001 - the judge is user code: report, do not crash
            raise UserError(f"eval.judge {spec!r} raised {type(e).__name__}: {e} on held-out prompt {i} "
                            f"({which} response); fix the judge or set eval.judge: null") from None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise UserError(f"eval.judge {spec!r} returned {value!r} ({type(value).__name__}) for held-out prompt {i} "
                            f"({which} response); it must return a finite number")
        out.append(float(value))
    return out


# ---------------------------------------------------------------------------- models


@dataclass
class Env:
    """What every evaluation pass needs, loaded once."""

    cfg: PipelineConfig
    tokenizer: Any
    roles: Any  # rlhf.ppo.roles.Roles
    stop_id: int | None
    pad_id: int
    score_suffix: list[int]
    response_length: int
    temperature: float
    seed: int
    batch_size: int
    device: torch.device


def _stop_id(cfg: PipelineConfig, tokenizer) -> int | None:
    stop = cfg.ppo.stop_token if cfg.ppo is not None else "eos"
    if stop is None:
        return None
    return tokenizer.eos_token_id if stop == "eos" else tokenizer.convert_tokens_to_ids(stop)


def load_env(cfg: PipelineConfig, tokenizer, conversational: bool) -> Env:
    """sft/model once, as the PPO roles: reward adapter + head from rm/adapter, a fresh policy adapter
    (identical to the reference until trained weights are loaded into it)."""
    from transformers import AutoModelForCausalLM

    from rlhf.models import lora_config, model_kwargs, turn_end_suffix
    from rlhf.ppo.roles import build_roles

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = AutoModelForCausalLM.from_pretrained(str(cfg.stage_dir("sft") / "model"), **model_kwargs(cfg.model)).to(device)
    # value_on_policy=True: build no value adapter, evaluation never uses the critic.
    roles = build_roles(base, lora_config(cfg.lora, "CAUSAL_LM"), cfg.stage_dir("rm") / "adapter", value_on_policy=True)
    e = cfg.eval
    ppo = cfg.ppo
    return Env(cfg=cfg, tokenizer=tokenizer, roles=roles, stop_id=_stop_id(cfg, tokenizer), pad_id=tokenizer.pad_token_id,
               score_suffix=turn_end_suffix(tokenizer) if conversational else [],
               response_length=e.response_length or (ppo.response_length if ppo else 48),
               temperature=e.temperature or (ppo.temperature if ppo else 0.7),
               seed=cfg.seed if e.seed is None else e.seed, batch_size=e.batch_size, device=device)


def load_policy_adapter(env: Env, adapter_dir: Path) -> None:
    """Put the PPO stage's exported policy adapter (ppo/adapter) into the `policy` adapter."""
    from rlhf.ppo.roles import _load_lora_weights

    _load_lora_weights(env.roles.model, adapter_dir, "policy")


def load_policy_checkpoint(env: Env, ckpt: Path) -> None:
    """Put a PPO checkpoint's policy weights (checkpoints/step-N/trainable.safetensors) into the
    `policy` adapter; the checkpoint's value adapter and head are not needed here."""
    from safetensors.torch import load_file

    from rlhf.ppo.trainer import load_trainable_state

    state = {k: v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()
             if k.startswith("model.") and ".policy." in k}
    expected = sum(1 for n, _ in env.roles.model.named_parameters() if ".policy." in n and "lora_" in n)
    if len(state) != expected:
        raise UserError(f"{ckpt}/trainable.safetensors holds {len(state)} policy weights, expected {expected}; "
                        "was it written with a different lora section? Rerun PPO: rlhf ppo --fresh --config ...")
    load_trainable_state(env.roles, state)


@torch.no_grad()
def sample(env: Env, adapter: str | None, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """(B, R) sampled response tokens of the PPO policy (adapter "policy") or the SFT model (None),
    with PPO's sampling settings (rlhf.ppo.rollout.generate)."""
    from rlhf.ppo.rollout import generate

    return generate(env.roles, query_ids, query_mask, env.response_length, env.temperature, env.stop_id, env.pad_id,
                    adapter=adapter)


@dataclass
class Responses:
    """Responses to N prompts from one model, scored. Lists are per prompt, in prompt order."""

    texts: list[str]
    scores: list[float]  # raw RM score (no centring, no missing-EOS rule)
    kl: list[float]  # KL(policy‖SFT) of each response (k1, summed); 0.0 for the SFT model itself
    lengths: list[int]
    has_stop: list[bool]


@torch.no_grad()
def respond(env: Env, adapter: str | None, prompts: list[list[int]], desc: str) -> Responses:
    """Sample a response per tokenized prompt with `adapter` ('policy' or None = SFT), in batches of
    eval.batch_size seeded with seed + batch index (so the SFT and the PPO pass draw the same random
    numbers), and score each with the reward model as PPO does. With the policy, also KL(policy‖SFT)."""
    from tqdm.auto import tqdm

    from rlhf.ppo.rollout import append_after_stop, left_pad, response_logprobs, sequence_scores, truncate_at_stop

    out = Responses([], [], [], [], [])
    starts = range(0, len(prompts), env.batch_size)
    for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True, leave=False)):
        query_ids, query_mask = left_pad(prompts[start:start + env.batch_size], env.pad_id, env.device)
        torch.manual_seed(env.seed + b)
        tokens = sample(env, adapter, query_ids, query_mask)
        response, mask, has_stop = truncate_at_stop(tokens, env.stop_id, env.pad_id)
        width = int(mask.sum(1).max())  # columns past the longest response are padding everywhere
        response, mask = response[:, :width], mask[:, :width]
        ids = torch.cat([query_ids, response], dim=1)
        attention = torch.cat([query_mask, mask], dim=1).long()
        scored_ids, scored_mask = append_after_stop(ids, attention, has_stop, env.score_suffix, env.pad_id)
        out.scores += sequence_scores(env.roles, scored_ids, scored_mask).tolist()
        if adapter is None:
            out.kl += [0.0] * len(response)  # the SFT model against itself
        else:
            logprobs, _, _ = response_logprobs(env.roles, ids, attention, response, env.temperature, adapter)
            ref, _, _ = response_logprobs(env.roles, ids, attention, response, env.temperature, None)
            out.kl += kl_per_response(logprobs, ref, mask).tolist()
        out.lengths += mask.sum(1).tolist()
        out.has_stop += has_stop.tolist()
        out.texts += [env.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(response, mask)]
    return out


@torch.no_grad()
def score_pairs(env: Env, pairs) -> tuple[list[float], list[float]]:
    """RM scores (chosen, rejected), each (N,), of preference records, tokenized as the RM stage
    trained on them (rlhf.rm.encode) and scored by the reward role, left-padded in length-sorted batches."""
    from rlhf.ppo.rollout import left_pad, sequence_scores
    from rlhf.rm import encode

    records = list(pairs)
    seqs = [encode(env.tokenizer, r["prompt"], r["chosen"]) for r in records]
    seqs += [encode(env.tokenizer, r["prompt"], r["rejected"]) for r in records]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    scores = [0.0] * len(seqs)
    for start in range(0, len(order), env.batch_size):
        idx = order[start:start + env.batch_size]
        ids, mask = left_pad([seqs[i] for i in idx], env.pad_id, env.device)
        for i, s in zip(idx, sequence_scores(env.roles, ids, mask.long()).tolist()):
            scores[i] = s
    return scores[:len(records)], scores[len(records):]


# ---------------------------------------------------------------------------- plots


def plot_calibration(bins: list[dict[str, float]], rm: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = [b["abs_diff_mean"] for b in bins]
    ax.plot(x, [b["accuracy"] for b in bins], "o-", label="held-out accuracy in bin")
    ax.plot(x, [b["predicted"] for b in bins], "s--", color="grey", label="Bradley-Terry σ(|diff|)")
    for b, xi in zip(bins, x):
        ax.annotate(f"n={b['n']}", (xi, b["accuracy"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.axhline(0.5, color="black", lw=0.6, ls=":")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("|score(chosen) − score(rejected)| (bin mean)")
    ax.set_ylabel("share of pairs ranked correctly")
    ax.set_title(f"RM calibration: accuracy {rm['accuracy']:.2f} on {rm['n_pairs']} {rm['split']} pairs", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)
    plt.close(fig)


def plot_overoptimisation(points: list[dict[str, Any]], path: Path, judge: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rm_score_mean", "mean RM score")] + ([("judge_mean", f"mean judge score ({judge})")] if judge else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    kl = [p["kl_mean"] for p in points]
    for ax, (key, label) in zip(axes[0], panels):
        y = [p[key] for p in points]
        ax.plot(kl, y, "o-")
        for p, xi, yi in zip(points, kl, y):
            ax.annotate(f"step {p['step']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("KL(policy ‖ SFT), nats per response")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    n = points[0]["n_prompts"] if points else 0
    fig.suptitle(f"Reward vs KL along PPO ({n} held-out prompts per point)", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------- the evaluation


def _readable_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _held_out(data, what: str, key: str):
    """The held-out split, or the training split with a warning when the config has none."""
    if data.eval is not None:
        return data.eval, "held-out"
    log.warning("%s has no held-out data (set %s.eval_path or eval_split); evaluating on training data", what, key)
    return data.train, "training"


def evaluate_rm(env: Env, pairs, split: str) -> dict[str, Any]:
    from rlhf.rm import pairwise_metrics

    chosen, rejected = score_pairs(env, pairs)
    metrics = pairwise_metrics(chosen, rejected)
    metrics["split"] = split
    metrics["calibration"] = calibration_bins([c - r for c, r in zip(chosen, rejected)])
    return metrics


def compare_policy(env: Env, prompts: list[list[int]], raw_prompts: list[Any], judge: Callable | None,
                   judge_spec: str | None, samples_per_prompt: int = 1
                   ) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """SFT vs the policy currently in the `policy` adapter on the same prompts, `samples_per_prompt`
    (k) responses per prompt from each model: (policy metrics, judge metrics or None, sample rows).

    The prompts are repeated k times (prompt-major) and sampled in the same batches with the same
    seeds by both models (respond), so sample j of prompt i is drawn with the same random numbers
    under SFT and PPO. Win rates, gains and their standard errors are over prompts, on the
    per-prompt means (paired_comparison); KL per response is averaged the same way."""
    k = samples_per_prompt
    expanded = [p for p in prompts for _ in range(k)]
    raw_expanded = [p for p in raw_prompts for _ in range(k)]
    prompt_index = [i for i in range(len(prompts)) for _ in range(k)]
    sft = respond(env, None, expanded, "eval: SFT")
    ppo = respond(env, "policy", expanded, "eval: PPO")
    cmp = paired_comparison(sft.scores, ppo.scores, k)
    policy = {
        "n_prompts": cmp["n"], "samples_per_prompt": k, "n_samples": cmp["n_samples"],
        "win_rate": cmp["win_rate"], "win_rate_stderr": cmp["win_rate_stderr"],
        "wins": cmp["wins"], "ties": cmp["ties"], "losses": cmp["losses"],
        "score_gain_mean": cmp["gain_mean"], "score_gain_stderr": cmp["gain_stderr"],
        "sft_score_mean": cmp["base_mean"], "ppo_score_mean": cmp["new_mean"],
        "kl": describe(prompt_means(ppo.kl, k)),
        "sft": response_stats(sft.lengths, sft.has_stop), "ppo": response_stats(ppo.lengths, ppo.has_stop),
        "gain_decomposition": gain_decomposition(sft.scores, ppo.scores, sft.lengths, ppo.lengths, sft.has_stop,
                                                 ppo.has_stop, k),
    }
    policy["kl_mean"] = policy["kl"]["mean"]
    if env.cfg.ppo is not None:
        policy["kl_warn_bound"] = env.cfg.ppo.kl_warn_bound
    rows = [{"prompt_index": i, "sample": n % k, "prompt": _readable_prompt(p), "sft_response": s, "ppo_response": q,
             "sft_score": round(ss, 4), "ppo_score": round(qs, 4), "kl": round(kl, 4), "sft_has_stop": bool(sh),
             "ppo_has_stop": bool(qh), "sft_length": int(sl), "ppo_length": int(ql)}
            for n, (i, p, s, q, ss, qs, kl, sh, qh, sl, ql) in enumerate(zip(
                prompt_index, raw_expanded, sft.texts, ppo.texts, sft.scores, ppo.scores, ppo.kl, sft.has_stop,
                ppo.has_stop, sft.lengths, ppo.lengths))]
    judged = None
    if judge is not None:
        sft_j = judge_scores(judge, judge_spec, raw_expanded, sft.texts, "SFT", prompt_index)
        ppo_j = judge_scores(judge, judge_spec, raw_expanded, ppo.texts, "PPO", prompt_index)
        jc = paired_comparison(sft_j, ppo_j, k)
        judged = {"judge": judge_spec, "n_prompts": jc["n"], "samples_per_prompt": k, "win_rate": jc["win_rate"],
                  "win_rate_stderr": jc["win_rate_stderr"], "ties": jc["ties"], "sft_mean": jc["base_mean"],
                  "ppo_mean": jc["new_mean"], "gain_mean": jc["gain_mean"], "gain_stderr": jc["gain_stderr"],
                  "agreement_with_rm": _agreement(outcomes(prompt_means(sft.scores, k), prompt_means(ppo.scores, k)),
                                                  outcomes(prompt_means(sft_j, k), prompt_means(ppo_j, k))),
                  "gain_decomposition": gain_decomposition(sft_j, ppo_j, sft.lengths, ppo.lengths, sft.has_stop,
                                                           ppo.has_stop, k)}
        for row, a, b in zip(rows, sft_j, ppo_j):
            row["sft_judge"], row["ppo_judge"] = a, b
    return policy, judged, rows


def _agreement(a: list[float], b: list[float]) -> float:
    """Share of prompts where the RM and the judge pick the same winner (a tie on either side counts 0.5)."""
    if not a:
        return float("nan")
    return sum(1.0 if x == y else 0.5 if 0.5 in (x, y) else 0.0 for x, y in zip(a, b)) / len(a)


def overoptimisation(env: Env, prompts: list[list[int]], raw_prompts: list[Any], judge: Callable | None,
                     judge_spec: str | None) -> list[dict[str, Any]]:
    """Mean RM score (and judge score, each with its standard error) and mean KL at step 0 (the SFT
    model) and at every PPO checkpoint of the current config, on `prompts`, one sample per prompt
    (kept cheap: one pass per checkpoint). Leaves the last checkpoint's policy loaded."""
    from rlhf.ppo.trainer import checkpoint_dirs

    ckpt_hash = stage_hash(env.cfg, "ppo")
    ckpts = []
    for d in checkpoint_dirs(env.cfg.stage_dir("ppo") / "checkpoints"):
        state = json.loads((d / "state.json").read_text())
        if state.get("config_hash") == ckpt_hash:
            ckpts.append((int(state["step"]), d))
    points = []
    for step, ckpt in [(0, None)] + ckpts:
        if ckpt is not None:
            load_policy_checkpoint(env, ckpt)
        r = respond(env, None if ckpt is None else "policy", prompts, f"eval: step {step}")
        point = {"step": step, "n_prompts": len(prompts), "rm_score_mean": describe(r.scores)["mean"],
                 "rm_score_stderr": stderr(r.scores), "kl_mean": describe(r.kl)["mean"],
                 "eos_rate": response_stats(r.lengths, r.has_stop)["eos_rate"]}
        if judge is not None:
            js = judge_scores(judge, judge_spec, raw_prompts, r.texts, f"step {step}")
            point["judge_mean"], point["judge_stderr"] = math.fsum(js) / len(js), stderr(js)
        points.append(point)
    return points


def run(cfg: PipelineConfig) -> Path:
    """Evaluate the finished stages of `cfg`; writes runs/<name>/eval/ and returns that folder."""
    from rlhf.data import needs_chat_template, ppo_data, render, rm_data
    from rlhf.models import load_tokenizer

    stage = stage_run(cfg, EVAL_DIR)  # an rm section; every configured stage finished and current
    judge = load_judge(cfg.eval.judge) if cfg.eval.judge else None  # fail on a bad judge before loading models
    t0 = time.perf_counter()
    out_dir = stage.dir
    out_dir.mkdir(parents=True, exist_ok=True)
    sft_model = str(cfg.stage_dir("sft") / "model")
    need_template = needs_chat_template(cfg.rm.data, cfg.seed) or (cfg.ppo is not None and needs_chat_template(cfg.ppo.data, cfg.seed))
    tokenizer = load_tokenizer(cfg.model, sft_model, need_chat_template=need_template)
    pairs, pair_split = _held_out(rm_data(cfg, tokenizer), "rm.data", "rm.data")
    prompts_ds, prompt_split, conversational = None, None, False
    if cfg.ppo is not None:
        data = ppo_data(cfg, tokenizer)
        conversational = data.conversational
        prompts_ds, prompt_split = _held_out(data, "ppo.data", "ppo.data")
    env = load_env(cfg, tokenizer, conversational)
    seconds = {"load": time.perf_counter() - t0}  # where the time goes, per phase

    report: dict[str, Any] = {"inputs": eval_inputs(cfg)}
    report["rm"] = evaluate_rm(env, pairs, pair_split)
    seconds["rm"] = time.perf_counter() - t0 - sum(seconds.values())
    plot_calibration(report["rm"]["calibration"], report["rm"], out_dir / CALIBRATION_PNG)
    log.info("RM: accuracy %.3f on %d %s pairs, margin %.3f", report["rm"]["accuracy"], report["rm"]["n_pairs"],
             pair_split, report["rm"]["margin_mean"])
    report["policy"], report["judge"], report["overoptimisation"] = None, None, []
    rows: list[dict[str, Any]] = []
    if cfg.ppo is not None:
        raw = list(prompts_ds["prompt"])[:cfg.eval.max_prompts]
        tokenized = [tokenizer(render(tokenizer, p), add_special_tokens=False)["input_ids"] for p in raw]
        load_policy_adapter(env, cfg.stage_dir("ppo") / "adapter")
        report["policy"], report["judge"], rows = compare_policy(env, tokenized, raw, judge, cfg.eval.judge,
                                                                 cfg.eval.samples_per_prompt)
        report["policy"]["split"] = prompt_split
        seconds["policy"] = time.perf_counter() - t0 - sum(seconds.values())
        k = min(cfg.eval.overopt_prompts, len(tokenized))
        if k:
            report["overoptimisation"] = overoptimisation(env, tokenized[:k], raw[:k], judge, cfg.eval.judge)
            plot_overoptimisation(report["overoptimisation"], out_dir / OVEROPT_PNG, cfg.eval.judge)
            seconds["overoptimisation"] = time.perf_counter() - t0 - sum(seconds.values())
    report["overoptimisation_check"] = overoptimisation_check(report["overoptimisation"])
    report["warnings"] = [w for w in [overoptimisation_warning(report["overoptimisation_check"])] if w]
    report["settings"] = {
        "max_prompts": cfg.eval.max_prompts, "samples_per_prompt": cfg.eval.samples_per_prompt,
        "overopt_prompts": cfg.eval.overopt_prompts, "overopt_samples_per_prompt": 1,
        "response_length": env.response_length, "temperature": env.temperature, "seed": env.seed,
        "batch_size": env.batch_size, "judge": cfg.eval.judge, "stop_token": cfg.ppo.stop_token if cfg.ppo else "eos",
        "ppo_steps": cfg.ppo.steps if cfg.ppo else None, "scores": "raw RM scores (no centring, no missing-EOS rule)",
        "kl": "k1, summed over response tokens, at the sampling temperature, on the PPO samples",
        "ties_count_as": 0.5,
        "win_rate": "over prompts: the per-prompt mean scores of PPO and SFT compared (ties 0.5)",
        "gain_stderr": "paired: sample std of the per-prompt mean differences / sqrt(n_prompts)",
        "samples": "samples.jsonl has one row per (prompt, sample); sample j of a prompt has the same seed for both models",
        "time_s": round(time.perf_counter() - t0, 2),
        "phase_s": {k: round(v, 2) for k, v in seconds.items()},
    }
    write_jsonl_atomically(out_dir / SAMPLES_FILE, rows)
    write_json_atomically(out_dir / EVAL_FILE, report)
    _track(cfg, report, rows)
    return out_dir


def _track(cfg: PipelineConfig, report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Log the figures to the configured tracker (stage 'eval'): the over-optimisation points at their
    PPO steps, then the summary and a samples table at the final step."""
    from rlhf.tracking import Tracker

    tracker = Tracker(cfg, EVAL_DIR)
    try:
        for p in report["overoptimisation"]:
            tracker.log({"overopt/rm_score": p["rm_score_mean"], "overopt/kl": p["kl_mean"],
                         **({"overopt/judge": p["judge_mean"]} if "judge_mean" in p else {})}, step=p["step"])
        step = cfg.ppo.steps if cfg.ppo is not None else 0
        tracker.log(summary_metrics(report), step=step)
        if rows:
            tracker.log_samples([{"prompt": r["prompt"], "sample": r["sample"], "response": r["ppo_response"],
                                  "score": r["ppo_score"], "sft_response": r["sft_response"], "sft_score": r["sft_score"],
                                  "kl": r["kl"]} for r in rows], step)
    finally:
        tracker.finish()


def summary_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of an eval.json, flat, for trackers and the command's printout."""
    out = {"eval/rm_accuracy": report["rm"]["accuracy"], "eval/rm_margin": report["rm"]["margin_mean"]}
    policy = report.get("policy")
    if policy:
        out.update({"eval/win_rate": policy["win_rate"], "eval/win_rate_stderr": policy["win_rate_stderr"],
                    "eval/score_gain": policy["score_gain_mean"], "eval/score_gain_stderr": policy["score_gain_stderr"],
                    "eval/kl": policy["kl_mean"], "eval/sft_score": policy["sft_score_mean"],
                    "eval/ppo_score": policy["ppo_score_mean"], "eval/ppo_eos_rate": policy["ppo"]["eos_rate"],
                    "eval/sft_eos_rate": policy["sft"]["eos_rate"], "eval/ppo_length": policy["ppo"]["length_mean"],
                    "eval/sft_length": policy["sft"]["length_mean"],
                    "eval/samples_per_prompt": policy.get("samples_per_prompt", 1)})
        out.update(_decomposition_metrics("eval/score_gain", policy.get("gain_decomposition")))
    judge = report.get("judge")
    if judge:
        out.update({"eval/judge_win_rate": judge["win_rate"], "eval/judge_win_rate_stderr": judge["win_rate_stderr"],
                    "eval/judge_gain": judge["gain_mean"], "eval/judge_gain_stderr": judge.get("gain_stderr", math.nan)})
        out.update(_decomposition_metrics("eval/judge_gain", judge.get("gain_decomposition")))
    check = report.get("overoptimisation_check")
    if check:
        out["eval/overoptimised"] = float(check["flag"])
    return out


def _decomposition_metrics(prefix: str, d: dict[str, Any] | None) -> dict[str, float]:
    if not d:
        return {}
    return {f"{prefix}_at_equal_length": d["length"]["gain_at_equal_length"],
            f"{prefix}_from_length": d["length"]["from_length"],
            f"{prefix}_with_eos_change": d["eos"]["changed_contribution"]}


def decomposition_lines(what: str, d: dict[str, Any]) -> list[str]:
    """Two lines: how much of a gain goes with the length change and with EOS changes (gain_decomposition)."""
    length, eos = d["length"], d["eos"]
    g = eos["groups"]
    return [f"  {what} gain at equal length {length['gain_at_equal_length']:+.3f} ± "
            f"{length['gain_at_equal_length_stderr']:.3f}, with the length change {length['from_length']:+.3f} "
            f"({length['length_diff_mean']:+.1f} tokens per response; regression over prompts)",
            f"  {what} gain by EOS status: changed in {eos['changed_share']:.0%} of the sample pairs (cut off -> "
            f"stopped {g['gained_stop']['share']:.0%}, stopped -> cut off {g['lost_stop']['share']:.0%}), carrying "
            f"{eos['changed_contribution']:+.3f} of the gain; the other pairs gain "
            f"{eos['unchanged_gain_mean']:+.3f} on average"]


def summary_lines(report: dict[str, Any], out_dir: Path) -> list[str]:
    """What `rlhf eval` prints."""
    rm = report["rm"]
    lines = [f"RM: accuracy {rm['accuracy']:.3f} on {rm['n_pairs']} {rm['split']} pairs (ties 0.5), "
             f"mean margin {rm['margin_mean']:+.3f}"]
    p = report.get("policy")
    if p:
        k = p.get("samples_per_prompt", 1)
        lines.append(f"PPO vs SFT on {p['n_prompts']} {p['split']} prompts × {k} sample{'s' if k > 1 else ''}: "
                     f"win rate {p['win_rate']:.3f} ± {p['win_rate_stderr']:.3f} by RM score (per-prompt means), "
                     f"mean score {p['sft_score_mean']:+.3f} -> {p['ppo_score_mean']:+.3f} "
                     f"(gain {p['score_gain_mean']:+.3f} ± {p['score_gain_stderr']:.3f})")
        if p.get("gain_decomposition"):
            lines += decomposition_lines("RM score", p["gain_decomposition"])
        lines.append(f"KL(PPO‖SFT) {p['kl_mean']:.3f} nats per response (median {p['kl']['median']:.3f}, "
                     f"max {p['kl']['max']:.3f} over prompts); length {p['sft']['length_mean']:.1f} -> "
                     f"{p['ppo']['length_mean']:.1f} tokens, EOS rate {p['sft']['eos_rate']:.2f} -> "
                     f"{p['ppo']['eos_rate']:.2f}")
    j = report.get("judge")
    if j:
        gain_se = f" ± {j['gain_stderr']:.3f}" if "gain_stderr" in j else ""
        lines.append(f"judge {j['judge']}: win rate {j['win_rate']:.3f} ± {j['win_rate_stderr']:.3f}, mean "
                     f"{j['sft_mean']:+.3f} -> {j['ppo_mean']:+.3f} (gain {j['gain_mean']:+.3f}{gain_se}), "
                     f"agrees with the RM on {j['agreement_with_rm']:.2f} of prompts")
        if j.get("gain_decomposition"):
            lines += decomposition_lines("judge", j["gain_decomposition"])
    for pt in report.get("overoptimisation") or []:
        judge_text = f", judge {pt['judge_mean']:+.3f}" if "judge_mean" in pt else ""
        lines.append(f"  step {pt['step']:>4}: RM score {pt['rm_score_mean']:+.3f}, KL {pt['kl_mean']:.3f}{judge_text}")
    lines += [f"warning: {w}" for w in report.get("warnings") or []]
    lines.append(f"wrote {out_dir / EVAL_FILE}, {out_dir / SAMPLES_FILE} and the plots in {out_dir}")
    return lines


# ---------------------------------------------------------------------------- rlhf generate


def generate_text(cfg: PipelineConfig, stage: str, prompt: str, max_new_tokens: int | None = None,
                  temperature: float | None = None, seed: int | None = None) -> str:
    """One response from a stage's merged model folder (sft/model or ppo/model) loaded with plain
    transformers; the prompt goes through the chat template as a user turn when the tokenizer has
    one. temperature 0 is greedy decoding."""
    from transformers import AutoModelForCausalLM

    from rlhf.data import render
    from rlhf.models import load_tokenizer, model_kwargs
    from rlhf.ppo.rollout import generate_pinned, pinned_generation_config
    from rlhf.runs import STAGE_COMMAND
    from rlhf.staleness import stage_state

    if stage not in ("sft", "ppo"):
        raise UserError(f"--stage {stage}: choose sft or ppo (the reward model scores, it does not generate: use rlhf score)")
    if getattr(cfg, stage) is None:
        raise UserError(f"{cfg.source}: no '{stage}' section, so there is no {stage} model to generate with")
    model_dir = cfg.stage_dir(stage) / "model"
    state = stage_state(cfg, stage)
    if state.status not in ("done", "stale") or not (model_dir / "config.json").is_file():
        raise UserError(f"no finished {stage} model in {model_dir} ({state.status}: {state.reason}); "
                        f"run `{STAGE_COMMAND[stage]} --config {cfg.source or 'pipeline.yaml'}` first")
    if state.status == "stale":
        log.warning("the %s model in %s is stale (%s); generating with it anyway", stage, model_dir, state.reason)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if temperature is not None and temperature < 0:
        raise UserError(f"--temperature {temperature}: must be 0 (greedy) or more")
    ppo = cfg.ppo
    max_new_tokens = max_new_tokens or cfg.eval.response_length or (ppo.response_length if ppo else 64)
    temperature = temperature if temperature is not None else (cfg.eval.temperature or (ppo.temperature if ppo else 0.7))
    tokenizer = load_tokenizer(cfg.model, str(model_dir), need_chat_template=False)
    text = render(tokenizer, [{"role": "user", "content": prompt}]) if tokenizer.chat_template else prompt
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = model_kwargs(cfg.model)
    kwargs["dtype"] = "auto"  # as saved (model.export_dtype): a 16-bit cast would round part of the trained update off again
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).to(device).eval()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
    stop_id = _stop_id(cfg, tokenizer)
    config = pinned_generation_config(max_new_tokens, temperature, tokenizer.eos_token_id if stop_id is None else stop_id,
                                      tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed if seed is None else seed)
    with torch.no_grad():
        out = generate_pinned(model, config, ids["input_ids"], ids["attention_mask"])
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
