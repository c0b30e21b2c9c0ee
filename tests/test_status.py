"""`rlhf status` on a finished tiny run: done, stale after an override (naming the key), missing,
running-or-interrupted and failed stages, with checkpoint steps and key metrics."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import load_config
from rlhf.status import latest_checkpoint_step, stage_rows
from tests.conftest import write_config


def by_stage(cfg):
    return {row.stage: row for row in stage_rows(cfg)}


def copy_run(tiny_ppo_run, tmp_path):
    """A private copy of the finished tiny run, safe to damage."""
    src = load_config(tiny_ppo_run)
    path = write_config(tmp_path)
    shutil.copytree(src.run_dir, load_config(path).run_dir)
    return path


def test_finished_run_is_done_with_metrics_and_checkpoint(tiny_ppo_run):
    cfg = load_config(tiny_ppo_run)
    rows = by_stage(cfg)
    assert [r.state for r in rows.values()] == ["done", "done", "done"]
    assert rows["ppo"].checkpoint == f"step {cfg.ppo.steps}/{cfg.ppo.steps}"
    assert set(rows["ppo"].metrics) == {"score", "KL", "length"}
    assert "eval accuracy" in rows["rm"].metrics and 0.0 <= rows["rm"].metrics["eval accuracy"] <= 1.0
    assert "eval loss" in rows["sft"].metrics
    assert rows["ppo"].outputs[0] == f"{cfg.stage_dir('ppo')}/"
    assert "  model/" in rows["ppo"].outputs


def test_override_makes_only_ppo_stale_and_names_the_key(tiny_ppo_run):
    cfg = load_config(tiny_ppo_run, ["ppo.kl_coef=0.123"])
    rows = by_stage(cfg)
    assert rows["sft"].state == rows["rm"].state == "done"
    assert rows["ppo"].state == "stale" and rows["ppo"].reason == "changed: ppo.kl_coef"
    # an upstream change is named too
    rows = by_stage(load_config(tiny_ppo_run, ["rm.learning_rate=0.5"]))
    assert rows["rm"].state == "stale" and rows["ppo"].state == "stale"
    assert "upstream changed: rm" in rows["ppo"].reason


def test_missing_stages(tmp_path):
    rows = by_stage(load_config(write_config(tmp_path)))
    assert [r.state for r in rows.values()] == ["missing", "missing", "missing"]
    assert all(r.checkpoint == "" and r.metrics == {} and r.outputs == [] for r in rows.values())
    rows = by_stage(load_config(write_config(tmp_path, name="sft-only.yaml"), ["rm=null", "ppo=null"]))
    assert rows["rm"].state == rows["ppo"].state == "not configured"


def test_interrupted_failed_and_orphan_checkpoints(tiny_ppo_run, tmp_path):
    path = copy_run(tiny_ppo_run, tmp_path)
    cfg = load_config(path)
    ppo_dir = cfg.stage_dir("ppo")
    manifest = json.loads((ppo_dir / "manifest.json").read_text())
    # a killed stage leaves its manifest saying "running"; its progress shows from metrics.jsonl
    shutil.rmtree(ppo_dir / "checkpoints" / f"step-{cfg.ppo.steps}")
    running = {k: v for k, v in manifest.items() if k not in ("metrics", "outputs", "finished")} | {"status": "running"}
    (ppo_dir / "manifest.json").write_text(json.dumps(running))
    row = by_stage(cfg)["ppo"]
    assert row.state == "interrupted" and "killed" in row.reason  # no rlhf command holds the run folder
    assert row.checkpoint == f"step {latest_checkpoint_step(ppo_dir, 'ppo')}/{cfg.ppo.steps}"
    assert latest_checkpoint_step(ppo_dir, "ppo") < cfg.ppo.steps
    assert "score" in row.metrics  # read from metrics.jsonl, not the (absent) final metrics

    (ppo_dir / "manifest.json").write_text(json.dumps(running | {"status": "failed", "error": "TrainingDiverged: boom"}))
    row = by_stage(cfg)["ppo"]
    assert row.state == "failed" and row.reason == "TrainingDiverged: boom"

    (ppo_dir / "manifest.json").unlink()
    row = by_stage(cfg)["ppo"]
    assert row.state == "interrupted" and "no manifest" in row.reason

    result = CliRunner().invoke(app, ["status", "--config", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 2}
    assert "done" in lines["sft"] and "eval loss" in result.stdout
    assert "interrupted" in lines["ppo"] and "step 2/4" in lines["ppo"]


def test_status_command_shows_stale_reason(tiny_ppo_run):
    result = CliRunner().invoke(app, ["status", "--config", str(tiny_ppo_run), "--set", "ppo.kl_coef=0.5"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "stale" in result.stdout and "changed: ppo.kl_coef" in result.stdout
