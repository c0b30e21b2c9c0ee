"""Training passes that keep fewer activations: cheap tensors made again in the backward.

A training forward keeps, for its backward, every tensor each operation saved. On a LoRA model
with a frozen base many of those are cheap to make again and expensive to hold. Counted on one
PPO policy update of SmolLM2-135M (bfloat16 base, 8 sequences of 87 tokens; a
`saved_tensors_hooks` count), ~610 MB were kept, of which:

- eager attention, ~170 MB: the float32 softmax output, its bfloat16 copy, and the keys and
  values repeated once per query head (grouped-query attention). Making them again needs only
  the queries and the un-repeated keys and values (~40 MB): one more QKᵀ and softmax per layer,
  under 1 % of a layer's FLOPs. `recomputed_attention` switches a model's eager attention to a
  kernel that keeps only those, for the block of one update.
- SwiGLU, 64 MB: `silu(gate) * up` keeps silu(gate) beside gate and up; it is one elementwise
  pass from gate. `keep_fewer_activations` gives SwiGLU MLPs a forward that keeps gate and up.
- RMSNorm, ~96 MB: transformers' RMSNorm casts its input to float32, and autograd keeps that
  copy. `keep_fewer_activations` gives Llama-style RMSNorms a forward that keeps the input as it
  comes (bfloat16: half the bytes) and each row's 1/rms, with autograd's chain written out.
- What the LoRA branches keep: each projection's lora_A keeps its input for its weight's
  gradient: the two norms' outputs and silu(gate)·up, ~110 MB more. They are cheap to make again
  from tensors that are kept anyway, so inside `remade_activations` the backward keeps a recipe
  for each and makes it again when it needs it (see `_Recipe`).

That is ~240 MB of the ~610 without the last item (368 MB kept, counted the same way), and
245 MB kept with it (float32: ~720 → 484 MB). Values are unchanged bit for
bit: every forward runs the same operations as before, so a rollout's scores (no gradients,
plain modules) still equal an update's. Gradients are autograd's own formulas on the same
tensors: equal to the plain pass's bit for bit in tests/test_recompute.py, and on SmolLM2's
policy and value LoRA gradients for the PPO benchmark's batch, in both precisions. Nothing
changes without gradients.

Measured in one process, alternating, on that batch (2-core AVX512-BF16 CPU, bfloat16 base, 16
rounds): a policy plus a value update took 1.42 s plain and 1.48 s with all three (attention
+0.04 s, the norms and the MLPs +0.01 s each; torch's generic checkpoint in place of the attention
kernel cost +0.08 s in an earlier run, and recomputing the norms whole under it +0.05 s). Making
the LoRA inputs again added 0.03 s to 1.50 s in bfloat16 (8 rounds) and nothing measurable to
4.2 s in float32; made once per output and shared by the branches that keep it (made for each,
it cost 0.07 s). bench/ppo_vs_trl.py's peak resident memory went from 2.02-2.05 to
1.76-1.82 GB with the first three, and to 1.68 GB with all four (float32: 3.7-4.1 → 3.2 GB).

The SFT and RM stages train the same way (`train_keeping_fewer_activations`, with the same
weights as without it: tests/test_recompute.py). The demo's SFT stage, 6 steps at max_length
512: peak resident memory 3.32 → 2.97 GB. The saving grows with the sequence length: eager
attention keeps T² probabilities per head and layer.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

RECOMPUTED_EAGER = "eager_recomputed"  # the attention kernel name registered with transformers


def _model_eager_attention(module: nn.Module):
    """The eager attention function of `module`'s own modeling file (each architecture has its
    own: soft-capping, sinks and scaling differ), or None where the file has none."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


_STANDARD_EAGER: dict = {}  # eager function -> _is_standard_eager's answer


def _is_standard_eager(eager) -> bool:
    """Asked on every attention call of an update, answered once per function (a plain dict, not
    functools.cache, which compiled layers (model.compile) would warn about and trace through)."""
    if eager not in _STANDARD_EAGER:
        _STANDARD_EAGER[eager] = _standard_eager(eager)
    return _STANDARD_EAGER[eager]


def _standard_eager(eager) -> bool:
    """Whether `eager` is transformers' standard eager attention (Llama's, which most
    architectures import or copy verbatim): softmax(q kᵀ · scaling + mask) v over repeated
    key/value heads, nothing else. Compared by compiled code, so a copy counts and a variant
    (soft-capping, sinks) does not."""
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama
    from transformers.models.llama.modeling_llama import repeat_kv

    if eager is llama:
        return True
    # A copy calls its own file's repeat_kv: that must be Llama's too.
    return _same_code(eager, llama) and _same_code(getattr(eager, "__globals__", {}).get("repeat_kv"), repeat_kv)


def _same_code(f, g) -> bool:
    a, b = getattr(f, "__code__", None), g.__code__
    return a is not None and (a.co_code, a.co_consts, a.co_names) == (b.co_code, b.co_consts, b.co_names)


def _probabilities(query, key, attention_mask, scaling: float, n_rep: int):
    """The standard eager attention's probabilities, by its own operations in its own order (so
    equal to its bit for bit): float32, in the query's dtype, and the repeated keys they used."""
    from transformers.models.llama.modeling_llama import repeat_kv

    keys = repeat_kv(key, n_rep)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    return probs, probs.to(query.dtype), keys


class _EagerAttention(torch.autograd.Function):
    """The standard eager attention (dropout off) keeping only query, key, value and the mask: the
    probabilities are made again in the backward by the forward's own operations. The forward
    output is eager's own; the gradients are autograd's formulas for eager's graph (bmm, softmax,
    the scale, repeat_kv's sum over each key/value head's group) on the same tensors: equal to
    autograd's bit for bit in tests/test_recompute.py and on SmolLM2."""

    @staticmethod
    def forward(ctx, query, key, value, attention_mask, scaling: float, n_rep: int):
        from transformers.models.llama.modeling_llama import repeat_kv

        _, probs, _ = _probabilities(query, key, attention_mask, scaling, n_rep)
        ctx.save_for_backward(query, key, value, attention_mask)
        ctx.scaling, ctx.n_rep = scaling, n_rep
        return torch.matmul(probs, repeat_kv(value, n_rep))  # (batch, heads, length, head_dim)

    @staticmethod
    def backward(ctx, grad):
        from transformers.models.llama.modeling_llama import repeat_kv

        query, key, value, mask = ctx.saved_tensors
        n_rep = ctx.n_rep
        probs32, probs, keys = _probabilities(query, key, mask, ctx.scaling, n_rep)
        grad = grad.to(probs.dtype)

        def per_kv_head(t):  # repeat_kv's backward: sum each key/value head's group of query heads
            b, h, length, d = t.shape
            return t.view(b, h // n_rep, n_rep, length, d).sum(2) if n_rep > 1 else t

        grad_value = per_kv_head(torch.matmul(probs.transpose(2, 3), grad))
        grad_probs = torch.matmul(grad, repeat_kv(value, n_rep).transpose(2, 3))
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs.to(torch.float32), probs32, -1, torch.float32)
        grad_scores = grad_scores.to(query.dtype) * ctx.scaling
        grad_query = torch.matmul(grad_scores, keys)
        grad_key = per_kv_head(torch.matmul(grad_scores.transpose(2, 3), query))
        return grad_query, grad_key, grad_value, None, None, None


def _recomputed_eager_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention interface: the model's own eager attention, its inside recomputed in
    the backward (only query, key, value and the mask are kept). Without gradients, or where the
    model asks for the probabilities, the plain eager function runs."""
    eager = _model_eager_attention(module)  # recomputed_attention switched to us only where there is one
    if not (torch.is_grad_enabled() and query.requires_grad) or kwargs.get("output_attentions"):
        return eager(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("dropout", 0.0) == 0 and _is_standard_eager(eager) and not (attention_mask is not None and attention_mask.requires_grad):
        out = _EagerAttention.apply(query, key, value, attention_mask, kwargs["scaling"],
                                    module.num_key_value_groups)
        return out.transpose(1, 2).contiguous(), None
    # Any other eager function (or dropout): recomputed whole by torch's checkpoint. Dropout draws
    # random masks: the RNG state is kept so the recomputation draws the same ones. Non-reentrant:
    # the recomputed graph joins the backward where the kept one would have, so the gradients are
    # accumulated in the same order and come out bit for bit the same.
    out, _ = checkpoint(eager, module, query, key, value, attention_mask, use_reentrant=False,
                        determinism_check="none", preserve_rng_state=kwargs.get("dropout", 0.0) > 0, **kwargs)
    return out, None  # the probabilities are what is not kept


@functools.cache  # once per process
def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(RECOMPUTED_EAGER, _recomputed_eager_attention)
    AttentionMaskInterface.register(RECOMPUTED_EAGER, eager_mask)  # the same masks eager gets


@contextlib.contextmanager
def recomputed_attention(model: nn.Module) -> Iterator[None]:
    """Run the block with eager attention recomputed in the backward, where `model` (a
    transformers model, or a peft model around one) runs eager attention and its attention
    modules' files define the eager function to recompute; any other kernel (SDPA and flash
    attention keep no probabilities) is left as it is. Restored after."""
    lm = _transformers_model(model)
    if not _runs_recomputable_eager(lm):
        yield
        return
    _register_attention()
    lm.set_attn_implementation(RECOMPUTED_EAGER)
    try:
        yield
    finally:
        lm.set_attn_implementation("eager")


def _transformers_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _runs_recomputable_eager(lm: nn.Module) -> bool:
    """Eager attention, in a model that dispatches attention through transformers' attention
    interface (older model code may treat any other kernel name as another kernel), in modules
    whose files define the eager function to recompute."""
    attention = [m for m in lm.modules() if type(m).__name__.endswith("Attention")]
    return (getattr(lm.config, "_attn_implementation", None) == "eager" and hasattr(lm, "set_attn_implementation")
            and getattr(lm, "_supports_attention_backend", False)
            and bool(attention) and all(_model_eager_attention(m) is not None for m in attention))


def train_keeping_fewer_activations(model: nn.Module, remake_outputs: bool = True) -> None:
    """For a model a transformers Trainer trains from here on (the SFT and RM stages): eager
    attention switched to the kernel that keeps only q, k, v for good (passes without gradients
    still run plain eager), `keep_fewer_activations`, and, with `remake_outputs`, every forward
    run inside `remade_activations` (off for compiled layers, which choose what to keep
    themselves). The values and gradients are the plain ones; a merged export or a reload gets the
    model's own kernel back (the kernel name is not saved in its config). Not for a model that
    ZeRO-3 or FSDP will shard: its parameters are not materialised at load time, and their
    wrappers own the modules; nor with activation checkpointing, where each layer keeps only its
    input anyway (hf_trainer.prepare_for_training checks both)."""
    lm = _transformers_model(model)
    if _runs_recomputable_eager(lm):
        _register_attention()
        lm.set_attn_implementation(RECOMPUTED_EAGER)
    keep_fewer_activations(model)
    if remake_outputs and "forward" not in vars(lm):  # not over accelerate's offloading hooks
        lm.forward = _remaking_forward(lm.forward)


def _remaking_forward(forward: Callable) -> Callable:
    """`forward` inside `remade_activations`: what its backward keeps is decided during the
    forward, so the backward, run later by the Trainer, needs no context of its own. Wrapped so
    that the Trainer still reads the model's own signature (the columns it keeps)."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with remade_activations():
            return forward(*args, **kwargs)
    return run


class _SiluTimes(torch.autograd.Function):
    """silu(gate) * up keeping gate and up only: silu(gate) is made again in the backward, and the
    gradients are autograd's own formulas (mul's, then aten.silu_backward), so equal bit for bit."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _silu_times(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


class _RMSNorm(torch.autograd.Function):
    """transformers' (Llama's) RMSNorm with a frozen weight, keeping its input in the input's own
    dtype and each row's 1/rms instead of the float32 copy autograd would keep: the forward runs
    the module's own operations; the backward is autograd's chain for them written out (the
    weight's product, the casts, the product with 1/rms and its row sum, rsqrt, mean and pow)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        inv_rms = _inv_rms(x32, eps)
        ctx.save_for_backward(x, inv_rms, weight)
        return weight * (x32 * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, inv_rms, weight = ctx.saved_tensors
        x32 = x.to(torch.float32)
        grad_normed = (grad * weight).to(torch.float32)
        grad_inv_rms = (grad_normed * x32).sum(-1, keepdim=True)
        grad_variance = -0.5 * grad_inv_rms * inv_rms.pow(3)
        grad_squares = grad_variance.expand(x32.shape) / x32.shape[-1]
        grad_x = grad_normed * inv_rms + grad_squares * (2 * x32.pow(1))
        return grad_x.to(x.dtype), None, None


def _is_llama_rmsnorm(module: nn.Module) -> bool:
    """A module whose forward is Llama's RMSNorm (most architectures copy it verbatim), compared by
    compiled code; Gemma's (1 + weight) and other variants do not count."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _same_code(type(module).forward, LlamaRMSNorm.forward) and isinstance(getattr(module, "weight", None), torch.Tensor)


def _rmsnorm_forward(norm: nn.Module):
    plain = norm.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad and not norm.weight.requires_grad):
            return plain(x)
        # A float32 input is its own float32 copy: nothing to keep less, and the plain graph's
        # gradient sums in its own order with the residual stream's.
        if x.dtype == torch.float32:
            return _remade_later(plain(x), plain, x)
        out = _RMSNorm.apply(x, norm.weight, norm.variance_epsilon)
        return _remade_later(out, _normed, x, norm.weight, norm.variance_epsilon)
    return forward


def _swiglu_forward(mlp: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return mlp.down_proj(_remade_later(_SiluTimes.apply(gate, up), _silu_times, gate, up))
        return mlp.down_proj(F.silu(gate) * up)
    return forward


def _silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _inv_rms(x32: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # Llama's RMSNorm's operations


def _normed(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """_RMSNorm's output, made again from its input."""
    x32 = x.to(torch.float32)
    return weight * (x32 * _inv_rms(x32, eps)).to(x.dtype)


# Remade activations. The outputs of the norms and of silu(gate)·up are what the LoRA branches
# of the next projections keep for their weights' gradients (lora_A multiplies them): one norm
# output for q, k and v, one for gate and up, and silu(gate)·up for down_proj, ~110 MB of the
# 368 of a SmolLM2 policy micro-batch in bfloat16 and ~220 of ~720 in float32. They are cheap to
# make again from tensors that are kept anyway (the norm's input and 1/rms, or gate and up), so
# inside `remade_activations` such an output is registered when it is made, and a backward that
# would keep it keeps the recipe instead (saved_tensors_hooks) and makes it again when it needs
# it, with the same operations on the same tensors: the same values bit for bit.
_REMADE: dict[int, tuple] = {}  # data address -> (weakref to the output, its _Recipe)
_remaking = False


class _Recipe:
    """How to make one registered output again. Several backward nodes may keep the same output
    (q, k and v's LoRA branches share one norm output): it is made once, at the first of them,
    and held until the last of them has taken it."""

    __slots__ = ("make", "inputs", "kept", "taken", "made", "__weakref__")

    def __init__(self, make: Callable, inputs: tuple):
        self.make, self.inputs, self.kept, self.taken, self.made = make, inputs, 0, 0, None

    def take(self) -> torch.Tensor:
        made = self.made
        if made is None:
            with torch.no_grad():
                made = self.make(*self.inputs)
        self.taken += 1
        # Held for the others that keep it; a second backward through a retained graph makes it again.
        self.made = made if self.taken < self.kept else None
        return made


def _remade_later(output: torch.Tensor, make: Callable, *inputs) -> torch.Tensor:
    """Register `output` (== make(*inputs)) to be made again instead of kept, inside
    `remade_activations`; returns `output`."""
    if _remaking and output.is_contiguous() and output.numel():
        address = output.data_ptr()
        _REMADE[address] = (weakref.ref(output, functools.partial(_forget, address)), _Recipe(make, inputs))
    return output


def _forget(address: int, dead: weakref.ref) -> None:
    """Drop the registry's entry for an output that has died. From then on only the backward nodes
    that packed its recipe hold the recipe, and with it the tensors it makes the output from: they
    are freed with the last of those nodes, layer by layer, instead of all at the end of the
    block (0.34 GB of float32 gate and up tensors a SmolLM2 policy micro-batch held through its
    whole backward)."""
    entry = _REMADE.get(address)
    if entry is not None and entry[0] is dead:
        del _REMADE[address]


def _pack(t: torch.Tensor):
    entry = _REMADE.get(t.data_ptr()) if t.layout == torch.strided else None
    if entry is not None:
        output = entry[0]()
        # The kept tensor must be the registered output itself or a view of all of it in the same
        # layout (F.linear keeps a 3-D input flattened to 2-D). Memory at that address can belong to
        # one live tensor only, and a dead output's entry is gone (_forget) or, failing that, its
        # weakref dead, so a tensor that reuses the memory is never taken for it.
        if (output is not None and t.numel() == output.numel() and t.dtype == output.dtype and t.is_contiguous()):
            entry[1].kept += 1
            return entry[1], t.shape
    return t


def _unpack(packed):
    if isinstance(packed, tuple):
        recipe, shape = packed
        return recipe.take().view(shape)
    return packed


@contextlib.contextmanager
def remade_activations() -> Iterator[None]:
    """Inside the block, the forward passes of modules that `keep_fewer_activations` changed
    register their outputs, and the backward keeps a recipe for each instead of the tensor (see
    above). Not inside torch.compile'd code (model.compile keeps its own choice of tensors)."""
    global _remaking
    outer = _remaking
    _remaking = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _remaking = outer
        if not outer:
            _REMADE.clear()


def _is_swiglu(mlp: nn.Module) -> bool:
    """An MLP computing down_proj(silu(gate_proj(x)) * up_proj(x)), checked on a probe: the
    attribute names are shared by MLPs of other shapes (other activations, extra terms)."""
    if not all(isinstance(getattr(mlp, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    if not isinstance(mlp.act_fn, nn.SiLU) and type(mlp.act_fn).__name__ != "SiLUActivation":
        return False
    weight = next(mlp.gate_proj.parameters(), None)
    in_features = getattr(mlp.gate_proj, "in_features", None)
    if weight is None or in_features is None or not weight.is_floating_point() or weight.device.type == "meta":
        return False  # quantized or not materialised: no probe to run, left as it is
    probe = torch.randn(1, 3, in_features, dtype=weight.dtype, device=weight.device,
                        generator=torch.Generator(device=weight.device).manual_seed(0))
    with torch.no_grad():
        return torch.equal(mlp(probe), _swiglu_forward(mlp)(probe))


def keep_fewer_activations(model: nn.Module) -> dict[str, int]:
    """Make `model`'s SwiGLU MLPs keep gate and up only, and its (Llama-style) RMSNorms keep their
    input as it comes instead of a float32 copy, by giving those modules an instance `forward`
    (parameters, names and state dicts are unchanged). Modules that already have an instance
    forward (accelerate's offloading hooks) are left alone. Returns how many of each were changed.

    Attention is switched per pass, with `recomputed_attention` (a kernel name, not a module)."""
    changed = {"rmsnorm": 0, "swiglu": 0}
    for module in model.modules():
        if "forward" in vars(module):
            continue
        if _is_llama_rmsnorm(module):
            module.forward = _rmsnorm_forward(module)
            changed["rmsnorm"] += 1
        elif _is_swiglu(module):
            module.forward = _swiglu_forward(module)
            changed["swiglu"] += 1
    return changed
