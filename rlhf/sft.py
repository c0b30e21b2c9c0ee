"""Stage 1: supervised fine-tuning with LoRA on trl.SFTTrainer.

Outputs under runs/<name>/sft/: adapter/ (LoRA), model/ (adapter merged into the base, a plain
transformers folder), checkpoints/ (for resume), metrics.jsonl, manifest.json.

With held-out data the exported adapter is the evaluated checkpoint of lowest held-out loss
(rlhf.best_checkpoint); the manifest's metrics record `eval_loss` (that checkpoint's),
`best_step` and `eval_curve` ({step, loss} per evaluation).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from rlhf import best_checkpoint
from rlhf.config import PipelineConfig
from rlhf.data import needs_chat_template, sft_data
from rlhf.hf_trainer import (CRITERION, callbacks, export_merged, final_metrics, prepare_for_training,
                              resume_checkpoint, trainer_kwargs)
from rlhf.models import load_tokenizer, lora_config, model_kwargs, resolve_model
from rlhf.runs import stage_run

log = logging.getLogger(__name__)
STAGE = "sft"
# The prepared sets hold TRL's input_ids and labels, truncated (rlhf.data.tokens.sft_token_ids):
# TRL's own label, truncation and filter passes would only copy them, token by token in Python.
TRL_DATASET_KWARGS = {"skip_prepare_dataset": True}


def run(cfg: PipelineConfig) -> Path:
    """Train the SFT adapter and export it; returns the merged model folder."""
    from transformers import AutoModelForCausalLM

    stage = stage_run(cfg, STAGE)
    stage_dir = stage.dir
    base_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model, base_path, need_chat_template=needs_chat_template(cfg.sft.data, cfg.seed))
    data = sft_data(cfg, tokenizer)  # user errors surface here, before the model loads
    with stage:  # manifest running -> done, or failed on any error (rlhf.runs)
        trainer = make_trainer(cfg, base_path, tokenizer, data)
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


def make_trainer(cfg: PipelineConfig, base_path: str, tokenizer, data):
    """The stage's SFTTrainer: the base model with a fresh LoRA adapter, the prepared data."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    model = AutoModelForCausalLM.from_pretrained(base_path, **model_kwargs(cfg.model))
    prepare_for_training(cfg, model)
    args = SFTConfig(
        **trainer_kwargs(cfg, STAGE, cfg.sft, has_eval=data.eval is not None),
        completion_only_loss=cfg.sft.completion_only_loss if "prompt" in data.train.column_names else None,
        packing=False,
        dataset_num_proc=None,
        dataset_kwargs=TRL_DATASET_KWARGS,
    )
    return sft_trainer_class()(
        model=model, args=args, train_dataset=data.train_ids, eval_dataset=data.eval_ids, processing_class=tokenizer,
        peft_config=lora_config(cfg.lora, "CAUSAL_LM"), callbacks=callbacks(cfg, STAGE),
    )


@functools.cache  # one class, so that it can be patched and compared like TRL's
def sft_trainer_class():
    """trl.SFTTrainer, with the loss taken from the model's own logits where TRL's fused LM head has no kernel.

    TRL computes the loss through a tiled LM head (`trl.kernels.chunked_logprob`) that never builds
    the (batch, length, vocab) logits. Off CUDA/XPU it has no Triton kernel: its torch fallback casts
    every tile of hidden states and head weights to float32 and scores every position. On the demo's
    CPU that was 4.5 s of an 8-s SFT step (torch.profiler); the model's plain forward (one matmul in
    the base's dtype) and a float32 log-softmax over the label positions cost a few percent of that.
    This is the loss every transformers Trainer computes; TRL documents overriding `compute_loss`
    as the way to change it. Anything outside the plain case (MoE auxiliary loss, DFT, label smoothing,
    a custom loss) goes to TRL's own path, as does every GPU."""
    import torch
    from trl import SFTTrainer

    class SFTTrainerFullLogits(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            plain = (inputs.get("labels") is not None and inputs["labels"].device.type == "cpu"
                     and self.args.loss_type == "nll"
                     and not self.aux_loss_enabled and self.label_smoother is None
                     and self.compute_loss_func is None and "attention_mask" in inputs)
            if not plain:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            labels = inputs["labels"]
            # Position t predicts token t+1. Logits only at the positions from the first one that
            # predicts a label to the last one that can: the prompts (most of the tokens in short chat
            # data) need none, and indices (not a slice) keep the backward to one scatter.
            has_label = (labels[:, 1:] != -100).any(0)
            first = int(has_label.nonzero()[0, 0]) if bool(has_label.any()) else 0
            keep = torch.arange(first, labels.shape[1] - 1, device=labels.device)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False,
                            logits_to_keep=keep)
            targets = labels[:, first + 1:]
            mask = targets != -100
            log_probs = outputs.logits[mask].float().log_softmax(-1)  # (N, V), N label positions
            token_log_probs = log_probs.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
            n_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -token_log_probs.sum() / torch.as_tensor(n_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as TRL: DDP averages
            with torch.no_grad():  # TRL's metrics, the same definitions
                num_valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
                entropy = -(log_probs.exp() * log_probs).sum(-1)
                entropy_sum = self.accelerator.gather_for_metrics(entropy.sum()).sum()
                correct = self.accelerator.gather_for_metrics((log_probs.argmax(-1) == targets[mask]).sum()).sum()
                self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append(
                    (correct / num_valid).item() if num_valid > 0 else 0.0)
                if mode == "train":
                    tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                    self._total_train_tokens += tokens // self._tp_size
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return SFTTrainerFullLogits
