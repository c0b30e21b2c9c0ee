"""What `rlhf eval` wrote, and how it reads: the output files under runs/<name>/eval/, the lines
`rlhf eval` prints and report.html shows (summary_lines, decomposition_lines), the headline
numbers trackers get (summary_metrics), and the over-optimisation warning.

Apart from rlhf.evaluate, which computes eval.json, so that the report (rlhf.report) can read an
eval.json without importing the evaluation, while the evaluation imports the report's plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rlhf.staleness import EVAL_DIR, EVAL_FILE  # noqa: F401  (eval.json is what staleness reads)
SAMPLES_FILE = "samples.jsonl"
CALIBRATION_PNG = "rm_calibration.png"
OVEROPT_PNG = "overoptimisation.png"


def overoptimisation_warning(check: dict[str, Any] | None) -> str | None:
    """The one warning line for a flagged overoptimisation_check, else None."""
    if not check or not check["flag"]:
        return None
    earlier = "the SFT model" if check["best_step"] == 0 else f"the step-{check['best_step']} checkpoint"
    return (f"over-optimisation: from step {check['best_step']} to step {check['last_step']} the RM score rose "
            f"({check['rm_at_best']:+.3f} -> {check['rm_last']:+.3f}) while the judge fell ({check['judge_best']:+.3f} -> "
            f"{check['judge_last']:+.3f}, more than its standard error {check['judge_stderr']:.3f}): PPO is exploiting "
            f"the reward model; prefer {earlier}, a larger ppo.kl_coef, fewer ppo.steps or a better RM")


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
