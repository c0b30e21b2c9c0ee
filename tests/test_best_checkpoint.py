"""Training length and the exported checkpoint (rlhf.best_checkpoint): epochs set the run length,
evaluations come about 8 times per run, the best evaluated checkpoint is exported (RM: held-out
pair accuracy, ties by loss; SFT: loss), early stopping, and resume keeping the best. Tiny model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import rlhf.rm
import rlhf.sft
from rlhf.best_checkpoint import RM, SFT, Criterion, best_index, eval_curve, evaluations_since_best
from rlhf.config import load_config
from tests.conftest import write_config

# Evaluations at every step of 6: on the tiny model this run's best RM checkpoint is not its last,
# and two evaluations tie on accuracy (the tie-break by loss decides). With save_total_limit 2 (the
# default) the rotation keeps only the latest checkpoint and the one it protects as the best.
# 48 pairs: a run whose best evaluation (step 2) ties another in accuracy and is not the last step
RM_RUN = {"rm": {"eval_steps": 1, "max_steps": 6, "save_total_limit": 2, "data": {"max_rows": 48}}}


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def _rm_config(tmp_path: Path, tiny_sft_run: Path, overrides: dict) -> Path:
    """A config in tmp_path whose run folder holds a copy of the session's finished tiny SFT stage."""
    path = write_config(tmp_path, overrides)
    shutil.copytree(load_config(tiny_sft_run).stage_dir("sft"), load_config(path).stage_dir("sft"),
                    ignore=shutil.ignore_patterns("checkpoints"))
    return path


def _eval_json(cfg) -> dict:
    return json.loads((cfg.stage_dir("rm") / "eval.json").read_text())


def _by_rule(curve: list[dict]) -> dict:
    """The best row of an RM curve by the documented rule, written out independently."""
    top = max(r["accuracy"] for r in curve)
    tied = [r for r in curve if r["accuracy"] == top]
    return min(tied, key=lambda r: r["loss"])


def _crash_at(step: int):
    """A callback that raises when optimizer step `step + 1` begins (checkpoint-`step` is written)."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupted(f"simulated crash after step {step}")

    return Crash()


class Interrupted(RuntimeError):
    pass


def _steps_recorder():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    return Recorder()


def _with_callbacks(monkeypatch, module, *extra) -> None:
    from rlhf.hf_trainer import callbacks

    monkeypatch.setattr(module, "callbacks", lambda cfg, stage: callbacks(cfg, stage) + list(extra))


# ---------------------------------------------------------------------------- the rule, by hand


def test_ranking_by_hand():
    rm_curve = [
        {"step": 2, "eval_pairs_accuracy": 0.50, "eval_loss": 0.69},
        {"step": 4, "eval_pairs_accuracy": 0.60, "eval_loss": 0.68},
        {"step": 6, "eval_pairs_accuracy": 0.60, "eval_loss": 0.66},  # same accuracy, lower loss: best
        {"step": 8, "eval_pairs_accuracy": 0.60, "eval_loss": 0.66},  # a full tie keeps the earlier one
        {"step": 10, "eval_pairs_accuracy": 0.55, "eval_loss": 0.60},  # lower loss does not beat accuracy
    ]
    assert best_index(rm_curve, RM) == 2
    assert evaluations_since_best(rm_curve, RM) == 2
    assert best_index(rm_curve[:2], RM) == 1 and evaluations_since_best(rm_curve[:3], RM) == 0
    sft_curve = [{"step": 1, "eval_loss": 3.0}, {"step": 2, "eval_loss": 2.5}, {"step": 3, "eval_loss": float("nan")},
                 {"step": 4, "eval_loss": 2.7}]
    assert best_index(sft_curve, SFT) == 1 and evaluations_since_best(sft_curve, SFT) == 2  # NaN ranks last
    assert best_index([], SFT) is None and evaluations_since_best([], SFT) == 0
    higher = Criterion("eval_x", higher_is_better=True)
    assert best_index([{"step": 1, "eval_x": float("nan")}, {"step": 2, "eval_x": -5.0}], higher) == 1
    # the curve is read from the Trainer's log history: evaluation rows only, in order
    history = [{"loss": 0.7, "step": 1}, {"eval_loss": 0.69, "eval_pairs_accuracy": 0.5, "step": 1},
               {"loss": 0.6, "step": 2}, {"eval_loss": 0.6, "eval_pairs_accuracy": 0.75, "step": 2},
               {"train_runtime": 1.0, "step": 2}]
    assert eval_curve(history, RM) == [{"step": 1, "eval_pairs_accuracy": 0.5, "eval_loss": 0.69},
                                       {"step": 2, "eval_pairs_accuracy": 0.75, "eval_loss": 0.6}]


def test_cadence_follows_the_run_length(tmp_path):
    """With held-out data and eval_steps null, a run evaluates (and checkpoints) 8 times, whatever
    its length; an explicit eval_steps wins; without held-out data it checkpoints 8 times per run."""
    from rlhf.hf_trainer import trainer_kwargs

    cfg = load_config(write_config(tmp_path, {"sft": {"eval_steps": None}}))
    auto = trainer_kwargs(cfg, "sft", cfg.sft, has_eval=True)
    assert (auto["eval_strategy"], auto["eval_steps"], auto["save_steps"]) == ("steps", 0.125, 0.125)
    none = trainer_kwargs(cfg, "sft", cfg.sft, has_eval=False)
    assert (none["eval_strategy"], none["save_steps"]) == ("no", 0.125)
    cfg = load_config(write_config(tmp_path, {"sft": {"eval_steps": 3, "save_steps": 2}}))
    explicit = trainer_kwargs(cfg, "sft", cfg.sft, has_eval=True)
    assert (explicit["eval_steps"], explicit["save_steps"]) == (3, 2)


def test_sft_length_follows_epochs_with_eight_evaluations(tmp_path):
    """max_steps -1: 16 rows in batches of 4 for 2 epochs is 8 steps; eval_steps null evaluates at
    every 8th of the run (ceil(8 / 8) = 1 step), each with a checkpoint; the best is exported."""
    from rlhf.status import stage_rows

    path = write_config(tmp_path, {"sft": {"max_steps": -1, "epochs": 2, "eval_steps": None,
                                           "data": {"max_rows": 16}}})
    cfg = load_config(path)
    rlhf.sft.run(cfg)
    metrics = json.loads((cfg.stage_dir("sft") / "manifest.json").read_text())["metrics"]
    assert metrics["global_step"] == 8
    assert [r["step"] for r in metrics["eval_curve"]] == list(range(1, 9))
    best = min(metrics["eval_curve"], key=lambda r: r["loss"])
    assert metrics["best_step"] == best["step"] and metrics["eval_loss"] == best["loss"]
    assert _equal(_tensors(cfg.stage_dir("sft") / "adapter"),
                  _tensors(cfg.stage_dir("sft") / "checkpoints" / f"checkpoint-{best['step']}"))
    row = next(r for r in stage_rows(cfg) if r.stage == "sft")
    assert row.checkpoint == "step 8/8" and row.metrics["eval loss"] == pytest.approx(best["loss"])


# ---------------------------------------------------------------------------- RM: the best checkpoint


@pytest.fixture(scope="module")
def rm_best_run(tiny_sft_run, tmp_path_factory) -> Path:
    import torch

    path = _rm_config(tmp_path_factory.mktemp("rm-best"), tiny_sft_run, RM_RUN)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' own runs (conftest.torch_threads), so results compare exactly
    try:
        rlhf.rm.run(load_config(path))
    finally:
        torch.set_num_threads(before)
    return path


def test_rm_exports_its_best_checkpoint_not_the_last(rm_best_run):
    cfg = load_config(rm_best_run)
    stage = cfg.stage_dir("rm")
    report = _eval_json(cfg)
    curve = report["curve"]
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) == {"step", "accuracy", "loss"} for r in curve)
    best = _by_rule(curve)
    assert report["best_step"] == best["step"] and report["last_step"] == report["global_step"] == 6
    assert best["step"] != 6, "this run's best must not be its last step, or the test proves nothing"
    assert sum(r["accuracy"] == best["accuracy"] for r in curve) > 1, "expected an accuracy tie broken by loss"
    # the rotation kept the best checkpoint besides the latest (unprotected, it would keep steps 5 and 6)
    assert sorted(p.name for p in (stage / "checkpoints").glob("checkpoint-*")) == [f"checkpoint-{best['step']}",
                                                                                  "checkpoint-6"]
    exported = _tensors(stage / "adapter")
    assert _equal(exported, _tensors(stage / "checkpoints" / f"checkpoint-{best['step']}"))
    assert not _equal(exported, _tensors(stage / "checkpoints" / "checkpoint-6"))
    # eval.json's figures are the exported model's, scored afresh: its accuracy is the best evaluation's
    assert report["accuracy"] == pytest.approx(best["accuracy"], abs=1e-9) and report["n_pairs"] == 100
    manifest = json.loads((stage / "manifest.json").read_text())["metrics"]
    assert manifest["best_step"] == best["step"] and manifest["score_std"] == report["score_std"]
    # score_mean/score_std are the exported model's: rescoring the training pairs with rm/model gives them
    from rlhf.data import rm_data
    from rlhf.models import load_tokenizer
    from rlhf.rm import load_reward_model, score_pairs_with_classifier

    model, tok = load_reward_model(stage / "model")
    data = rm_data(cfg, load_tokenizer(cfg.model, str(cfg.stage_dir("sft") / "model")))
    chosen, rejected = score_pairs_with_classifier(model, tok, data.train, 8)
    scores = chosen + rejected
    assert report["score_mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)


def test_rm_resume_keeps_the_best(rm_best_run, tiny_sft_run, tmp_path, monkeypatch):
    """Interrupted after step 5 (checkpoints: the best and step 5), then rerun: training
    resumes at step 6, the best checkpoint survives the rotation, and the exported adapter is the
    uninterrupted run's."""
    path = _rm_config(tmp_path, tiny_sft_run, RM_RUN)
    cfg = load_config(path)
    want = _eval_json(load_config(rm_best_run))
    _with_callbacks(monkeypatch, rlhf.rm, _crash_at(5))
    with pytest.raises(Interrupted):
        rlhf.rm.run(cfg)
    root = cfg.stage_dir("rm") / "checkpoints"
    assert sorted(p.name for p in root.glob("checkpoint-*")) == sorted({f"checkpoint-{want['best_step']}", "checkpoint-5"})

    recorder = _steps_recorder()
    _with_callbacks(monkeypatch, rlhf.rm, recorder)
    rlhf.rm.run(cfg)
    assert recorder.steps == [6]
    got = _eval_json(cfg)
    assert got["best_step"] == want["best_step"]
    assert [(r["step"], r["accuracy"]) for r in got["curve"]] == [(r["step"], r["accuracy"]) for r in want["curve"]]
    assert [r["loss"] for r in got["curve"]] == [r["loss"] for r in want["curve"]]
    assert sorted(p.name for p in root.glob("checkpoint-*")) == [f"checkpoint-{want['best_step']}", "checkpoint-6"]
    # the best checkpoint was written before the interruption, so the export is the uninterrupted run's exactly
    assert _equal(_tensors(cfg.stage_dir("rm") / "adapter"), _tensors(load_config(rm_best_run).stage_dir("rm") / "adapter"))


def test_rm_early_stopping_then_a_crash_before_export(tiny_sft_run, tmp_path, monkeypatch):
    """rm.early_stopping_patience 1 ends the run at the first evaluation without a new best. Killed
    after that decision (here: while exporting), the rerun exports the same best checkpoint without
    training a step more."""
    path = _rm_config(tmp_path, tiny_sft_run, {"rm": {**RM_RUN["rm"], "early_stopping_patience": 1}})
    cfg = load_config(path)

    def broken_export(*args, **kwargs):
        raise Interrupted("simulated crash during the export")

    monkeypatch.setattr(rlhf.rm, "export_merged", broken_export)
    with pytest.raises(Interrupted):
        rlhf.rm.run(cfg)
    monkeypatch.undo()
    last = max((cfg.stage_dir("rm") / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    stopped_at = state["global_step"]
    curve = [{"step": r["step"], "accuracy": r["eval_pairs_accuracy"], "loss": r["eval_loss"]}
             for r in state["log_history"] if "eval_pairs_accuracy" in r]
    best = _by_rule(curve)
    assert stopped_at < 6 and curve[-1]["step"] == stopped_at and stopped_at == best["step"] + 1

    recorder = _steps_recorder()
    _with_callbacks(monkeypatch, rlhf.rm, recorder)
    rlhf.rm.run(cfg)
    assert recorder.steps == []  # nothing trained past the stop
    report = _eval_json(cfg)
    assert report["best_step"] == best["step"] and report["last_step"] == stopped_at
    assert _equal(_tensors(cfg.stage_dir("rm") / "adapter"),
                  _tensors(cfg.stage_dir("rm") / "checkpoints" / f"checkpoint-{best['step']}"))


# ---------------------------------------------------------------------------- SFT


def test_sft_early_stopping_exports_the_lowest_held_out_loss(tmp_path):
    """At this learning rate the tiny model's held-out loss (48 rows) rises at step 5: patience 1
    stops there, and the checkpoint of step 4 (the lowest loss) is exported, not the last."""
    path = write_config(tmp_path, {"sft": {"eval_steps": 1, "max_steps": 6, "learning_rate": 0.1,
                                           "early_stopping_patience": 1, "data": {"max_rows": 48}}})
    cfg = load_config(path)
    rlhf.sft.run(cfg)
    stage = cfg.stage_dir("sft")
    metrics = json.loads((stage / "manifest.json").read_text())["metrics"]
    curve = metrics["eval_curve"]
    best = min(curve, key=lambda r: r["loss"])
    assert metrics["global_step"] == curve[-1]["step"] < 6, "early stopping should have ended the run"
    assert metrics["best_step"] == best["step"] == curve[-2]["step"] and metrics["eval_loss"] == best["loss"]
    assert all(math.isfinite(r["loss"]) for r in curve)
    exported = _tensors(stage / "adapter")
    assert _equal(exported, _tensors(stage / "checkpoints" / f"checkpoint-{best['step']}"))
    assert not _equal(exported, _tensors(stage / "checkpoints" / f"checkpoint-{metrics['global_step']}"))


def test_every_evaluation_writes_a_checkpoint_whatever_save_steps(tmp_path):
    """save_steps 3 with eval_steps 2: checkpoints at 3 (save_steps) and at 2 and 4 (evaluations),
    so whichever evaluation is best has a checkpoint to export."""
    cfg = load_config(write_config(tmp_path, {"sft": {"eval_steps": 2, "save_steps": 3, "save_total_limit": 5}}))
    rlhf.sft.run(cfg)
    names = sorted(p.name for p in (cfg.stage_dir("sft") / "checkpoints").glob("checkpoint-*"))
    assert names == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
