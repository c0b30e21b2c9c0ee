"""`rlhf eval` and `rlhf generate` on the tiny model: the win-rate, KL and calibration maths against
hand-made numbers, the judge plug-in and its error paths, PPO-vs-SFT with an untrained policy
(identical to the reference: KL exactly 0, win rate exactly 0.5), the outputs and their
consistency, staleness in run-all, and missing-stage errors."""

from __future__ import annotations

import json
import os
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.eval_results import overoptimisation_warning, summary_metrics
from rlhf.evaluate import compare_policy, load_env, load_policy_adapter, load_policy_checkpoint
from rlhf.judges import judge_scores, load_judge
from rlhf.sampling import generate
from rlhf.stats import (
    calibration_bins,
    describe,
    eos_change_split,
    gain_decomposition,
    kl_per_response,
    length_regression,
    outcomes,
    overoptimisation_check,
    paired_comparison,
    prompt_means,
    response_stats,
    stderr,
)
from rlhf.staleness import eval_state
from tests.conftest import write_config


# Judges for the plug-in tests, imported by the evaluation as "tests.test_evaluate:<name>".
def length_judge(prompt, response):
    assert isinstance(response, str) and prompt  # prompt as in the data: here a list of messages
    return float(len(response))


def raising_judge(prompt, response):
    raise RuntimeError("judge service down")


FALLING_JUDGE_CALLS = [0]


def falling_judge(prompt, response):
    """A gold score that only ever falls: each call scores 1 lower than the one before."""
    FALLING_JUDGE_CALLS[0] += 1
    return -float(FALLING_JUDGE_CALLS[0])


# ---------------------------------------------------------------------------- pure maths


def test_paired_comparison_against_hand_computed_values():
    base = [1.0, 2.0, 3.0, 0.5]
    new = [2.0, 2.0, 1.0, 1.5]
    assert outcomes(base, new) == [1.0, 0.5, 0.0, 1.0]
    m = paired_comparison(base, new)
    assert (m["n"], m["wins"], m["ties"], m["losses"]) == (4, 2, 1, 1)
    assert m["win_rate"] == 0.625
    # outcomes' deviations from 0.625: .375 -.125 -.625 .375 -> Σ² = .6875; sqrt(.6875 / 3 / 4)
    assert m["win_rate_stderr"] == pytest.approx(math.sqrt(0.6875 / 12))
    # gains 1, 0, -2, 1: mean 0, Σ² = 6 -> sqrt(6 / 3 / 4)
    assert m["gain_mean"] == 0.0 and m["gain_stderr"] == pytest.approx(math.sqrt(0.5))
    assert m["base_mean"] == m["new_mean"] == 1.625
    same = paired_comparison([0.3, -1.0], [0.3, -1.0])
    assert same["win_rate"] == 0.5 and same["ties"] == 2 and same["gain_mean"] == 0.0
    assert math.isnan(paired_comparison([], [])["win_rate"])
    with pytest.raises(ValueError):
        outcomes([1.0], [1.0, 2.0])


def test_paired_comparison_over_per_prompt_means():
    """Two samples per prompt: the prompts' means are compared, not the samples."""
    assert prompt_means([1.0, 3.0, 2.0, 2.0], 2) == [2.0, 2.0]
    with pytest.raises(ValueError):
        prompt_means([1.0, 2.0, 3.0], 2)
    base = [1.0, 3.0, 2.0, 2.0, 0.0, 1.0]  # per-prompt means 2, 2, 0.5
    new = [2.0, 4.0, 2.0, 2.0, 1.0, -2.0]  # per-prompt means 3, 2, -0.5
    m = paired_comparison(base, new, samples_per_item=2)
    assert (m["n"], m["n_samples"], m["samples_per_item"]) == (3, 6, 2)
    assert (m["wins"], m["ties"], m["losses"], m["win_rate"]) == (1, 1, 1, 0.5)  # per sample it would be 4/6
    # outcomes 1, 0.5, 0: deviations .5 0 -.5 -> Σ² = .5; sqrt(.5 / 2 / 3)
    assert m["win_rate_stderr"] == pytest.approx(math.sqrt(0.5 / 6))
    # per-prompt mean differences 1, 0, -1: mean 0, Σ² = 2 -> the paired stderr sqrt(2 / 2 / 3)
    assert m["gain_mean"] == 0.0 and m["gain_stderr"] == pytest.approx(math.sqrt(1 / 3))
    assert m["base_mean"] == m["new_mean"] == 1.5
    assert paired_comparison(base, new)["n"] == 6  # one sample per item: the samples are the items


def test_eos_change_split_against_hand_computed_values():
    d = eos_change_split([True, False, False, True, False], [True, True, False, False, True],
                         [1.0, 2.0, -1.0, -2.0, 4.0])
    g = d["groups"]
    assert {k: v["n"] for k, v in g.items()} == {"both_stop": 1, "neither_stop": 1, "gained_stop": 2, "lost_stop": 1}
    assert g["gained_stop"] == {"n": 2, "share": 0.4, "gain_mean": 3.0, "contribution": 1.2}
    assert (g["both_stop"]["contribution"], g["neither_stop"]["contribution"], g["lost_stop"]["contribution"]) == (0.2, -0.2, -0.4)
    # the contributions add up to the mean gain 0.8; the pairs that changed EOS status carry (2 + 4 - 2) / 5
    assert d["n_pairs"] == 5 and d["changed_share"] == 0.6 and d["changed_contribution"] == 0.8
    assert d["unchanged_gain_mean"] == 0.0
    empty = eos_change_split([True], [True], [0.5])["groups"]["lost_stop"]
    assert empty["n"] == 0 and math.isnan(empty["gain_mean"]) and empty["contribution"] == 0.0


def test_length_regression_against_hand_computed_values():
    r = length_regression([0.0, 2.0, 4.0], [1.0, 2.0, 6.0])
    # x̄ 2, ȳ 3, Sxx 8, Sxy 10: slope 1.25, intercept 3 - 2.5 = 0.5; residuals .5 -1 .5: SSE 1.5
    assert (r["n"], r["length_diff_mean"], r["slope"], r["gain_at_equal_length"], r["from_length"]) == (3, 2.0, 1.25, 0.5, 2.5)
    assert r["gain_at_equal_length"] + r["from_length"] == 3.0  # the mean gain, exactly
    assert r["length_share"] == 2.5 / 3
    assert r["gain_at_equal_length_stderr"] == pytest.approx(math.sqrt(1.5 / 1 * (1 / 3 + 4 / 8)))
    assert r["r2"] == pytest.approx(1 - 1.5 / 14)
    same = length_regression([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])  # no length change: all of it at equal length
    assert (same["slope"], same["gain_at_equal_length"], same["from_length"], same["length_share"]) == (0.0, 2.0, 0.0, 0.0)
    assert same["gain_at_equal_length_stderr"] == pytest.approx(math.sqrt(1 / 3))
    shifted = length_regression([2.0, 2.0], [1.0, 2.0])  # every response 2 tokens longer: slope unidentified
    assert math.isnan(shifted["slope"]) and math.isnan(shifted["gain_at_equal_length"])


def test_gain_decomposition_uses_sample_pairs_for_eos_and_prompt_means_for_length():
    d = gain_decomposition(base_scores=[0.0, 0.0, 1.0, 1.0], new_scores=[1.0, 3.0, 1.0, 2.0],
                           base_lengths=[4, 4, 8, 8], new_lengths=[6, 8, 8, 8],
                           base_stop=[False, False, True, True], new_stop=[True, True, True, True], samples_per_prompt=2)
    # sample gains 1 3 0 1; prompt means: gain 2, 0.5; Δlength 3, 0 -> slope 0.5, intercept 0.5
    assert d["eos"]["groups"]["gained_stop"]["n"] == 2 and d["eos"]["changed_contribution"] == 1.0
    assert d["eos"]["unchanged_gain_mean"] == 0.5
    length = d["length"]
    assert (length["n"], length["slope"], length["gain_at_equal_length"], length["from_length"]) == (2, 0.5, 0.5, 0.75)
    assert math.isnan(length["gain_at_equal_length_stderr"])  # two points fit any line


def _point(step, rm, judge, se=0.125):
    return {"step": step, "rm_score_mean": rm, "judge_mean": judge, "judge_stderr": se, "kl_mean": 0.0}


def test_overoptimisation_check_flags_judge_falling_while_rm_rises():
    points = [_point(0, 0.0, 1.0), _point(2, 0.5, 1.5), _point(4, 0.75, 1.25)]
    c = overoptimisation_check(points)
    assert c == {"flag": True, "last_step": 4, "best_step": 2, "judge_last": 1.25, "judge_best": 1.5, "judge_drop": 0.25,
                 "judge_stderr": 0.125, "rm_last": 0.75, "rm_at_best": 0.5}
    line = overoptimisation_warning(c)
    assert line.startswith("over-optimisation: from step 2 to step 4 the RM score rose (+0.500 -> +0.750) while the judge "
                           "fell (+1.500 -> +1.250, more than its standard error 0.125)")
    assert "prefer the step-2 checkpoint" in line
    # a drop within the standard error, or an RM score that fell too: no flag
    assert not overoptimisation_check([_point(0, 0.0, 1.0), _point(2, 0.5, 1.5), _point(4, 0.75, 1.25, se=0.25)])["flag"]
    assert not overoptimisation_check([_point(0, 0.0, 1.0), _point(2, 0.5, 1.5), _point(4, 0.25, 1.25)])["flag"]
    assert overoptimisation_warning(overoptimisation_check([_point(0, 0.0, 1.0), _point(2, 0.5, 1.5)])) is None
    from_sft = overoptimisation_check([_point(0, 0.0, 2.0), _point(2, 0.5, 1.5)])
    assert from_sft["best_step"] == 0 and "prefer the SFT model" in overoptimisation_warning(from_sft)
    assert overoptimisation_check([_point(0, 0.0, 1.0)]) is None
    assert overoptimisation_check([{"step": 0, "rm_score_mean": 0.0}, {"step": 2, "rm_score_mean": 1.0}]) is None


def test_kl_per_response_sums_masked_tokens_only():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -0.25, -7.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    # row 0: 0.5 + (-1.0) = -0.5 (the masked +6 is left out); row 1: 0.5 - 0.25 = 0.25
    assert kl_per_response(logprobs, ref, mask).tolist() == [-0.5, 0.25]
    assert kl_per_response(logprobs, logprobs, mask).tolist() == [0.0, 0.0]


def test_calibration_bins_against_hand_computed_values():
    bins = calibration_bins([0.0, 1.0, -2.0, 3.0], n_bins=2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # sorted by |diff|: [0.0, 1.0] | [-2.0, 3.0]
    assert [b["n"] for b in bins] == [2, 2]
    assert bins[0]["accuracy"] == 0.75  # a tie (0.5) and a correct pair (1)
    assert bins[1]["accuracy"] == 0.5
    assert bins[0]["abs_diff_mean"] == 0.5 and bins[1]["abs_diff_mean"] == 2.5
    assert bins[0]["predicted"] == pytest.approx((0.5 + sig(1.0)) / 2)
    assert bins[1]["predicted"] == pytest.approx((sig(2.0) + sig(3.0)) / 2)
    assert (bins[1]["abs_diff_min"], bins[1]["abs_diff_max"]) == (2.0, 3.0)
    few = calibration_bins([1.0, -1.0], n_bins=6)  # fewer pairs than bins: one pair per bin
    assert [b["n"] for b in few] == [1, 1] and sorted(b["accuracy"] for b in few) == [0.0, 1.0]


def test_describe_and_response_stats():
    d = describe([3.0, 1.0, 2.0, 10.0])
    assert (d["mean"], d["median"], d["min"], d["max"]) == (4.0, 2.5, 1.0, 10.0)
    assert describe([5.0])["stderr"] == 0.0
    s = response_stats([4, 2, 6], [True, False, True])
    assert s == {"length_mean": 4.0, "length_min": 2, "length_max": 6, "eos_rate": 2 / 3}


# ---------------------------------------------------------------------------- judge plug-in


def test_judge_loads_and_scores():
    judge = load_judge("tests.test_evaluate:length_judge")
    assert judge_scores(judge, "j", ["p", "q"], ["abc", ""], "PPO") == [3.0, 0.0]


@pytest.mark.parametrize("spec, message", [
    ("tests.no_such_module:judge", "cannot import module 'tests.no_such_module'"),
    ("tests.test_evaluate:no_such_judge", "has no attribute 'no_such_judge'"),
    ("tests.test_evaluate:pytest", "is not a function"),
])
def test_judge_that_cannot_be_loaded_is_a_user_error(spec, message):
    with pytest.raises(UserError, match=message) as info:
        load_judge(spec)
    assert spec in str(info.value)


@pytest.mark.parametrize("value", ["0.7", float("nan"), None, float("inf"), True])
def test_judge_returning_a_non_number_names_judge_and_prompt(value):
    spec = "my.judges:score"
    judge = lambda p, r: value if p == "bad" else 1.0  # noqa: E731
    with pytest.raises(UserError) as info:
        judge_scores(judge, spec, ["ok", "bad"], ["a", "b"], "SFT", indices=[5, 6])
    msg = str(info.value)
    assert spec in msg and "held-out prompt 6" in msg and "SFT response" in msg and "finite number" in msg


def test_judge_that_raises_names_judge_and_prompt():
    with pytest.raises(UserError, match=r"'tests.test_evaluate:raising_judge' raised RuntimeError: judge service "
                                         r"down on held-out prompt 0 \(PPO response\)"):
        judge_scores(raising_judge, "tests.test_evaluate:raising_judge", ["p"], ["r"], "PPO")


def test_judge_form_is_checked_by_config_validation(tmp_path):
    path = write_config(tmp_path, {"eval": {"judge": "tests/judge.py"}})
    with pytest.raises(UserError, match=r"eval\.judge: expected 'package\.module:function'"):
        load_config(path)
    assert load_config(write_config(tmp_path, {"eval": {"judge": "a.b_c:d"}})).eval.judge == "a.b_c:d"


# ---------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def fresh_env(tiny_ppo_run):
    """The eval roles with the policy adapter as initialised (lora_B = 0: identical to the reference)."""
    from rlhf.data import ppo_data, render
    from rlhf.models import load_tokenizer

    cfg = load_config(tiny_ppo_run)
    tok = load_tokenizer(cfg.model, str(cfg.stage_dir("sft") / "model"))
    data = ppo_data(cfg, tok)
    raw = list(data.eval["prompt"])[:6]
    prompts = [tok(render(tok, p), add_special_tokens=False)["input_ids"] for p in raw]
    env = load_env(cfg, tok, data.conversational)
    env.batch_size = 4  # two batches, the second one short
    return cfg, env, raw, prompts


def test_untrained_policy_against_sft_is_an_exact_tie(fresh_env):
    """The SFT pass (adapters off) and the policy pass (the policy folded in) draw the same
    tokens with the same seeds when the policy equals the reference: with 2 samples per prompt,
    every sample pair is identical, so every prompt ties and KL is exactly 0; the two samples of a
    prompt are different draws."""
    cfg, env, raw, prompts = fresh_env
    policy, judged, rows = compare_policy(env, prompts, raw, load_judge("tests.test_evaluate:length_judge"),
                                          "tests.test_evaluate:length_judge", samples_per_prompt=2)
    assert (policy["n_prompts"], policy["samples_per_prompt"], policy["n_samples"], len(rows)) == (6, 2, 12, 12)
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(i, j) for i in range(6) for j in range(2)]
    assert all(r["prompt"] == rows[2 * r["prompt_index"]]["prompt"] for r in rows)
    assert any(rows[2 * i]["sft_response"] != rows[2 * i + 1]["sft_response"] for i in range(6))
    assert all(r["sft_response"] == r["ppo_response"] and r["sft_score"] == r["ppo_score"] for r in rows)
    assert policy["win_rate"] == 0.5 and policy["ties"] == 6 and policy["score_gain_mean"] == 0.0
    assert policy["score_gain_stderr"] == 0.0 and policy["win_rate_stderr"] == 0.0
    assert [r["kl"] for r in rows] == [0.0] * 12 and policy["kl_mean"] == 0.0
    assert judged["win_rate"] == 0.5 and judged["agreement_with_rm"] == 1.0 and judged["gain_stderr"] == 0.0
    assert policy["sft"] == policy["ppo"]
    eos = policy["gain_decomposition"]["eos"]
    assert eos["changed_share"] == 0.0 and eos["changed_contribution"] == 0.0
    assert policy["gain_decomposition"]["length"]["gain_at_equal_length"] == 0.0


def test_both_samplers_draw_the_same_tokens(fresh_env):
    from rlhf.sampling import left_pad

    cfg, env, raw, prompts = fresh_env
    q, qm = left_pad(prompts[:3], env.pad_id)
    settings = (env.response_length, env.temperature, env.stop_id, env.pad_id)
    torch.manual_seed(7)
    a = generate(env.roles, q, qm, *settings, adapter=None)
    torch.manual_seed(7)
    b = generate(env.roles, q, qm, *settings, adapter="policy")
    assert a.shape == (3, env.response_length) and torch.equal(a, b)


def test_checkpoint_and_exported_adapter_hold_the_same_final_policy(tiny_ppo_run):
    from rlhf.models import load_tokenizer
    from rlhf.ppo.checkpoint import checkpoint_dirs

    cfg = load_config(tiny_ppo_run)
    tok = load_tokenizer(cfg.model, str(cfg.stage_dir("sft") / "model"))
    env = load_env(cfg, tok, True)

    def policy_weights():
        return {n: p.detach().clone() for n, p in env.roles.model.named_parameters() if ".policy." in n}

    fresh = policy_weights()
    last = checkpoint_dirs(cfg.stage_dir("ppo") / "checkpoints")[-1]
    assert last.name == f"step-{cfg.ppo.steps}"
    load_policy_checkpoint(env, last)
    from_ckpt = policy_weights()
    load_policy_adapter(env, cfg.stage_dir("ppo") / "adapter")
    from_adapter = policy_weights()
    assert from_ckpt.keys() == from_adapter.keys() and len(from_ckpt) > 0
    assert all(torch.equal(from_ckpt[n], from_adapter[n]) for n in from_ckpt)
    assert any(not torch.equal(fresh[n], from_ckpt[n]) for n in fresh)  # PPO did train it


# ---------------------------------------------------------------------------- end to end


def test_eval_outputs_exist_and_agree(tiny_eval_run):
    cfg = load_config(tiny_eval_run)
    out = cfg.stage_dir("eval")
    report = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("rm_calibration.png", "overoptimisation.png", "eval.json", "samples.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask  # shareable, not mkstemp's 0600
    for png in ("rm_calibration.png", "overoptimisation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # RM: every held-out pair, the same accuracy and margin as the RM stage's own evaluation of rm/model
    rm_stage = json.loads((cfg.stage_dir("rm") / "eval.json").read_text())
    rm = report["rm"]
    assert rm["n_pairs"] == rm_stage["n_pairs"] == sum(b["n"] for b in rm["calibration"])
    assert rm["margin_mean"] == pytest.approx(rm_stage["margin_mean"], abs=1e-3)
    assert rm["accuracy"] == pytest.approx(rm_stage["accuracy"], abs=0.03)
    # policy: the summary is the samples table's, k = eval.samples_per_prompt rows per prompt (default 4)
    policy = report["policy"]
    k = cfg.eval.samples_per_prompt
    assert k == 4 and policy["samples_per_prompt"] == report["settings"]["samples_per_prompt"] == k
    assert policy["n_prompts"] == cfg.eval.max_prompts and len(rows) == policy["n_samples"] == k * cfg.eval.max_prompts
    assert [r["sample"] for r in rows] == list(range(k)) * cfg.eval.max_prompts
    expected = paired_comparison([r["sft_score"] for r in rows], [r["ppo_score"] for r in rows], k)
    assert policy["win_rate"] == expected["win_rate"] and policy["ties"] == expected["ties"]
    assert policy["win_rate_stderr"] == pytest.approx(expected["win_rate_stderr"])
    assert policy["score_gain_stderr"] == pytest.approx(expected["gain_stderr"], abs=1e-3)
    assert policy["kl_mean"] == pytest.approx(sum(r["kl"] for r in rows) / len(rows), abs=1e-3)
    assert policy["kl"]["stderr"] == pytest.approx(stderr(prompt_means([r["kl"] for r in rows], k)), abs=1e-3)
    assert policy["ppo"]["eos_rate"] == sum(r["ppo_has_stop"] for r in rows) / len(rows)
    assert policy["ppo"]["length_mean"] == sum(r["ppo_length"] for r in rows) / len(rows)
    assert any(r["sft_response"] != r["ppo_response"] for r in rows)  # the trained policy samples differently
    assert set(rows[0]) >= {"prompt", "sft_response", "ppo_response", "sft_score", "ppo_score", "kl"}
    # the decomposition adds up to the gain
    d = policy["gain_decomposition"]
    assert d["length"]["gain_at_equal_length"] + d["length"]["from_length"] == pytest.approx(policy["score_gain_mean"])
    assert sum(g["contribution"] for g in d["eos"]["groups"].values()) == pytest.approx(policy["score_gain_mean"])
    assert d["eos"]["n_pairs"] == len(rows) and d["length"]["n"] == cfg.eval.max_prompts
    assert report["judge"] is None and report["overoptimisation_check"] is None and report["warnings"] == []
    tracked = summary_metrics(report)  # what the tracker gets
    assert tracked["eval/win_rate_stderr"] == policy["win_rate_stderr"] and tracked["eval/samples_per_prompt"] == k
    assert tracked["eval/score_gain_stderr"] == policy["score_gain_stderr"]
    assert tracked["eval/score_gain_at_equal_length"] == d["length"]["gain_at_equal_length"]
    assert tracked["eval/score_gain_with_eos_change"] == d["eos"]["changed_contribution"]
    assert "eval/overoptimised" not in tracked and not any(k.startswith("eval/judge") for k in tracked)
    # over-optimisation: step 0 (SFT, KL 0) and every checkpoint
    points = report["overoptimisation"]
    assert [p["step"] for p in points] == list(range(0, cfg.ppo.steps + 1, cfg.ppo.save_every))
    assert points[0]["kl_mean"] == 0.0 and all(p["n_prompts"] == cfg.eval.overopt_prompts for p in points)
    assert report["settings"]["response_length"] == cfg.ppo.response_length


def test_eval_with_judge_through_the_cli(tiny_eval_run, tmp_path):
    src = load_config(tiny_eval_run)
    path = write_config(tmp_path, {"eval": {"max_prompts": 4, "overopt_prompts": 2, "batch_size": 4,
                                            "judge": "tests.test_evaluate:length_judge"}})
    cfg = load_config(path)
    shutil.copytree(src.run_dir, cfg.run_dir)
    result = CliRunner().invoke(app, ["eval", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "win rate" in result.stdout and "judge tests.test_evaluate:length_judge" in result.stdout
    report = json.loads((cfg.stage_dir("eval") / "eval.json").read_text())
    rows = [json.loads(line) for line in (cfg.stage_dir("eval") / "samples.jsonl").read_text().splitlines()]
    assert [r["sft_judge"] for r in rows] == [float(len(r["sft_response"])) for r in rows]
    k = cfg.eval.samples_per_prompt
    expected = paired_comparison([r["sft_judge"] for r in rows], [r["ppo_judge"] for r in rows], k)
    assert report["judge"]["win_rate"] == expected["win_rate"] and report["judge"]["n_prompts"] == 4
    assert report["judge"]["gain_stderr"] == expected["gain_stderr"] and len(rows) == 4 * k
    assert "judge gain at equal length" in result.stdout and "judge gain by EOS status" in result.stdout
    assert all("judge_mean" in p and "judge_stderr" in p for p in report["overoptimisation"])
    assert report["overoptimisation_check"] == overoptimisation_check(report["overoptimisation"])
    tracked = summary_metrics(report)
    assert tracked["eval/judge_gain_stderr"] == expected["gain_stderr"]
    assert tracked["eval/judge_win_rate_stderr"] == expected["win_rate_stderr"]
    assert tracked["eval/overoptimised"] == float(report["overoptimisation_check"]["flag"])
    # a judge that raises: exit 2, one error line naming the judge and the prompt
    result = CliRunner().invoke(app, ["eval", "--config", str(path), "--set", "eval.judge=tests.test_evaluate:raising_judge"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: eval.judge 'tests.test_evaluate:raising_judge' raised RuntimeError" in result.stderr
    assert "held-out prompt 0" in result.stderr


def test_eval_warns_when_the_judge_falls_while_the_rm_score_rises(tiny_eval_run, tmp_path, monkeypatch):
    """Over the checkpoints a judge that only falls, and an RM score that rises (the tiny RM is
    noise, so the over-optimisation passes get +1 per PPO step added to their RM scores): the
    summary warns, and eval.json flags it."""
    from rlhf import evaluate

    src = load_config(tiny_eval_run)
    path = write_config(tmp_path, {"eval": {"max_prompts": 2, "samples_per_prompt": 1, "overopt_prompts": 4,
                                            "batch_size": 4, "judge": "tests.test_evaluate:falling_judge"}})
    cfg = load_config(path)
    shutil.copytree(src.run_dir, cfg.run_dir)
    real_respond = evaluate.respond

    def rising_respond(env, adapter, prompts, desc):
        out = real_respond(env, adapter, prompts, desc)
        if desc.startswith("eval: step "):
            out.scores = [s + int(desc.rsplit(" ", 1)[1]) for s in out.scores]
        return out

    monkeypatch.setattr(evaluate, "respond", rising_respond)
    FALLING_JUDGE_CALLS[0] = 0
    result = CliRunner().invoke(app, ["eval", "--config", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads((cfg.stage_dir("eval") / "eval.json").read_text())
    check = report["overoptimisation_check"]
    assert check["flag"] is True and (check["best_step"], check["last_step"]) == (0, cfg.ppo.steps)
    assert report["warnings"] == [overoptimisation_warning(check)]
    assert f"warning: over-optimisation: from step 0 to step {cfg.ppo.steps} the RM score rose" in result.stdout
    assert "prefer the SFT model" in result.stdout
    # without the rising RM the tiny run's curve decides; the flag always follows the pure check
    monkeypatch.setattr(evaluate, "respond", real_respond)
    assert CliRunner().invoke(app, ["eval", "--config", str(path)]).exit_code == 0
    report = json.loads((cfg.stage_dir("eval") / "eval.json").read_text())
    assert report["overoptimisation_check"] == overoptimisation_check(report["overoptimisation"])
    assert bool(report["warnings"]) == report["overoptimisation_check"]["flag"]


def test_run_all_skips_a_current_eval_and_reruns_a_stale_one(tiny_eval_run, monkeypatch):
    from rlhf import pipeline

    cfg = load_config(tiny_eval_run)
    assert eval_state(cfg) == (True, "")
    launched = []
    monkeypatch.setattr(pipeline, "_run_command",
                        lambda command, config_path, overrides, *a, **kw: launched.append([command, config_path, *overrides]) or 0)
    said = []
    pipeline.run_all(cfg, str(tiny_eval_run), [], echo=said.append)
    assert launched == [] and any(line.startswith("eval: up to date, skipped") for line in said)
    changed = load_config(tiny_eval_run, ["eval.max_prompts=5"])
    assert eval_state(changed)[0] is False
    pipeline.run_all(changed, str(tiny_eval_run), ["eval.max_prompts=5"], echo=said.append)
    assert launched == [["eval", str(tiny_eval_run), "eval.max_prompts=5"]]
    pipeline.run_all(load_config(tiny_eval_run, ["eval.enabled=false"]), str(tiny_eval_run), [], force=False, echo=said.append)
    assert len(launched) == 1


def test_eval_and_generate_name_the_missing_stage(tmp_path):
    path = write_config(tmp_path)
    result = CliRunner().invoke(app, ["eval", "--config", str(path)])
    assert result.exit_code == 2
    assert f"run `rlhf sft --config {path}` first" in result.stderr
    result = CliRunner().invoke(app, ["generate", "--config", str(path), "--stage", "ppo", "--prompt", "hi"])
    assert result.exit_code == 2 and f"run `rlhf ppo --config {path}` first" in result.stderr
    result = CliRunner().invoke(app, ["generate", "--config", str(path), "--stage", "rm", "--prompt", "hi"])
    assert result.exit_code == 2 and "choose sft or ppo" in result.stderr


def test_generate_prints_the_models_response(tiny_ppo_run):
    from rlhf.generate import generate_text

    cfg = load_config(tiny_ppo_run)
    for stage in ("sft", "ppo"):
        result = CliRunner().invoke(app, ["generate", "--config", str(tiny_ppo_run), "--stage", stage, "--prompt",
                                          "How are you?", "--max-new-tokens", "6", "--temperature", "0"])
        assert result.exit_code == 0, result.output
        expected = generate_text(cfg, stage, "How are you?", max_new_tokens=6, temperature=0.0)
        assert result.stdout == expected + "\n" and expected.strip()
    sampled = [generate_text(cfg, "ppo", "hi", max_new_tokens=6, temperature=1.0, seed=s) for s in (3, 3)]
    assert sampled[0] == sampled[1]


def test_validate_imports_the_judge(tmp_path):
    ok = write_config(tmp_path, {"eval": {"judge": "tests.test_evaluate:length_judge"}})
    result = CliRunner().invoke(app, ["validate", "--config", str(ok)])
    assert result.exit_code == 0 and "eval.judge: tests.test_evaluate:length_judge imports" in result.stdout
    result = CliRunner().invoke(app, ["validate", "--config", str(ok), "--set", "eval.judge=tests.nope:f"])
    assert result.exit_code == 2 and "error: eval.judge 'tests.nope:f': cannot import module 'tests.nope'" in result.stderr
