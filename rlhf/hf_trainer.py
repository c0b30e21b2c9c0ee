"""What the SFT and RM stages share: both run on a transformers Trainer (through TRL).

- `trainer_kwargs`: the TrainingArguments fields that come from a TrainSection;
- `prepare_for_training`: the model trained with less activation memory (rlhf.recompute) and,
  with `model.compile`, compiled decoder layers (rlhf.compile_layers);
- `resume_checkpoint`: the checkpoint to resume from after an interruption (or None);
- `export_stage`: save the adapter, fold it into the base for a merged model, mark the stage done.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from rlhf.atomic import file_problem, save_atomically
from rlhf.best_checkpoint import RM, SFT, auto_steps, keep_best_callback
from rlhf.config import PipelineConfig, TrainSection
from rlhf.models import export_dtype, model_kwargs, torch_dtype
from rlhf.staleness import stage_hash
from rlhf.tracking import METRICS_FILE, metrics_callback, report_to, trim_metrics

log = logging.getLogger(__name__)

HASH_FILE = "config_hash"
CRITERION = {"sft": SFT, "rm": RM}  # how each stage's evaluations rank its checkpoints (rlhf.best_checkpoint)


def trainer_kwargs(cfg: PipelineConfig, stage: str, section: TrainSection, has_eval: bool) -> dict[str, Any]:
    import torch

    stage_dir = cfg.stage_dir(stage)
    bf16 = torch_dtype(cfg.model) == torch.bfloat16
    return dict(
        output_dir=str(stage_dir / "checkpoints"),
        run_name=f"{cfg.run_name}-{stage}",
        num_train_epochs=section.epochs,
        max_steps=section.max_steps,
        per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.batch_size,
        gradient_accumulation_steps=section.grad_accum,
        learning_rate=section.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=section.warmup_ratio,  # a float < 1 is a fraction of the total steps
        weight_decay=section.weight_decay,
        max_length=section.max_length,
        logging_steps=section.logging_steps,
        logging_first_step=True,
        # With held-out data: evaluate every eval_steps (null: EVALS_PER_RUN times over the run) and at
        # the end; each evaluation also writes a checkpoint (keep_best_callback), the best is exported.
        eval_strategy="steps" if has_eval else "no",
        eval_steps=auto_steps(section.eval_steps),
        save_strategy="steps",
        # save_steps null: with the evaluations, or EVALS_PER_RUN times over a run without held-out data
        save_steps=auto_steps(section.eval_steps if section.save_steps is None and has_eval else section.save_steps),
        save_total_limit=section.save_total_limit,
        report_to=report_to(cfg, stage),
        seed=cfg.seed,
        bf16=bf16,
        # The Trainer accepts bf16 without a GPU only when told it is on the CPU on purpose.
        use_cpu=bf16 and not torch.cuda.is_available(),
        activation_checkpointing=cfg.model.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        model_init_kwargs=None,
        disable_tqdm=False,
        dataloader_num_workers=0,
        # Multi-process runs (DDP): every trainable weight (LoRA, the RM's score head) takes part in
        # every forward, so DDP need not search the graph for unused ones after each backward.
        ddp_find_unused_parameters=False,
    )


def prepare_for_training(cfg: PipelineConfig, model) -> None:
    """Train `model` keeping fewer activations (rlhf.recompute.train_keeping_fewer_activations: the
    same weights, less memory), unless each layer keeps only its input anyway
    (model.gradient_checkpointing) or ZeRO-3/FSDP will shard it (its parameters are not
    materialised at load time, and their wrappers own the modules); and with `model.compile`, run
    its decoder layers compiled (rlhf.compile_layers)."""
    from rlhf.compile_layers import compile_layers_for_training
    from rlhf.launch import sharding_in_use
    from rlhf.recompute import train_keeping_fewer_activations

    if not cfg.model.gradient_checkpointing and not sharding_in_use():
        train_keeping_fewer_activations(model, remake_outputs=not cfg.model.compile)
    if cfg.model.compile:
        compile_layers_for_training(model)


def resume_checkpoint(cfg: PipelineConfig, stage: str) -> str | None:
    """The last checkpoint of an interrupted run of the same config, or None.

    Checkpoints written under a different stage hash are removed: resuming them would mix configs.
    metrics.jsonl is cut back to match: rows logged after the checkpoint (or every row, when
    starting afresh) would otherwise appear twice, or mix two configs' curves. A checkpoint that a
    kill left half-written is removed with a warning, so the run falls back to the one before it.
    Only the main process touches the files; every process returns the same checkpoint."""
    from accelerate import PartialState
    from transformers.trainer_utils import get_last_checkpoint

    state = PartialState()
    ckpt_dir = cfg.stage_dir(stage) / "checkpoints"
    want = stage_hash(cfg, stage)
    if state.is_main_process:
        if ckpt_dir.is_dir():
            have = (ckpt_dir / HASH_FILE).read_text().strip() if (ckpt_dir / HASH_FILE).is_file() else None
            if have != want:
                shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / HASH_FILE).write_text(want)
        for torn in incomplete_checkpoints(ckpt_dir):
            log.warning("skipping incomplete checkpoint %s (%s; the run was killed while writing it); removed",
                        torn, checkpoint_problem(torn))
            shutil.rmtree(torn)
    state.wait_for_everyone()
    last = get_last_checkpoint(str(ckpt_dir))
    if state.is_main_process:
        trim_metrics(cfg.stage_dir(stage) / METRICS_FILE, int(Path(last).name.rsplit("-", 1)[-1]) if last else 0)
    if last:
        log.info("resuming %s from %s", stage, last)
    return last


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from, or None when it is complete.

    The Trainer writes a checkpoint in place (weights, optimizer, scheduler, RNG state, then
    trainer_state.json last) and deletes old ones after the new one, so a kill can leave a folder
    with some files missing or cut short; every file must read back whole."""
    ckpt = Path(ckpt)
    if not any(ckpt.glob("*.safetensors")):
        return "no weights"
    if not any(ckpt.glob("rng_state*.pth")):
        return "no RNG state"
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt"):
        problem = file_problem(ckpt / name)
        if problem:
            return problem
    for path in sorted(ckpt.iterdir()):
        problem = file_problem(path) if path.is_file() else None
        if problem:
            return problem
    return None


def incomplete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N folders under `ckpt_dir` that a kill left incomplete (see checkpoint_problem)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not ckpt_dir.is_dir():
        return []
    return [d for d in sorted(ckpt_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))
            if d.is_dir() and d.name.rsplit("-", 1)[-1].isdigit() and checkpoint_problem(d)]


def callbacks(cfg: PipelineConfig, stage: str) -> list:
    section = getattr(cfg, stage)
    return [metrics_callback(cfg.stage_dir(stage) / "metrics.jsonl"), divergence_callback(cfg, stage),
            keep_best_callback(CRITERION[stage], section.early_stopping_patience)]


def divergence_callback(cfg: PipelineConfig, stage: str):
    """A TrainerCallback that stops SFT/RM training on NaN/inf with TrainingDiverged (exit status 3).

    After every optimizer step the trained weights are checked (a NaN loss makes NaN gradients and
    NaN weights; the Trainer's logged loss hides it, logging_nan_inf_filter), and every log line's
    loss and grad_norm. The check runs before that step's checkpoint is written, so the last
    checkpoint on disk is the last good one; the stage is marked failed."""
    import torch
    from transformers import TrainerCallback

    from rlhf.errors import TrainingDiverged

    section = f"{stage}.learning_rate"

    def diverged(step: int, what: str) -> TrainingDiverged:
        ckpts = sorted((cfg.stage_dir(stage) / "checkpoints").glob("checkpoint-*"),
                       key=lambda d: int(d.name.rsplit("-", 1)[-1]) if d.name.rsplit("-", 1)[-1].isdigit() else -1)
        kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        return TrainingDiverged(f"{stage} training diverged at step {step}: {what}; {kept}; "
                                f"lower {section} (or raise warmup) and rerun")

    class StopOnNonFinite(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is None:
                return
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.requires_grad and p.numel() and not torch.isfinite(p).all():
                        raise diverged(state.global_step, f"weight {name} holds NaN or inf")

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise diverged(state.global_step, f"{key} is {value}")

    return StopOnNonFinite()


def export_merged(cfg: PipelineConfig, base_path: str, adapter_dir: Path, out_dir: Path, model_cls, tokenizer, **load_kwargs) -> Path:
    """Fold a saved adapter into a fresh copy of the base loaded from disk and save the result.

    Merging from files (not from the trained model in memory) works the same whatever the
    distribution strategy was (DDP, ZeRO-3 shards, FSDP). The base loads in `model.dtype`, as in
    training, and is then cast to `model.export_dtype` (float32 by default) before the fold, so the
    saved weights are exactly the trained model's: its base weights plus the whole LoRA update."""
    from peft import PeftModel

    kwargs = model_kwargs(cfg.model)
    kwargs.update(load_kwargs)
    base = model_cls.from_pretrained(base_path, **kwargs).to(export_dtype(cfg.model))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    # The tokenizer's pad token (made distinct from EOS by load_tokenizer) goes into the model's
    # configs too: a sequence classifier reads its score at the last non-pad token, and a base
    # config saying pad == EOS would make it read a right-padded batch at the wrong place.
    merged.config.pad_token_id = tokenizer.pad_token_id
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return save_atomically(out_dir, write)


def final_metrics(trainer, eval_metrics: dict[str, float] | None) -> dict[str, Any]:
    logs = [row for row in trainer.state.log_history if "loss" in row]
    out: dict[str, Any] = {"global_step": trainer.state.global_step}
    if logs:
        out["train_loss_last"] = logs[-1]["loss"]
    if eval_metrics:
        out.update({k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))})
    return json.loads(json.dumps(out, default=float))
