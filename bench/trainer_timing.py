"""Timing shared by the Trainer-based benchmarks (SFT and RM): one TrainerCallback attached to
both trainers, so ours and the baseline are measured the same way, and the alternating
run order and summary both benchmarks print."""

import time


def timer_callback():
    """A TrainerCallback recording when training starts/ends, when each step ends, and the
    cumulative token count TRL logs at each step."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.begin = self.end = 0.0
            self.step_end: dict[int, float] = {}
            self.tokens: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.tokens[state.global_step] = float(logs["num_tokens"])

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

        def result(self, warmup: int) -> dict:
            last = max(self.step_end)
            w = min(warmup, last - 1)
            total = self.tokens[last]
            steady_tokens = total - (self.tokens[w] if w > 0 else 0.0)
            steady_time = self.step_end[last] - (self.step_end[w] if w > 0 else self.begin)
            return {
                "steps": last,
                "tokens": total,
                "loop_s": self.end - self.begin,
                "loop_tokens_per_s": total / (self.end - self.begin),
                "steady_tokens_per_s": steady_tokens / steady_time,
            }

    return Timer()


def add_common_args(parser) -> None:
    """The options both Trainer benchmarks share (the model folder and --batch-size are their own)."""
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed run")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the steady-state figure")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side; 2+ alternates the order (ABBA)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on a GPU that has it)")
    parser.add_argument("--no-warmup-run", action="store_true", help="skip the untimed warm-up run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 avoids oversubscription on a busy machine)")


def setup(args, model_dir: str | None) -> tuple[str, str]:
    """Quiet logging, threads and dtype from the common options; returns (model folder: the given one
    or the embedded SmolLM2, converted on first use; a description of the device)."""
    import logging
    import sys
    from pathlib import Path

    import torch
    import transformers

    from rlhf.config import ModelConfig
    from rlhf.models import resolve_model

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    model_dir = model_dir or resolve_model(ModelConfig())
    if not (Path(model_dir) / "config.json").is_file():
        sys.exit(f"error: {model_dir} is not a model folder (no config.json)")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads"
    return model_dir, device


def compare(args, model_dir: str, run_baseline, run_ours, stage: str, baseline_name: str, ours_name: str,
            device: str) -> None:
    """Run both sides (an untimed baseline warm-up, then `args.repeats` rounds in alternating order,
    so drift in machine load favours neither), print a summary and end with one JSON line of ratios."""
    import json
    import shutil
    import statistics
    import sys
    import tempfile
    from pathlib import Path

    work = Path(tempfile.mkdtemp(prefix=f"{stage}-bench-"))
    runners = {"baseline": run_baseline, "ours": run_ours}
    results: dict[str, list[dict]] = {"baseline": [], "ours": []}
    try:
        if not args.no_warmup_run:
            run_baseline(args, model_dir, work / "warmup", min(3, args.steps))
        order = ["baseline", "ours"]
        for r in range(args.repeats):
            for side in order if r % 2 == 0 else order[::-1]:
                res = runners[side](args, model_dir, work / f"{side}-{r}", args.steps)
                results[side].append(res)
                print(f"{side:8s} run {r}: {res['tokens']:.0f} tokens, loop {res['loop_s']:.1f} s, "
                      f"{res['loop_tokens_per_s']:.1f} tok/s (steady {res['steady_tokens_per_s']:.1f} tok/s)",
                      file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mean(side: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[side])

    base, ours = mean("baseline", "loop_tokens_per_s"), mean("ours", "loop_tokens_per_s")
    base_steady, ours_steady = mean("baseline", "steady_tokens_per_s"), mean("ours", "steady_tokens_per_s")
    if results["baseline"][0]["tokens"] != results["ours"][0]["tokens"]:
        print("warning: the two sides counted different token totals; their data differ", file=sys.stderr)
    width = max(len(baseline_name), len(ours_name)) + 12
    print(f"{'baseline (' + baseline_name + '):':{width}s} {base:10.1f} tokens/s   steady-state {base_steady:10.1f} tokens/s")
    print(f"{'ours (' + ours_name + '):':{width}s} {ours:10.1f} tokens/s   steady-state {ours_steady:10.1f} tokens/s")
    print(f"{'ratio ours/baseline:':{width}s} {ours / base:10.3f}            steady-state {ours_steady / base_steady:10.3f}")
    print(json.dumps({
        f"{stage}_throughput_ratio": round(ours / base, 4),
        f"{stage}_steady_throughput_ratio": round(ours_steady / base_steady, 4),
        "baseline_tokens_per_s": round(base, 2),
        "ours_tokens_per_s": round(ours, 2),
        "baseline_steady_tokens_per_s": round(base_steady, 2),
        "ours_steady_tokens_per_s": round(ours_steady, 2),
        "tokens_per_run": results["ours"][0]["tokens"],
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "repeats": args.repeats,
        "dtype": args.dtype, "device": device, "model": model_dir,
    }))
