"""Several processes: `accelerate launch` of every stage with 2 CPU processes over gloo, and the
cross-process pieces of PPO (gradient averaging, global whitening, metric averaging, per-process
RNG in checkpoints) on toy tensors in 2 spawned gloo processes."""

from __future__ import annotations

import copy
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REPO, write_config

WORLD = 2


# ---------------------------------------------------------------------------- pure helpers


def test_ppo_refuses_sharding_configs(tmp_path):
    from rlhf.config import load_config
    from rlhf.errors import UserError
    from rlhf.launch import check_launch

    for name in ("zero2", "zero3", "fsdp"):
        cfg = load_config(write_config(tmp_path, {"launcher": {"accelerate_config": str(REPO / f"configs/accelerate/{name}.yaml")}}))
        check_launch("sft", cfg)
        check_launch("rm", cfg)
        with pytest.raises(UserError, match="configs/accelerate/ddp.yaml"):
            check_launch("ppo", cfg)
    cfg = load_config(write_config(tmp_path, {"launcher": {"accelerate_config": str(REPO / "configs/accelerate/ddp.yaml")}}))
    check_launch("ppo", cfg)


def test_shipped_accelerate_configs_use_known_keys():
    """accelerate ignores unknown keys inside deepspeed_config/fsdp_config silently: check them against
    its launch arguments, and the top level against its config class (which rejects unknown keys)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    known = {a.dest for a in launch_command_parser()._actions}
    for name in ("ddp", "zero2", "zero3", "fsdp"):
        path = REPO / "configs" / "accelerate" / f"{name}.yaml"
        load_config_from_file(str(path))
        raw = yaml.safe_load(path.read_text())
        for section in ("deepspeed_config", "fsdp_config"):
            unknown = set(raw.get(section) or {}) - known
            assert not unknown, f"{path}: unknown {section} keys {unknown}"


# ---------------------------------------------------------------------------- 2 gloo processes, toy tensors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(rank: int, k: int) -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(100 * rank + k))


def _two_adapter_backward(policy, value, x, n_micro):
    """What ppo_update does per micro-batch: one backward per adapter, scaled by 1 / n_micro."""
    (policy(x).pow(2).mean() / n_micro).backward()
    (value(x).tanh().sum() / n_micro).backward()


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate.utils import gather_object

    from rlhf.errors import TrainingDiverged
    from rlhf.ppo.advantages import make_kl_controller, masked_whiten
    from rlhf.ppo.checkpoint import latest_resumable, load_checkpoint, restore_rank_rng, save_all_processes
    from rlhf.ppo.distributed import (
        Agreement, GradientAverager, average_metrics, mean_across_processes, seed_everything, sum_across_processes,
    )
    from rlhf.ppo.metrics import check_finite
    from rlhf.ppo.trainer import _backward
    from rlhf.stage_script import exit_without_native_teardown, init_processes

    state = init_processes()
    assert (state.process_index, state.num_processes) == (rank, WORLD)

    # Gradients: two micro-batches, a backward per adapter, each process on its own data; after the
    # loop every process holds the mean over processes of the gradients each would have alone.
    torch.manual_seed(0)
    policy, value = torch.nn.Linear(3, 2), torch.nn.Linear(3, 1)
    expected = [torch.zeros_like(p) for p in [*policy.parameters(), *value.parameters()]]
    for r in range(WORLD):
        p_r, v_r = copy.deepcopy(policy), copy.deepcopy(value)
        for k in range(2):
            _two_adapter_backward(p_r, v_r, _data(r, k), 2)
        for e, p in zip(expected, [*p_r.parameters(), *v_r.parameters()]):
            e += p.grad / WORLD
    optimizer = torch.optim.SGD([*policy.parameters(), *value.parameters()], lr=0.1)
    averager = GradientAverager([list(policy.parameters()), list(value.parameters())], optimizer)
    for k in range(2):
        _two_adapter_backward(policy, value, _data(rank, k), 2)
    for e, p in zip(expected, [*policy.parameters(), *value.parameters()]):
        assert torch.allclose(p.grad, e, atol=1e-6), (rank, p.grad, e)
        assert not torch.allclose(p.grad, e * WORLD, atol=1e-6)  # not this process's gradient alone
    optimizer.step()
    averager.remove()
    # A group whose backward never completes (a parameter outside the graph) stops the step.
    w, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(1))
    opt2 = torch.optim.SGD([w, unused], lr=0.1)
    av2 = GradientAverager([[w, unused]], opt2)
    (w * _data(rank, 0)).sum().backward()
    with pytest.raises(RuntimeError, match="not averaged across processes"):
        opt2.step()
    av2.remove()

    # Whitening with the statistics of both processes' batches equals whitening their concatenation.
    def batch(r):
        g = torch.Generator().manual_seed(7 + r)
        return torch.randn(3, 5, generator=g) * (r + 1) + r, torch.rand(3, 5, generator=g) > 0.3

    x, mask = batch(rank)

    def whiten(x, mask, shift_mean):  # the whitening PPO does on several processes
        return masked_whiten(x, mask, shift_mean, sum_across=sum_across_processes)

    full_x, full_mask = (torch.cat(t) for t in zip(*(batch(r) for r in range(WORLD))))
    rows = slice(3 * rank, 3 * rank + 3)
    assert torch.allclose(whiten(x, mask, True), masked_whiten(full_x, full_mask, shift_mean=True)[rows], atol=1e-5)
    scores = x[:, 0]
    all_scores = full_x[:, 0]
    ones = torch.ones_like(all_scores, dtype=torch.bool)
    assert torch.allclose(whiten(scores, torch.ones_like(scores, dtype=torch.bool), False),
                          masked_whiten(all_scores, ones, shift_mean=False)[rows], atol=1e-5)
    assert average_metrics({"a": float(rank), "b": 2.0}, mean_across_processes) == {"a": 0.5, "b": 2.0}

    # Checkpoint: each process resumes with its own RNG state (rank 1's travels as rng-rank1.pt).
    roles = SimpleNamespace(model=policy, value_head=value)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    kl_ctl = make_kl_controller(0.05, None, 10000)
    generator = torch.Generator().manual_seed(seed_everything(0, rank))
    root = Path(tmp) / "checkpoints"
    save_all_processes(root, 1, roles, optimizer, scheduler, kl_ctl, generator, "hash", {}, state)

    def draws():
        return [torch.rand(3).tolist(), torch.rand(3, generator=generator).tolist(), random.random(), float(np.random.rand())]

    after = draws()
    seed_everything(123)
    generator.manual_seed(5)
    ckpt = latest_resumable(root, "hash")
    assert load_checkpoint(ckpt, roles, optimizer, scheduler, kl_ctl, generator) == 1
    restore_rank_rng(ckpt, rank, WORLD, 0, 1, generator)
    assert draws() == after
    assert len({json.dumps(d) for d in gather_object([after])}) == WORLD  # each process samples differently
    assert (ckpt / "rng-rank1.pt").is_file() and not (ckpt / "rng-rank0.pt").exists()

    # Finiteness is decided together: a NaN on process 1 alone makes both raise the same error at the
    # same point (neither is left waiting in a collective); finite everywhere, neither raises.
    agreement = Agreement(rank, WORLD, sum_across_processes)
    scores = torch.tensor([1.0, float("nan") if rank == 1 else 2.0])
    with pytest.raises(TrainingDiverged, match=r"^scores contains NaN or inf on process 1 of 2$"):
        check_finite(agreement, kl=torch.zeros(2), scores=scores)
    check_finite(agreement, kl=torch.zeros(2))
    loss = torch.tensor(float("inf") if rank == 0 else 0.5, requires_grad=True)
    with pytest.raises(TrainingDiverged, match=r"^PPO loss is NaN or inf on process 0 of 2$"):
        _backward(loss, loss, None, agreement)
    state.wait_for_everyone()  # as stage_script does: no process tears down while another is in a collective
    state.destroy_process_group()
    exit_without_native_teardown(0)  # as stage_script ends a process of a group


def test_gradient_averaging_whitening_and_rng_across_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)


# ---------------------------------------------------------------------------- all three stages, 2 processes


def _steps(path: Path, key: str) -> list[int]:
    return [row["step"] for row in map(json.loads, path.read_text().splitlines()) if key in row]


def test_run_all_with_two_processes(tmp_path):
    """`rlhf run-all --set launcher.num_processes=2` on the tiny model: 2 gloo processes per stage."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.config import load_config
    from rlhf.rm import load_reward_model

    config = write_config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "run-all", "--config", str(config),
                           "--set", "launcher.num_processes=2", "--set", "eval.enabled=false"],  # the three stages only
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert proc.stderr.count("-m rlhf.accelerate_launch") == 3
    cfg = load_config(config)
    for stage in ("sft", "rm", "ppo"):
        manifest = json.loads((cfg.stage_dir(stage) / "manifest.json").read_text())
        assert manifest["status"] == "done", (stage, manifest)

    # Metrics written by one process: each logged step once.
    assert _steps(cfg.stage_dir("sft") / "metrics.jsonl", "loss") == [1, 2, 3, 4]
    assert _steps(cfg.stage_dir("rm") / "metrics.jsonl", "loss") == [1, 2, 3, 4]
    ppo_rows = [json.loads(line) for line in (cfg.stage_dir("ppo") / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ppo_rows] == [1, 2, 3, 4]
    # Both processes' rollouts count: episodes = 2 processes x rollout_batch_size x steps.
    assert ppo_rows[-1]["episode"] == WORLD * cfg.ppo.rollout_batch_size * cfg.ppo.steps
    samples = (cfg.stage_dir("ppo") / "samples.jsonl").read_text().splitlines()
    assert len(samples) == cfg.ppo.rollout_batch_size * 2  # the main process's prompts, at steps 2 and 4
    # Gradients averaged: the processes end with the same weights (checked at every checkpoint).
    for step in (2, 4):
        assert f"step {step}: trained weights identical on all 2 processes" in proc.stderr
    assert (cfg.stage_dir("ppo") / "checkpoints" / "step-4" / "rng-rank1.pt").is_file()

    # Outputs load.
    rm_eval = json.loads((cfg.stage_dir("rm") / "eval.json").read_text())
    assert rm_eval["n_pairs"] > 0 and "score_mean" in rm_eval
    load_reward_model(cfg.stage_dir("rm") / "model")
    for stage in ("sft", "ppo"):
        AutoModelForCausalLM.from_pretrained(str(cfg.stage_dir(stage) / "model"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(cfg.stage_dir("sft") / "model")),
                              str(cfg.stage_dir("ppo") / "adapter"))


def test_launched_output_streams_and_its_errors_come_back_once():
    """run_stage passes the processes' output through and ends with their `error:` lines, deduplicated."""
    from rlhf.launch import run_streaming

    script = ("import sys\n"
              "for _ in range(2): sys.stderr.write('error: data.jsonl, line 3: no prompt\\n'); sys.stderr.flush()\n"
              "sys.stderr.write('progress\\r50%\\rerror: second problem\\n'); sys.exit(2)")
    returncode, errors = run_streaming([sys.executable, "-c", script], dict(os.environ))
    assert returncode == 2
    assert errors == ["data.jsonl, line 3: no prompt", "second problem"]


# ---------------------------------------------------------------------------- faults in one of 2 processes


def test_launch_outcome_keeps_the_workers_status():
    """What `rlhf <stage>` (and so run-all) exits with after a multi-process failure, and its one line."""
    from rlhf.accelerate_launch import WorkerExit, outcome

    status, line = outcome([WorkerExit(1, 3), WorkerExit(0, 3)], 2)
    assert status == 3 and line.startswith("all 2 processes stopped with exit status 3 (the training diverged")
    status, line = outcome([WorkerExit(0, 2), WorkerExit(1, -15)], 2)
    assert status == 2 and line.startswith("process 0 of 2 stopped with exit status 2 (a user mistake")
    status, line = outcome([WorkerExit(1, -9, 4242), WorkerExit(0, 1)], 2)  # the other lost its peer and stopped
    assert (status, line.split(";")[0]) == (1, "process 1 of 2 was killed by SIGKILL, pid 4242")
    status, line = outcome([WorkerExit(1, -15), WorkerExit(0, 1)], 2)  # a crash; the launcher SIGTERMed the other
    assert status == 1 and line.startswith("process 0 of 2 failed with exit status 1")
    assert outcome([WorkerExit(0, -15)], 2)[1].startswith("process 0 of 2 was killed by SIGTERM")


# Fault injection inside the launched processes: a sitecustomize on PYTHONPATH wraps the policy loss of
# process FAULT_RANK, after FAULT_AFTER calls (one per PPO epoch and micro-batch: tiny PPO makes 2 per
# step), to return NaN or to SIGKILL its own process.
SITECUSTOMIZE = """
import os
if os.environ.get("RANK") == os.environ.get("FAULT_RANK"):
    import signal
    import rlhf.ppo.algorithms as A
    real, calls = A.policy_loss, [0]
    def faulty(*args, **kwargs):
        calls[0] += 1
        loss, stats = real(*args, **kwargs)
        if calls[0] > int(os.environ["FAULT_AFTER"]):
            if os.environ["FAULT_KIND"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            loss = loss * float("nan")
        return loss, stats
    A.policy_loss = faulty
"""


def _ppo_only(tiny_rm_run: Path, tmp_path: Path) -> Path:
    """A config in tmp_path whose run folder holds copies of tiny_rm_run's finished SFT and RM stages."""
    import shutil

    from rlhf.config import load_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_path)
    src, dst = load_config(tiny_rm_run), load_config(config)
    for stage in ("sft", "rm"):
        shutil.copytree(src.stage_dir(stage), dst.stage_dir(stage), ignore=shutil.ignore_patterns("checkpoints"))
    return config


def _run_all_2(config: Path, fault: dict | None = None, extra: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        inject = config.parent / "inject"
        inject.mkdir(exist_ok=True)
        (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env.update(PYTHONPATH=str(inject), **{f"FAULT_{k.upper()}": str(v) for k, v in fault.items()})
    return subprocess.run([sys.executable, "-m", "rlhf.cli", "run-all", "--config", str(config),
                           "--set", "launcher.num_processes=2", "--set", "eval.enabled=false", *(extra or [])],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=env)


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def _ppo_status(config: Path) -> str:
    from rlhf.config import load_config

    return json.loads((load_config(config).stage_dir("ppo") / "manifest.json").read_text())["status"]


def test_nan_on_one_process_stops_every_process_with_exit_status_3(tiny_rm_run, tmp_path):
    """NaN in process 1's policy loss at step 3: both processes agree on it before the backward (no one
    waits in the gradient all-reduce), both exit 3, the launcher keeps 3, and so does run-all; the
    stage is marked failed, and the checkpoint of step 2 is kept."""
    config = _ppo_only(tiny_rm_run, tmp_path)
    proc = _run_all_2(config, {"rank": 1, "kind": "nan", "after": 4})
    assert proc.returncode == 3, proc.stderr[-4000:]
    errors = _errors(proc)
    assert errors[0] == "error: PPO loss is NaN or inf on process 1 of 2", errors
    # Both processes decided to stop with 3 (the agreement above); which launcher line follows depends
    # on timing only: torchrun stops a worker that is still on its way out once the other has exited.
    assert ("error: all 2 processes stopped with exit status 3 (the training diverged, see the error above)" in errors
            or any(e.startswith("error: process ") and "stopped with exit status 3 (the training diverged" in e
                   and e.endswith("the other processes were stopped") for e in errors)), errors
    assert errors[-1].startswith("error: the ppo stage failed (exit status 3)")
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert _ppo_status(config) == "failed"
    assert sorted(p.name for p in (config.parent / "runs" / "tiny" / "ppo" / "checkpoints").iterdir()) == ["step-2"]


def test_sigkill_of_one_process_stops_the_others_and_a_rerun_resumes_to_the_unbroken_result(tiny_rm_run, tmp_path):
    """Process 1 of a 2-process PPO stage is SIGKILLed in step 3: the launcher stops process 0, run-all
    exits non-zero and its last lines say which process was killed (no traceback), and a rerun resumes
    from step 2 to the adapter of an unbroken 2-process run, exactly."""
    from tests.test_numerical import max_diff

    unbroken = _ppo_only(tiny_rm_run, tmp_path / "unbroken")
    assert _run_all_2(unbroken).returncode == 0
    config = _ppo_only(tiny_rm_run, tmp_path / "killed")
    proc = _run_all_2(config, {"rank": 1, "kind": "kill", "after": 4})
    assert proc.returncode == 1, proc.stderr[-4000:]
    errors = _errors(proc)
    assert any(e.startswith("error: process 1 of 2 was killed by SIGKILL, pid ") for e in errors), errors
    assert errors[-1].startswith("error: the ppo stage failed (exit status 1)")
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert _ppo_status(config) in ("failed", "running")  # process 0 may be stopped before it records the failure

    proc = _run_all_2(config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming PPO from" in proc.stderr and "step-2 (step 2 of 4)" in proc.stderr
    adapter = Path("ppo") / "adapter" / "adapter_model.safetensors"
    assert max_diff(unbroken.parent / "runs" / "tiny" / adapter, config.parent / "runs" / "tiny" / adapter) <= 1e-6


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "reinforce_pp"])
def test_critic_free_stage_with_two_processes(tiny_rm_run, tmp_path, algorithm):
    """Each critic-free `ppo.algorithm` on 2 gloo processes (the PPO stage alone, SFT and RM copied):
    what the PPO run above checks (each step logged once, episodes of both processes, identical weights at every
    checkpoint, per-process RNG, the adapter loads), and a prompt's k samples stay on one process: the
    main process's samples table holds its own share of each step's prompts, k times each in a row."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.config import load_config
    from rlhf.console import LOG_FILE
    from rlhf.data import ppo_data, render
    from rlhf.models import load_tokenizer
    from rlhf.ppo.trainer import step_prompt_indices

    config = _ppo_only(tiny_rm_run, tmp_path)
    # the RM's scores alone (equal missing-EOS scores would leave RLOO nothing to train, and identical
    # weights would then prove nothing)
    overrides = [f"ppo.algorithm={algorithm}", "ppo.missing_eos_score=null"]
    proc = _run_all_2(config, extra=[a for o in overrides for a in ("--set", o)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    cfg = load_config(config, overrides)
    stage = cfg.stage_dir("ppo")
    assert json.loads((stage / "manifest.json").read_text())["status"] == "done"
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["episode"] == WORLD * cfg.ppo.rollout_batch_size * cfg.ppo.steps
    assert not any(k.startswith("value/") for r in rows for k in r)
    assert rows[-1]["objective/kl"] != 0.0  # the policy trained
    log = (stage / LOG_FILE).read_text()  # the whole output (the terminal's may join a line to the progress bar)
    for step in (2, 4):
        assert f"step {step}: trained weights identical on all 2 processes" in log
    assert (stage / "checkpoints" / "step-4" / "rng-rank1.pt").is_file()

    tok = load_tokenizer(cfg.model, str(cfg.stage_dir("sft") / "model"))
    texts = [render(tok, p) for p in ppo_data(cfg, tok).train["prompt"]]
    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    for step in (2, 4):
        share = step_prompt_indices(len(texts), cfg.ppo, step - 1, cfg.seed, rank=0, world=WORLD)
        assert [r["prompt"] for r in samples if r["step"] == step] == [texts[i] for i in share]
        other = step_prompt_indices(len(texts), cfg.ppo, step - 1, cfg.seed, rank=1, world=WORLD)
        assert not set(share) & set(other) and len(set(share)) == cfg.ppo.prompts_per_step
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(cfg.stage_dir("sft") / "model")),
                              str(stage / "adapter"))
