"""run-all: the stages in order, each in a fresh process, skipping those already up to date.

A stage is up to date when its manifest says `done` with the current config hash and the
current hashes of its upstream stages (rlhf.staleness.stage_state). `--from STAGE` reruns from a
stage on, `--only STAGE` runs one, `--force` ignores the manifests. A failing stage stops the
pipeline and leaves the earlier stages intact; rerunning continues from its last checkpoint.
Before PPO starts, the reward model's held-out accuracy must pass `rm.min_accuracy`
(rlhf.rm_gate); otherwise run-all stops with that error, the SFT and RM stages kept.
After the stages, `rlhf eval` runs (when `eval.enabled`, and not with `--only`) unless its
eval.json is current and no stage ran.
"""

from __future__ import annotations

import subprocess
import sys

from rlhf.config import STAGES, PipelineConfig
from rlhf.errors import UserError
from rlhf.launch import check_launch, needs_accelerate
from rlhf.rm_gate import check_before_ppo
from rlhf.staleness import eval_state, stage_state


def plan(cfg: PipelineConfig, start: str | None = None, only: str | None = None, force: bool = False) -> list[tuple[str, str]]:
    """(stage, reason) for each configured stage that will run, in order; skipped ones are absent."""
    configured = [s for s in STAGES if getattr(cfg, s) is not None]
    for name, value in (("--from", start), ("--only", only)):
        if value is not None and value not in configured:
            raise UserError(f"{name} {value}: not a configured stage; choose one of {', '.join(configured)}")
    if only:
        return [(only, "asked for with --only")]
    todo: list[tuple[str, str]] = []
    for stage in configured[configured.index(start) if start else 0:]:
        if force or (start and stage == start):
            todo.append((stage, "--force" if force else "--from"))
            continue
        state = stage_state(cfg, stage)
        upstream_rerun = any(t for t, _ in todo)
        if upstream_rerun:
            todo.append((stage, "an upstream stage reruns"))
        elif state.status != "done":
            todo.append((stage, f"{state.status}: {state.reason}"))
    return todo


def nothing_to_run(cfg: PipelineConfig, start: str | None = None, only: str | None = None, force: bool = False) -> bool:
    """Whether run-all would skip every stage and the evaluation: all of them are up to date.
    Reads manifests and hashes files only (no torch), so a finished run answers in a fraction of a second."""
    if plan(cfg, start, only, force):
        return False
    return not evaluates_after(cfg, only) or eval_state(cfg)[0]


def evaluates_after(cfg: PipelineConfig, only: str | None) -> bool:
    """Whether run-all considers `rlhf eval` after the stages (it still skips an up-to-date one)."""
    return only is None and cfg.eval.enabled and cfg.rm is not None


def run_all(cfg: PipelineConfig, config_path: str, overrides: list[str], start: str | None = None,
            only: str | None = None, force: bool = False, echo=print, verbose: bool = False) -> None:
    """Other libraries' output goes to each stage's log.txt (and to the terminal with `verbose`);
    a summary table closes the run, also when a stage failed (rlhf.console)."""
    from rlhf.console import print_lines, summary_lines

    results: list[dict] = []
    try:
        _run_stages(cfg, config_path, overrides, start, only, force, echo, verbose, results)
    finally:
        if results:
            print_lines(summary_lines(cfg, results), echo)


def _run_stages(cfg, config_path, overrides, start, only, force, echo, verbose, results: list[dict]) -> None:
    import time

    from rlhf.console import LOG_FILE, closing_line

    todo = plan(cfg, start, only, force)
    if needs_accelerate(cfg):  # e.g. PPO under a ZeRO config: say so before SFT spends an hour
        for stage, _ in todo:
            check_launch(stage, cfg)
    running = {s for s, _ in todo}
    for stage in STAGES:
        if getattr(cfg, stage) is not None and stage not in running:
            echo(f"{stage}: up to date, skipped ({cfg.stage_dir(stage)})")
            results.append({"stage": stage, "state": "skipped", "seconds": None})
    for stage, reason in todo:
        if stage == "ppo" and stage_state(cfg, "rm").status == "done":
            # The RM is trained by now: its quality gate, before PPO's process starts (a missing or stale
            # RM is PPO's own error). The PPO process itself warns about an unchecked RM.
            check_before_ppo(cfg, warn=False)
        echo(f"{stage}: running ({reason}); full output in {cfg.stage_dir(stage) / LOG_FILE}")
        t0 = time.monotonic()
        status = _run_command(stage, config_path, overrides, cfg.stage_dir(stage) / LOG_FILE, verbose)
        results.append({"stage": stage, "state": "ran" if status == 0 else "failed", "seconds": time.monotonic() - t0})
        if status != 0:
            raise StageFailed(f"the {stage} stage failed (exit status {status}); earlier stages are kept. "
                              f"Fix the cause and rerun: it resumes from the last checkpoint", status)
        echo(closing_line(cfg, stage, results[-1]["seconds"]))
    if evaluates_after(cfg, only):
        _run_eval(cfg, config_path, overrides, rerun=force or bool(todo), echo=echo, verbose=verbose, results=results)


def _run_eval(cfg: PipelineConfig, config_path: str, overrides: list[str], rerun: bool, echo, verbose: bool = False,
              results: list | None = None) -> None:
    """`rlhf eval` after the stages, in its own process like them; skipped when eval/eval.json was
    computed from the current stages and eval settings and no stage ran now."""
    up_to_date, reason = eval_state(cfg)
    if up_to_date and not rerun:
        echo(f"eval: up to date, skipped ({cfg.stage_dir('eval')})")
        if results is not None:
            results.append({"stage": "eval", "state": "skipped", "seconds": None})
        return
    import time

    from rlhf.console import LOG_FILE, closing_line

    log_path = cfg.stage_dir("eval") / LOG_FILE
    echo(f"eval: running ({'a stage ran' if rerun else reason}); full output in {log_path}")
    t0 = time.monotonic()
    status = _run_command("eval", config_path, overrides, log_path, verbose)
    if results is not None:
        results.append({"stage": "eval", "state": "ran" if status == 0 else "failed", "seconds": time.monotonic() - t0})
    if status != 0:
        raise StageFailed(f"the evaluation failed (exit status {status}); the trained stages are kept. "
                          f"Fix the cause and run `rlhf eval --config {config_path}`", status)
    echo(closing_line(cfg, "eval", time.monotonic() - t0))


class StageFailed(UserError):
    """A stage's process failed. run-all exits with that process's status, so a script can tell a
    user mistake (2) from a diverged run (3) or a crash (1, also for a process killed by a signal)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.exit_code = status if status > 0 else 1


def _run_command(command: str, config_path: str, overrides: list[str], log_path=None, verbose: bool = False) -> int:
    """`rlhf COMMAND --config F --set ...` in a fresh process; returns its exit status. With a
    `log_path` its output goes there, and to the terminal only our lines (rlhf.console). The run
    folder's lock stays held while it runs (the child inherits its descriptor)."""
    from rlhf.runlock import held_fds

    cmd = [sys.executable, "-m", "rlhf.cli", command, "--config", config_path]
    for item in overrides:
        cmd += ["--set", item]
    if log_path is not None:
        from rlhf.console import run_logged

        return run_logged(cmd, log_path, verbose=verbose, pass_fds=held_fds())
    return subprocess.run(cmd, pass_fds=held_fds()).returncode
