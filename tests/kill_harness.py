"""Kill harness: SIGKILL a pipeline stage at chosen moments, rerun `rlhf run-all`, check it recovers.

    python tests/kill_harness.py --kills 20            # 20 kills per stage (sft, rm, ppo), ~15 min on 2 cores
    python tests/kill_harness.py --kills 2 --stages ppo

On configs/tiny.yaml, in a temp folder: one uninterrupted `run-all` is the reference. Then, per
kill, a trial folder gets copies of the reference's finished upstream stages (so only the stage
under test runs, and it starts from the very inputs the reference had), `run-all` starts in its
own process group, and the harness polls the stage folder every millisecond and kills the whole
group (run-all and the stage process) with SIGKILL when the aimed-at moment comes:

- train:      the stage is running and has logged a step; kill after a random 0-0.3 s more;
- checkpoint: a checkpoint is being written (a Trainer checkpoint-N folder without its
              trainer_state.json, which the Trainer writes last; a PPO step-N.tmp-* folder);
- export:     the final outputs are being written (adapter.tmp*, model.tmp-*, *.old folders).

No hook in the library: the moments are recognised from the files alone. If the stage finishes
before the moment is seen (it is a few milliseconds long), the trial starts again (`misses`).
After the kill the harness records what the folder shows (the observed phase, and whether a torn
checkpoint was left), reruns `run-all` to the end, and checks:

- no stage is ever marked done with incomplete outputs (checked right after the kill and after
  the rerun: every file of adapter/ and model/ reads back whole, see rlhf.atomic.file_problem);
- a torn checkpoint left by the kill is detected and skipped with a warning (the rerun's log says
  "skipping incomplete checkpoint") and none remains afterwards;
- the run completes (exit 0, every stage done);
- the final adapter and merged model equal the reference's: PPO within 1e-6, SFT/RM within
  `--tol-hf` (the max abs difference is measured and reported for every stage).

Everything runs on one CPU thread per process (OMP_NUM_THREADS=1), as deterministic kernels need.
tests/test_kill.py runs one kill per stage of this harness in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
STAGES = ("sft", "rm", "ppo")
PHASES = ("train", "checkpoint", "export")
PPO_TOL = 1e-6


class HarnessFailure(AssertionError):
    """A recovery guarantee did not hold; the message names the trial folder and what was wrong."""


@dataclass
class StageReport:
    stage: str
    kills: int = 0
    misses: int = 0  # attempts where the stage finished before the aimed-at moment was seen
    aimed: dict[str, int] = field(default_factory=dict)
    observed: dict[str, int] = field(default_factory=dict)
    torn_checkpoints: int = 0  # kills that left a half-written checkpoint (each then detected and skipped)
    max_adapter_diff: float = 0.0
    max_model_diff: float = 0.0
    seconds: float = 0.0

    def line(self) -> str:
        def counts(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items()))

        return (f"{self.stage}: {self.kills} kills passed (aimed: {counts(self.aimed)}; observed: "
                f"{counts(self.observed)}; torn checkpoints detected and skipped: {self.torn_checkpoints}; "
                f"missed windows retried: {self.misses}); max |diff| vs uninterrupted: adapter "
                f"{self.max_adapter_diff:.3g}, merged model {self.max_model_diff:.3g}; {self.seconds:.0f} s")


# ---------------------------------------------------------------------------- processes


def harness_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               RLHF_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    env.setdefault("RLHF_CACHE", str(REPO / ".cache" / "rlhf"))
    return env


def run_all_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf.cli", "run-all", "--config", str(config)]


def run_to_end(config: Path, log: Path) -> str:
    with open(log, "ab") as f:
        result = subprocess.run(run_all_command(config), cwd=REPO, env=harness_env(), stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if result.returncode != 0:
        raise HarnessFailure(f"run-all exited {result.returncode} ({config}); log {log}:\n{text[-3000:]}")
    return text


def write_trial_config(folder: Path, last_stage: str) -> Path:
    """configs/tiny.yaml with its output in `folder`, data paths absolute, and no stage after
    `last_stage` (a stage's hash does not depend on later sections, so the hashes match the reference)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["output_dir"] = str(folder / "runs")
    for stage in STAGES:
        data = (raw.get(stage) or {}).get("data") or {}
        for key in ("path", "eval_path"):
            if data.get(key) and not Path(data[key]).is_absolute():
                data[key] = str(REPO / data[key])
    for stage in STAGES[STAGES.index(last_stage) + 1:]:
        raw.pop(stage, None)
    from rlhf.config import PipelineConfig

    if "eval" in PipelineConfig.model_fields:  # the evaluation after PPO is not under test here
        raw["eval"] = {**(raw.get("eval") or {}), "enabled": False}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------- reading the folder


def manifest_status(stage_dir: Path) -> str | None:
    try:
        return json.loads((stage_dir / "manifest.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def torn_checkpoints(stage_dir: Path, stage: str) -> list[Path]:
    """Checkpoints a kill left half-written: PPO temp folders, Trainer folders that do not read back whole."""
    root = stage_dir / "checkpoints"
    if not root.is_dir():
        return []
    if stage == "ppo":
        return sorted(root.glob("step-*.tmp-*"))
    from rlhf.hf_trainer import incomplete_checkpoints

    return incomplete_checkpoints(root)


def writing_checkpoint(stage_dir: Path, stage: str) -> bool:
    """Cheap test, called every millisecond: is a checkpoint being written right now?"""
    root = stage_dir / "checkpoints"
    try:
        names = os.listdir(root)
    except OSError:
        return False
    if stage == "ppo":
        return any(n.startswith("step-") and ".tmp-" in n for n in names)
    return any(n.startswith("checkpoint-") and not os.path.exists(root / n / "trainer_state.json") for n in names)


def writing_export(stage_dir: Path) -> bool:
    try:
        names = os.listdir(stage_dir)
    except OSError:
        return False
    return any(n.startswith(("adapter.tmp", "model.tmp")) or n.endswith(".old") for n in names)


def observed_phase(stage_dir: Path, stage: str) -> str:
    """What the stage was doing when it died, read from what it left."""
    status = manifest_status(stage_dir)
    if status == "done":
        return "after-done"
    if torn_checkpoints(stage_dir, stage):
        return "checkpoint"
    if writing_export(stage_dir) or (stage_dir / "adapter").exists():
        return "export"
    if status == "running":
        return "train"
    return "startup"


def output_problems(stage_dir: Path) -> list[str]:
    """For a stage marked done: every file of its adapter/ and model/ must read back whole."""
    from rlhf.atomic import file_problem

    problems = []
    for sub in ("adapter", "model"):
        folder = stage_dir / sub
        if not any(folder.glob("*.safetensors")):
            problems.append(f"{folder}: no weights")
            continue
        for f in sorted(folder.iterdir()):
            problem = file_problem(f) if f.is_file() else None
            if problem:
                problems.append(f"{folder}: {problem}")
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            problems.append(f"{folder}: no config")
    return problems


def check_done_stages(run_dir: Path, where: str) -> None:
    for stage in STAGES:
        stage_dir = run_dir / stage
        if manifest_status(stage_dir) == "done":
            problems = output_problems(stage_dir)
            if problems:
                raise HarnessFailure(f"{where}: {stage} is marked done with incomplete outputs: {'; '.join(problems)}")


def max_abs_diff(a_dir: Path, b_dir: Path) -> float:
    """Max abs difference over the tensors of every *.safetensors file of two folders (same names)."""
    from safetensors.torch import load_file

    worst = 0.0
    for fa in sorted(a_dir.glob("*.safetensors")):
        ta, tb = load_file(str(fa)), load_file(str(b_dir / fa.name))
        if set(ta) != set(tb):
            raise HarnessFailure(f"{fa.name}: tensor names differ between {a_dir} and {b_dir}")
        for k in ta:
            worst = max(worst, (ta[k].double() - tb[k].double()).abs().max().item() if ta[k].numel() else 0.0)
    return worst


# ---------------------------------------------------------------------------- one kill


def kill_once(stage: str, target: str, config: Path, log: Path, rng: random.Random, timeout: float = 300) -> bool:
    """Start run-all and SIGKILL its process group at the `target` moment of `stage`; False if the
    stage finished before the moment was seen (nothing killed)."""
    stage_dir = Path(yaml.safe_load(config.read_text())["output_dir"]) / "tiny" / stage
    with open(log, "ab") as f:
        proc = subprocess.Popen(run_all_command(config), cwd=REPO, env=harness_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    kill_at = None
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                raise HarnessFailure(f"run-all did not finish within {timeout} s ({config})")
            if target == "checkpoint":
                hit = writing_checkpoint(stage_dir, stage)
            elif target == "export":
                hit = writing_export(stage_dir)
            else:
                if kill_at is None and manifest_status(stage_dir) == "running" and (stage_dir / "metrics.jsonl").is_file():
                    kill_at = now + rng.uniform(0.0, 0.3)
                hit = kill_at is not None and now >= kill_at
            if hit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise HarnessFailure(f"run-all failed (exit {proc.returncode}) before any kill; log {log}:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
    return False


def trial(stage: str, target: str, ref_run: Path, folder: Path, rng: random.Random, report: StageReport,
          tol_hf: float, max_attempts: int = 8) -> None:
    """One kill of `stage` at `target`, the rerun, and every check."""
    for attempt in range(max_attempts):
        shutil.rmtree(folder, ignore_errors=True)
        config = write_trial_config(folder, stage)
        run_dir = folder / "runs" / "tiny"
        for up in STAGES[:STAGES.index(stage)]:
            shutil.copytree(ref_run / up, run_dir / up)
        log = folder / "log.txt"
        if kill_once(stage, target, config, log, rng):
            break
        report.misses += 1
    else:
        raise HarnessFailure(f"{stage}: the {target} moment was not caught in {max_attempts} attempts")
    stage_dir = run_dir / stage
    phase = observed_phase(stage_dir, stage)
    torn = torn_checkpoints(stage_dir, stage)
    check_done_stages(run_dir, f"{folder} right after the kill")

    text = run_to_end(config, folder / "rerun-log.txt")
    check_done_stages(run_dir, f"{folder} after the rerun")
    for s in STAGES[:STAGES.index(stage) + 1]:
        if manifest_status(run_dir / s) != "done":
            raise HarnessFailure(f"{folder}: {s} is not done after the rerun completed")
    if torn:
        if "skipping incomplete checkpoint" not in text:
            raise HarnessFailure(f"{folder}: the kill left {torn[0].name} half-written, and the rerun did not "
                                 "warn that it skipped it")
        report.torn_checkpoints += 1
    left = torn_checkpoints(stage_dir, stage) if stage != "ppo" else []
    if left:
        raise HarnessFailure(f"{folder}: incomplete checkpoints remain after the rerun: {left}")

    adapter_diff = max_abs_diff(ref_run / stage / "adapter", stage_dir / "adapter")
    model_diff = max_abs_diff(ref_run / stage / "model", stage_dir / "model")
    tol = PPO_TOL if stage == "ppo" else tol_hf
    if adapter_diff > tol or model_diff > tol:
        raise HarnessFailure(f"{folder}: {stage} outputs differ from the uninterrupted run by {max(adapter_diff, model_diff):.3g} "
                             f"(> {tol:g}; killed at {phase})")
    report.kills += 1
    report.aimed[target] = report.aimed.get(target, 0) + 1
    report.observed[phase] = report.observed.get(phase, 0) + 1
    report.max_adapter_diff = max(report.max_adapter_diff, adapter_diff)
    report.max_model_diff = max(report.max_model_diff, model_diff)


# ---------------------------------------------------------------------------- the harness


def run_harness(kills: int, stages: tuple[str, ...] = STAGES, seed: int = 0, workdir: Path | None = None,
                tol_hf: float = 1e-6, phase_offset: int = 0, keep: bool = False, reference: Path | None = None,
                echo=print) -> dict[str, StageReport]:
    """`kills` kills per stage, aimed in turn at train / checkpoint / export (starting at
    PHASES[phase_offset + stage index]); raises HarnessFailure on the first broken guarantee.

    `reference`: the run folder of a finished uninterrupted tiny run to compare with (e.g. a test
    fixture's, made on one thread as here); by default the harness makes one with `run-all`."""
    rng = random.Random(seed)
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-kill-")) if own else Path(workdir)
    reports: dict[str, StageReport] = {}
    try:
        t0 = time.monotonic()
        if reference is None:
            ref_folder = workdir / "reference"
            shutil.rmtree(ref_folder, ignore_errors=True)
            run_to_end(write_trial_config(ref_folder, stages[-1] if stages else "ppo"), ref_folder / "log.txt")
            reference = ref_folder / "runs" / "tiny"
            echo(f"reference run: {time.monotonic() - t0:.0f} s ({reference})")
        check_done_stages(reference, "reference run")
        for s_index, stage in enumerate(stages):
            report = reports[stage] = StageReport(stage)
            start = time.monotonic()
            for i in range(kills):
                target = PHASES[(i + s_index + phase_offset) % len(PHASES)]
                folder = workdir / f"{stage}-{i:02d}"
                trial(stage, target, reference, folder, rng, report, tol_hf)
                if not keep:
                    shutil.rmtree(folder, ignore_errors=True)
                echo(f"  {stage} kill {i + 1}/{kills}: aimed at {target}, passed")
            report.seconds = time.monotonic() - start
            echo(report.line())
        return reports
    finally:
        if own and not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills per stage (default 20)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to kill (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill delays")
    parser.add_argument("--tol-hf", type=float, default=1e-6, help="max abs diff allowed for SFT/RM outputs")
    parser.add_argument("--workdir", help="keep trial folders here instead of a temp folder")
    parser.add_argument("--keep", action="store_true", help="keep every trial folder")
    args = parser.parse_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    stages = tuple(s for s in STAGES if s in stages)  # upstream first: trials copy the reference's earlier stages
    t0 = time.monotonic()
    try:
        reports = run_harness(args.kills, stages, args.seed, Path(args.workdir) if args.workdir else None,
                              args.tol_hf, keep=args.keep)
    except HarnessFailure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(f"all {sum(r.kills for r in reports.values())} kills passed in {time.monotonic() - t0:.0f} s")
    for r in reports.values():
        print(r.line())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
