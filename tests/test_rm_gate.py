"""The quality gate before PPO (rlhf.rm_gate): the rule by hand, PPO and run-all refusing an RM at
chance with one error line, `rm.min_accuracy: null` letting it through, the warning for an RM
without held-out pairs, and the verdict in `rlhf status`. The tiny model's RM is noise
(held-out accuracy about 0.5), so it fails the default gate."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.rm_gate import check_before_ppo, gate_verdict, read_verdict
from rlhf.stats import binomial_se
from rlhf.status import stage_rows
from tests.conftest import write_config


def _rm_row(cfg):
    return next(r for r in stage_rows(cfg) if r.stage == "rm")


def _gated_copy(tiny_rm_run: Path, tmp_path: Path, min_accuracy: float | None = 0.6) -> Path:
    """A config with rm.min_accuracy set whose run folder holds copies of the session's finished
    tiny SFT and RM stages (min_accuracy is not part of any stage hash, so they stay done)."""
    path = write_config(tmp_path, {"rm": {"min_accuracy": min_accuracy}})
    src, cfg = load_config(tiny_rm_run), load_config(path)
    for stage in ("sft", "rm"):
        shutil.copytree(src.stage_dir(stage), cfg.stage_dir(stage), ignore=shutil.ignore_patterns("checkpoints"))
    return path


def _expected_error(cfg) -> str:
    report = json.loads((cfg.stage_dir("rm") / "eval.json").read_text())
    acc, n = report["accuracy"], report["n_pairs"]
    se = math.sqrt(acc * (1 - acc) / n)
    assert acc < 0.6 and acc - 2 * se <= 0.5, "the tiny RM was expected to be at chance"
    return (f"error: PPO not started: the reward model's held-out pair accuracy is {acc:.2f} ± {se:.2f} "
            f"(n={n} pairs, {cfg.stage_dir('rm')}/eval.json), below rm.min_accuracy 0.60 and not clearly above "
            f"chance ({acc:.2f} - 2 × {se:.2f} = {acc - 2 * se:.2f} <= 0.5), so PPO could be optimising noise. "
            "Train the RM longer (raise rm.epochs), give it more or cleaner preference pairs, or set "
            "rm.min_accuracy: null to run PPO anyway")


# ---------------------------------------------------------------------------- the rule, by hand


def test_binomial_standard_error_by_hand():
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.9, 100) == pytest.approx(0.03)
    assert binomial_se(1.0, 20) == 0.0


@pytest.mark.parametrize("accuracy, n, min_accuracy, passed, summary", [
    # 0.57 - 2 × 0.0495 = 0.47: below the gate and not clearly above chance
    (0.57, 100, 0.6, False, "eval accuracy 0.57 ± 0.05 (n=100) — below gate 0.60"),
    # above the gate, but 0.62 - 2 × 0.0686 = 0.48 on 50 pairs: a coin flip could look like this
    (0.62, 50, 0.6, False, "eval accuracy 0.62 ± 0.07 (n=50) — not clearly above chance (gate 0.60)"),
    (0.62, 200, 0.6, True, "eval accuracy 0.62 ± 0.03 (n=200) — passes gate 0.60"),
    (0.88, 100, 0.6, True, "eval accuracy 0.88 ± 0.03 (n=100) — passes gate 0.60"),
    (1.0, 20, 0.6, True, "eval accuracy 1.00 ± 0.00 (n=20) — passes gate 0.60"),
    (0.57, 100, None, True, "eval accuracy 0.57 ± 0.05 (n=100) — gate off (rm.min_accuracy: null)"),
    (None, 0, 0.6, True, "no held-out pairs — RM unchecked"),
])
def test_verdicts(accuracy, n, min_accuracy, passed, summary):
    verdict = gate_verdict(accuracy, n, min_accuracy)
    assert verdict.passed is passed and verdict.summary() == summary


def test_error_names_the_condition_that_failed(tiny_rm_run, tmp_path):
    cfg = load_config(_gated_copy(tiny_rm_run, tmp_path))
    near = gate_verdict(0.62, 50, 0.6).error(cfg)
    assert "not clearly above chance (0.62 - 2 × 0.07 = 0.48 <= 0.5)" in near and "below" not in near
    assert "more or cleaner preference pairs (more held-out pairs narrow the ±)" in near
    low = gate_verdict(0.58, 10000, 0.6).error(cfg)
    assert "0.58 ± 0.00 (n=10000 pairs" in low and "below rm.min_accuracy 0.60, so PPO" in low
    assert "\n" not in near + low


# ---------------------------------------------------------------------------- PPO and run-all


def test_ppo_refuses_an_rm_at_chance_before_loading_a_model(tiny_rm_run, tmp_path, monkeypatch):
    path = _gated_copy(tiny_rm_run, tmp_path)
    cfg = load_config(path)

    def no_model(*args, **kwargs):
        raise AssertionError("PPO loaded a model before checking the reward model")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    result = CliRunner().invoke(app, ["ppo", "--config", str(path)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [_expected_error(cfg)]
    assert "Traceback" not in result.output
    assert not (cfg.stage_dir("ppo") / "manifest.json").exists()


def test_run_all_stops_before_starting_ppo(tiny_rm_run, tmp_path, monkeypatch):
    path = _gated_copy(tiny_rm_run, tmp_path)
    started = []
    monkeypatch.setattr("rlhf.pipeline._run_command", lambda command, *a: started.append(command) or 0)
    result = CliRunner().invoke(app, ["run-all", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert started == []  # sft and rm are up to date; PPO's process never starts
    assert "sft: up to date" in result.output and "rm: up to date" in result.output
    assert "ppo: running" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == \
        [_expected_error(load_config(path))]


def test_null_min_accuracy_lets_ppo_start(tiny_rm_run, tmp_path, caplog):
    cfg = load_config(_gated_copy(tiny_rm_run, tmp_path, min_accuracy=None))
    with caplog.at_level(logging.WARNING):
        check_before_ppo(cfg)
    assert caplog.text == ""
    (tmp_path / "on").mkdir()
    with pytest.raises(UserError):
        check_before_ppo(load_config(_gated_copy(tiny_rm_run, tmp_path / "on")))


def test_status_shows_the_gate(tiny_rm_run, tmp_path):
    path = _gated_copy(tiny_rm_run, tmp_path)
    cfg = load_config(path)
    verdict = read_verdict(cfg)
    assert _rm_row(cfg).gate == f"eval accuracy {verdict.figure()} — below gate 0.60"
    result = CliRunner().invoke(app, ["status", "--config", str(path)], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    assert "below gate 0.60" in result.stdout
    assert _rm_row(load_config(tiny_rm_run)).gate.endswith("— gate off (rm.min_accuracy: null)")
    # changing the gate makes no stage stale: it only decides whether PPO may start
    assert [r.state for r in stage_rows(cfg)][:2] == ["done", "done"]


def test_rm_without_held_out_pairs_is_unchecked(tiny_sft_run, tmp_path, caplog):
    """An RM trained without held-out pairs: its last state is exported (nothing to select by), and
    the RM stage, the PPO check and `rlhf status` say it is unchecked."""
    from rlhf.rm import run

    path = write_config(tmp_path, {"rm": {"data": {"eval_path": None, "eval_split": None}, "max_steps": 2,
                                          "min_accuracy": 0.6, "early_stopping_patience": 1}})
    cfg = load_config(path)
    shutil.copytree(load_config(tiny_sft_run).stage_dir("sft"), cfg.stage_dir("sft"),
                    ignore=shutil.ignore_patterns("checkpoints"))
    with caplog.at_level(logging.WARNING):
        run(cfg)
    assert "no held-out pairs, so its accuracy is unchecked" in caplog.text
    assert "early_stopping_patience is set but there is no held-out data" in caplog.text
    report = json.loads((cfg.stage_dir("rm") / "eval.json").read_text())
    assert report["n_pairs"] == 0 and "best_step" not in report and "curve" not in report
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf.rm_gate"):
        check_before_ppo(cfg)  # no error: PPO goes on, warned
    assert "the reward model has no held-out pairs" in caplog.text
    assert _rm_row(cfg).gate == "no held-out pairs — RM unchecked"
