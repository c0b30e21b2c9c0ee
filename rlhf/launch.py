"""Start a stage: in this process for a single process, through `accelerate launch` otherwise.

The stage scripts in stages/ are what `accelerate launch` starts; each process then reads the
same config file (with the same --set overrides), so every rank sees one config. On a machine
without CUDA the processes talk over gloo (`ACCELERATE_USE_CPU`, see rlhf.stage_script), which is
how the multi-process path is tested on a laptop or CI runner.
"""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from rlhf.config import PipelineConfig
from rlhf.errors import UserError

STAGES_DIR = Path(__file__).resolve().parent.parent / "stages"
# distributed_type values of an accelerate config that shard parameters across processes. PPO keeps
# four roles on one frozen base and switches LoRA adapters inside one model; ZeRO/FSDP wrap that
# model for a single forward/backward per step and cannot follow the switching, so PPO refuses them.
SHARDING_TYPES = {"DEEPSPEED": "DeepSpeed ZeRO", "FSDP": "FSDP"}


def sharding_in_use() -> str | None:
    """In a stage process: the kind of parameter sharding accelerate launched it with ("DeepSpeed
    ZeRO", "FSDP"), or None (one process, or plain data parallel)."""
    import os

    for distributed_type, kind in SHARDING_TYPES.items():  # accelerate sets ACCELERATE_USE_<type>
        if os.environ.get(f"ACCELERATE_USE_{distributed_type}", "").lower() in ("1", "true", "yes"):
            return kind
    return None


def needs_accelerate(cfg: PipelineConfig) -> bool:
    launcher = cfg.launcher
    return launcher.num_processes > 1 or launcher.num_machines > 1 or launcher.accelerate_config is not None


def accelerate_config_type(path: str) -> str | None:
    """The `distributed_type` of an accelerate config file (upper case), or None if it names none."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"launcher.accelerate_config: cannot read {path} ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"launcher.accelerate_config: {path} is not a YAML mapping; see configs/accelerate/ for examples")
    value = raw.get("distributed_type")
    return str(value).upper() if value is not None else None


def check_launch(stage: str, cfg: PipelineConfig) -> None:
    """Raise UserError for a launcher setting that cannot work for `stage` (before anything starts)."""
    launcher = cfg.launcher
    if launcher.accelerate_config is not None and not Path(launcher.accelerate_config).is_file():
        raise UserError(f"launcher.accelerate_config: {launcher.accelerate_config} does not exist (see configs/accelerate/)")
    if launcher.num_machines > 1 and launcher.accelerate_config is None:
        raise UserError("launcher.num_machines > 1 needs launcher.accelerate_config: a file per machine with its "
                        "machine_rank, main_process_ip and main_process_port (start from configs/accelerate/ddp.yaml)")
    if stage == "ppo" and launcher.accelerate_config is not None:
        kind = SHARDING_TYPES.get(accelerate_config_type(launcher.accelerate_config) or "")
        if kind is not None:
            raise UserError(
                f"launcher.accelerate_config: {launcher.accelerate_config} uses {kind}, which the PPO stage cannot use "
                "(its trainable weights are LoRA adapters switched on one shared base, so plain data parallel is what "
                "helps); set launcher.accelerate_config: configs/accelerate/ddp.yaml for PPO (launcher settings never "
                "make finished stages stale)")


def accelerate_command(stage: str, cfg: PipelineConfig, config_path: str, overrides: list[str]) -> list[str]:
    script = STAGES_DIR / f"{stage}.py"
    if not script.is_file():
        raise UserError(f"{script} not found: multi-process runs launch the scripts in stages/; run from a source checkout")
    check_launch(stage, cfg)
    launcher = cfg.launcher
    total = launcher.num_processes * launcher.num_machines
    cmd = [sys.executable, "-m", "rlhf.accelerate_launch"]  # accelerate launch, keeping the workers' exit status
    if launcher.accelerate_config:
        cmd += ["--config_file", launcher.accelerate_config]
    else:
        # No config file: say everything accelerate would otherwise warn about guessing. `--multi_gpu`
        # selects its torchrun launcher, which also starts CPU processes (gloo) when there is no GPU.
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if total > 1:
            cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(total), "--num_machines", str(launcher.num_machines)]
    if launcher.num_machines == 1:
        cmd += ["--main_process_port", "0"]  # a free port: two runs on one machine must not collide on 29500
    cmd += [str(script), "--config", config_path]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def launch_env() -> dict[str, str]:
    """The environment of the launched processes: CPU (gloo) processes when there is no CUDA device."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def run_stage(stage: str, cfg: PipelineConfig, config_path: str, overrides: list[str]) -> Path | None:
    """Run one stage to completion; raises UserError (or the stage's own error) on failure.

    With several processes the output of every process streams through as it is written, and a
    failing process stops the others (torchrun tears the group down); the error raised here
    carries the processes' own exit status (3 for a diverged run, 2 for a mistake; see
    rlhf.accelerate_launch.outcome), so `rlhf <stage>` and `run-all` exit with it."""
    if not needs_accelerate(cfg):
        module = importlib.import_module(f"rlhf.{stage}")
        return module.run(cfg)
    cmd = accelerate_command(stage, cfg, config_path, overrides)
    print("launching:", shlex.join(cmd), file=sys.stderr, flush=True)
    returncode, errors = run_streaming(cmd, launch_env())
    if returncode != 0:
        if errors:  # the processes' own `error:` lines and the launcher's summary, once each
            raise LaunchFailed(f"the {stage} stage failed: " + "\n".join(errors), returncode)
        raise LaunchFailed(f"the {stage} stage failed (exit status {returncode}); its error is printed above", returncode)
    return cfg.stage_dir(stage)


class LaunchFailed(UserError):
    """A launched stage failed: `rlhf <stage>` exits with the launch's exit status, not 2."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.exit_code = status if status > 0 else 1


def run_streaming(cmd: list[str], env: dict[str, str], keep: int = 1 << 20) -> tuple[int, list[str]]:
    """Run `cmd` with its output passed through as it comes (progress bars included); return its exit
    status and the distinct `error: ...` lines (UserErrors) its processes printed to stderr."""
    from rlhf.runlock import held_fds

    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, pass_fds=held_fds())  # the run folder's lock too
    out = getattr(sys.stderr, "buffer", None)
    tail = bytearray()
    while chunk := os.read(proc.stderr.fileno(), 1 << 16):
        if out is not None:
            out.write(chunk)
        else:
            sys.stderr.write(chunk.decode(errors="replace"))
        sys.stderr.flush()
        tail += chunk
        del tail[:-keep]
    returncode = proc.wait()
    errors: list[str] = []
    for line in tail.decode(errors="replace").splitlines():
        line = line.rsplit("\r", 1)[-1]
        if line.startswith("error: ") and line[7:] not in errors:
            errors.append(line[7:])
    return returncode, errors
