"""Training passes that keep fewer activations, exactly: cheap tensors recomputed in the backward.

A training forward keeps, for its backward, every tensor each operation saved. On a LoRA model
with a frozen base most of those are cheap to make again and expensive to hold. Counted on one
PPO policy update of SmolLM2-135M (bfloat16 base, 8 sequences of 87 tokens; a
`saved_tensors_hooks` count), ~610 MB were kept, of which:

- eager attention, ~170 MB: the float32 softmax output, its bfloat16 copy, and the keys and
  values repeated once per query head (grouped-query attention). Recomputing them needs the
  queries and the un-repeated keys and values (~40 MB), and costs one more QKᵀ and softmax per
  layer: at these lengths under 1 % of a layer's FLOPs.
- SwiGLU, 64 MB: `silu(gate) * up` keeps silu(gate) beside gate and up. It is one elementwise
  pass from gate.

Every recomputation runs the same operations on the same inputs, so values and gradients are
those of the plain pass bit for bit (tests/test_recompute.py). Nothing changes without gradients:
sampling and scoring passes run the modules as they are.

Not recomputed: RMSNorm's float32 copy of its input (~96 MB there). Recomputing the norms cost
~30 ms per update, their forward being eight elementwise passes each, for ~48 MB; the trade was
not worth it (measured in one process, alternating).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

RECOMPUTED_EAGER = "eager_recomputed"  # the attention kernel name registered with transformers


def _model_eager_attention(module: nn.Module):
    """The eager attention function of `module`'s own modeling file (each architecture has its
    own: soft-capping, sinks and scaling differ), or None where the file has none."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _recomputed_eager_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention interface: the model's own eager attention, its inside recomputed in
    the backward (only query, key, value and the mask are kept). Without gradients, or where the
    model asks for the probabilities, the plain eager function runs."""
    eager = _model_eager_attention(module)  # recomputed_attention switched to us only where there is one
    if not (torch.is_grad_enabled() and query.requires_grad) or kwargs.get("output_attentions"):
        return eager(module, query, key, value, attention_mask, **kwargs)
    # Dropout draws random masks: keep the RNG state so the recomputation draws the same ones.
    # Non-reentrant: the recomputed graph joins the backward where the kept one would have, so the
    # gradients are accumulated in the same order and come out bit for bit the same.
    out, _ = checkpoint(eager, module, query, key, value, attention_mask, use_reentrant=False,
                        determinism_check="none", preserve_rng_state=kwargs.get("dropout", 0.0) > 0, **kwargs)
    return out, None  # the probabilities are what is not kept


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
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = [m for m in lm.modules() if type(m).__name__.endswith("Attention")]
    if (getattr(lm.config, "_attn_implementation", None) != "eager" or not hasattr(lm, "set_attn_implementation")
            or not attention or any(_model_eager_attention(m) is None for m in attention)):
        yield
        return
    _register_attention()
    lm.set_attn_implementation(RECOMPUTED_EAGER)
    try:
        yield
    finally:
        lm.set_attn_implementation("eager")


class _SiluTimes(torch.autograd.Function):
    """silu(gate) * up keeping gate and up only: silu(gate) is made again in the backward, and the
    gradients are autograd's own formulas (mul's, then aten.silu_backward), so equal bit for bit."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _swiglu_forward(mlp: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return mlp.down_proj(_SiluTimes.apply(gate, up))
        return mlp.down_proj(F.silu(gate) * up)
    return forward


def _is_swiglu(mlp: nn.Module) -> bool:
    """An MLP computing down_proj(silu(gate_proj(x)) * up_proj(x)), checked on a probe: the
    attribute names are shared by MLPs of other shapes (other activations, extra terms)."""
    if not all(isinstance(getattr(mlp, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    if not isinstance(mlp.act_fn, nn.SiLU) and type(mlp.act_fn).__name__ != "SiLUActivation":
        return False
    weight = next(mlp.gate_proj.parameters(), None)
    in_features = getattr(mlp.gate_proj, "in_features", None)
    if weight is None or in_features is None:
        return False
    probe = torch.randn(1, 3, in_features, dtype=weight.dtype, device=weight.device,
                        generator=torch.Generator(device=weight.device).manual_seed(0))
    with torch.no_grad():
        return torch.equal(mlp(probe), _swiglu_forward(mlp)(probe))


def keep_fewer_activations(model: nn.Module) -> int:
    """Make `model`'s SwiGLU MLPs keep gate and up only, by giving them an instance `forward`
    (their parameters, names and state dicts are unchanged). MLPs that already have an instance
    forward (accelerate's offloading hooks) are left alone. Returns how many MLPs were changed.

    Attention is switched per pass, with `recomputed_attention` (a kernel name, not a module)."""
    changed = 0
    for module in model.modules():
        if "forward" not in vars(module) and _is_swiglu(module):
            module.forward = _swiglu_forward(module)
            changed += 1
    return changed
