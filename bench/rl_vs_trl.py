"""Our critic-free stage 3 (ppo.algorithm rloo / grpo) against TRL 1.16's RLOOTrainer and GRPOTrainer.

    .venv/bin/python bench/rl_vs_trl.py --config pipeline.yaml            # after `rlhf sft` and `rlhf rm`
    .venv/bin/python bench/rl_vs_trl.py --config pipeline.yaml --no-activation-checkpointing   # off on both sides
    .venv/bin/python bench/rl_vs_trl.py --config configs/tiny.yaml --steps 1 --prompts 2 --k 2 --response-length 8
    .venv/bin/python bench/rl_vs_trl.py --config pipeline.yaml --algorithms grpo --dtype float32 --skip-ours

Both sides start from the finished SFT and RM stages of the config's run folder: the policy is
`sft/model` plus a fresh LoRA (the config's r, alpha and target modules, dropout 0); the reward is
the *trained* RM: TRL gets `rm/model` as an AutoModelForSequenceClassification in `reward_funcs`
(with `rm/model`'s tokenizer as its reward processing class; conversational prompts, so TRL scores
the chat-template rendering of prompt + completion, as RewardTrainer trained it), ours gets
`rm/adapter` (reward LoRA + score head on the shared base) and the RM's score mean and std.

Same on both sides: the first `steps × prompts` prompts of the config's PPO data (each side sees
each once), `prompts` prompts × `k` completions per optimizer step, one optimizer step per
generation batch, in micro-batches of `--micro-batch` completions (default all of them; TRL:
generation_batch_size = prompts × k, per_device_train_batch_size = the micro-batch, gradient
accumulation over the rest, num_iterations 1; ours: rollout_batch_size = prompts × k responses,
micro_batch_size = the micro-batch, one mini-batch, ppo_epochs 1), response length, temperature
0.7, learning rate with linear decay and no warm-up, clip ε 0.2, β (RLOO 0.05, GRPO 0.04: our defaults, passed to TRL, whose GRPO default is 0), GRPO's loss aggregation and
std scaling (TRL loss_type 'grpo', scale_rewards 'group'; with --dr-grpo 'dr_grpo' and 'none'), no
dropout, activation checkpointing on on both sides by default (TRL's default, `activation_checkpointing`
True; ours: model.gradient_checkpointing, non-reentrant as TRL's) or, with
--no-activation-checkpointing, off on both (our stages' default), no missing-EOS
rule on our side (TRL has none), and the precision: `--dtype bfloat16` loads both bases in
bfloat16 (TRL with bf16 mixed precision; its PEFT LoRA weights are float32, as ours), `float32`
both in float32.

Each side runs in its own fresh process, so each peak resident memory (ru_maxrss) is its own; on
a GPU the peak allocated GPU memory is reported too. Timed: the training loop only
(`trainer.train()` / `run_loop`); loading models and data is outside. Output: one JSON line per
side, then one JSON line of ratios per algorithm, ours divided by TRL's:
`{"algorithm": ..., "completions_per_s_ratio": ..., "peak_rss_ratio": ...}` (above 1 is faster,
below 1 is less memory). The issue's targets: throughput >= 1.5x and peak memory <= 0.5x TRL's.

Our side builds the roles as the PPO stage does for a critic-free algorithm: policy, reference and
reward on the one base, no value adapter and no value head (rlhf.ppo.roles.build_roles(critic=False)).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import last_json  # noqa: E402  (bench/ is not a package)

ALGORITHMS = ("rloo", "grpo")
TEMPERATURE = 0.7
CLIP_EPS = 0.2


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)  # kB on Linux


def peak_gpu_gb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else None


def die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_dirs(a) -> dict:
    """The config and the finished SFT and RM outputs of its run folder; one error line names what is missing."""
    from rlhf.config import load_config
    from rlhf.errors import UserError

    try:
        cfg = load_config(a.config, a.set)
    except UserError as e:
        die(str(e))
    if cfg.ppo is None or cfg.rm is None:
        die(f"{a.config} needs rm and ppo sections (the prompts are ppo.data)")
    sft_model, rm_dir = cfg.stage_dir("sft") / "model", cfg.stage_dir("rm")
    for path, stage in ((sft_model / "config.json", "sft"), (rm_dir / "model" / "config.json", "rm"),
                        (rm_dir / "adapter" / "adapter_config.json", "rm"), (rm_dir / "manifest.json", "rm")):
        if not path.is_file():
            die(f"{path} is missing; train the stages first: rlhf {stage} --config {a.config}")
    metrics = json.loads((rm_dir / "manifest.json").read_text()).get("metrics") or {}
    if not all(isinstance(metrics.get(k), (int, float)) for k in ("score_mean", "score_std")):
        die(f"{rm_dir / 'manifest.json'} has no score_mean/score_std; rerun the RM stage: rlhf rm --config {a.config}")
    return {"cfg": cfg, "sft_model": sft_model, "rm_model": rm_dir / "model", "rm_adapter": rm_dir / "adapter",
            "rm_mean": float(metrics["score_mean"]), "rm_std": float(metrics["score_std"])}


def bench_prompts(cfg, tokenizer, n: int) -> list:
    """The first n prompts of the config's PPO data (text or message lists), after its length filter."""
    from rlhf.data import ppo_data

    prompts = list(ppo_data(cfg, tokenizer).train["prompt"])
    if len(prompts) < n:
        die(f"the PPO data has {len(prompts)} usable prompts; the benchmark needs {n} (steps × prompts)")
    return prompts[:n]


def beta_of(a) -> float:
    from rlhf.config import ALGORITHM_DEFAULTS

    return a.beta if a.beta is not None else ALGORITHM_DEFAULTS[a.algorithm]["kl_coef"]


def run_trl(a) -> dict:
    """TRL 1.16's RLOOTrainer or GRPOTrainer on the same model folder, reward model and prompts."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.models import load_tokenizer

    d = run_dirs(a)
    cfg = d["cfg"]
    dtype = getattr(torch, a.dtype)
    tokenizer = load_tokenizer(cfg.model, str(d["sft_model"]))
    prompts = bench_prompts(cfg, tokenizer, a.steps * a.prompts)
    policy = AutoModelForCausalLM.from_pretrained(str(d["sft_model"]), dtype=dtype, use_safetensors=True)
    reward = AutoModelForSequenceClassification.from_pretrained(str(d["rm_model"]), dtype=dtype, num_labels=1,
                                                                use_safetensors=True)
    reward_tokenizer = AutoTokenizer.from_pretrained(str(d["rm_model"]))
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="rl-bench-trl-"), max_steps=a.steps, per_device_train_batch_size=micro_batch(a),
        # one generation of prompts × k completions per optimizer step, in micro-batches of micro_batch(a)
        gradient_accumulation_steps=a.prompts * a.k // micro_batch(a), generation_batch_size=a.prompts * a.k,
        num_generations=a.k, max_completion_length=a.response_length,
        temperature=TEMPERATURE, learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0, beta=beta_of(a),
        num_iterations=1, epsilon=CLIP_EPS, shuffle_dataset=False, disable_dropout=True,
        activation_checkpointing=a.activation_checkpointing,  # TRL's default True; the same on our side
        bf16=a.dtype == "bfloat16", use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to="none", seed=0,
        dataloader_num_workers=0, log_completions=False,
    )
    if a.algorithm == "rloo":
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer

        args = Config(**common, normalize_advantages=False)
    else:
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer

        args = Config(**common, loss_type="dr_grpo" if a.dr_grpo else "grpo", scale_rewards="none" if a.dr_grpo else "group")
    trainer = Trainer(model=policy, reward_funcs=reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                      processing_class=tokenizer, reward_processing_classes=reward_tokenizer, peft_config=lora)
    t = time.perf_counter()
    trainer.train()
    dt = time.perf_counter() - t
    return side_result("trl-1.16-" + Trainer.__name__, a, dtype, dt)


def run_ours(a) -> dict:
    """Our stage-3 loop (rlhf.ppo.trainer.run_loop, as bench/ppo_vs_trl.py calls it) with ppo.algorithm set,
    on roles without a critic (no value adapter, no value head), as the PPO stage builds them."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.config import LoraSection, PPOConfig
    from rlhf.data import render
    from rlhf.models import load_tokenizer, lora_config, model_kwargs, no_grad_attn_implementation, turn_end_suffix
    from rlhf.ppo import trainer as loop
    from rlhf.ppo.roles import build_roles
    from rlhf.tracking import MetricsWriter

    d = run_dirs(a)
    cfg = d["cfg"]
    tokenizer = load_tokenizer(cfg.model, str(d["sft_model"]))
    tokenizer.padding_side = "left"
    prompts = bench_prompts(cfg, tokenizer, a.steps * a.prompts)
    texts = [render(tokenizer, p) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rm_mean, rm_std = d["rm_mean"], d["rm_std"]
    tmp = Path(tempfile.mkdtemp(prefix="rl-bench-ours-"))
    model_cfg = cfg.model.model_copy(update={"dtype": a.dtype, "gradient_checkpointing": a.activation_checkpointing})
    loop.seed_everything(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(str(d["sft_model"]), **model_kwargs(model_cfg)).to(device)
    lora = LoraSection(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=0.0, target_modules=cfg.lora.target_modules)
    roles = build_roles(base, lora_config(lora, "CAUSAL_LM"), d["rm_adapter"], score_mean=rm_mean, critic=False,
                        no_grad_attn=no_grad_attn_implementation(model_cfg),
                        activation_checkpointing=model_cfg.gradient_checkpointing)  # as the stage builds them
    assert roles.value_head is None and "value" not in roles.model.peft_config  # the memory a critic would take
    extra = {"dr_grpo": True} if a.algorithm == "grpo" and a.dr_grpo else {}
    # rollout_batch_size counts responses: a.prompts prompts × a.k samples, TRL's per-device batch
    ppo = PPOConfig(data={"path": "unused.jsonl"}, algorithm=a.algorithm, steps=a.steps,
                    rollout_batch_size=a.prompts * a.k, samples_per_prompt=a.k, micro_batch_size=micro_batch(a), num_mini_batches=1, ppo_epochs=1,
                    response_length=a.response_length, learning_rate=a.lr, temperature=TEMPERATURE, clip_eps=CLIP_EPS,
                    kl_coef=beta_of(a), missing_eos_score=None, save_every=10**6, sample_every=10**6, **extra)
    t = time.perf_counter()
    loop.run_loop(roles, tokenizer, ids, texts, ppo, seed=0, rm_mean=rm_mean, rm_std=rm_std, ckpt_root=tmp / "ckpt",
                  config_hash="bench", metrics_writer=MetricsWriter(tmp / "metrics.jsonl", enabled=False),
                  samples_path=tmp / "samples.jsonl", resume=False,
                  score_suffix=turn_end_suffix(tokenizer) if isinstance(prompts[0], list) else [])
    dt = time.perf_counter() - t
    return side_result("rlhf", a, getattr(torch, a.dtype), dt)


def micro_batch(a) -> int:
    """Completions per forward/backward pass, the same on both sides (default: all of a step's)."""
    return a.micro_batch or a.prompts * a.k


def side_result(impl: str, a, dtype, seconds: float) -> dict:
    completions = a.steps * a.prompts * a.k
    return {"impl": impl, "algorithm": a.algorithm + ("-dr" if a.algorithm == "grpo" and a.dr_grpo else ""),
            "dtype": str(dtype), "steps": a.steps, "prompts_per_step": a.prompts, "k": a.k,
            "response_length": a.response_length, "micro_batch": micro_batch(a),
            "activation_checkpointing": a.activation_checkpointing, "completions": completions, "train_s": round(seconds, 3),
            "completions_per_s": round(completions / seconds, 4), "peak_rss_gb": peak_rss_gb(),
            "peak_gpu_gb": peak_gpu_gb()}


def child_command(a, side: str, algorithm: str) -> list[str]:
    cmd = [sys.executable, __file__, "--side", side, "--algorithm", algorithm, "--config", a.config,
           "--steps", str(a.steps), "--prompts", str(a.prompts), "--k", str(a.k), "--response-length", str(a.response_length),
           "--lr", str(a.lr), "--dtype", a.dtype, "--micro-batch", str(micro_batch(a))]
    cmd += [f"--set={s}" for s in a.set] + (["--dr-grpo"] if a.dr_grpo else [])
    cmd += ["--activation-checkpointing" if a.activation_checkpointing else "--no-activation-checkpointing"]
    return cmd + (["--beta", str(a.beta)] if a.beta is not None else [])


def run_side(a, side: str, algorithm: str) -> dict:
    """One side in a fresh process; its JSON line, or {"error": ...} when it failed."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    proc = subprocess.run(child_command(a, side, algorithm), capture_output=True, text=True, env=env)
    try:
        return last_json(proc.stdout)
    except RuntimeError:
        return {"impl": side, "algorithm": algorithm, "error": f"exit status {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-1500:]}"}


def ratios(algorithm: str, ours: dict | None, trl: dict | None) -> dict:
    out: dict = {"algorithm": algorithm}
    if ours is None or trl is None or "error" in ours or "error" in trl:
        for name, side in (("ours", ours), ("trl", trl)):
            if side is not None and "error" in side:
                out[f"{name}_error"] = side["error"]
        return out
    out["completions_per_s_ratio"] = round(ours["completions_per_s"] / trl["completions_per_s"], 3)
    out["peak_rss_ratio"] = round(ours["peak_rss_gb"] / trl["peak_rss_gb"], 3)
    if ours.get("peak_gpu_gb") and trl.get("peak_gpu_gb"):
        out["peak_gpu_ratio"] = round(ours["peak_gpu_gb"] / trl["peak_gpu_gb"], 3)
    out.update({"ours_completions_per_s": ours["completions_per_s"], "trl_completions_per_s": trl["completions_per_s"],
                "ours_peak_rss_gb": ours["peak_rss_gb"], "trl_peak_rss_gb": trl["peak_rss_gb"]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="pipeline.yaml", help="pipeline config whose run folder holds finished sft and rm stages")
    ap.add_argument("--set", action="append", default=[], help="config override, as for rlhf (repeatable)")
    ap.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (one generation batch each)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--k", type=int, default=4, help="completions per prompt")
    ap.add_argument("--response-length", type=int, default=48)
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="completions per forward/backward on both sides, a divisor of prompts × k (default: all of them)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=None, help="KL coefficient (default: ours, RLOO 0.05, GRPO 0.04)")
    ap.add_argument("--dr-grpo", action="store_true", help="GRPO as Dr. GRPO on both sides")
    ap.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="activation checkpointing on both sides (default on: TRL's default; ours: model.gradient_checkpointing)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="both bases' dtype (bf16 where the hardware has it, float32 otherwise)")
    ap.add_argument("--skip-ours", action="store_true", help="run TRL's side only")
    ap.add_argument("--skip-trl", action="store_true", help="run our side only")
    ap.add_argument("--side", choices=["trl", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", choices=ALGORITHMS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.k < 2:
        ap.error("--k must be at least 2 (RLOO and GRPO compare a prompt's completions)")
    if a.micro_batch is not None and (a.micro_batch < 1 or (a.prompts * a.k) % a.micro_batch):
        ap.error(f"--micro-batch must divide prompts × k = {a.prompts * a.k}")
    if a.side:  # a child: one side, one JSON line
        print(json.dumps(run_trl(a) if a.side == "trl" else run_ours(a)))
        return 0
    run_dirs(a)  # fail here, once, when the stages are missing
    failed = False
    for algorithm in a.algorithms:
        sides = {}
        for side in ("ours", "trl"):
            if (side == "ours" and a.skip_ours) or (side == "trl" and a.skip_trl):
                continue
            sides[side] = run_side(a, side, algorithm)
            failed |= "error" in sides[side]
            print(json.dumps(sides[side]), flush=True)
        print(json.dumps(ratios(algorithm, sides.get("ours"), sides.get("trl"))), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
