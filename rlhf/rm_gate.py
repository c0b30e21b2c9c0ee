"""The quality gate before PPO: is the reward model clearly better than a coin flip?

PPO optimises whatever the reward model rewards. An RM at chance accuracy on held-out pairs is
noise, and PPO against it makes the policy worse while every stage reports `done`. So PPO (and
`run-all`, before it starts PPO) reads `rm/eval.json` — the exported RM's accuracy on the
held-out pairs, ties counting 0.5 — and refuses to start unless

    accuracy >= rm.min_accuracy   and   accuracy - 2·SE > 0.5,   SE = sqrt(accuracy·(1 - accuracy) / n)

(SE: the binomial standard error of an accuracy measured on n pairs; "2 SE above chance" is about
a one-sided 2.3 % chance that a coin-flip RM would look this good). `rm.min_accuracy: null`
turns the gate off. Without held-out pairs nothing can be checked: PPO warns that the RM is
unchecked and goes on. `rlhf status` shows the verdict in the rm row.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from rlhf.config import PipelineConfig
from rlhf.errors import UserError
from rlhf.stats import binomial_se

log = logging.getLogger(__name__)
CHANCE = 0.5


@dataclass(frozen=True)
class Verdict:
    """The gate's reading of one reward model: held-out `accuracy` on `n_pairs` pairs (None / 0
    without held-out pairs) against `min_accuracy` (None: gate off)."""

    accuracy: float | None
    n_pairs: int
    min_accuracy: float | None

    @property
    def checked(self) -> bool:
        return self.n_pairs > 0 and self.accuracy is not None and math.isfinite(self.accuracy)

    @property
    def se(self) -> float | None:
        return binomial_se(self.accuracy, self.n_pairs) if self.checked else None

    @property
    def below_min(self) -> bool:
        return self.checked and self.min_accuracy is not None and self.accuracy < self.min_accuracy

    @property
    def near_chance(self) -> bool:
        return self.checked and self.min_accuracy is not None and self.accuracy - 2 * self.se <= CHANCE

    @property
    def passed(self) -> bool:
        """False only when the gate is on and the RM fails it (an unchecked RM passes, with a warning)."""
        return not (self.below_min or self.near_chance)

    def figure(self) -> str:
        return f"{self.accuracy:.2f} ± {self.se:.2f} (n={self.n_pairs})"

    def summary(self) -> str:
        """One line for `rlhf status`, e.g. 'eval accuracy 0.57 ± 0.05 (n=100) — below gate 0.60'."""
        if not self.checked:
            return "no held-out pairs — RM unchecked"
        if self.min_accuracy is None:
            return f"eval accuracy {self.figure()} — gate off (rm.min_accuracy: null)"
        if self.below_min:
            return f"eval accuracy {self.figure()} — below gate {self.min_accuracy:.2f}"
        if self.near_chance:
            return f"eval accuracy {self.figure()} — not clearly above chance (gate {self.min_accuracy:.2f})"
        return f"eval accuracy {self.figure()} — passes gate {self.min_accuracy:.2f}"

    def error(self, cfg: PipelineConfig) -> str:
        """The one-line reason PPO does not start (for a verdict that did not pass)."""
        why = []
        if self.below_min:
            why.append(f"below rm.min_accuracy {self.min_accuracy:.2f}")
        if self.near_chance:
            why.append(f"not clearly above chance ({self.accuracy:.2f} - 2 × {self.se:.2f} = "
                       f"{self.accuracy - 2 * self.se:.2f} <= {CHANCE})")
        more = " (more held-out pairs narrow the ±)" if self.near_chance and not self.below_min else ""
        return (f"PPO not started: the reward model's held-out pair accuracy is {self.accuracy:.2f} ± {self.se:.2f} "
                f"(n={self.n_pairs} pairs, {cfg.stage_dir('rm')}/eval.json), {' and '.join(why)}, so PPO could be "
                f"optimising noise. Train the RM longer (raise rm.epochs), give it more or cleaner preference "
                f"pairs{more}, or set rm.min_accuracy: null to run PPO anyway")

    def warning(self, cfg: PipelineConfig) -> str:
        """What the RM stage and PPO log when the verdict is not a clean pass."""
        if not self.checked:
            return ("the reward model has no held-out pairs, so its accuracy is unchecked and rm.min_accuracy "
                    "cannot be applied; give rm.data an eval_path or an eval_split to check it before PPO")
        return self.error(cfg).replace("PPO not started: ", "PPO will not start: ", 1)


def gate_verdict(accuracy: float | None, n_pairs: int, min_accuracy: float | None) -> Verdict:
    return Verdict(accuracy, int(n_pairs or 0), min_accuracy)


def read_verdict(cfg: PipelineConfig) -> Verdict | None:
    """The gate's verdict on the RM in the run folder (rm/eval.json), None when there is none yet."""
    if cfg.rm is None:
        return None
    path = cfg.stage_dir("rm") / "eval.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    n = int(report.get("n_pairs") or 0)
    accuracy = report.get("accuracy") if n else None
    return gate_verdict(float(accuracy) if isinstance(accuracy, (int, float)) else None, n, cfg.rm.min_accuracy)


def check_before_ppo(cfg: PipelineConfig, warn: bool = True) -> None:
    """Raise a UserError (exit 2) when the RM fails the gate; log a warning (when `warn`) when it is
    unchecked. Reads only rm/eval.json: call it before loading any model."""
    verdict = read_verdict(cfg) or gate_verdict(None, 0, cfg.rm.min_accuracy if cfg.rm else None)
    if not verdict.passed:
        raise UserError(verdict.error(cfg))
    if warn and not verdict.checked:
        log.warning("%s", verdict.warning(cfg))
