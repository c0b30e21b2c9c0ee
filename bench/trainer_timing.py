"""Timing shared by the Trainer-based benchmarks (SFT and RM): one TrainerCallback attached to
both trainers, so ours and the baseline are measured the same way."""

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
