"""`rlhf report`: the rolling mean by hand, every PNG and the HTML on a finished tiny run, the
eval outputs embedded when present, and missing stages skipped with a note."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import load_config
from rlhf.report import PLOTS, rolling_mean, rolling_window, write_report
from tests.conftest import write_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rolling_mean_by_hand():
    assert rolling_mean([1.0, 2.0, 3.0, 4.0], 1) == [1.0, 2.0, 3.0, 4.0]
    assert rolling_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert rolling_mean([1.0, 2.0, 3.0, 4.0, -4.0], 3) == pytest.approx([1.0, 1.5, 2.0, 3.0, 1.0])
    assert rolling_mean([], 3) == []
    with pytest.raises(ValueError):
        rolling_mean([1.0], 0)
    assert [rolling_window(n) for n in (4, 6, 40, 100, 1000)] == [1, 3, 4, 10, 25]


@pytest.fixture
def run_copy(tiny_ppo_run, tmp_path):
    """A private copy of the finished tiny run's records (no models: the report reads none)."""
    src = load_config(tiny_ppo_run)
    path = write_config(tmp_path)
    cfg = load_config(path)
    for stage in ("sft", "rm", "ppo"):
        shutil.copytree(src.stage_dir(stage), cfg.stage_dir(stage), ignore=shutil.ignore_patterns("model", "adapter"))
    return path


def test_report_on_a_finished_tiny_run(run_copy):
    cfg = load_config(run_copy)
    out = write_report(cfg, echo=lambda line: None)
    assert out == cfg.run_dir / "eval" / "report.html"
    page = out.read_text()
    for name in PLOTS:
        png = cfg.run_dir / "eval" / name
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000, name
        assert f"<img src='{name}'" in page
    assert "skipped" not in page
    # samples: the last PPO step of ppo/samples.jsonl, escaped
    samples = [json.loads(line) for line in (cfg.stage_dir("ppo") / "samples.jsonl").read_text().splitlines()]
    last = [s for s in samples if s["step"] == max(r["step"] for r in samples)]
    assert f"Samples: PPO step {last[0]['step']}" in page
    assert "&lt;|im_start|&gt;" in page and "<|im_start|>" not in page
    # the stage table and the note that eval.json is missing
    assert page.count("<td>done</td>") == 3
    assert "No eval/eval.json" in page

    result = CliRunner().invoke(app, ["report", "--config", str(run_copy)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(f"report: {out}")


def test_report_embeds_eval_outputs(run_copy):
    cfg = load_config(run_copy)
    eval_dir = cfg.run_dir / "eval"
    eval_dir.mkdir(parents=True)
    rows = [{"prompt": "Hi <there>", "sft_response": "hello", "ppo_response": "HELLO!", "sft_score": 0.25,
             "ppo_score": 0.5, "kl": 0.1}] * 3
    (eval_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (eval_dir / "eval.json").write_text(json.dumps(
        {"rm": {"accuracy": 0.75, "n_pairs": 8, "split": "eval", "margin_mean": 0.3}, "overoptimisation": []}))
    write_report(cfg, echo=lambda line: None)  # makes the PNGs; one becomes the eval helper's plot below
    shutil.copy(eval_dir / "sft_loss.png", eval_dir / "rm_calibration.png")
    page = write_report(cfg, echo=lambda line: None).read_text()
    assert "<img src='rm_calibration.png'" in page
    assert "Samples: SFT vs PPO on held-out prompts" in page
    assert "<th>sft_response</th><th>ppo_response</th>" in page and "HELLO!" in page and "Hi &lt;there&gt;" in page
    assert "Evaluation (eval/eval.json)" in page and "0.75" in page


def test_report_shows_a_real_evaluation(tiny_eval_run, tmp_path):
    """On `rlhf eval`'s own outputs (4 samples per prompt): the summary with its standard errors and
    the gain decomposition, and a samples table with one row per prompt (its first sample)."""
    src = load_config(tiny_eval_run)
    cfg = load_config(write_config(tmp_path, {"eval": {"max_prompts": 8, "overopt_prompts": 4, "batch_size": 4}}))
    for name in ("sft", "rm", "ppo", "eval"):
        shutil.copytree(src.run_dir / name, cfg.run_dir / name, ignore=shutil.ignore_patterns("model", "adapter", "checkpoints"))
    page = write_report(cfg, echo=lambda line: None).read_text()
    assert "held-out prompts × 4 samples: win rate" in page and "RM score gain at equal length" in page
    assert "RM score gain by EOS status" in page
    assert "<th>prompt</th><th>sample</th><th>sft_response</th>" in page
    assert "the first sample of the first 8 of 8 prompts (32 samples in all)" in page
    samples = page.split("Samples: SFT vs PPO", 1)[1]
    assert samples.count("<tr><td>") == 8


def test_missing_stages_are_skipped_with_a_note(tiny_ppo_run, tmp_path):
    cfg = load_config(write_config(tmp_path))
    eval_dir = cfg.run_dir / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "ppo_reward.png").write_bytes(PNG_MAGIC)  # a plot from an earlier run must not survive
    page = write_report(cfg, echo=lambda line: None).read_text()
    assert not list(eval_dir.glob("*.png"))
    assert page.count("skipped, no metrics") == len(PLOTS)
    assert "<td>missing</td>" in page and "No samples yet" in page

    # only SFT finished: its plot is made, the others are noted
    shutil.copytree(load_config(tiny_ppo_run).stage_dir("sft"), cfg.stage_dir("sft"),
                    ignore=shutil.ignore_patterns("model", "adapter"))
    page = write_report(cfg, echo=lambda line: None).read_text()
    assert [p.name for p in eval_dir.glob("*.png")] == ["sft_loss.png"]
    assert page.count("skipped, no metrics") == len(PLOTS) - 1
