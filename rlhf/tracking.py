"""Experiment tracking: metrics.jsonl always, plus W&B or TensorBoard when configured.

One W&B run per stage, grouped by the pipeline run (group = run_name, job_type = stage).
`tracking.mode: auto` goes online when W&B credentials are present and offline otherwise
(sync later with `wandb sync`). Secrets never reach the logged config.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from rlhf.config import PipelineConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(cfg: PipelineConfig) -> str | None:
    """'online', 'offline', or None when W&B is not in use."""
    t = cfg.tracking
    if t.backend != "wandb" or t.mode == "disabled":
        return None
    if t.mode == "auto":
        return "online" if _wandb_credentials_present() else "offline"
    return t.mode


def report_to(cfg: PipelineConfig, stage: str) -> list[str]:
    """The `report_to` list for a transformers Trainer, with the W&B environment set for this stage."""
    mode = wandb_mode(cfg)
    if mode is not None:
        os.environ.update({
            "WANDB_MODE": mode,
            "WANDB_PROJECT": cfg.tracking.project,
            "WANDB_RUN_GROUP": cfg.run_name,
            "WANDB_JOB_TYPE": stage,
            "WANDB_NAME": f"{cfg.run_name}-{stage}",
            "WANDB_DIR": str(cfg.stage_dir(stage)),
        })
        if cfg.tracking.entity:
            os.environ["WANDB_ENTITY"] = cfg.tracking.entity
        if mode == "offline":
            log.info("W&B is offline (no credentials found); sync later with: wandb sync %s/wandb/offline-run-*",
                     cfg.stage_dir(stage))
        return ["wandb"]
    if cfg.tracking.backend == "tensorboard":
        return ["tensorboard"]
    return []


class MetricsWriter:
    """Append one JSON object per logged step to <stage>/metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def metrics_callback(path: Path):
    """A transformers TrainerCallback that mirrors every Trainer log into metrics.jsonl."""
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        def __init__(self) -> None:
            self.writer: MetricsWriter | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if self.writer is None:
                self.writer = MetricsWriter(path)
            self.writer.write(state.global_step, {**logs, "epoch": state.epoch})

    return MetricsJsonl()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill is skipped
    return rows


SECRET_MARKERS = ("key", "token", "secret", "password")


def loggable_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The resolved config for a tracker, with any secret-looking value blanked."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("***" if any(m in k.lower() for m in SECRET_MARKERS) and v else scrub(v)) for k, v in node.items()}
        return node

    return scrub(cfg.model_dump(mode="json"))


class Tracker:
    """A stage's live tracker for code outside the HF Trainer (PPO): W&B or TensorBoard."""

    def __init__(self, cfg: PipelineConfig, stage: str):
        self.wandb_run = None
        self.tb = None
        backends = report_to(cfg, stage)
        if "wandb" in backends:
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.tracking.project, entity=cfg.tracking.entity, group=cfg.run_name, job_type=stage,
                name=f"{cfg.run_name}-{stage}", dir=str(cfg.stage_dir(stage)), config=loggable_config(cfg),
                mode=os.environ["WANDB_MODE"], reinit="finish_previous",
            )
        elif "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from rlhf.errors import UserError

                raise UserError("tracking.backend: tensorboard needs the tensorboard package; run: pip install tensorboard") from None
            self.tb = SummaryWriter(log_dir=str(cfg.stage_dir(stage) / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if self.wandb_run is not None and rows:
            import wandb

            columns = list(rows[0])
            self.wandb_run.log({"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                               step=step)
        if self.tb is not None:
            text = "\n\n".join(f"**{r['score']:.3f}** {r['prompt']} → {r['response']}" for r in rows)
            self.tb.add_text("samples", text, step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tb is not None:
            self.tb.close()
