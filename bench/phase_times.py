"""Wall time per phase of a PPO training loop, from wrappers around the functions that run each
phase, for both sides of bench/ppo_vs_trl.py. No dependency beyond torch, so the TRL 1.12 side
runs it in its own venv:

    BASELINE_PYTHON bench/phase_times.py ../shared/bench/trl112_ppo_baseline.py MODEL_DIR [its arguments]

runs the baseline script unchanged (as `__main__`) with TRL 1.12's PPOTrainer instrumented, and
prints one more JSON line after the script's own: `{"phases_s": {...}}`, seconds summed over the run.

Phases, the same on both sides:
- `generation`: the sampling call (TRL's `batch_generation`; our `rlhf.sampling.generate`);
- `rollout scoring`: the passes without gradients over the sampled sequences (TRL: the
  reference forward and `get_reward` for the value and the reward; ours: the policy and
  reference log-probs, the value and the reward score);
- `update forward`: the passes with gradients (TRL: its policy-and-value wrapper's forward;
  ours: the policy's log-probs and the value pass);
- `backward`: `torch.Tensor.backward`;
- `optimizer step`: `torch.optim.AdamW.step`;
- `rest`: the loop's time outside these (losses, advantages, logging, memory housekeeping);
  filled in by the caller from the loop's total.
"""

from __future__ import annotations

import functools
import json
import runpy
import sys
import time
from collections import defaultdict

PHASES: dict[str, float] = defaultdict(float)
STEP_STARTS: list[float] = []  # perf_counter at the start of each PPO step (its rollout's first call)
LOOP_END: list[float] = []  # perf_counter when the baseline's train() returned


def timed(fn, phase, nests: bool = True):
    """`fn`, adding its wall time to PHASES[phase] (phase: a name, or a function of no arguments
    that names it at call time). Nested timed calls count once, in the outermost phase; with
    nests=False (the loop's total) the calls inside are timed as phases of their own."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if timed.depth:
            return fn(*args, **kwargs)
        timed.depth += nests
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[phase() if callable(phase) else phase] += time.perf_counter() - t
            timed.depth -= nests
    return wrapper


timed.depth = 0


def marks_step_start(fn):
    """`fn`, called once at the start of every step: records when (STEP_STARTS)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        STEP_STARTS.append(time.perf_counter())
        return fn(*args, **kwargs)
    return wrapper


def ends_loop(fn):
    """`fn` (the baseline's train()), recording when it returns (LOOP_END)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            LOOP_END.append(time.perf_counter())
    return wrapper


def after_first_step(end: float) -> float | None:
    """Seconds per step after the first (compilation and warm-up are in the first), from
    STEP_STARTS to `end` (the loop's end); None with fewer than two steps."""
    if len(STEP_STARTS) < 2:
        return None
    return round((end - STEP_STARTS[1]) / (len(STEP_STARTS) - 1), 3)


def by_grad_mode(with_grad: str, without_grad: str):
    import torch

    return lambda: with_grad if torch.is_grad_enabled() else without_grad


def instrument_common() -> None:
    import torch

    torch.Tensor.backward = timed(torch.Tensor.backward, "backward")
    torch.optim.AdamW.step = timed(torch.optim.AdamW.step, "optimizer step")


def instrument_trl112() -> None:
    import trl.experimental.ppo.ppo_trainer as ppo

    instrument_common()
    ppo.batch_generation = marks_step_start(timed(ppo.batch_generation, "generation"))  # once per step
    ppo.forward = timed(ppo.forward, by_grad_mode("update forward", "rollout scoring"))
    ppo.get_reward = timed(ppo.get_reward, by_grad_mode("update forward", "rollout scoring"))
    ppo.PPOTrainer.train = ends_loop(timed(ppo.PPOTrainer.train, "total", nests=False))


def instrument_ours() -> None:
    import rlhf.ppo.rollout as rollout
    import rlhf.ppo.trainer as trainer
    import rlhf.sampling as sampling

    instrument_common()
    trainer.collect_rollout = marks_step_start(trainer.collect_rollout)  # once per step
    sampling.generate = timed(sampling.generate, "generation")
    sampling.sequence_scores = timed(sampling.sequence_scores, "rollout scoring")
    for module, phase in ((rollout, "rollout scoring"), (trainer, "update forward")):
        module.response_logprobs = timed(module.response_logprobs, phase)
        module.token_values = timed(module.token_values, phase)


ORDER = ("generation", "rollout scoring", "update forward", "backward", "optimizer step", "rest")


def per_step(phases: dict[str, float], total_s: float, steps: int) -> dict[str, float]:
    """Seconds per step of each phase in ORDER, `rest` being the loop's total minus the timed phases."""
    timed_s = {k: phases.get(k, 0.0) for k in ORDER[:-1]}
    timed_s["rest"] = total_s - sum(timed_s.values())
    return {k: round(v / steps, 3) for k, v in timed_s.items()}


def main() -> None:
    script, *args = sys.argv[1:]
    instrument_trl112()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
    print(json.dumps({"phases_s": {k: round(v, 3) for k, v in PHASES.items()},
                      "s_per_step_after_first": after_first_step(LOOP_END[-1]) if LOOP_END else None}), flush=True)


if __name__ == "__main__":
    main()
