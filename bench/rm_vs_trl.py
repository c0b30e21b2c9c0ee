"""Reward-model training throughput: our `rlhf.rm.run` against a plain trl.RewardTrainer script, in one run.

Both sides train the same model folder, loaded as AutoModelForSequenceClassification(num_labels=1),
on data/demo/rm_train.jsonl (explicit prompt, conversational; in file order with the same seed, so
both see the same batches), with the same LoRA (r=16, alpha=32, all-linear, SEQ_CLS: the score head
trained in full), batch size, learning rate and schedule, dtype, seed and number of optimizer steps.
Activation checkpointing is off on both sides (TRL's default is on; ours is off). One
TrainerCallback, attached to both trainers, times them:

- loop throughput: tokens / seconds from on_train_begin to on_train_end (steps, per-step logging and,
  on our side, the resumable checkpoint our stage writes at the last step);
- steady-state throughput: tokens / seconds between the end of the warm-up steps and the end of the
  last step.

Tokens are RewardTrainer's logged `num_tokens` (non-padding tokens of the chosen and rejected
sequences), counted identically on both sides. Model loading, tokenising, and our stage's export
(adapter, score head, merged model) are outside the timed window; our stage's post-training scoring
passes (held-out metrics, score_mean/score_std) are skipped here to keep the benchmark short, as
they are outside it too. Our stage needs a finished SFT stage: the benchmark marks one done with
MODEL_DIR (a symlink) as its merged model, so both sides train exactly the same weights.
A short untimed warm-up run comes first; --repeats 2 runs baseline, ours, ours, baseline.
The last line printed is one JSON object: {"rm_throughput_ratio": ours / baseline, ...}.

    python bench/rm_vs_trl.py MODEL_DIR [--steps 20] [--batch-size 8] [--repeats 2] [--threads 1]
    python bench/rm_vs_trl.py            # the embedded SmolLM2 (rlhf.models.resolve_model)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

from trainer_timing import add_common_args, compare, setup, timer_callback  # noqa: E402 (bench/ is the script's folder)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "demo" / "rm_train.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}  # RewardTrainer zeroes dropout anyway
LR = 5e-5
SEED = 42

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_baseline(args, model_dir: str, out: Path, steps: int) -> dict:
    """What a user would write with TRL alone."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
    data = load_dataset("json", data_files=str(DATA), split="train")
    data = data.select_columns(["prompt", "chosen", "rejected"])
    timer = timer_callback()
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0.03,
            max_length=args.max_length, logging_steps=1, save_strategy="no", report_to="none", seed=SEED,
            bf16=dtype == torch.bfloat16, disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(),
            activation_checkpointing=False,  # TRL's default is on, ours off: compare the wrappers, not this
        ),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules=LORA["target_modules"], task_type="SEQ_CLS", bias="none"),
        callbacks=[timer],
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    del trainer, model
    gc.collect()
    return timer.result(args.warmup_steps)


def run_ours(args, model_dir: str, out: Path, steps: int) -> dict:
    """rlhf.rm.run on the equivalent pipeline config (our defaults elsewhere)."""
    import rlhf.rm
    from rlhf.config import validate_config
    from rlhf.hf_trainer import callbacks
    from rlhf.runs import begin_stage, finish_stage

    cfg = validate_config({
        "run_name": "bench", "output_dir": str(out), "seed": SEED,
        "model": {"name_or_path": model_dir, "dtype": args.dtype}, "lora": LORA, "tracking": {"backend": "none"},
        "sft": {"data": {"path": str(REPO / "data" / "demo" / "sft_train.jsonl")}},
        "rm": {
            "data": {"path": str(DATA), "eval_split": None}, "max_steps": steps, "batch_size": args.batch_size,
            "grad_accum": 1, "learning_rate": LR, "warmup_ratio": 0.03, "max_length": args.max_length,
            "logging_steps": 1, "save_steps": steps,  # one checkpoint, after the last step (not 8 per run)
        },
    }, "<bench>")
    sft_dir = cfg.stage_dir("sft")
    sft_dir.mkdir(parents=True, exist_ok=True)
    (sft_dir / "model").symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    finish_stage(cfg, "sft", begin_stage(cfg, "sft"), {"note": "benchmark stand-in"}, {"model": str(sft_dir / "model")})

    timer = timer_callback()
    real_callbacks, real_evaluate = rlhf.rm.callbacks, rlhf.rm._evaluate
    rlhf.rm.callbacks = lambda c, stage: callbacks(c, stage) + [timer]  # the same timer as the baseline's
    rlhf.rm._evaluate = lambda *a, **k: {}  # post-training scoring: outside the timed window, skipped
    try:
        rlhf.rm.run(cfg)
    finally:
        rlhf.rm.callbacks, rlhf.rm._evaluate = real_callbacks, real_evaluate
    gc.collect()
    return timer.result(args.warmup_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?",
                        help="model folder (default: the embedded SmolLM2, converted on first use)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    add_common_args(parser)
    args = parser.parse_args()
    model_dir, device = setup(args, args.model_dir)
    print(f"model {model_dir} | {args.steps} steps x {args.batch_size} pairs | max_length {args.max_length} | "
          f"{args.dtype} | {device}", file=sys.stderr)

    compare(args, model_dir, run_baseline, run_ours, "rm", "trl.RewardTrainer", "rlhf.rm.run", device)


if __name__ == "__main__":
    main()
