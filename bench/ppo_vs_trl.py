"""Our PPO against TRL 1.12's PPOTrainer (the last TRL with PPO), same model, prompts and settings.

    .venv/bin/python bench/ppo_vs_trl.py [--model-dir DIR] [--steps 3] [--ppo-epochs 4]

Both sides run in their own fresh process (so each peak resident memory is its own): the
baseline is ../shared/bench/trl112_ppo_baseline.py in the venv that ../shared/bench/baseline_env.sh
makes; ours is this file with --ours. Same local model folder (default: the converted embedded
SmolLM2), batch 8, response length 48, PPO epochs 4, LoRA r=16 alpha=32 all-linear, lr 1e-5,
temperature 0.7, the same short chat prompts, and an untrained reward head on the same base on
both sides (the baseline's recipe). Timed: the training loop only (the baseline times
`trainer.train()`; ours times `run_loop`), so model loading is outside both. Prints both JSON
lines and ends with one line of ratios, ours divided by the baseline's.

Precision, like for like: `--dtype` sets both sides (the baseline's script loads its three models in
that dtype and sets PPOConfig(bf16=...); our frozen shared base is loaded in it, while our LoRA
weights, heads, logits and log-probs stay float32, as peft keeps the baseline's LoRA weights).
Default auto: bfloat16 where the hardware multiplies it natively, float32 otherwise; `--dtype both`
prints one comparison in each precision. Ours runs with our defaults (model_kwargs: eager
attention on a CPU) and under the C allocator setting the `rlhf` command runs under
(rlhf.allocator: glibc's tcache off); the baseline with TRL's defaults, in the environment this
script was started in. `--baseline-allocator` runs the baseline under our allocator setting too,
which separates what that setting gives from the rest.
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

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "bench"

from phase_times import PHASES, after_first_step, instrument_ours, per_step  # noqa: E402  (bench/, beside this script)


def prompts(tok, n: int) -> list[list[int]]:
    """The baseline script's prompts, token for token."""
    texts = [tok.apply_chat_template([{"role": "user", "content": f"Write one sentence about topic number {i}."}],
                                     add_generation_prompt=True, tokenize=False) for i in range(n)]
    return texts, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def untrained_reward_adapter(model_dir: str, out: Path, r: int, alpha: int) -> Path:
    """A reward adapter equivalent to the baseline's untrained reward model: LoRA with B = 0 (so the
    body is the base) and a freshly initialised score head, in the RM stage's layout."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    from rlhf.rm import SCORE_HEAD_FILE

    torch.manual_seed(0)
    seq = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    peft_model = get_peft_model(seq, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type="SEQ_CLS"))
    peft_model.save_pretrained(out)
    save_file({"weight": seq.score.weight.detach().clone().contiguous()}, str(out / SCORE_HEAD_FILE))
    return out


def run_ours(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.config import LoraSection, ModelConfig, PPOConfig
    from rlhf.models import lora_config, model_kwargs, no_grad_attn_implementation, torch_dtype
    from rlhf.ppo.roles import build_roles
    from rlhf.ppo.distributed import seed_everything
    from rlhf.ppo.trainer import run_loop
    from rlhf.tracking import MetricsWriter

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts, ids = prompts(tok, a.batch * (a.steps + 1))
    tmp = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    adapter = Path(a.adapter)
    seed_everything(0)
    model_cfg = ModelConfig(name_or_path=str(a.model_dir), dtype=a.dtype)
    dtype = torch_dtype(model_cfg)
    base = AutoModelForCausalLM.from_pretrained(a.model_dir, **model_kwargs(model_cfg))  # our defaults, attention included
    roles = build_roles(base, lora_config(LoraSection(r=16, alpha=32, dropout=0.0), "CAUSAL_LM"), adapter,
                        value_on_policy=a.value_on_policy, no_grad_attn=no_grad_attn_implementation(model_cfg),
                        activation_checkpointing=a.activation_checkpointing, compile_layers=a.compile)
    ppo = PPOConfig(data={"path": "unused.jsonl"}, steps=a.steps, rollout_batch_size=a.batch, micro_batch_size=a.batch,
                    num_mini_batches=1, ppo_epochs=a.ppo_epochs, response_length=a.response_length, learning_rate=1e-5,
                    temperature=0.7, missing_eos_score=None, missing_eos_penalty=1.0, save_every=10**6,
                    sample_every=10**6, value_head_on_policy=a.value_on_policy)
    instrument_ours()
    t = time.perf_counter()
    run_loop(roles, tok, ids, texts, ppo, seed=0, rm_mean=0.0, ckpt_root=tmp / "ckpt", config_hash="bench",
             metrics_writer=MetricsWriter(tmp / "metrics.jsonl", enabled=False), samples_path=tmp / "samples.jsonl",
             resume=False)
    end = time.perf_counter()
    dt = end - t
    del torch
    return {"impl": "rlhf" + ("-value-on-policy" if a.value_on_policy else ""),
            "activation_checkpointing": a.activation_checkpointing, "compile": a.compile, "dtype": str(dtype).replace("torch.", ""),
            "attn_implementation": base.config._attn_implementation, "batch": a.batch,
            "response_length": a.response_length, "ppo_epochs": a.ppo_epochs, "steps": a.steps,
            "s_per_step": round(dt / a.steps, 3), "s_per_step_after_first": after_first_step(end), "episodes_per_s": round(a.batch * a.steps / dt, 4),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
            "phases_s_per_step": per_step(PHASES, dt, a.steps)}


def last_json(output: str, key: str = "impl") -> dict:
    """The last JSON line of `output` that holds `key`."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{") and key in (result := json.loads(line)):
            return result
    raise RuntimeError(f"no JSON result in:\n{output[-2000:]}")


def compare(a, dtype: str, env: dict, adapter: Path, common: list[str]) -> dict:
    """One like-for-like pair in `dtype`: ours, then the baseline, each in a fresh process."""
    ours_cmd = [sys.executable, __file__, "--ours", "--model-dir", a.model_dir, "--adapter", str(adapter), *common]
    ours_cmd += ["--dtype", dtype] + (["--value-on-policy"] if a.value_on_policy else [])
    ours_cmd += ["--activation-checkpointing"] if a.activation_checkpointing else []
    ours_cmd += ["--compile"] if a.compile else []
    from rlhf.allocator import glibc_version, tuned_environment

    tuned = tuned_environment(env, glibc_version()) or env  # what `rlhf` would run under
    ours = last_json(subprocess.run(ours_cmd, capture_output=True, text=True, env=tuned, check=True).stdout)
    print(json.dumps(ours), flush=True)
    if a.skip_baseline:
        return {}
    py = subprocess.run(["bash", str(SHARED / "baseline_env.sh")], capture_output=True, text=True, check=True).stdout.strip()
    # The baseline script runs unchanged, under bench/phase_times.py's wrappers (its phases' wall times).
    base_cmd = [py, str(Path(__file__).with_name("phase_times.py")), str(SHARED / "trl112_ppo_baseline.py"),
                a.model_dir, *common, "--dtype", dtype]
    out = subprocess.run(base_cmd, capture_output=True, text=True, env=tuned if a.baseline_allocator else env, check=True).stdout
    base, timing = last_json(out), last_json(out, "phases_s")
    phases = timing["phases_s"]
    base["s_per_step_after_first"] = timing["s_per_step_after_first"]
    base["phases_s_per_step"] = per_step(phases, phases["total"], a.steps)
    print(json.dumps(base), flush=True)
    return {"dtype": dtype, "baseline_allocator": "ours" if a.baseline_allocator else "default",
            "ours_glibc_tunables": tuned.get("GLIBC_TUNABLES"), "throughput_ratio": round(ours["episodes_per_s"] / base["episodes_per_s"], 3),
            "peak_memory_ratio": round(ours["peak_rss_gb"] / base["peak_rss_gb"], 3),
            # Steps after the first: without compilation (--compile) and first-call warm-up, what a long run sees.
            "throughput_ratio_after_first_step": (round(base["s_per_step_after_first"] / ours["s_per_step_after_first"], 3)
                                                  if ours["s_per_step_after_first"] and base["s_per_step_after_first"] else None),
            "ours_s_per_step": ours["s_per_step"], "baseline_s_per_step": base["s_per_step"],
            "ours_peak_rss_gb": ours["peak_rss_gb"], "baseline_peak_rss_gb": base["peak_rss_gb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="local model folder (default: the converted embedded SmolLM2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--response-length", type=int, default=48)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--value-on-policy", action="store_true", help="also allowed: our cheaper opt-in variant")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "both"],
                    help="the precision of both sides (auto = bfloat16 where the hardware multiplies it natively, "
                         "float32 otherwise; both = one comparison in each). Our LoRA weights, heads and log-probs "
                         "stay float32, as peft keeps the baseline's LoRA weights")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="ours with model.gradient_checkpointing (TRL 1.12's PPOConfig defaults it to on, but its "
                         "PPOTrainer never enables it, so the baseline runs without)")
    ap.add_argument("--compile", action="store_true",
                    help="ours with model.compile (compiled decoder layers in the updates; the compilation counts in "
                         "the first step, so compare throughput_ratio_after_first_step)")
    ap.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--skip-baseline", action="store_true", help="measure ours only")
    ap.add_argument("--baseline-allocator", action="store_true",
                    help="run the baseline under our C allocator setting too (rlhf.allocator), not its default")
    a = ap.parse_args()
    if a.model_dir is None:
        from rlhf.config import ModelConfig
        from rlhf.models import resolve_model

        a.model_dir = resolve_model(ModelConfig(name_or_path="embedded:smollm2-135m-instruct"))
    if a.ours:
        print(json.dumps(run_ours(a)))
        return
    if a.dtype == "auto":
        from rlhf.config import ModelConfig
        from rlhf.models import torch_dtype

        dtypes = [str(torch_dtype(ModelConfig(dtype="auto"))).replace("torch.", "")]
    else:
        dtypes = ["bfloat16", "float32"] if a.dtype == "both" else [a.dtype]
    common = ["--batch", str(a.batch), "--response-length", str(a.response_length), "--ppo-epochs", str(a.ppo_epochs),
              "--steps", str(a.steps)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    # The reward adapter is made here, so the SeqCls model it needs never counts in our peak memory.
    adapter = untrained_reward_adapter(a.model_dir, Path(tempfile.mkdtemp(prefix="ppo-bench-rm-")), 16, 32)
    for dtype in dtypes:
        ratios = compare(a, dtype, env, adapter, common)
        if ratios:
            print(json.dumps(ratios), flush=True)


if __name__ == "__main__":
    main()
