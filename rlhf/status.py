"""`rlhf status`: where each stage of a run stands, in one table.

For every stage: its state relative to the current config (done / stale and why / missing /
running or interrupted / failed — rlhf.staleness.stage_state decides, this module only adds what a
person wants to see beside it), the step of its latest checkpoint, a few key metrics (for the
reward model, the verdict of PPO's quality gate, rlhf.rm_gate) and where its outputs are.
Reading only: nothing here loads a model or writes a file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import STAGES, PipelineConfig
from rlhf.rm_gate import read_verdict
from rlhf.staleness import stage_state
from rlhf.tracking import METRICS_FILE, read_metrics

# What each manifest/metrics status is shown as. "running" stays "running" in the manifest when a
# process is killed; the run folder's lock (rlhf.runlock) tells the two apart: a stage is shown
# "running (pid N)" only while a live rlhf command holds the folder, "interrupted" otherwise.
SHOWN = {"done": "done", "stale": "stale", "missing": "missing", "running": "running",
         "interrupted": "interrupted", "failed": "failed"}
STYLE = {"done": "green", "stale": "yellow", "missing": "dim", "running": "cyan", "interrupted": "cyan",
         "failed": "red", "not configured": "dim"}


@dataclass
class StageRow:
    stage: str
    state: str  # done | stale | missing | running | interrupted | failed | not configured
    reason: str = ""
    checkpoint: str = ""  # "step N" of the latest checkpoint, "" when none
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    gate: str = ""  # rm: the PPO quality gate's verdict (rlhf.rm_gate), shown with the metrics
    pid: int | None = None  # the rlhf command running it (state "running")


def latest_checkpoint_step(stage_dir: Path, stage: str) -> int | None:
    """Step of the newest checkpoint: trainer `checkpoints/checkpoint-N` (SFT, RM) or PPO's `checkpoints/step-N`."""
    pattern = re.compile(r"^step-(\d+)$" if stage == "ppo" else r"^checkpoint-(\d+)$")
    root = stage_dir / "checkpoints"
    if not root.is_dir():
        return None
    steps = [int(m.group(1)) for d in root.iterdir() if d.is_dir() and (m := pattern.match(d.name))]
    return max(steps) if steps else None


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    for row in reversed(rows):
        if isinstance(row.get(key), (int, float)):
            return float(row[key])
    return None


def key_metrics(stage: str, stage_dir: Path, manifest: dict[str, Any] | None) -> dict[str, float]:
    """The few numbers that say how a stage went: a finished stage's final metrics from its manifest;
    an unfinished one's from metrics.jsonl (so an interrupted stage shows its progress)."""
    rows = read_metrics(stage_dir / METRICS_FILE)
    final = (manifest or {}).get("metrics") or {}
    wanted = {
        # label: (metrics.jsonl key, manifest key)
        "sft": {"train loss": ("loss", "train_loss_last"), "eval loss": ("eval_loss", "eval_loss")},
        "rm": {"eval accuracy": ("eval_pairs_accuracy", "eval_accuracy"), "train loss": ("loss", "train_loss_last")},
        "ppo": {"score": ("objective/scores", "objective/scores"), "KL": ("objective/kl", "objective/kl"),
                "length": ("response/length_mean", "response/length_mean")},
    }[stage]
    done = (manifest or {}).get("status") == "done"
    out = {}
    for label, (row_key, manifest_key) in wanted.items():
        recorded = float(final[manifest_key]) if isinstance(final.get(manifest_key), (int, float)) else None
        # A finished stage shows its exported model's figures (SFT/RM export their best checkpoint,
        # not the last one evaluated); an unfinished one its progress.
        value = recorded if done and recorded is not None else _last(rows, row_key)
        if value is None:
            value = recorded
        if value is not None:
            out[label] = value
    return out


def stage_rows(cfg: PipelineConfig) -> list[StageRow]:
    """One row per stage of the pipeline, in order."""
    from rlhf.runlock import running_holder

    holder = running_holder(cfg.run_dir)  # reads the lock file only: never waits for the lock
    rows = []
    for stage in STAGES:
        if getattr(cfg, stage) is None:
            rows.append(StageRow(stage, "not configured", f"no '{stage}' section in the config"))
            continue
        stage_dir = cfg.stage_dir(stage)
        state = stage_state(cfg, stage)
        status, reason = state.status, state.reason
        step = latest_checkpoint_step(stage_dir, stage)
        if status == "missing" and step is not None:
            # checkpoints without a manifest: the manifest was lost, the training was not
            status, reason = "interrupted", "checkpoints present but no manifest"
        if status == "running" and holder is None:
            status = "interrupted"
            reason = "the manifest says running, but no rlhf command holds the run folder: it was killed (rerun to resume)"
        elif status == "running":
            reason = f"by {holder.describe()}"
        checkpoint = ""
        if step is not None:
            total = cfg.ppo.steps if stage == "ppo" else trainer_total_steps(stage_dir, step)
            checkpoint = f"step {step}" + (f"/{total}" if total and total > 0 else "")
        outputs = _outputs(stage_dir, (state.manifest or {}).get("outputs") or {})
        gate = ""
        if stage == "rm" and status in ("done", "stale"):
            verdict = read_verdict(cfg)
            gate = verdict.summary() if verdict is not None else ""
        rows.append(StageRow(stage, status, reason, checkpoint, key_metrics(stage, stage_dir, state.manifest), outputs,
                             gate, pid=holder.pid if status == "running" else None))
    return rows


def trainer_total_steps(stage_dir: Path, step: int) -> int | None:
    """The length of an SFT/RM run in optimizer steps, as its Trainer computed it from the epochs
    (trainer_state.json of checkpoint-`step`), or None."""
    try:
        return int(json.loads((stage_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _outputs(stage_dir: Path, recorded: dict[str, str]) -> list[str]:
    """The stage folder, then each recorded output relative to it (short enough for a table cell)."""
    if not stage_dir.is_dir():
        return []
    out = [f"{stage_dir}/"]
    for path in recorded.values():
        p = Path(path)
        try:
            out.append("  " + str(p.relative_to(stage_dir)) + ("/" if p.is_dir() else ""))
        except ValueError:
            out.append(str(p))
    return out


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _metric_lines(row: StageRow) -> list[str]:
    """The metrics cell: one line per metric; for the RM the gate's verdict replaces the bare accuracy."""
    lines = [f"{k} {_fmt(v)}" for k, v in row.metrics.items() if not (row.gate and k == "eval accuracy")]
    return ([row.gate] if row.gate else []) + lines


def render(cfg: PipelineConfig, rows: list[StageRow]):
    """A rich Table of the rows."""
    from rich.table import Table

    table = Table(title=f"run {cfg.run_name} ({cfg.run_dir})", title_justify="left", show_lines=True)
    for name in ("stage", "state", "why", "checkpoint", "metrics", "outputs"):
        table.add_column(name, overflow="fold")
    for row in rows:
        shown = f"running (pid {row.pid})" if row.pid is not None else SHOWN.get(row.state, row.state)
        table.add_row(
            row.stage, f"[{STYLE.get(row.state, '')}]{shown}[/]", row.reason, row.checkpoint,
            "\n".join(_metric_lines(row)),
            "\n".join(row.outputs),
        )
    return table


def print_status(cfg: PipelineConfig, console=None) -> list[StageRow]:
    from rich.console import Console

    rows = stage_rows(cfg)
    (console or Console()).print(render(cfg, rows))
    return rows
