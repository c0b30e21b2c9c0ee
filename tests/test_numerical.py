"""Numerical faults: NaN/inf stop a stage with TrainingDiverged (exit status 3, one `error:` line),
the stage is marked failed, the last good checkpoint stays intact, and rerunning resumes from it
to the uninterrupted run's result.

Faults are injected by patching: the PPO reward (the reward_fn hook), the PPO policy loss and KL,
and the SFT/RM Trainer's compute_loss. SFT/RM behaviour (hf_trainer.divergence_callback): stop,
never skip, at the first optimizer step whose weights or logged loss/grad_norm are not finite,
before that step's checkpoint is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import load_config
from rlhf.errors import TrainingDiverged
from tests.conftest import write_config


def copy_stages(src_config: Path, tmp_path: Path, stages: tuple[str, ...]) -> Path:
    """A tiny config in tmp_path whose run folder holds copies of `stages` from src_config's run."""
    path = write_config(tmp_path)
    src, dst = load_config(src_config), load_config(path)
    for stage in stages:
        shutil.copytree(src.stage_dir(stage), dst.stage_dir(stage), ignore=shutil.ignore_patterns("checkpoints"))
    return path


def status(config: Path, stage: str) -> str:
    return json.loads((load_config(config).stage_dir(stage) / "manifest.json").read_text())["status"]


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert set(ta) == set(tb)
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def nan_after(fn, calls_ok: int):
    """Wrap `fn` so that every call after the first `calls_ok` returns its loss times NaN."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        count["n"] += 1
        if count["n"] <= calls_ok:
            return out
        if isinstance(out, tuple):
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")

    return wrapped


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------------------- PPO


def test_ppo_nan_loss_stops_with_exit_3_and_resumes_from_last_good_checkpoint(tiny_ppo_run, tmp_path, monkeypatch):
    """tiny: 4 steps, 2 PPO epochs of one micro-batch, a checkpoint every 2 steps. The policy loss
    turns NaN in step 3: exit 3, ppo marked failed, step-2 intact; the rerun resumes from step-2
    and ends with the uninterrupted run's adapter."""
    import rlhf.ppo.algorithms as A
    from rlhf.atomic import file_problem
    from rlhf.ppo.checkpoint import latest_resumable
    from rlhf.staleness import stage_hash

    config = copy_stages(tiny_ppo_run, tmp_path, ("sft", "rm"))
    cfg = load_config(config)
    monkeypatch.setattr(A, "policy_loss", nan_after(A.policy_loss, calls_ok=4))
    result = cli("ppo", "--config", str(config))
    assert result.exit_code == 3, result.output
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: PPO loss is nan (policy nan"), errors
    assert "Traceback" not in result.output
    assert status(config, "ppo") == "failed"
    root = cfg.stage_dir("ppo") / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]
    assert latest_resumable(root, stage_hash(cfg, "ppo")) == root / "step-2"
    assert all(file_problem(f) is None for f in (root / "step-2").iterdir())
    assert torch.isfinite(torch.cat([t.flatten() for t in _load(root / "step-2" / "trainable.safetensors").values()])).all()

    monkeypatch.undo()
    result = cli("ppo", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert status(config, "ppo") == "done"
    ref = load_config(tiny_ppo_run).stage_dir("ppo") / "adapter" / "adapter_model.safetensors"
    assert max_diff(ref, cfg.stage_dir("ppo") / "adapter" / "adapter_model.safetensors") <= 1e-6


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("what", ["scores", "kl"])
def test_ppo_nan_scores_or_kl_stop_the_loop(tiny_ppo_run, tmp_path, monkeypatch, what):
    """Non-finite RM scores (through the reward_fn hook) or KL stop PPO before any update: the
    message names the quantity, and the checkpoint written before is untouched."""
    import rlhf.ppo.trainer as T
    from rlhf.data import ppo_data, render
    from rlhf.ppo.checkpoint import latest_resumable
    from rlhf.models import load_tokenizer, lora_config
    from rlhf.ppo.roles import build_roles
    from rlhf.tracking import MetricsWriter
    from transformers import AutoModelForCausalLM

    cfg = load_config(tiny_ppo_run)
    tok = load_tokenizer(cfg.model, str(cfg.stage_dir("sft") / "model"))
    tok.padding_side = "left"
    texts = [render(tok, p) for p in ppo_data(cfg, tok).train["prompt"]]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def loop(**kw):
        base = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft") / "model")
        roles = build_roles(base, lora_config(cfg.lora, "CAUSAL_LM"), cfg.stage_dir("rm") / "adapter", False)
        T.run_loop(roles, tok, prompts, texts, cfg.ppo, seed=0, rm_mean=0.0, ckpt_root=tmp_path / "ckpt",
                   config_hash="h", metrics_writer=MetricsWriter(tmp_path / "metrics.jsonl"),
                   samples_path=tmp_path / "samples.jsonl", **kw)

    loop(stop_after=2)
    before = {f.name: f.read_bytes() for f in (tmp_path / "ckpt" / "step-2").iterdir()}
    kw = {}
    if what == "scores":
        kw["reward_fn"] = lambda q, r, m: torch.full((r.shape[0],), float("inf"))
    else:
        import rlhf.ppo.algorithms as A

        real = A.kl_penalty
        monkeypatch.setattr(A, "kl_penalty", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(TrainingDiverged, match=f"^{what} contains NaN or inf$") as info:
        loop(**kw)
    assert info.value.exit_code == 3
    assert {f.name: f.read_bytes() for f in (tmp_path / "ckpt" / "step-2").iterdir()} == before
    assert latest_resumable(tmp_path / "ckpt", "h") == tmp_path / "ckpt" / "step-2"


# ---------------------------------------------------------------------------- SFT and RM


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_trainer_nan_loss_stops_with_exit_3_keeping_the_last_checkpoint(stage, tiny_rm_run, tmp_path, monkeypatch):
    """tiny: 4 optimizer steps of one micro-batch, a checkpoint every 2. The loss turns NaN at step 3:
    the stage stops right after that step (before any checkpoint of NaN weights), exit 3, marked
    failed, checkpoint-2 intact; the rerun resumes from checkpoint-2 to the uninterrupted adapter."""
    if stage == "sft":
        from rlhf.sft import sft_trainer_class

        Trainer = sft_trainer_class()  # the stage's SFTTrainer subclass (its own loss on CPUs)
        config = write_config(tmp_path)
    else:
        from trl import RewardTrainer as Trainer

        config = copy_stages(tiny_rm_run, tmp_path, ("sft",))
    cfg = load_config(config)
    monkeypatch.setattr(Trainer, "compute_loss", nan_after(Trainer.compute_loss, calls_ok=2))
    result = cli(stage, "--config", str(config))
    assert result.exit_code == 3, result.output
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    root = cfg.stage_dir(stage) / "checkpoints"
    assert len(errors) == 1 and errors[0].startswith(f"error: {stage} training diverged at step 3: weight "), errors
    assert errors[0].endswith(f"holds NaN or inf; the last good checkpoint is {root / 'checkpoint-2'}; "
                              f"lower {stage}.learning_rate (or raise warmup) and rerun")
    assert "Traceback" not in result.output
    assert status(config, stage) == "failed"
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2"]
    assert torch.isfinite(torch.cat([t.flatten() for t in _load(root / "checkpoint-2" / "adapter_model.safetensors").values()])).all()

    monkeypatch.undo()
    result = cli(stage, "--config", str(config))
    assert result.exit_code == 0, result.output
    assert status(config, stage) == "done"
    ref = load_config(tiny_rm_run).stage_dir(stage) / "adapter" / "adapter_model.safetensors"
    assert max_diff(ref, cfg.stage_dir(stage) / "adapter" / "adapter_model.safetensors") <= 1e-6


def test_divergence_callback_reads_logged_loss_and_grad_norm(tmp_path):
    """A logged non-finite loss or grad_norm stops training too (finite weights notwithstanding)."""
    from types import SimpleNamespace

    from rlhf.hf_trainer import divergence_callback

    cfg = load_config(write_config(tmp_path))
    cb = divergence_callback(cfg, "sft")
    state = SimpleNamespace(global_step=7)
    cb.on_log(None, state, None, logs={"loss": 1.5, "grad_norm": 0.3})
    with pytest.raises(TrainingDiverged, match=r"^sft training diverged at step 7: grad_norm is inf; no checkpoint"):
        cb.on_log(None, state, None, logs={"loss": 1.5, "grad_norm": float("inf")})
    model = torch.nn.Linear(2, 2)
    cb.on_step_end(None, state, None, model=model)
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="weight bias holds NaN or inf"):
        cb.on_step_end(None, state, None, model=model)
