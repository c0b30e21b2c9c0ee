"""Evaluation: did each stage do its job? (`rlhf eval`, also run at the end of `rlhf run-all`).

- RM: accuracy on the held-out preference pairs (ties count 0.5), mean margin, and a
  calibration-style view: pairs binned by |score difference| against the empirical accuracy in
  each bin, beside the Bradley-Terry prediction σ(|difference|) -> eval/rm_calibration.png.
- Policy: for each held-out PPO prompt (the first `eval.max_prompts`), one response from the SFT
  model and one from the PPO policy, sampled with the same settings and the same seed, both scored
  by the reward model exactly as PPO scores its rollouts. Win rate of PPO over SFT (ties 0.5),
  mean score gain, KL(PPO‖SFT) per response, lengths and EOS rates.
- Judge (optional): `eval.judge: "package.module:function"`, called as function(prompt, response)
  -> float on both responses; its win rate and means are reported beside the RM's.
- Over-optimisation: every PPO checkpoint (and step 0, the SFT model) on the first
  `eval.overopt_prompts` held-out prompts: mean RM score (and judge score) against mean KL
  -> eval/overoptimisation.png.

The models are the PPO roles (rlhf.ppo.roles.build_roles): `sft/model` loaded once, the reward
adapter and head from `rm/adapter`, and the policy adapter loaded with the trained PPO weights. The
SFT model is that base with the adapters off (the PPO reference), so "SFT" here is exactly the
model PPO measured its KL against, and scores are read as PPO reads them (chat-template suffix
appended after a stop token, score at the last real token).

Outputs under runs/<name>/eval/: eval.json {settings, inputs, rm, policy, judge, overoptimisation},
samples.jsonl (one row per prompt: prompt, sft_response, ppo_response, sft_score, ppo_score, kl,
and sft_judge/ppo_judge with a judge), rm_calibration.png, overoptimisation.png.

`generate_text` is `rlhf generate`: a stage's merged model folder with plain transformers.
"""

from __future__ import annotations

import hashlib
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

from rlhf.config import PipelineConfig, stage_hash
from rlhf.errors import UserError
from rlhf.runs import save_figure, write_json_atomically, write_jsonl_atomically

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
EVAL_FILE = "eval.json"
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


def paired_comparison(base: Sequence[float], new: Sequence[float]) -> dict[str, float]:
    """Win rate and score gain of `new` over `base` on paired scores.

    base, new: (N,) floats, item i scored under both. Returns n, win_rate (mean of `outcomes`),
    wins, ties, losses, win_rate_stderr (sample std of the outcomes / sqrt(N); 0 for N = 1),
    gain_mean (mean of new - base), gain_stderr, base_mean and new_mean. N = 0 gives NaNs."""
    base = [float(x) for x in base]
    new = [float(x) for x in new]
    n = len(base)
    out = outcomes(base, new)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "win_rate": nan, "wins": 0, "ties": 0, "losses": 0, "win_rate_stderr": nan,
                "gain_mean": nan, "gain_stderr": nan, "base_mean": nan, "new_mean": nan}
    gains = [b2 - b1 for b1, b2 in zip(base, new)]
    return {
        "n": n,
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


# ---------------------------------------------------------------------------- inputs and staleness


def eval_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """What an evaluation depends on: the stage hashes and the eval section (less `enabled`)."""
    inputs = {s: stage_hash(cfg, s) for s in ("sft", "rm", "ppo") if getattr(cfg, s) is not None}
    settings = json.dumps(cfg.eval.model_dump(mode="json", exclude={"enabled"}), sort_keys=True)
    inputs["eval"] = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return inputs


def eval_state(cfg: PipelineConfig) -> tuple[bool, str]:
    """(up to date, why not): eval.json exists and was computed from the current stages and settings."""
    path = cfg.stage_dir(EVAL_DIR) / EVAL_FILE
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("inputs")
    except (OSError, json.JSONDecodeError):
        return False, "never run"
    if old != eval_inputs(cfg):
        return False, "a stage or the eval settings changed"
    return True, ""


def require_stages(cfg: PipelineConfig, what: str) -> None:
    """Every configured stage must be finished and current; else name the command that makes it so."""
    from rlhf.runs import STAGE_COMMAND, stage_state

    for stage in ("sft", "rm", "ppo"):
        if getattr(cfg, stage) is None:
            continue
        state = stage_state(cfg, stage)
        if state.status != "done":
            raise UserError(f"{what} needs a finished, current {stage} stage in {cfg.stage_dir(stage)} "
                            f"({state.status}: {state.reason}); run `{STAGE_COMMAND[stage]} --config "
                            f"{cfg.source or 'pipeline.yaml'}` first (or `rlhf run-all`)")


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
                   judge_spec: str | None) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """SFT vs the policy currently in the `policy` adapter on the same prompts: (policy metrics,
    judge metrics or None, sample rows)."""
    sft = respond(env, None, prompts, "eval: SFT")
    ppo = respond(env, "policy", prompts, "eval: PPO")
    cmp = paired_comparison(sft.scores, ppo.scores)
    policy = {
        "n_prompts": cmp["n"], "win_rate": cmp["win_rate"], "win_rate_stderr": cmp["win_rate_stderr"],
        "wins": cmp["wins"], "ties": cmp["ties"], "losses": cmp["losses"],
        "score_gain_mean": cmp["gain_mean"], "score_gain_stderr": cmp["gain_stderr"],
        "sft_score_mean": cmp["base_mean"], "ppo_score_mean": cmp["new_mean"],
        "kl": describe(ppo.kl),
        "sft": response_stats(sft.lengths, sft.has_stop), "ppo": response_stats(ppo.lengths, ppo.has_stop),
    }
    policy["kl_mean"] = policy["kl"]["mean"]
    if env.cfg.ppo is not None:
        policy["kl_warn_bound"] = env.cfg.ppo.kl_warn_bound
    rows = [{"prompt": _readable_prompt(p), "sft_response": s, "ppo_response": q, "sft_score": round(ss, 4),
             "ppo_score": round(qs, 4), "kl": round(k, 4), "sft_has_stop": bool(sh), "ppo_has_stop": bool(qh)}
            for p, s, q, ss, qs, k, sh, qh in zip(raw_prompts, sft.texts, ppo.texts, sft.scores, ppo.scores, ppo.kl,
                                                  sft.has_stop, ppo.has_stop)]
    judged = None
    if judge is not None:
        sft_j = judge_scores(judge, judge_spec, raw_prompts, sft.texts, "SFT")
        ppo_j = judge_scores(judge, judge_spec, raw_prompts, ppo.texts, "PPO")
        jc = paired_comparison(sft_j, ppo_j)
        judged = {"judge": judge_spec, "n_prompts": jc["n"], "win_rate": jc["win_rate"],
                  "win_rate_stderr": jc["win_rate_stderr"], "ties": jc["ties"], "sft_mean": jc["base_mean"],
                  "ppo_mean": jc["new_mean"], "gain_mean": jc["gain_mean"],
                  "agreement_with_rm": _agreement(outcomes(sft.scores, ppo.scores), outcomes(sft_j, ppo_j))}
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
    """Mean RM score (and judge score) and mean KL at step 0 (the SFT model) and at every PPO
    checkpoint of the current config, on `prompts`. Leaves the last checkpoint's policy loaded."""
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
            point["judge_mean"] = math.fsum(js) / len(js)
        points.append(point)
    return points


def run(cfg: PipelineConfig) -> Path:
    """Evaluate the finished stages of `cfg`; writes runs/<name>/eval/ and returns that folder."""
    from rlhf.data import needs_chat_template, ppo_data, render, rm_data
    from rlhf.models import load_tokenizer

    if cfg.rm is None:
        raise UserError(f"{cfg.source}: rlhf eval needs an rm section (the reward model scores everything)")
    require_stages(cfg, "rlhf eval")
    judge = load_judge(cfg.eval.judge) if cfg.eval.judge else None  # fail on a bad judge before loading models
    t0 = time.perf_counter()
    out_dir = cfg.stage_dir(EVAL_DIR)
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
        report["policy"], report["judge"], rows = compare_policy(env, tokenized, raw, judge, cfg.eval.judge)
        report["policy"]["split"] = prompt_split
        seconds["policy"] = time.perf_counter() - t0 - sum(seconds.values())
        k = min(cfg.eval.overopt_prompts, len(tokenized))
        if k:
            report["overoptimisation"] = overoptimisation(env, tokenized[:k], raw[:k], judge, cfg.eval.judge)
            plot_overoptimisation(report["overoptimisation"], out_dir / OVEROPT_PNG, cfg.eval.judge)
            seconds["overoptimisation"] = time.perf_counter() - t0 - sum(seconds.values())
    report["settings"] = {
        "max_prompts": cfg.eval.max_prompts, "overopt_prompts": cfg.eval.overopt_prompts,
        "response_length": env.response_length, "temperature": env.temperature, "seed": env.seed,
        "batch_size": env.batch_size, "judge": cfg.eval.judge, "stop_token": cfg.ppo.stop_token if cfg.ppo else "eos",
        "ppo_steps": cfg.ppo.steps if cfg.ppo else None, "scores": "raw RM scores (no centring, no missing-EOS rule)",
        "kl": "k1, summed over response tokens, at the sampling temperature, on the PPO samples",
        "ties_count_as": 0.5, "time_s": round(time.perf_counter() - t0, 2),
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
            tracker.log_samples([{"prompt": r["prompt"], "response": r["ppo_response"], "score": r["ppo_score"],
                                  "sft_response": r["sft_response"], "sft_score": r["sft_score"], "kl": r["kl"]}
                                 for r in rows], step)
    finally:
        tracker.finish()


def summary_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of an eval.json, flat, for trackers and the command's printout."""
    out = {"eval/rm_accuracy": report["rm"]["accuracy"], "eval/rm_margin": report["rm"]["margin_mean"]}
    policy = report.get("policy")
    if policy:
        out.update({"eval/win_rate": policy["win_rate"], "eval/score_gain": policy["score_gain_mean"],
                    "eval/kl": policy["kl_mean"], "eval/sft_score": policy["sft_score_mean"],
                    "eval/ppo_score": policy["ppo_score_mean"], "eval/ppo_eos_rate": policy["ppo"]["eos_rate"],
                    "eval/sft_eos_rate": policy["sft"]["eos_rate"], "eval/ppo_length": policy["ppo"]["length_mean"],
                    "eval/sft_length": policy["sft"]["length_mean"]})
    judge = report.get("judge")
    if judge:
        out.update({"eval/judge_win_rate": judge["win_rate"], "eval/judge_gain": judge["gain_mean"]})
    return out


def summary_lines(report: dict[str, Any], out_dir: Path) -> list[str]:
    """What `rlhf eval` prints."""
    rm = report["rm"]
    lines = [f"RM: accuracy {rm['accuracy']:.3f} on {rm['n_pairs']} {rm['split']} pairs (ties 0.5), "
             f"mean margin {rm['margin_mean']:+.3f}"]
    p = report.get("policy")
    if p:
        lines.append(f"PPO vs SFT on {p['n_prompts']} {p['split']} prompts: win rate {p['win_rate']:.3f} "
                     f"± {p['win_rate_stderr']:.3f} by RM score, mean score {p['sft_score_mean']:+.3f} -> "
                     f"{p['ppo_score_mean']:+.3f} (gain {p['score_gain_mean']:+.3f})")
        lines.append(f"KL(PPO‖SFT) {p['kl_mean']:.3f} nats per response (median {p['kl']['median']:.3f}, "
                     f"max {p['kl']['max']:.3f}); length {p['sft']['length_mean']:.1f} -> {p['ppo']['length_mean']:.1f} "
                     f"tokens, EOS rate {p['sft']['eos_rate']:.2f} -> {p['ppo']['eos_rate']:.2f}")
    j = report.get("judge")
    if j:
        lines.append(f"judge {j['judge']}: win rate {j['win_rate']:.3f}, mean {j['sft_mean']:+.3f} -> {j['ppo_mean']:+.3f}, "
                     f"agrees with the RM on {j['agreement_with_rm']:.2f} of prompts")
    for pt in report.get("overoptimisation") or []:
        judge_text = f", judge {pt['judge_mean']:+.3f}" if "judge_mean" in pt else ""
        lines.append(f"  step {pt['step']:>4}: RM score {pt['rm_score_mean']:+.3f}, KL {pt['kl_mean']:.3f}{judge_text}")
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
    from rlhf.runs import STAGE_COMMAND, stage_state

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
