"""Experiment tracking: metrics.jsonl always, plus W&B or TensorBoard when configured.

One W&B run per stage, grouped by the pipeline run (group = run_name, job_type = stage), with
the resolved config (secrets blanked) as its config. SFT and RM: `report_to` starts the run and
the Trainer's WandbCallback logs into it (train/*, eval/* against train/global_step); PPO: a
`Tracker` logs the PPO metric set per step and a samples table. `tracking.mode: auto` follows
WANDB_MODE when set, else goes online when W&B credentials are present and offline otherwise,
with a one-line hint naming the `wandb sync` command. `backend: tensorboard` writes to
<stage>/tensorboard instead. Secrets never reach the logged config.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
    """'online', 'offline', or None when W&B is not in use.

    `auto` takes WANDB_MODE from the environment when it is set (CI, tests), else goes online when
    credentials are present and offline otherwise."""
    t = cfg.tracking
    if t.backend != "wandb" or t.mode == "disabled":
        return None
    if t.mode == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env in ("disabled", "offline", "online"):
            return None if env == "disabled" else env
        return "online" if _wandb_credentials_present() else "offline"
    return t.mode


# The W&B run that report_to() started for a Trainer stage, by stage folder: rows that stage writes
# to metrics.jsonl outside the Trainer (the RM's final held-out accuracy) are mirrored to it.
_trainer_runs: dict[Path, Any] = {}


def start_wandb(cfg: PipelineConfig, stage: str):
    """Start this stage's W&B run (group = run name, job_type = stage, the config without secrets),
    or return None when W&B is off. Call on the main process only."""
    mode = wandb_mode(cfg)
    if mode is None:
        return None
    import wandb

    stage_dir = cfg.stage_dir(stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    _trainer_runs.clear()  # reinit finishes any earlier run; never mirror into a finished one
    run = wandb.init(
        project=cfg.tracking.project, entity=cfg.tracking.entity, group=cfg.run_name, job_type=stage,
        name=f"{cfg.run_name}-{stage}", dir=str(stage_dir), config=loggable_config(cfg), mode=mode,
        reinit="finish_previous",
    )
    if mode == "offline":
        if cfg.tracking.mode == "offline":
            why = "tracking.mode: offline"
        else:
            why = "WANDB_MODE=offline" if os.environ.get("WANDB_MODE") else "no W&B credentials found"
        log.info("W&B is offline (%s); upload this run later with: wandb sync %s", why, run.settings.sync_dir)
    return run


def _require_tensorboard() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        from rlhf.errors import UserError

        raise UserError("tracking.backend: tensorboard needs the tensorboard package; run: pip install tensorboard "
                        "(or set tracking.backend: none)")


def report_to(cfg: PipelineConfig, stage: str) -> list[str]:
    """The `report_to` list for a transformers Trainer. For W&B the main process starts the stage's
    run here, so the Trainer's WandbCallback logs into it (it reuses an active run) and the run has
    our group, job_type, name and config rather than the Trainer's defaults."""
    if wandb_mode(cfg) is not None:
        from accelerate import PartialState

        if PartialState().is_main_process:
            run = start_wandb(cfg, stage)
            _trainer_runs[cfg.stage_dir(stage).resolve()] = run
        return ["wandb"]
    if cfg.tracking.backend == "tensorboard":
        _require_tensorboard()
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(cfg.stage_dir(stage) / "tensorboard")
        return ["tensorboard"]
    return []


def wandb_key(name: str) -> str:
    """A metrics.jsonl name in the Trainer's W&B naming (eval_loss -> eval/loss, loss -> train/loss)."""
    if "/" in name:
        return name
    for prefix in ("eval", "train", "test"):
        if name.startswith(prefix + "_"):
            return f"{prefix}/{name[len(prefix) + 1:]}"
    return f"train/{name}"


class MetricsWriter:
    """Append one JSON object per logged step to <stage>/metrics.jsonl (main process only).

    With `mirror` (default), a row is also logged to the W&B run that report_to() started for the
    same stage folder, if any (so the RM's final held-out accuracy reaches the dashboard). The
    Trainer's own rows are not mirrored (its WandbCallback logs them), and PPO logs through its
    Tracker, whose run is not registered for mirroring."""

    def __init__(self, path: Path, enabled: bool = True, mirror: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.mirror = mirror
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        run = _trainer_runs.get(self.path.parent.resolve()) if self.mirror else None
        if run is not None:
            numbers = {wandb_key(k): v for k, v in row.items()
                       if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            run.log({**numbers, "train/global_step": step})


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
                self.writer = MetricsWriter(path, mirror=False)
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


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of a JSONL log (metrics, samples) logged up to `step`, the checkpoint a run resumes
    from, minus end-of-training summaries; step 0 removes the file."""
    from rlhf.atomic import write_jsonl_atomically

    path = Path(path)
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= step and "train_runtime" not in row]
    write_jsonl_atomically(path, kept)


# Names of config keys that would hold credentials (none does today; a future field such as
# `hub_token` or `api_key` must not reach W&B). Whole names and credential suffixes only, so
# `stop_token` or `margin_column` stay visible.
SECRET_KEY = re.compile(r"^(token|key)$|(api_?key|secret|password|passwd|auth_token|access_token|hub_token|hf_token)$",
                        re.IGNORECASE)


def scrub_secrets(node: Any) -> Any:
    """A copy of nested dicts/lists with the value of every credential-like key replaced by '***'."""
    if isinstance(node, dict):
        return {k: ("***" if v and SECRET_KEY.search(str(k)) else scrub_secrets(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [scrub_secrets(v) for v in node]
    return node


def loggable_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The resolved config for a tracker, with any credential-like value blanked."""
    return scrub_secrets(cfg.model_dump(mode="json"))


class Tracker:
    """A stage's live tracker for code outside the HF Trainer (PPO): W&B or TensorBoard."""

    def __init__(self, cfg: PipelineConfig, stage: str):
        self.wandb_run = None
        self.tb = None
        if wandb_mode(cfg) is not None:
            self.wandb_run = start_wandb(cfg, stage)
        elif cfg.tracking.backend == "tensorboard":
            _require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

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
