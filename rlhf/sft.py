"""Stage 1: supervised fine-tuning with LoRA on trl.SFTTrainer.

Outputs under runs/<name>/sft/: adapter/ (LoRA), model/ (adapter merged into the base, a plain
transformers folder), checkpoints/ (for resume), metrics.jsonl, manifest.json.

With held-out data the exported adapter is the evaluated checkpoint of lowest held-out loss
(rlhf.best_checkpoint); the manifest's metrics record `eval_loss` (that checkpoint's),
`best_step` and `eval_curve` ({step, loss} per evaluation).
"""

from __future__ import annotations

import logging
from pathlib import Path

from rlhf import best_checkpoint
from rlhf.config import PipelineConfig
from rlhf.data import needs_chat_template, sft_data
from rlhf.hf_trainer import CRITERION, callbacks, export_merged, final_metrics, resume_checkpoint, trainer_kwargs
from rlhf.models import load_tokenizer, lora_config, model_kwargs, resolve_model
from rlhf.runs import stage_run

log = logging.getLogger(__name__)
STAGE = "sft"


def run(cfg: PipelineConfig) -> Path:
    """Train the SFT adapter and export it; returns the merged model folder."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    stage = stage_run(cfg, STAGE)
    stage_dir = stage.dir
    base_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model, base_path, need_chat_template=needs_chat_template(cfg.sft.data, cfg.seed))
    data = sft_data(cfg, tokenizer)  # user errors surface here, before the model loads
    with stage:  # manifest running -> done, or failed on any error (rlhf.runs)
        model = AutoModelForCausalLM.from_pretrained(base_path, **model_kwargs(cfg.model))
        args = SFTConfig(
            **trainer_kwargs(cfg, STAGE, cfg.sft, has_eval=data.eval is not None),
            completion_only_loss=cfg.sft.completion_only_loss if "prompt" in data.train.column_names else None,
            packing=False,
            dataset_num_proc=None,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=data.train_ids, eval_dataset=data.eval_ids, processing_class=tokenizer,
            peft_config=lora_config(cfg.lora, "CAUSAL_LM"), callbacks=callbacks(cfg, STAGE),
        )
        criterion = CRITERION[STAGE]
        best_checkpoint.train(trainer, resume_checkpoint(cfg, STAGE), criterion, cfg.sft.early_stopping_patience)
        # The checkpoint of lowest held-out loss (the last state without held-out data).
        best_checkpoint.export_adapter(trainer, stage_dir / "adapter", criterion)
        if stage.is_main:
            export_merged(cfg, base_path, stage_dir / "adapter", stage_dir / "model", AutoModelForCausalLM, tokenizer)
            best = best_checkpoint.best_evaluation(trainer, criterion)
            metrics = final_metrics(trainer, {"eval_loss": best["eval_loss"]} if best else None)
            selection = best_checkpoint.selection_report(trainer, criterion)
            if selection:
                metrics.update(best_step=selection["best_step"], selected_by=selection["selected_by"],
                               eval_curve=selection["curve"])
            metrics["data"] = data.report
            stage.finish(metrics, {"model": str(stage_dir / "model"), "adapter": str(stage_dir / "adapter")})
    return stage_dir / "model"
