"""SFT training throughput: our `rlhf.sft.run` against a plain trl.SFTTrainer script, in one run.

Both sides train the same model folder (default: the embedded SmolLM2, converted by
rlhf.models.resolve_model) on the same demo SFT data, formatted the same way (prompt/completion,
conversational), with the same LoRA (r=16, alpha=32, dropout 0.05, all-linear), batch size,
max_length, learning rate, seed and number of optimizer steps. One TrainerCallback times both:

- loop throughput: tokens / seconds from on_train_begin to on_train_end (everything the training
  loop does: steps, logging, and for our stage the resumable checkpoint it writes at the end);
- steady-state throughput: tokens / seconds between the end of the warm-up steps and the end of the
  last step (optimizer steps and per-step logging only).

Tokens are TRL's `num_tokens` (non-padding tokens fed to the model, logged every step), so both
sides count them identically. A short untimed warm-up run comes first, and with --repeats 2 the
order is baseline, ours, ours, baseline, so that neither side always runs on a colder (or hotter)
machine. The last line printed is one JSON object.

    python bench/sft_vs_trl.py                       # embedded SmolLM2, 20 steps
    python bench/sft_vs_trl.py --model-dir DIR --steps 50 --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

from trainer_timing import add_common_args, compare, setup, timer_callback  # noqa: E402 (bench/ is the script's folder)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "demo" / "sft_train.jsonl"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prompt_completion_rows(path: Path) -> list[dict]:
    """The demo `messages` rows as prompt (every turn but the last) / completion (the last turn)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def run_baseline(args, model_dir: str, out: Path, steps: int) -> dict:
    """What a user would write with TRL alone."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    timer = timer_callback()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0.03,
            max_length=args.max_length, completion_only_loss=True, packing=False, logging_steps=1,
            save_strategy="no", report_to="none", seed=42, bf16=dtype == torch.bfloat16, disable_tqdm=True,
            dataloader_pin_memory=torch.cuda.is_available(),
            # TRL turns activation checkpointing on by default; our model.gradient_checkpointing defaults
            # to off. Measured with it off on both sides, so the ratio is the cost of our wrapper alone.
            activation_checkpointing=False,
        ),
        train_dataset=Dataset.from_list(prompt_completion_rows(DATA)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                               task_type="CAUSAL_LM", bias="none"),
        callbacks=[timer],
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    del trainer, model
    gc.collect()
    return timer.result(args.warmup_steps)


def run_ours(args, model_dir: str, out: Path, steps: int) -> dict:
    """rlhf.sft.run on the equivalent pipeline config (our defaults elsewhere)."""
    import rlhf.sft
    from rlhf.config import validate_config
    from rlhf.hf_trainer import callbacks

    cfg = validate_config({
        "run_name": "bench", "output_dir": str(out), "seed": 42,
        "model": {"name_or_path": model_dir, "dtype": args.dtype},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "tracking": {"backend": "none"},
        "sft": {
            "data": {"path": str(DATA), "eval_split": None}, "completion_only_loss": True,
            "max_steps": steps, "batch_size": args.batch_size, "grad_accum": 1, "learning_rate": 2e-4,
            "warmup_ratio": 0.03, "max_length": args.max_length, "logging_steps": 1,
            "save_steps": steps,  # one checkpoint, after the last step (not 8 per run)
        },
    }, "<bench>")
    timer = timer_callback()
    real = rlhf.sft.callbacks
    rlhf.sft.callbacks = lambda c, stage: callbacks(c, stage) + [timer]  # the same timer as the baseline's
    try:
        rlhf.sft.run(cfg)
    finally:
        rlhf.sft.callbacks = real
    gc.collect()
    return timer.result(args.warmup_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="model folder (default: the embedded SmolLM2, converted on first use)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_common_args(parser)
    args = parser.parse_args()
    model_dir, device = setup(args, args.model_dir)
    print(f"model {model_dir} | {args.steps} steps x batch {args.batch_size} | max_length {args.max_length} | "
          f"{args.dtype} | {device}", file=sys.stderr)

    compare(args, model_dir, run_baseline, run_ours, "sft", "trl.SFTTrainer", "rlhf.sft.run", device)


if __name__ == "__main__":
    main()
