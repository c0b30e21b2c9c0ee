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
model PPO measured its KL against. Responses are drawn and scored by the function PPO's rollout
uses (rlhf.sampling.sample_and_score: chat-template suffix appended after a stop token, score at
the last real token), so eval cannot drift from what PPO optimised.

Outputs under runs/<name>/eval/: eval.json {settings, inputs, rm, policy, judge, overoptimisation,
overoptimisation_check, warnings}, samples.jsonl (one row per prompt and sample: prompt_index,
sample, prompt, sft_response, ppo_response, sft_score, ppo_score, kl, sft/ppo_has_stop,
sft/ppo_length, and sft_judge/ppo_judge with a judge), rm_calibration.png, overoptimisation.png.

Elsewhere: the statistics in rlhf.stats, the plots in rlhf.report, the judge plug-in in
rlhf.judges, the file names and the printed summary in rlhf.eval_results. What is left (about
440 lines, a quarter of them this docstring, the imports and the eval.json settings block) is the stage
itself: the models, the passes over them and the assembly of eval.json, which read best together.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf.config import PipelineConfig
from rlhf.errors import UserError
from rlhf.eval_results import (
    CALIBRATION_PNG,
    EVAL_DIR,
    EVAL_FILE,
    OVEROPT_PNG,
    SAMPLES_FILE,
    overoptimisation_warning,
    summary_metrics,
)
from rlhf.judges import judge_scores, load_judge
from rlhf.report import plot_calibration, plot_overoptimisation
from rlhf.atomic import write_json_atomically, write_jsonl_atomically
from rlhf.runs import stage_run
from rlhf.staleness import eval_inputs, stage_hash
from rlhf.stats import (
    calibration_bins,
    describe,
    gain_decomposition,
    kl_per_response,
    outcomes,
    overoptimisation_check,
    paired_comparison,
    prompt_means,
    response_stats,
    stderr,
    winner_agreement,
)

log = logging.getLogger(__name__)

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


def load_env(cfg: PipelineConfig, tokenizer, conversational: bool) -> Env:
    """sft/model once, as the PPO roles: reward adapter + head from rm/adapter, a fresh policy adapter
    (identical to the reference until trained weights are loaded into it)."""
    from transformers import AutoModelForCausalLM

    from rlhf.models import lora_config, model_kwargs, no_grad_attn_implementation, turn_end_suffix
    from rlhf.ppo.roles import build_roles
    from rlhf.sampling import stop_token_id

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = AutoModelForCausalLM.from_pretrained(str(cfg.stage_dir("sft") / "model"), **model_kwargs(cfg.model)).to(device)
    # critic=False: no value adapter or head, evaluation never uses the critic.
    roles = build_roles(base, lora_config(cfg.lora, "CAUSAL_LM"), cfg.stage_dir("rm") / "adapter", critic=False,
                        no_grad_attn=no_grad_attn_implementation(cfg.model))
    e = cfg.eval
    ppo = cfg.ppo
    return Env(cfg=cfg, tokenizer=tokenizer, roles=roles, stop_id=stop_token_id(ppo.stop_token if ppo else "eos", tokenizer), pad_id=tokenizer.pad_token_id,
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

    from rlhf.ppo.checkpoint import load_trainable_state

    state = {k: v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()
             if k.startswith("model.") and ".policy." in k}
    expected = sum(1 for n, _ in env.roles.model.named_parameters() if ".policy." in n and "lora_" in n)
    if len(state) != expected:
        raise UserError(f"{ckpt}/trainable.safetensors holds {len(state)} policy weights, expected {expected}; "
                        "was it written with a different lora section? Rerun PPO: rlhf ppo --fresh --config ...")
    load_trainable_state(env.roles, state)


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
    numbers), drawn and scored as PPO's rollout does (rlhf.sampling.sample_and_score). With the
    policy, also KL(policy‖SFT)."""
    from tqdm.auto import tqdm

    from rlhf.ppo.rollout import response_logprobs
    from rlhf.sampling import left_pad, sample_and_score

    out = Responses([], [], [], [], [])
    starts = range(0, len(prompts), env.batch_size)
    for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True, leave=False)):
        query_ids, query_mask = left_pad(prompts[start:start + env.batch_size], env.pad_id, env.device)
        torch.manual_seed(env.seed + b)
        # the whole batch scored in one pass (micro_batch_size = the batch)
        s = sample_and_score(env.roles, query_ids, query_mask, response_length=env.response_length,
                             temperature=env.temperature, stop_id=env.stop_id, pad_id=env.pad_id,
                             micro_batch_size=env.batch_size, adapter=adapter, score_suffix=env.score_suffix)
        out.scores += s.scores.tolist()
        if adapter is None:
            out.kl += [0.0] * len(s.response_ids)  # the SFT model against itself
        else:
            ids, attention = s.input_ids, s.attention_mask
            logprobs, _, _ = response_logprobs(env.roles, ids, attention, s.response_ids, env.temperature, adapter)
            ref, _, _ = response_logprobs(env.roles, ids, attention, s.response_ids, env.temperature, None)
            out.kl += kl_per_response(logprobs, ref, s.response_mask).tolist()
        out.lengths += s.response_mask.sum(1).tolist()
        out.has_stop += s.has_stop.tolist()
        out.texts += [env.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(s.response_ids, s.response_mask)]
    return out


@torch.no_grad()
def score_pairs_with_reward_role(env: Env, pairs) -> tuple[list[float], list[float]]:
    """RM scores (chosen, rejected), each (N,), of preference records, tokenized as the RM stage
    trained on them (rlhf.rm.encode) and scored by the reward role (the reward adapter and head on
    the PPO base, as PPO reads scores), left-padded in length-sorted batches. The RM stage's own
    scoring of the exported classifier is rlhf.rm.score_pairs_with_classifier."""
    from rlhf.rm import encode
    from rlhf.sampling import left_pad, sequence_scores

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

    chosen, rejected = score_pairs_with_reward_role(env, pairs)
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
                  "agreement_with_rm": winner_agreement(
                      outcomes(prompt_means(sft.scores, k), prompt_means(ppo.scores, k)),
                      outcomes(prompt_means(sft_j, k), prompt_means(ppo_j, k))),
                  "gain_decomposition": gain_decomposition(sft_j, ppo_j, sft.lengths, ppo.lengths, sft.has_stop,
                                                           ppo.has_stop, k)}
        for row, a, b in zip(rows, sft_j, ppo_j):
            row["sft_judge"], row["ppo_judge"] = a, b
    return policy, judged, rows


def overoptimisation(env: Env, prompts: list[list[int]], raw_prompts: list[Any], judge: Callable | None,
                     judge_spec: str | None) -> list[dict[str, Any]]:
    """Mean RM score (and judge score, each with its standard error) and mean KL at step 0 (the SFT
    model) and at every PPO checkpoint of the current config, on `prompts`, one sample per prompt
    (kept cheap: one pass per checkpoint). Leaves the last checkpoint's policy loaded."""
    from rlhf.ppo.checkpoint import checkpoint_dirs

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
