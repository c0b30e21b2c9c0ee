"""`model.compile`: torch.compile on each decoder layer, for training passes only.

Why layers and why only training: eager PyTorch runs every elementwise operation of a layer
(RMSNorm, rotary embeddings, SiLU·up, LoRA's scale-and-add, autocast's casts) as its own kernel,
each paying a dispatch and a pass over memory. Measured on the PPO benchmark's batch (SmolLM2,
bfloat16 base, 8 × 87 tokens, 2-core AVX512-BF16 CPU; bench/ppo_profile.py --compile-layers), a
compiler fusing those chains takes the policy update from 41 to 52.5 % of the measured matmul
peak and the value update from 45 to 61 % (0.86 → 0.68 s and 0.69 → 0.51 s), and a PPO step
12 % shorter once compiled. Every decoder layer of a model runs the same code, so one
compilation serves them all.

Numbers: in float32 a compiled run gives eager's results to a rounding (the demo SFT, 16
steps: every logged loss equal to ~1e-6). In bfloat16 the fused kernels keep each layer's
elementwise chains in float32 and round once, where eager rounds after every operation, so the
two differ by more, and the compiled run is the one closer to float32: the demo SFT's per-step
losses stayed within 0.06 of a float32 run's compiled, and were up to 0.28 above it eager (step
5; 0.02 by step 16): eager bfloat16 loses part of the small early LoRA updates to rounding.

Sampling stays eager: decoding changes the sequence length at every token and runs another
attention kernel (models.no_grad_attn_implementation), so it would compile again and again for
little gain. PPO's rollout scoring stays eager too, so the log-probabilities PPO compares come
from the same kernels they always did; with compiled updates they equal the rollout's to a
rounding (fused kernels round in another order), not bit for bit as in eager.

The cost is the compilation: on a 2-core CPU ~25 s for the first graph, ~10 s for each other
adapter or grad mode (inductor's on-disk cache makes later runs cheaper). It pays back over
long runs, not in a 16-step demo; hence opt-in. Shapes are compiled as dynamic from the start:
every batch has its own padded length, and a static first graph would only be compiled again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Callable, Iterator

import torch
from torch import nn

from rlhf.errors import UserError

log = logging.getLogger(__name__)

# What inductor builds its kernels with: C++ for CPU kernels, C for Triton's GPU launchers.
_COMPILERS = {"cpu": ("CXX", "g++", "c++", "clang++"), "cuda": ("CC", "cc", "gcc", "clang")}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (every architecture's layers derive from
    GradientCheckpointingLayer), outermost first."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layer_forwards(model: nn.Module) -> list[tuple[nn.Module, Callable]]:
    """(layer, compiled forward) for each decoder layer of `model`; nothing runs compiled until
    `compiled_layers` switches them in (or `compile_layers_for_training` does so for good).
    Compilation itself happens at the first call. Logs a warning where the model has no layers
    this recognises (then every pass stays eager)."""
    _require_compiler(next(model.parameters()).device.type)
    layers = decoder_layers(model)
    if not layers:
        log.warning("model.compile: found no transformers decoder layers in %s; training runs eager",
                    type(model).__name__)
    else:
        log.info("model.compile: %d decoder layers compile at the first training pass (~10-30 s on a CPU, "
                 "once per adapter and grad mode)", len(layers))
    return [(layer, torch.compile(layer.forward, dynamic=True)) for layer in layers]


def _require_compiler(device: str) -> None:
    """Fail before any training where torch.compile could not build its kernels, instead of deep in
    inductor at the first pass."""
    env, *programs = _COMPILERS.get(device, _COMPILERS["cuda"])
    if not (os.environ.get(env) or any(shutil.which(p) for p in programs)):
        raise UserError(f"model.compile needs a {'C++' if device == 'cpu' else 'C'} compiler for torch.compile's "
                        f"kernels on {device}, and none was found (${env}, {', '.join(programs)}): install one "
                        f"(e.g. apt-get install g++) or set model.compile: false")


@contextlib.contextmanager
def compiled_layers(forwards: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Context: the given layers run their compiled forward (an instance attribute, which
    nn.Module's call prefers to the class's), and their own again afterwards (an instance forward
    they had before, such as accelerate's offloading hook, included)."""
    own = [vars(layer).get("forward") for layer, _ in forwards]
    try:
        for layer, forward in forwards:
            layer.forward = forward
        yield
    finally:
        for (layer, _), forward in zip(forwards, own):
            if forward is None:
                vars(layer).pop("forward", None)
            else:
                layer.forward = forward


def compile_layers_for_training(model: nn.Module) -> int:
    """SFT and RM: every pass of the model is a training or evaluation pass, so its layers run
    compiled for good. Returns the number of layers compiled."""
    forwards = compile_layer_forwards(model)
    for layer, forward in forwards:
        layer.forward = forward
    return len(forwards)
