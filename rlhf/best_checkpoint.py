"""Which checkpoint an SFT or RM run exports: the one with the best held-out evaluation.

With held-out data the Trainer evaluates periodically (every `eval_steps`, by default about
`EVALS_PER_RUN` times over the run, and at the last step) and every evaluation writes a
checkpoint. The exported adapter is the best evaluated checkpoint's, not the last one's:

- RM: the highest held-out pair accuracy (ties count 0.5 per pair, as `rlhf.rm.pairwise_metrics`);
  between checkpoints of equal accuracy, the lower held-out loss;
- SFT: the lowest held-out loss.

A full tie keeps the earlier checkpoint. `early_stopping_patience` ends the run after that many
evaluations in a row without a new best.

The best is always derived from the Trainer's own `state.log_history` (every evaluation is logged
there, and the history is saved in each checkpoint's trainer_state.json), so a resumed run knows
its best without state of ours. The Trainer's machinery does the rest: `state.best_global_step`
makes its checkpoint rotation (`save_total_limit`) keep the best checkpoint. Its own best-model
selection (`metric_for_best_model`, `load_best_model_at_end`, `EarlyStoppingCallback`) compares
one metric with a strict `>` and so cannot break accuracy ties by loss; we leave it off.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.atomic import replace_dir, save_atomically

log = logging.getLogger(__name__)

EVALS_PER_RUN = 8
# What a Trainer checkpoint holds besides the saved model (the resumable training state).
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin")


@dataclass(frozen=True)
class Criterion:
    """How evaluations are ranked: `metric` first (higher or lower is better), then `tie_break`
    (lower is better), both keys of the Trainer's evaluation logs."""

    metric: str
    higher_is_better: bool
    tie_break: str | None = None

    def describe(self) -> str:
        first = f"{'highest' if self.higher_is_better else 'lowest'} {self.metric}"
        return first + (f", ties broken by the lowest {self.tie_break}" if self.tie_break else "")


RM = Criterion("eval_pairs_accuracy", higher_is_better=True, tie_break="eval_loss")
SFT = Criterion("eval_loss", higher_is_better=False)


# ---------------------------------------------------------------------------- pure functions


def eval_curve(log_history: list[dict[str, Any]], criterion: Criterion) -> list[dict[str, float]]:
    """The evaluations in a Trainer's log history, in order: one {step, metric[, tie_break]} per
    log entry holding `criterion.metric`."""
    keys = [criterion.metric] + ([criterion.tie_break] if criterion.tie_break else [])
    curve = []
    for row in log_history:
        if criterion.metric in row:
            curve.append({"step": int(row["step"]), **{k: float(row[k]) for k in keys if k in row}})
    return curve


def _rank(row: dict[str, float], criterion: Criterion) -> tuple[float, float]:
    """A key that sorts better evaluations higher; NaN (or a missing value) ranks last."""

    def finite(x: float | None) -> float | None:
        return x if x is not None and not math.isnan(x) else None

    m = finite(row.get(criterion.metric))
    first = -math.inf if m is None else (m if criterion.higher_is_better else -m)
    t = finite(row.get(criterion.tie_break)) if criterion.tie_break else 0.0
    return first, -math.inf if t is None else -t


def best_index(curve: list[dict[str, float]], criterion: Criterion) -> int | None:
    """Index of the best evaluation of `curve` (the first of equals), None for an empty curve."""
    best = None
    for i, row in enumerate(curve):
        if best is None or _rank(row, criterion) > _rank(curve[best], criterion):
            best = i
    return best


def evaluations_since_best(curve: list[dict[str, float]], criterion: Criterion) -> int:
    """How many evaluations came after the best one (0 when the latest is the best or none ran)."""
    best = best_index(curve, criterion)
    return 0 if best is None else len(curve) - 1 - best


def auto_steps(explicit: int | None) -> int | float:
    """A Trainer `eval_steps`/`save_steps` value: the explicit step count, or the fraction of the
    run that gives EVALS_PER_RUN evaluations (the Trainer rounds ceil(total_steps × fraction))."""
    return explicit if explicit is not None else 1.0 / EVALS_PER_RUN


# ---------------------------------------------------------------------------- the Trainer side


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def keep_best_callback(criterion: Criterion, patience: int | None):
    """A TrainerCallback that writes a checkpoint at every evaluation, points the Trainer's
    `state.best_global_step` / `best_model_checkpoint` at the best one (so checkpoint rotation keeps
    it), and stops the run after `patience` evaluations without a new best."""
    from transformers import TrainerCallback

    class KeepBest(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if patience is not None and args.eval_strategy == "no":
                log.warning("early_stopping_patience is set but there is no held-out data to evaluate on: "
                            "training runs its full length and exports its last state")
            # After a resume: the restored history names the best; its folder is in this run's output_dir
            # (a copied run folder's trainer_state.json still names the folder it was written in).
            mark_best(state, args.output_dir, criterion)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.global_step > 0:
                control.should_save = True  # the Trainer saves right after evaluating, before rotating
            curve = mark_best(state, args.output_dir, criterion)
            if patience is not None and evaluations_since_best(curve, criterion) >= patience:
                best = curve[best_index(curve, criterion)]
                log.info("early stopping at step %d: %d evaluations without a new best (best: step %d, %s %.4g)",
                         state.global_step, patience, best["step"], criterion.metric, best[criterion.metric])
                control.should_training_stop = True

    return KeepBest()


def mark_best(state, output_dir: str | Path, criterion: Criterion) -> list[dict[str, float]]:
    """Set the Trainer state's best step and checkpoint from its log history; returns the curve."""
    curve = eval_curve(state.log_history, criterion)
    best = best_index(curve, criterion)
    if best is not None:
        step = curve[best]["step"]
        state.best_global_step = step
        state.best_metric = curve[best][criterion.metric]
        folder = checkpoint_dir(output_dir, step)
        # Not written yet when this evaluation is the new best: the Trainer sets it after saving.
        state.best_model_checkpoint = str(folder) if folder.is_dir() else None
    return curve


def stopped_early(checkpoint: str | Path | None, criterion: Criterion, patience: int | None) -> bool:
    """Whether a run resumed from `checkpoint` had already been ended by early stopping (killed
    between that decision and the export): training it further would go past the stop."""
    if checkpoint is None or patience is None:
        return False
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("log_history", [])
    return evaluations_since_best(eval_curve(history, criterion), criterion) >= patience


def train(trainer, resume_from: str | None, criterion: Criterion, patience: int | None) -> None:
    """trainer.train(resume_from_checkpoint=...), unless early stopping had already ended the run:
    then the checkpoint's state is restored without training a step more."""
    if stopped_early(resume_from, criterion, patience):
        from transformers import TrainerState

        log.info("%s: early stopping had already ended this run; exporting its best checkpoint", resume_from)
        trainer.state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
        return
    from peft.helpers import disable_input_dtype_casting

    # Under bf16/fp16 autocast peft's default would cast every LoRA branch's input up to the
    # float32 of the LoRA weights, and autocast would cast it straight back down for the matmul:
    # the same products, plus two copies per adapted layer (PPO's passes do the same: roles.use_adapter).
    low_precision = trainer.args.bf16 or trainer.args.fp16
    with disable_input_dtype_casting(trainer.model, active=low_precision):
        trainer.train(resume_from_checkpoint=resume_from)


def best_evaluation(trainer, criterion: Criterion) -> dict[str, float] | None:
    """The best evaluation row {step, metric, ...} of a trained Trainer, or None without evaluations."""
    curve = eval_curve(trainer.state.log_history, criterion)
    best = best_index(curve, criterion)
    return None if best is None else curve[best]


def export_adapter(trainer, out_dir: Path, criterion: Criterion) -> int | None:
    """Write the adapter to export into `out_dir`: the best evaluated checkpoint's model files, or
    (without evaluations) the trained model as it is. Returns the best step, or None.

    Copying the checkpoint's files (written by the same `trainer.save_model` as the final save,
    gathered across processes under ZeRO-3/FSDP) works whatever the distribution strategy."""

    best = best_evaluation(trainer, criterion)
    if best is None:
        save_adapter(trainer, out_dir)
        return None
    step = int(best["step"])
    source = checkpoint_dir(trainer.args.output_dir, step)
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        if not any(source.glob("*.safetensors")):
            raise RuntimeError(f"the best checkpoint {source} (step {step}) holds no weights; it should have been "
                               "kept by the checkpoint rotation")

        def write(tmp: Path) -> None:
            for f in sorted(source.iterdir()):
                if f.is_file() and f.name not in TRAINING_STATE_FILES and not f.name.startswith("rng_state"):
                    shutil.copy2(f, tmp / f.name)

        save_atomically(out_dir, write)
        log.info("exporting the best checkpoint: step %d of %d (%s)", step, trainer.state.global_step,
                 criterion.describe())
    accelerator.wait_for_everyone()
    return step


def _short(key: str) -> str:
    return key.removeprefix("eval_pairs_").removeprefix("eval_")


def selection_report(trainer, criterion: Criterion) -> dict[str, Any]:
    """What the manifest and eval.json record about the selection: `best_step`, `last_step`,
    `selected_by`, and `curve` ({step, accuracy?, loss} per evaluation, in order); {} without
    evaluations."""
    curve = eval_curve(trainer.state.log_history, criterion)
    best = best_index(curve, criterion)
    if best is None:
        return {}
    return {
        "best_step": int(curve[best]["step"]),
        "last_step": int(trainer.state.global_step),
        "selected_by": criterion.describe(),
        "curve": [{_short(k) if k != "step" else k: v for k, v in row.items()} for row in curve],
    }


def save_adapter(trainer, out_dir: Path) -> Path:
    """Save the trained adapter (and score head, for the RM) with the Trainer's own logic.

    Every process calls it (under ZeRO-3/FSDP saving gathers shards collectively); the main
    process writes into a temp folder and renames it into place."""
    state = trainer.accelerator
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    state.wait_for_everyone()
    trainer.save_model(str(tmp))
    state.wait_for_everyone()
    if state.is_main_process:
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the manifest records the config
        replace_dir(tmp, out_dir)
    return out_dir
