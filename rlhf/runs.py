"""A stage's run in the run folder: the checks before it, its manifest, and the processes' waits.

Every stage goes through one lifecycle (`stage_run`, used by rlhf.sft, rlhf.rm, rlhf.ppo.stage,
and for its checks by rlhf.evaluate):

    stage = stage_run(cfg, "rm")  # its config section, its upstream stages finished and current
    data = ...                    # user mistakes in the data surface here, before anything is written
    with stage:                   # manifest `running`; every process waits for the main one
        ...train...
        if stage.is_main:
            ...write the outputs...
            stage.finish(metrics, outputs)  # manifest `done`, after every output is written
    # leaving the block: the processes wait for each other; an exception marks the manifest `failed`

runs/<run_name>/<stage>/manifest.json records the stage's config hash, its upstream stages'
hashes, its status and final metrics (rlhf.staleness reads it back). A stage is marked `done`
only after all its outputs are written (each by an atomic rename, rlhf.atomic), so a crash never
leaves a `done` stage with partial outputs. Under `accelerate launch` only the main process
writes the manifest; the others wait for it where the files matter.
"""

from __future__ import annotations

import os
import time
from typing import Any

from rlhf.atomic import write_json_atomically
from rlhf.config import STAGES, UPSTREAM, PipelineConfig, dump_config
from rlhf.errors import UserError
from rlhf.staleness import EVAL_DIR, MANIFEST, read_manifest, stage_config, stage_hash, stage_state, weights_fingerprint

STAGE_COMMAND = {"sft": "rlhf sft", "rm": "rlhf rm", "ppo": "rlhf ppo"}
# What running a stage (or the evaluation) without the config section it needs says.
NO_SECTION = {
    "rm": ("rm", "no 'rm' section; add one to run the reward-model stage"),
    "ppo": ("ppo", "no 'ppo' section; add one to run the PPO stage"),
    EVAL_DIR: ("rm", "rlhf eval needs an rm section (the reward model scores everything)"),
}


# ---------------------------------------------------------------------------- before a stage starts


def require_section(cfg: PipelineConfig, stage: str) -> None:
    section, message = NO_SECTION.get(stage, (stage, ""))
    if getattr(cfg, section) is None:
        raise UserError(f"{cfg.source}: {message}")


def require_upstream(cfg: PipelineConfig, stage: str) -> None:
    """Fail early, with the command to run, if an upstream stage is missing, unfinished or stale."""
    for up in UPSTREAM[stage]:
        state = stage_state(cfg, up)
        if state.status != "done":
            raise UserError(
                f"the {stage} stage needs a finished {up} stage in {cfg.stage_dir(up)} ({state.status}: {state.reason}); "
                f"run `{STAGE_COMMAND[up]} --config {cfg.source or 'pipeline.yaml'}` first (or `rlhf run-all`)"
            )
    if stage == "ppo":
        check_same_base(cfg)


def require_stages(cfg: PipelineConfig, what: str) -> None:
    """Every configured stage must be finished and current; else name the command that makes it so."""
    for stage in STAGES:
        if getattr(cfg, stage) is None:
            continue
        state = stage_state(cfg, stage)
        if state.status != "done":
            raise UserError(f"{what} needs a finished, current {stage} stage in {cfg.stage_dir(stage)} "
                            f"({state.status}: {state.reason}); run `{STAGE_COMMAND[stage]} --config "
                            f"{cfg.source or 'pipeline.yaml'}` first (or `rlhf run-all`)")


def check_same_base(cfg: PipelineConfig) -> None:
    """PPO puts the reward adapter on sft/model: refuse an RM whose manifest records other SFT weights
    (e.g. the SFT stage was forced to rerun and came out different; hashes of configs cannot see that)."""
    recorded = (read_manifest(cfg.stage_dir("rm")) or {}).get("base_weights")
    if recorded is None:
        return  # a run folder from before this check: nothing recorded to compare
    current = weights_fingerprint(cfg.stage_dir("sft") / "model")
    if current != recorded:
        raise UserError(
            f"{cfg.stage_dir('rm') / MANIFEST}: the reward model was trained on other SFT weights than "
            f"{cfg.stage_dir('sft') / 'model'} holds now (sha256 {recorded[:12]} vs {str(current)[:12]}); retrain it: "
            f"`rlhf run-all --from rm --config {cfg.source or 'pipeline.yaml'}`"
        )


# ---------------------------------------------------------------------------- the manifest


def begin_stage(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """Mark a stage as running and write the resolved config of this invocation beside the run."""
    stage_dir = cfg.stage_dir(stage)
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
        probe = stage_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir: cannot write to {stage_dir} ({e.strerror}); choose a writable output_dir") from None
    resolved = cfg.run_dir / "pipeline.yaml"
    tmp = resolved.with_name(f"{resolved.name}.tmp-{os.getpid()}")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    os.replace(tmp, resolved)  # a kill mid-write leaves the previous file, never half of one
    manifest = {
        "stage": stage,
        "status": "running",
        "config_hash": stage_hash(cfg, stage),
        "upstream": {u: stage_hash(cfg, u) for u in UPSTREAM[stage]},
        "config": stage_config(cfg, stage),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if stage in ("rm", "ppo"):  # both train on sft/model; PPO checks the RM saw the same weights
        manifest["base_weights"] = weights_fingerprint(cfg.stage_dir("sft") / "model")
    write_json_atomically(stage_dir / MANIFEST, manifest)
    return manifest


def finish_stage(cfg: PipelineConfig, stage: str, manifest: dict[str, Any], metrics: dict[str, Any], outputs: dict[str, str]) -> None:
    """Mark a stage done; call only after every output has been written."""
    manifest = dict(manifest, status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), metrics=metrics, outputs=outputs)
    from rlhf.model_card import write_stage_cards

    write_stage_cards(cfg, stage, manifest)  # README.md in model/ and adapter/: the held-out figures are known now
    write_json_atomically(cfg.stage_dir(stage) / MANIFEST, manifest)


def fail_stage(cfg: PipelineConfig, stage: str, manifest: dict[str, Any], error: str) -> None:
    manifest = dict(manifest, status="failed", error=error, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json_atomically(cfg.stage_dir(stage) / MANIFEST, manifest)


# ---------------------------------------------------------------------------- the lifecycle


class StageRun:
    """One run of a trained stage (see the module docstring). `with` it around the work the manifest
    records: entering marks the stage `running` (main process) and waits for every process; leaving
    waits for every process again, or, on any exception, marks the stage `failed` with the error and
    lets the exception through. `finish` marks it `done`.

    The evaluation uses only the checks (stage "eval"): it writes no manifest, its eval.json records
    its inputs (rlhf.staleness.eval_state)."""

    def __init__(self, cfg: PipelineConfig, stage: str):
        self.cfg = cfg
        self.stage = stage
        self.dir = cfg.stage_dir(stage)
        self.manifest: dict[str, Any] | None = None  # the `running` manifest, once entered (main process)
        self._processes = None

    @property
    def processes(self):
        """accelerate's view of the processes running this stage (made on first use: it needs torch)."""
        if self._processes is None:
            from accelerate import PartialState

            self._processes = PartialState()
        return self._processes

    @property
    def is_main(self) -> bool:
        """The process that writes the stage's files (the only one, without `accelerate launch`)."""
        return self.processes.is_main_process

    def __enter__(self) -> StageRun:
        if self.stage not in STAGES:
            raise TypeError(f"{self.stage}: only the trained stages ({', '.join(STAGES)}) keep a manifest")
        if self.is_main:
            self.manifest = begin_stage(self.cfg, self.stage)
        self.processes.wait_for_everyone()  # e.g. PPO's main process prunes checkpoints before the others resume
        return self

    def finish(self, metrics: dict[str, Any], outputs: dict[str, str]) -> None:
        """Mark the stage done (main process); call only after every output has been written."""
        if self.is_main:
            finish_stage(self.cfg, self.stage, self.manifest, metrics, outputs)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            try:
                self.processes.wait_for_everyone()
            except BaseException as e:
                self._fail(e)
                raise
            return False
        self._fail(exc)
        return False

    def _fail(self, error: BaseException) -> None:
        if self.manifest is not None and self.is_main:
            fail_stage(self.cfg, self.stage, self.manifest, f"{type(error).__name__}: {error}")


def stage_run(cfg: PipelineConfig, stage: str) -> StageRun:
    """The checks before `stage` (sft, rm, ppo, or eval) runs, each a UserError naming what to do:
    its config section is there, and its upstream stages (for the evaluation: every configured
    stage) are finished and current, PPO's RM on the SFT weights there now. Loads nothing."""
    require_section(cfg, stage)
    if stage == EVAL_DIR:
        require_stages(cfg, "rlhf eval")
    else:
        require_upstream(cfg, stage)
    return StageRun(cfg, stage)
