"""Stage 2: a pairwise (Bradley–Terry) reward model with LoRA on trl.RewardTrainer.

The model is the merged SFT model (`runs/<name>/sft/model`) loaded as
`AutoModelForSequenceClassification(num_labels=1)`: the backbone gets a LoRA adapter
(`lora.target_modules`; peft's "all-linear" leaves the classification head out) and the new
linear `score` head (hidden -> 1) is trained in full as a peft `modules_to_save` module. The loss
is RewardTrainer's: -log σ(r_chosen - r_rejected [- margin]) with the optional margin column
(`rm.margin_column`, passed to the trainer as `margin`) and the optional reward-centring term
`rm.center_rewards_coefficient · mean((r_chosen + r_rejected)²)`. RewardTrainer turns dropout off
(LoRA dropout included), so the two sides of a pair are scored by the same function.

Learning rate: `rm.learning_rate` defaults to 5e-5. InstructGPT trained its full-parameter RMs at
~9e-6; LoRA moves only a low-rank delta and needs a higher rate (the literature uses 5e-5 to
1e-4, TRL's RewardConfig default is 1e-4). We take the low end because the score head starts
from random and is trained in full at the same rate, and an RM that overfits its pairs gives PPO
a reward to hack. Very short runs want more: on the CPU demo (SmolLM2-135M, 30 steps of 8 pairs)
held-out accuracy is 0.75 at 5e-5 and 0.89 at 2e-4, so the demo pipeline should set 2e-4.

Outputs under runs/<name>/rm/:
- adapter/    the LoRA adapter and the trained score head (peft `modules_to_save`), loadable with
              `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
              sft/model, num_labels=1), rm/adapter)`;
- adapter/score_head.safetensors   the score head alone: tensor `weight` of shape (1, hidden)
              (and `bias` (1,) if the head has one; Llama-style heads have none). PPO loads
              sft/model as a causal LM, attaches adapter/ as a LoRA adapter named "reward" and
              applies this head itself to the final hidden state (after the last norm) at the
              last real token: score = h_last @ weight.T (+ bias). (`load_adapter` on a causal
              LM reports `base_model.model.score.weight` as an unexpected key: that is the head,
              which this file provides; every LoRA weight finds its layer);
- model/      the adapter merged into the backbone: a plain AutoModelForSequenceClassification
              (num_labels=1, `config.pad_token_id` set) with the tokenizer;
- eval.json   held-out pair metrics (see `pairwise_metrics`), the same on the training pairs, and
              `score_mean`/`score_std` over the responses (chosen and rejected) of up to 128 training
              pairs (`TRAIN_SCORE_PAIRS`, a seeded sample) — PPO subtracts `score_mean` so that the
              SFT policy scores about 0 — all of the exported model; with held-out pairs also
              `best_step`, `last_step`, `selected_by` and `curve` ({step, accuracy, loss} of every
              evaluation during training);
- manifest.json, metrics.jsonl (trainer logs, plus the final held-out metrics as `eval_pairs_*`),
  checkpoints/ (for resume).

Which checkpoint is exported: with held-out pairs the trainer evaluates about 8 times per run
(`rm.eval_steps`), checkpointing each time, and the checkpoint of highest held-out pair accuracy
(ties between checkpoints: lower held-out loss) becomes adapter/ and model/ (rlhf.best_checkpoint);
`rm.early_stopping_patience` ends the run after that many evaluations without a new best. PPO
checks the exported model's held-out accuracy against `rm.min_accuracy` first (rlhf.rm_gate).

Accuracy counts a pair as 1 when r_chosen > r_rejected, 0 when r_chosen < r_rejected and 0.5 on
an exact tie (a tie is a coin flip, so an RM that outputs a constant scores 0.5, not 0 or 1).
TRL's own `eval_accuracy` (logged by the trainer) counts ties as 0; ours is `eval_pairs_accuracy`.

Scoring outside training goes through the same tokenization as RewardTrainer (`encode`):
conversational prompt + response rendered by the chat template with no generation prompt and
nothing appended; text prompt + response with the tokenizer's EOS appended (unless present) and
the tokenizer's default special tokens. The score is read at the last non-pad token.

A little over 400 lines: the stage and the one scoring path everything outside training uses
(`rlhf score`, eval's pair accuracy, the gate's figures) belong together, so that training and
scoring cannot drift apart in how they tokenize.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from rlhf import best_checkpoint
from rlhf.atomic import write_json_atomically
from rlhf.config import PipelineConfig
from rlhf.data import needs_chat_template, rm_data
from rlhf.errors import UserError
from rlhf.hf_trainer import (CRITERION, callbacks, export_merged, final_metrics, prepare_for_training,
                              resume_checkpoint, trainer_kwargs)
from rlhf.models import load_tokenizer, lora_config, model_kwargs
from rlhf.rm_gate import gate_verdict
from rlhf.runs import stage_run
from rlhf.staleness import read_manifest, stage_state
from rlhf.tracking import METRICS_FILE, MetricsWriter

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
STAGE = "rm"
SCORE_HEAD_FILE = "score_head.safetensors"
EVAL_FILE = "eval.json"
EVAL_PREFIX = "pairs_"  # trainer eval logs become eval_pairs_*, clear of TRL's own eval_accuracy/eval_margin


# ---------------------------------------------------------------------------- pure math


def pairwise_metrics(chosen_scores: Iterable[float], rejected_scores: Iterable[float]) -> dict[str, float]:
    """Metrics of a reward model on N preference pairs.

    chosen_scores, rejected_scores: (N,) scores of the chosen and the rejected response of each pair.
    Returns accuracy (mean of 1[c > r] + 0.5·1[c == r]), ties (count of exact ties), margin_mean
    (mean of c - r), chosen_mean/chosen_std and rejected_mean/rejected_std (population std, ddof=0),
    and n_pairs. N = 0 gives n_pairs 0 and NaN for the rest."""
    chosen = [float(x) for x in chosen_scores]
    rejected = [float(x) for x in rejected_scores]
    if len(chosen) != len(rejected):
        raise ValueError(f"pairwise_metrics: {len(chosen)} chosen scores but {len(rejected)} rejected scores")
    n = len(chosen)
    if n == 0:
        nan = float("nan")
        return {"accuracy": nan, "ties": 0, "margin_mean": nan, "chosen_mean": nan, "chosen_std": nan,
                "rejected_mean": nan, "rejected_std": nan, "n_pairs": 0}
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    ties = sum(1 for c, r in zip(chosen, rejected) if c == r)
    return {
        "accuracy": wins / n,
        "ties": ties,
        "margin_mean": math.fsum(c - r for c, r in zip(chosen, rejected)) / n,
        "chosen_mean": _mean(chosen),
        "chosen_std": _std(chosen),
        "rejected_mean": _mean(rejected),
        "rejected_std": _std(rejected),
        "n_pairs": n,
    }


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float:
    m = _mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / len(xs))


# ---------------------------------------------------------------------------- scoring


def encode(tokenizer: PreTrainedTokenizerBase, prompt: Any, response: Any) -> list[int]:
    """Token ids of prompt + response exactly as trl.RewardTrainer builds them for training.

    Conversational (message lists): the chat template over prompt + response, no generation
    prompt, nothing appended. Text: prompt + response + EOS (unless the response already ends
    with it), tokenized with the tokenizer's default special tokens."""
    if isinstance(response, list):
        messages = list(prompt or []) + list(response)
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    if not response.endswith(tokenizer.eos_token):
        response = response + tokenizer.eos_token
    return list(tokenizer(text=(prompt or "") + response)["input_ids"])


def score_sequences(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sequences: list[list[int]],
                    batch_size: int = 16) -> list[float]:
    """Scores of tokenized sequences: right-padded batches (sorted by length to pad little) through a
    sequence-classification model with num_labels=1; one float per sequence, in input order."""
    import torch

    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token to score batches")
    if model.config.get_text_config().pad_token_id is None:
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                longest = max(len(sequences[i]) for i in idx)
                ids = torch.full((len(idx), longest), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(idx), longest), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                    mask[row, : len(sequences[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                for row, i in enumerate(idx):
                    out[i] = float(logits[row, 0].float())
    finally:
        model.train(was_training)
    return out


def score_pairs_with_classifier(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                                records: Iterable[dict[str, Any]],
                                batch_size: int = 16) -> tuple[list[float], list[float]]:
    """Scores of the chosen and the rejected response of each explicit-prompt record
    {prompt, chosen, rejected} (text or conversational, as rlhf.data.records.preference_records makes them),
    by a sequence-classification reward model (the exported rm/model, or the RM being trained).
    `rlhf eval` scores pairs with the PPO reward role instead: rlhf.evaluate.score_pairs_with_reward_role.

    Returns (chosen_scores, rejected_scores), each (N,), tokenized as RewardTrainer does (`encode`)."""
    records = list(records)
    seqs = [encode(tokenizer, r["prompt"], r["chosen"]) for r in records]
    seqs += [encode(tokenizer, r["prompt"], r["rejected"]) for r in records]
    scores = score_sequences(model, tokenizer, seqs, batch_size)
    return scores[: len(records)], scores[len(records):]


def load_reward_model(model_dir: str | Path, dtype: Any = "auto", device: Any = None):
    """(model, tokenizer) from an exported rm/model folder, ready for `score_sequences`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no reward model here (no config.json); "
                        "run the rm stage first: `rlhf rm --config ...`")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True)
    if model.config.get_text_config().pad_token_id is None:
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def score(cfg_or_model_dir: PipelineConfig | str | Path, prompts: Any, responses: Sequence[Any],
          batch_size: int = 16, conversational: bool | None = None) -> list[float]:
    """The reward model's score of each (prompt, response).

    `cfg_or_model_dir`: a pipeline config (its finished rm/model is used) or an exported RM folder.
    `prompts`: one prompt for all responses, or one per response. Prompts and responses are text or
    message lists. Plain strings are wrapped as a user turn and an assistant turn when the RM was
    trained on conversational data (`conversational=None` reads it from the rm manifest, falling
    back to whether the tokenizer has a chat template)."""
    import torch

    if isinstance(cfg_or_model_dir, PipelineConfig):
        cfg = cfg_or_model_dir
        state = stage_state(cfg, STAGE) if cfg.rm is not None else None
        if state is None or state.status not in ("done", "stale"):
            why = "no rm section in the config" if state is None else f"{state.status}: {state.reason}"
            raise UserError(f"no trained reward model in {cfg.stage_dir(STAGE)} ({why}); "
                            f"run `rlhf rm --config {cfg.source or 'pipeline.yaml'}` first")
        if state.status == "stale":
            log.warning("the reward model in %s is stale (%s); scoring with it anyway",
                        cfg.stage_dir(STAGE), state.reason)
        model_dir = cfg.stage_dir(STAGE) / "model"
    else:
        model_dir = Path(cfg_or_model_dir)
    responses = list(responses)
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts] * len(responses)
    prompts = list(prompts)
    if len(prompts) != len(responses):
        raise UserError(f"score: {len(prompts)} prompts for {len(responses)} responses; "
                        "give one prompt, or one per response")
    device = "cuda" if torch.cuda.is_available() else None
    # In the dtype it was saved in (model.export_dtype): a 16-bit cast would round part of the adapter off again.
    model, tokenizer = load_reward_model(model_dir, dtype="auto", device=device)
    if conversational is None:
        manifest_conv = ((read_manifest(model_dir.parent) or {}).get("metrics") or {}).get("conversational")
        conversational = bool(tokenizer.chat_template) if manifest_conv is None else bool(manifest_conv)
    seqs = []
    for p, r in zip(prompts, responses):
        if conversational or isinstance(r, list) or isinstance(p, list):
            p, r = _as_messages(p, "user"), _as_messages(r, "assistant")
        seqs.append(encode(tokenizer, p, r))
    return score_sequences(model, tokenizer, seqs, batch_size)


def score_lines(cfg: PipelineConfig, prompt: str, responses: list[str]) -> list[str]:
    """What `rlhf score` prints: one line per response with its raw score and its score minus the
    training mean (the reward PPO sees before the KL penalty)."""
    scores = score(cfg, prompt, responses)
    mean = ((read_manifest(cfg.stage_dir(STAGE)) or {}).get("metrics") or {}).get("score_mean")
    lines = []
    for s, r in zip(scores, responses):
        shown = r if len(r) <= 80 else r[:77] + "..."
        centred = f"  (vs training mean: {s - mean:+.4f})" if isinstance(mean, (int, float)) else ""
        lines.append(f"{s:+.4f}{centred}  {shown}")
    return lines


# ---------------------------------------------------------------------------- trainer hooks


def _pair_logits(logits: Any, labels: Any = None) -> torch.Tensor:
    """preprocess_logits_for_metrics: a batch's (2B, 1) rewards [chosen..., rejected...] -> (B, 2)
    [chosen, rejected] rows, before gathering across processes keeps the pairs together."""
    import torch

    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    chosen, rejected = logits.squeeze(-1).chunk(2)
    return torch.stack([chosen, rejected], dim=1)


def _compute_metrics(eval_pred) -> dict[str, float]:
    preds = eval_pred.predictions
    return {EVAL_PREFIX + k: v for k, v in pairwise_metrics(preds[:, 0].tolist(), preds[:, 1].tolist()).items()}


def _check_head_not_adapted(model) -> None:
    """The score head must be a full trainable copy (modules_to_save), never LoRA-wrapped: PPO reads
    its weight from score_head.safetensors and applies it to the adapted backbone's hidden state."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    head = model.get_base_model().score
    if not isinstance(head, ModulesToSaveWrapper):
        raise UserError("lora.target_modules must not include the reward model's score head ('score'); "
                        "use 'all-linear' or name the backbone's layers (e.g. [q_proj, v_proj])")
    if any(isinstance(m, BaseTunerLayer) for m in head.modules()):
        raise UserError("lora.target_modules matches the reward model's score head ('score'); leave it out")


def write_score_head(adapter_dir: Path) -> Path:
    """Copy the score head out of adapter_model.safetensors into score_head.safetensors ({weight, bias?})."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapter_file = adapter_dir / "adapter_model.safetensors"
    tensors = {}
    with safe_open(str(adapter_file), framework="pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if len(parts) >= 2 and parts[-2] == "score" and parts[-1] in ("weight", "bias"):
                tensors[parts[-1]] = f.get_tensor(key).contiguous()
    if "weight" not in tensors:
        raise RuntimeError(f"{adapter_file} holds no score head (keys ending in score.weight); "
                           "was the head saved as modules_to_save?")
    if tensors["weight"].dim() != 2 or tensors["weight"].shape[0] != 1:
        raise RuntimeError(f"unexpected score head shape {tuple(tensors['weight'].shape)}; expected (1, hidden)")
    out = adapter_dir / SCORE_HEAD_FILE
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "layout": "score = hidden_last @ weight.T (+ bias)"})
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _quiet_head_init():
    """Loading a causal-LM checkpoint as a classifier reports the new score head and the unused
    lm_head; both are expected (TRL's own filter)."""
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    with suppress_seqcls_warning():
        yield


# ---------------------------------------------------------------------------- the stage


def run(cfg: PipelineConfig) -> Path:
    """Train the reward model, export adapter + head + merged model, evaluate; returns rm/model."""
    stage = stage_run(cfg, STAGE)  # an rm section, a finished and current SFT stage

    import torch
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    stage_dir = stage.dir
    sft_model = str(cfg.stage_dir("sft") / "model")
    tokenizer = load_tokenizer(cfg.model, sft_model, need_chat_template=needs_chat_template(cfg.rm.data, cfg.seed))
    data = rm_data(cfg, tokenizer)  # user errors (columns, empty files, nothing left) surface here
    with stage:  # manifest running -> done, or failed on any error (rlhf.runs)
        set_seed(cfg.seed)  # the score head is initialised at random on load
        with _quiet_head_init():
            model = AutoModelForSequenceClassification.from_pretrained(
                sft_model, num_labels=1, **model_kwargs(cfg.model)
            )
        model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last non-pad token
        prepare_for_training(cfg, model)
        kwargs = trainer_kwargs(cfg, STAGE, cfg.rm, has_eval=data.eval is not None)
        # rlhf.data already dropped (and reported) rows over rm.max_length; RewardTrainer's own check
        # counts an appended EOS too and would drop boundary rows silently.
        kwargs["max_length"] = None
        args = RewardConfig(
            **kwargs, center_rewards_coefficient=cfg.rm.center_rewards_coefficient, dataset_num_proc=None
        )
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=data.train_ids, eval_dataset=data.eval_ids, processing_class=tokenizer,
            peft_config=lora_config(cfg.lora, "SEQ_CLS"), callbacks=callbacks(cfg, STAGE),
            compute_metrics=_compute_metrics, preprocess_logits_for_metrics=_pair_logits,
        )
        _check_head_not_adapted(trainer.model)
        criterion = CRITERION[STAGE]
        best_checkpoint.train(trainer, resume_checkpoint(cfg, STAGE), criterion, cfg.rm.early_stopping_patience)
        # The checkpoint of best held-out pair accuracy (the last state without held-out pairs).
        best_checkpoint.export_adapter(trainer, stage_dir / "adapter", criterion)
        metrics = final_metrics(trainer, None)
        selection = best_checkpoint.selection_report(trainer, criterion)
        device = trainer.args.device
        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if stage.is_main:
            write_score_head(stage_dir / "adapter")
            with _quiet_head_init():
                export_merged(cfg, sft_model, stage_dir / "adapter", stage_dir / "model",
                              AutoModelForSequenceClassification, tokenizer, num_labels=1,
                              pad_token_id=tokenizer.pad_token_id)
            metrics.update(_evaluate(cfg, stage_dir, data, device, metrics["global_step"], selection))
            metrics["data"] = data.report
            metrics["conversational"] = data.conversational
            stage.finish(metrics, {
                "model": str(stage_dir / "model"), "adapter": str(stage_dir / "adapter"),
                "score_head": str(stage_dir / "adapter" / SCORE_HEAD_FILE), "eval": str(stage_dir / EVAL_FILE),
            })
    return stage_dir / "model"


# Training pairs scored for the training-set figures and score_mean/score_std. Every pair of a
# 100k-pair set would take hours in float32; 128 pairs put the mean within ~0.06 score_std of the
# full set's (one standard error), enough for PPO's centring, and the train accuracy within ~0.04.
TRAIN_SCORE_PAIRS = 128


def train_sample(pairs, seed: int, k: int = TRAIN_SCORE_PAIRS) -> list:
    """Up to `k` of the training pairs, a seeded random choice in their file order (all when fewer)."""
    import random

    pairs = list(pairs)
    if len(pairs) <= k:
        return pairs
    return [pairs[i] for i in sorted(random.Random(f"rm-train-sample-{seed}").sample(range(len(pairs)), k))]


def _evaluate(cfg: PipelineConfig, stage_dir: Path, data, device, step: int,
              selection: dict[str, Any]) -> dict[str, Any]:
    """Score held-out and training pairs with the exported rm/model (what PPO and users will load);
    write eval.json (with `selection`: the best step and the accuracy curve) and the metrics line;
    return the manifest metrics."""
    # In the dtype it was saved in (model.export_dtype): a 16-bit cast would round part of the adapter off again.
    model, tokenizer = load_reward_model(stage_dir / "model", dtype="auto", device=device)
    batch = max(cfg.rm.batch_size * 2, 8)
    train_c, train_r = score_pairs_with_classifier(model, tokenizer, train_sample(data.train, cfg.seed), batch)
    train = pairwise_metrics(train_c, train_r)
    all_train = train_c + train_r
    norm = {"score_mean": _mean(all_train), "score_std": _std(all_train)}
    held = None
    if data.eval is not None:
        held = pairwise_metrics(*score_pairs_with_classifier(model, tokenizer, data.eval, batch))
    del model
    report = {**(held or {"n_pairs": 0}), **norm, "train": train, "global_step": step,
              "ties_count_as": 0.5, "std": "population (ddof=0)", **selection}
    write_json_atomically(stage_dir / EVAL_FILE, report)
    line = {f"eval_{EVAL_PREFIX}{k}": v for k, v in (held or {}).items()}
    line.update({f"train_{EVAL_PREFIX}{k}": v for k, v in train.items()})
    line.update(norm)
    MetricsWriter(stage_dir / METRICS_FILE).write(step, line)
    if held is not None:
        log.info("RM held-out: accuracy %.3f over %d pairs, margin %.3f",
                 held["accuracy"], held["n_pairs"], held["margin_mean"])
    out = {f"eval_{k}": v for k, v in (held or {}).items()}
    out.update({f"train_{k}": v for k, v in train.items() if k in ("accuracy", "margin_mean", "n_pairs")})
    out.update(norm)
    if selection:
        out["best_step"] = selection["best_step"]
    verdict = gate_verdict(held["accuracy"] if held else None, held["n_pairs"] if held else 0, cfg.rm.min_accuracy)
    if not verdict.passed or not verdict.checked:
        log.warning("%s", verdict.warning(cfg))
    return out
