"""Start a stage: in this process for a single process, through `accelerate launch` otherwise.

The stage scripts in stages/ are what `accelerate launch` starts; each process then reads the
same config file (with the same --set overrides), so every rank sees one config.
"""

from __future__ import annotations

import importlib
import shlex
import subprocess
import sys
from pathlib import Path

from rlhf.config import PipelineConfig
from rlhf.errors import UserError

STAGES_DIR = Path(__file__).resolve().parent.parent / "stages"


def needs_accelerate(cfg: PipelineConfig) -> bool:
    launcher = cfg.launcher
    return launcher.num_processes > 1 or launcher.num_machines > 1 or launcher.accelerate_config is not None


def accelerate_command(stage: str, cfg: PipelineConfig, config_path: str, overrides: list[str]) -> list[str]:
    script = STAGES_DIR / f"{stage}.py"
    if not script.is_file():
        raise UserError(f"{script} not found: multi-process runs launch the scripts in stages/; run from a source checkout")
    launcher = cfg.launcher
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launcher.accelerate_config:
        if not Path(launcher.accelerate_config).is_file():
            raise UserError(f"launcher.accelerate_config: {launcher.accelerate_config} does not exist (see configs/accelerate/)")
        cmd += ["--config_file", launcher.accelerate_config]
    cmd += ["--num_processes", str(launcher.num_processes * launcher.num_machines), "--num_machines", str(launcher.num_machines)]
    cmd += [str(script), "--config", config_path]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def run_stage(stage: str, cfg: PipelineConfig, config_path: str, overrides: list[str]) -> Path | None:
    """Run one stage to completion; raises UserError (or the stage's own error) on failure."""
    if not needs_accelerate(cfg):
        module = importlib.import_module(f"rlhf.{stage}")
        return module.run(cfg)
    cmd = accelerate_command(stage, cfg, config_path, overrides)
    print("launching:", shlex.join(cmd), file=sys.stderr)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise UserError(f"the {stage} stage failed (exit status {result.returncode}); its error is printed above")
    return cfg.stage_dir(stage)
