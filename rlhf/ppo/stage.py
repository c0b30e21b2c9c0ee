"""Stage 3: PPO (or RLOO, GRPO, REINFORCE++: `ppo.algorithm`) against the reward model, on one
shared LoRA base (docs/ppo.md).

Outputs under runs/<name>/ppo/: adapter/ (the policy LoRA), model/ (policy merged into the SFT
model, a plain transformers folder), checkpoints/step-N/, metrics.jsonl, samples.jsonl,
manifest.json. Rerunning resumes from the latest checkpoint of the same config.

Under `accelerate launch` (launcher.num_processes > 1) every process trains on its own prompts
(trainer.run_loop); the main process alone writes the files while the others wait.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

from rlhf.config import PipelineConfig
from rlhf.errors import UserError
from rlhf.staleness import stage_hash

log = logging.getLogger(__name__)
STAGE = "ppo"


def _save_policy_adapter(roles, out_dir: Path) -> Path:
    """The policy adapter alone, in peft's layout (loadable with PeftModel.from_pretrained on sft/model)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from rlhf.atomic import save_atomically

    def write(tmp: Path) -> None:
        state = get_peft_model_state_dict(roles.model, adapter_name="policy")
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"))
        roles.model.peft_config["policy"].save_pretrained(str(tmp))

    return save_atomically(out_dir, write)


def _rm_score_stat(cfg: PipelineConfig, key: str) -> float:
    """A finite score statistic the RM stage recorded in its manifest (score_mean, score_std)."""
    import math

    from rlhf.staleness import read_manifest

    value = ((read_manifest(cfg.stage_dir("rm")) or {}).get("metrics") or {}).get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{cfg.stage_dir('rm')}/manifest.json has no {key} (found {value!r}); rerun the RM stage: "
                        f"rlhf run-all --from rm --config {cfg.source or 'pipeline.yaml'}")
    return float(value)


def _rm_score_mean(cfg: PipelineConfig) -> float:
    """The RM's mean score over its training responses: PPO centres scores by it."""
    return _rm_score_stat(cfg, "score_mean")


def _rm_score_std(cfg: PipelineConfig) -> float:
    """The RM's score std over its training responses: the unit of ppo.missing_eos_score/penalty."""
    std = _rm_score_stat(cfg, "score_std")
    if std <= 0:
        raise UserError(f"{cfg.stage_dir('rm')}/manifest.json has score_std {std}, but the unit of "
                        "ppo.missing_eos_score must be positive; rerun the RM stage: "
                        f"rlhf run-all --from rm --config {cfg.source or 'pipeline.yaml'}")
    return std


def _refuse_sharding() -> None:
    """Refuse ZeRO and FSDP launches."""
    from rlhf.launch import sharding_in_use

    if kind := sharding_in_use():
        raise UserError(f"the PPO stage cannot run under {kind} (its trainable weights are LoRA adapters switched "
                        "on one shared base, so plain data parallel is what helps); launch it with "
                        "launcher.accelerate_config: configs/accelerate/ddp.yaml")


def run(cfg: PipelineConfig, fresh: bool = False) -> Path:
    """Train the policy adapter with PPO and export it; returns the merged model folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.data import needs_chat_template, ppo_data
    from rlhf.hf_trainer import export_merged
    from rlhf.models import load_tokenizer, lora_config, model_kwargs, no_grad_attn_implementation, turn_end_suffix
    from rlhf.ppo.algorithms import needs_critic
    from rlhf.ppo.roles import build_roles
    from rlhf.ppo.checkpoint import checkpoint_dirs, latest_resumable
    from rlhf.ppo.distributed import seed_everything
    from rlhf.ppo.trainer import run_loop
    from rlhf.runs import stage_run
    from rlhf.tracking import MetricsWriter, Tracker, trim_metrics

    stage = stage_run(cfg, STAGE)  # a ppo section; SFT and RM finished and current, the RM on today's SFT weights
    from rlhf.rm_gate import check_before_ppo

    check_before_ppo(cfg)  # an RM at chance would make PPO optimise noise: stop before loading a model
    _refuse_sharding()
    state = stage.processes
    stage_dir = stage.dir
    sft_model = cfg.stage_dir("sft") / "model"
    rm_adapter = cfg.stage_dir("rm") / "adapter"
    rm_mean = _rm_score_mean(cfg)
    rm_std = _rm_score_std(cfg)
    tokenizer = load_tokenizer(cfg.model, str(sft_model), need_chat_template=needs_chat_template(cfg.ppo.data, cfg.seed))
    tokenizer.padding_side = "left"
    data = ppo_data(cfg, tokenizer)
    prompt_texts, prompts = data.train_ids["prompt_text"][:], data.train_ids["prompt_ids"][:]  # rendered, tokenized

    ckpt_root = stage_dir / "checkpoints"
    config_hash = stage_hash(cfg, STAGE)
    if stage.is_main:  # the other processes wait (entering `stage`), then all resume from the same checkpoint
        if fresh:
            shutil.rmtree(ckpt_root, ignore_errors=True)
        for old in checkpoint_dirs(ckpt_root):  # checkpoints of another config would mislead resume and evaluation
            if json.loads((old / "state.json").read_text()).get("config_hash") != config_hash:
                shutil.rmtree(old)
        # Rows logged after the checkpoint resumed from are logged again (all of them when starting afresh).
        resume_from = latest_resumable(ckpt_root, config_hash)
        done_steps = json.loads((resume_from / "state.json").read_text())["step"] if resume_from else 0
        for name in ("metrics.jsonl", "samples.jsonl"):
            trim_metrics(stage_dir / name, done_steps)
    with stage, contextlib.ExitStack() as on_exit:  # manifest running -> done, or failed on any error (rlhf.runs)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.cuda.is_available() and state.num_processes > 1:
            device = state.device  # this process's GPU
        base = AutoModelForCausalLM.from_pretrained(str(sft_model), **model_kwargs(cfg.model)).to(device)
        seed_everything(cfg.seed)  # the policy LoRA's random init (lora_A) must not depend on earlier RNG use
        roles = build_roles(base, lora_config(cfg.lora, "CAUSAL_LM"), rm_adapter, cfg.ppo.value_head_on_policy,
                            score_mean=rm_mean, critic=needs_critic(cfg.ppo.algorithm),
                            no_grad_attn=no_grad_attn_implementation(cfg.model),
                            activation_checkpointing=cfg.model.gradient_checkpointing,
                            compile_layers=cfg.model.compile)
        tracker = Tracker(cfg, STAGE) if stage.is_main else None
        if tracker is not None:
            on_exit.callback(tracker.finish)  # also when the stage fails
        metrics = run_loop(roles, tokenizer, prompts, prompt_texts, cfg.ppo, seed=cfg.seed, rm_mean=rm_mean,
                           ckpt_root=ckpt_root, config_hash=config_hash,
                           metrics_writer=MetricsWriter(stage_dir / "metrics.jsonl", enabled=stage.is_main),
                           samples_path=stage_dir / "samples.jsonl", tracker=tracker,
                           score_suffix=turn_end_suffix(tokenizer) if data.conversational else [], rm_std=rm_std)
        if stage.is_main:  # every process holds the same adapters (gradients are averaged)
            _save_policy_adapter(roles, stage_dir / "adapter")
            del roles, base
            export_merged(cfg, str(sft_model), stage_dir / "adapter", stage_dir / "model", AutoModelForCausalLM, tokenizer)
            stage.finish({**metrics, "data": data.report},
                         {"model": str(stage_dir / "model"), "adapter": str(stage_dir / "adapter")})
    return stage_dir / "model"
