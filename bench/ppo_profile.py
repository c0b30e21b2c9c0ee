"""A roofline table for one PPO step: for each phase, its work, its time and how close it runs to
what this machine can do.

    .venv/bin/python bench/ppo_profile.py [--model-dir DIR] [--dtype auto|bfloat16|float32]
                                          [--batch 8] [--response-length 48] [--repeats 3] [--compile-layers]

Same set-up as bench/ppo_vs_trl.py (model folder, prompts, batch, response length, LoRA r=16
alpha=32 all-linear, an untrained reward adapter on the same base). The phases are the calls the
PPO loop makes, timed one by one (best of --repeats, after one warm-up call):

- generation: `rlhf.sampling.generate` (the policy folded into scratch weights, KV cache);
- the four rollout passes (no gradients): policy and reference log-probs, value, reward;
- the policy update: one micro-batch's forward, loss and backward (`rollout.response_logprobs`,
  `losses.policy_loss`), and the value update likewise (`rollout.token_values`, `losses.value_loss`);
- the optimizer step;
- decoding's matrix products alone: the model's weights times a (batch, in) input, once per new
  token, with nothing else; once with the weights as they are and once reordered into oneDNN's
  packed layout (bfloat16 only): the floor the matmul library sets for the generation row;
- with --compile-layers, the two updates again with `torch.compile` on every decoder layer (the
  candidate the eager rows point at), and the compile's cost (the first call after it).

Work. FLOPs are counted from the model's shapes and the token counts, not measured:
2 x (multiply-adds) for every linear layer (base and the active LoRA adapter), the attention score
and value products (2 x 2 x T^2 x hidden per layer and sequence, the full square an eager or SDPA
kernel computes), and the LM head on the positions whose logits are used. The base is frozen, so a
backward pass computes input gradients only (1x the forward's linear FLOPs), attention gradients
(2x) and the LoRA weight gradients (2x the LoRA forward). Decoding's bound is memory, not compute:
each new token reads every weight once (plus the KV cache so far), so its roofline is those bytes
over the measured bandwidth.

Peaks, measured here in the same process and thread count: the matmul rate is the best of
`F.linear` on the model's own linear shapes at the pass's token count, in the base's dtype; the
bandwidth is a sum over a buffer far larger than the caches. "% of peak" is achieved / peak.

Prints the table and one JSON line with every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import prompts, untrained_reward_adapter  # noqa: E402  (the bench's own set-up)


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def body_linears(model) -> list:
    """Every frozen base Linear of the transformer body, in order: LoRA's and the LM head excluded."""
    import torch

    return [mod for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and "lora_" not in name and "lm_head" not in name]


def linear_shapes(model) -> list[tuple[int, int]]:
    """(in_features, out_features) of body_linears."""
    return [(mod.in_features, mod.out_features) for mod in body_linears(model)]


def peak_matmul(shapes: set[tuple[int, int]], tokens: int, dtype, repeats: int) -> float:
    """The best FLOP/s of F.linear(x (tokens, in), W (out, in)) over the given shapes."""
    import torch
    import torch.nn.functional as F

    best = 0.0
    for fan_in, fan_out in shapes:
        x = torch.randn(tokens, fan_in, dtype=dtype)
        w = torch.randn(fan_out, fan_in, dtype=dtype)
        dt = best_time(lambda: F.linear(x, w), max(repeats, 5))
        best = max(best, 2 * tokens * fan_in * fan_out / dt)
    return best


def decoding_matmuls(model, batch: int, repeats: int, packed: bool = False) -> tuple[float, int] | None:
    """Seconds and bytes of one decoding step's matrix products alone: every base weight of the
    model (its linear layers in order, then the LM head) times a (batch, in_features) input, as a
    decoder step multiplies them, nothing else (no attention, no elementwise work, no sampling).
    The weights (hundreds of MB) do not fit in the caches, so each step reads them from memory as
    decoding does: this is what the matmul library achieves at the decoding shape on this machine.

    packed: the same products on weights packed as sampling packs them
    (`rlhf.sampling.packed_linear_weights`: oneDNN's blocked layout); None where sampling would not
    pack (not bfloat16, or no oneDNN with native bfloat16)."""
    import torch
    import torch.nn.functional as F

    from rlhf.sampling import onednn_bf16_linear, packed_linear, packed_weight

    weights = [mod.weight.detach() for mod in body_linears(model)]
    weights.append(model.get_output_embeddings().weight.detach())
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    inputs = [torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights]
    linear = F.linear
    if packed:
        if weights[0].dtype != torch.bfloat16 or not onednn_bf16_linear():
            return None
        weights, linear = [packed_weight(w, batch) for w in weights], packed_linear

    def step():
        with torch.no_grad():
            for x, w in zip(inputs, weights):
                linear(x, w)

    return best_time(step, max(repeats, 5)), nbytes


def bandwidth(repeats: int) -> float:
    """Bytes per second read by a reduction over a 1 GiB buffer."""
    import torch

    buf = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
    dt = best_time(lambda: buf.sum(), max(repeats, 5))
    return buf.numel() * buf.element_size() / dt


def forward_flops(dims: dict, batch: int, seq: int, logit_positions: int, lora_r: int, with_lora: bool) -> dict:
    """FLOPs of one forward pass of `batch` sequences of `seq` tokens, split into parts."""
    linear = 2 * batch * seq * dims["linear_macs"]
    lora = 2 * batch * seq * lora_r * dims["lora_fan_sum"] if with_lora else 0
    attention = dims["layers"] * 2 * 2 * batch * seq * seq * dims["hidden"]
    head = 2 * batch * logit_positions * dims["hidden"] * dims["vocab"]
    return {"linear": linear, "lora": lora, "attention": attention, "head": head}


def model_dims(model, lora_r: int) -> dict:
    cfg = model.config.get_text_config()
    shapes = linear_shapes(model)
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
            "linear_macs": sum(i * o for i, o in shapes), "lora_fan_sum": sum(i + o for i, o in shapes),
            "shapes": sorted(set(shapes)), "weight_params": sum(i * o for i, o in shapes) + cfg.hidden_size * cfg.vocab_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="local model folder (default: the converted embedded SmolLM2)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--response-length", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default=None, help="attn_implementation (model.attn_implementation; default: ours)")
    ap.add_argument("--compile-layers", action="store_true",
                    help="also time the two updates with torch.compile on every decoder layer (compile_s: the first call)")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.config import LoraSection, ModelConfig
    from rlhf.models import lora_config, model_kwargs, no_grad_attn_implementation, resolve_model, torch_dtype
    from rlhf.ppo.losses import policy_loss, value_loss
    from rlhf.ppo.distributed import seed_everything
    from rlhf.ppo.roles import build_roles
    from rlhf.ppo.rollout import response_logprobs, token_values
    from rlhf.sampling import generate, left_pad, sequence_scores

    model_dir = a.model_dir or resolve_model(ModelConfig(name_or_path="embedded:smollm2-135m-instruct"))
    dtype = torch_dtype(ModelConfig(dtype=a.dtype))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _, ids = prompts(tok, a.batch)
    seed_everything(0)
    adapter = untrained_reward_adapter(model_dir, Path(tempfile.mkdtemp(prefix="ppo-profile-rm-")), 16, 32)
    model_cfg = ModelConfig(name_or_path=str(model_dir), dtype=a.dtype, attn_implementation=a.attn)
    base = AutoModelForCausalLM.from_pretrained(model_dir, **model_kwargs(model_cfg))
    dims = model_dims(base, 16)
    roles = build_roles(base, lora_config(LoraSection(r=16, alpha=32, dropout=0.0), "CAUSAL_LM"), adapter,
                        no_grad_attn=no_grad_attn_implementation(model_cfg))  # sampling's kernel, as the loop's
    q, qm = left_pad(ids, tok.pad_token_id)
    B, P, R = a.batch, q.shape[1], a.response_length
    T = P + R

    # Generation: no stop token, so every response is exactly R tokens (the work is fixed).
    gen = {}

    def run_generation():
        with roles.no_grad_attention():  # as rlhf.sampling.sample_and_score
            gen["tokens"] = generate(roles, q, qm, R, 0.7, None, tok.pad_token_id)

    rows = []
    t_gen = best_time(run_generation, a.repeats)
    input_ids = torch.cat([q, gen["tokens"]], dim=1)
    mask = torch.cat([qm, torch.ones_like(gen["tokens"], dtype=torch.bool)], dim=1).long()
    response = gen["tokens"]
    elem = torch.finfo(dtype).bits // 8
    prefill = forward_flops(dims, B, P, 1, 16, False)
    decode_flops = sum(sum(forward_flops(dims, B, 1, 1, 16, False).values()) for _ in range(R - 1))
    kv_bytes = sum(2 * dims["layers"] * B * (P + t) * dims["hidden"] * elem for t in range(R - 1))  # upper bound (GQA reads less)
    decode_bytes = (R - 1) * dims["weight_params"] * elem + kv_bytes
    rows.append({"phase": "generation", "s": t_gen, "flops": sum(prefill.values()) + decode_flops, "bytes": decode_bytes,
                 "tokens": B * R})
    # What the matmul library itself reaches at decoding's shape: the generation row's floor on this machine.
    # (The base weights, of the shapes and dtype of the scratch weights generation folds the policy into.)
    for packed in (False, True):
        measured = decoding_matmuls(roles.model.get_base_model(), B, a.repeats, packed)
        if measured:
            t_step, step_bytes = measured
            rows.append({"phase": f"decoding's matmuls alone ({R - 1} steps of batch {B}"
                                  + (", oneDNN-packed weights)" if packed else ")"), "s": (R - 1) * t_step,
                         "flops": (R - 1) * 2 * B * (dims["linear_macs"] + dims["hidden"] * dims["vocab"]),
                         "bytes": (R - 1) * step_bytes, "tokens": B * (R - 1)})

    with torch.no_grad():
        passes = {
            "rollout: policy log-probs": lambda: response_logprobs(roles, input_ids, mask, response, 0.7, "policy"),
            "rollout: reference log-probs": lambda: response_logprobs(roles, input_ids, mask, response, 0.7, None),
            "rollout: value": lambda: token_values(roles, input_ids, mask, R),
            "rollout: reward": lambda: sequence_scores(roles, input_ids, mask),
        }
        for name, fn in passes.items():
            logits = R + 1 if "log-probs" in name else 0
            f = forward_flops(dims, B, T, logits, 16, "reference" not in name)
            rows.append({"phase": name, "s": best_time(fn, a.repeats), "flops": sum(f.values()), "tokens": B * T})
        old_logprobs, _, _ = response_logprobs(roles, input_ids, mask, response, 0.7, "policy")
        old_values = token_values(roles, input_ids, mask, R)
    rmask = torch.ones_like(response, dtype=torch.bool)
    adv = torch.randn(B, R)
    returns = torch.randn(B, R)

    def policy_step():
        with roles.training_pass("policy"):  # as the loop's updates (rlhf.recompute's kernels)
            logprobs, _, _ = response_logprobs(roles, input_ids, mask, response, 0.7, "policy")
            loss, _ = policy_loss(logprobs, old_logprobs, adv, rmask, 0.2)
            loss.backward()

    def value_step():
        with roles.training_pass("value"):
            values = token_values(roles, input_ids, mask, R)
            loss, _ = value_loss(values, old_values, returns, rmask, 0.2)
            loss.backward()

    updates = (("update: policy (fwd + bwd)", policy_step, R + 1), ("update: value (fwd + bwd)", value_step, 0))
    for name, fn, logits in updates:
        f = forward_flops(dims, B, T, logits, 16, True)
        flops = 2 * f["linear"] + 3 * f["lora"] + 3 * f["attention"] + 2 * f["head"]
        rows.append({"phase": name, "s": best_time(fn, a.repeats), "flops": flops, "tokens": B * T})
    if a.compile_layers:
        # model.compile: a compiler fusing each decoder layer's elementwise chains (RMSNorm, rotary,
        # SiLU·up, LoRA's scale-and-add, casts), in the updates only, as the stage runs them. Every layer
        # runs the same code, so one compilation serves all of them; its cost is the first call's.
        from rlhf.compile_layers import compile_layer_forwards

        roles.compiled = compile_layer_forwards(roles.model)
        for name, fn, _ in updates:
            t0 = time.perf_counter()
            fn()
            compiled = {**next(r for r in rows if r["phase"] == name), "phase": name + ", compiled layers"}
            compiled.update(s=best_time(fn, a.repeats), compile_s=round(time.perf_counter() - t0, 1))
            rows.append(compiled)
    params = roles.policy_parameters() + roles.value_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5)
    rows.append({"phase": "optimizer step", "s": best_time(opt.step, a.repeats), "flops": 0, "tokens": 0})

    peak = peak_matmul(set(dims["shapes"]), B * T, dtype, a.repeats)
    bw = bandwidth(a.repeats)
    print(f"{B} prompts x {P} prompt tokens + {R} response tokens, base {str(dtype).replace('torch.', '')}, "
          f"attention {base.config._attn_implementation}, "
          f"{torch.get_num_threads()} threads; peak matmul {peak / 1e9:.0f} GFLOP/s, bandwidth {bw / 1e9:.1f} GB/s",
          file=sys.stderr)
    print("| phase | time s | GFLOP | GFLOP/s | % of peak matmul | GB read | % of bandwidth bound |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for row in rows:
        rate = row["flops"] / row["s"] if row["s"] else 0.0
        row["gflop"] = round(row["flops"] / 1e9, 2)
        row["gflop_per_s"] = round(rate / 1e9, 1)
        row["pct_peak_matmul"] = round(100 * rate / peak, 1)
        bw_cell = ""
        if "bytes" in row:
            row["gb_read"] = round(row["bytes"] / 1e9, 2)
            row["pct_bandwidth_bound"] = round(100 * (row["bytes"] / bw) / row["s"], 1)
            bw_cell = f"{row['gb_read']} | {row['pct_bandwidth_bound']}"
        else:
            bw_cell = " | "
        row["s"] = round(row["s"], 3)
        compile_note = f" (compile and first call {row['compile_s']} s)" if "compile_s" in row else ""
        print(f"| {row['phase']}{compile_note} | {row['s']} | {row['gflop']} | {row['gflop_per_s']} | "
              f"{row['pct_peak_matmul']} | {bw_cell} |", file=sys.stderr)
    print(json.dumps({"dtype": str(dtype), "attn_implementation": base.config._attn_implementation, "batch": B, "prompt_tokens": P, "response_length": R,
                      "threads": torch.get_num_threads(), "peak_matmul_gflop_per_s": round(peak / 1e9, 1),
                      "bandwidth_gb_per_s": round(bw / 1e9, 2),
                      "rows": rows}))


if __name__ == "__main__":
    main()
