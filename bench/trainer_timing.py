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
