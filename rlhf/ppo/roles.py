"""The four PPO roles on one frozen base (docs/ppo.md §1-§2).

`sft/model` is loaded once and frozen. Three LoRA adapters sit on it:
- `policy`: new, trainable (LoRA dropout 0: PPO runs without dropout);
- `reward`: the RM stage's LoRA weights, frozen, with its score head (a Linear(hidden, 1));
- `value`: a copy of the reward adapter and head, trainable (critic initialised from the RM,
  as in InstructGPT, N+, DeepSpeed-Chat and OpenRLHF), its head's bias lowered by the RM's
  training `score_mean`: PPO's rewards are scores minus that mean, so the critic starts centred
  on them instead of offset by the mean (which GAE would turn into a length-dependent bias of
  every advantage until the critic caught up);
and the reference policy is the base with every adapter disabled, which is exactly the SFT
model because SFT was merged into the base. The critic-free algorithms (RLOO, GRPO, REINFORCE++)
and `rlhf eval` build no critic at all (`critic=False`): no value adapter, no value head.

Adapters are switched with `use_adapter`, which sets peft's per-layer active adapter directly.
peft's own `set_adapter`/`disable_adapter` also flip `requires_grad` on adapter weights (only
the active adapter stays trainable), which would silently freeze the value adapter while the
policy is active; switching the flag alone leaves the trainable set as built here.

The heads live outside peft (plain float32 Linear modules), so "modules_to_save must follow
the active adapter" cannot go wrong: each role applies its own head explicitly.

Precision: the base may be loaded in bfloat16 (`model.dtype`). It is frozen, so it needs no
float32 master copy, and on CPUs with AVX512-BF16 (and on GPUs) its matmuls run several times
faster. Everything that is trained or compared stays float32: peft keeps the LoRA weights in
float32 (`autocast_adapter_dtype`), the heads are float32 and read float32 hidden states, and
log-probabilities come from float32 logits (losses.logprobs_from_logits).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from rlhf.compile_layers import compile_layer_forwards, compiled_layers, decoder_layers
from rlhf.models import attention_implementation
from rlhf.recompute import keep_fewer_activations, recomputed_attention, remade_activations
from rlhf.rm import SCORE_HEAD_FILE  # the RM stage writes the score head there; the roles read it


@dataclass
class Roles:
    """One peft model with adapters policy/reward/value, and the reward and value heads (no value
    adapter or head without a critic)."""

    model: nn.Module  # peft PeftModel around the causal LM
    reward_head: nn.Linear
    value_head: nn.Linear | None  # None: no critic (the critic-free algorithms, evaluation)
    value_on_policy: bool = False  # the cheaper variant: value head on the policy adapter's hidden states
    no_grad_attn: str | None = None  # attention kernel for sampling (models.no_grad_attn_implementation)
    activation_checkpointing: bool = False  # recompute the decoder layers in the updates' backward passes
    compiled: list = field(default_factory=list)  # (layer, compiled forward) for the updates (model.compile)

    def no_grad_attention(self):
        """Context: sampling runs with `no_grad_attn` (a no-op with gradients on)."""
        return attention_implementation(self.model.get_base_model(), self.no_grad_attn)

    @contextlib.contextmanager
    def training_pass(self, adapter: str) -> Iterator[None]:
        """Context for one update's forward *and* backward with `adapter`: the backward runs with the
        adapter that built the graph, and with `activation_checkpointing` the decoder layers keep only
        their inputs and are recomputed in the backward; without it, eager attention keeps only its
        inputs and is recomputed (rlhf.recompute.recomputed_attention).

        The recomputation happens inside `loss.backward()`, after the forward's `use_adapter` has
        switched the adapters back: without this context it would recompute another adapter's
        function (the value adapter's layers for a policy loss). transformers checkpoints a layer only
        while the layer itself is in training mode; the flag is set on the decoder layers alone, not
        on their children, so dropout stays off as everywhere in stage 3 (build_roles)."""
        layers = _checkpointed_layers(self.model) if self.activation_checkpointing else []
        saved = [layer.training for layer in layers]
        try:
            for layer in layers:
                layer.training = True  # the layer object only: nn.Module.train() would recurse
            # Without layer checkpointing, attention keeps only its inputs (rlhf.recompute); with it the
            # whole layer is recomputed anyway.
            attention = contextlib.nullcontext() if self.activation_checkpointing else recomputed_attention(self.model)
            # Norm and SwiGLU outputs made again in the backward (rlhf.recompute); compiled layers
            # choose what to keep themselves.
            remade = contextlib.nullcontext() if self.activation_checkpointing or self.compiled else remade_activations()
            with _adapter_flags(self.model, adapter), attention, remade, compiled_layers(self.compiled):
                yield
        finally:
            for layer, training in zip(layers, saved):
                layer.training = training

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None

    @property
    def backbone(self) -> nn.Module:
        """The transformer body (hidden states, no LM head) of the wrapped causal LM."""
        lm = self.model.get_base_model()
        return getattr(lm, lm.base_model_prefix)

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if ".policy." in n and p.requires_grad]

    def value_parameters(self) -> list[nn.Parameter]:
        if self.value_head is None:
            return []
        adapter = [] if self.value_on_policy else [p for n, p in self.model.named_parameters() if ".value." in n and p.requires_grad]
        return adapter + list(self.value_head.parameters())


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers that transformers' activation checkpointing was enabled on."""
    return [m for m in decoder_layers(model) if m.gradient_checkpointing]


def _low_precision(model: nn.Module) -> bool:
    return next(model.parameters()).dtype in (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def _adapter_flags(model: nn.Module, name: str | None) -> Iterator[None]:
    """Only adapter `name` active (None: every adapter off), peft's input casting off for a
    low-precision base (see use_adapter); restores the previous flags. No autocast."""
    layers = _tuner_layers(model)
    saved = [(m._active_adapter, m._disable_adapters, m.cast_input_dtype_enabled) for m in layers]
    low_precision = _low_precision(model)
    try:
        for m in layers:
            if name is None:
                m._disable_adapters = True
            else:
                m._active_adapter = [name]
                m._disable_adapters = False
            m.cast_input_dtype_enabled = not low_precision
        yield
    finally:
        for m, (active, disabled, cast) in zip(layers, saved):
            m._active_adapter, m._disable_adapters, m.cast_input_dtype_enabled = active, disabled, cast


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run the block with only adapter `name` active (None: all adapters off = the reference model).

    Leaves `requires_grad` untouched (see the module docstring) and restores the previous state.

    With a bfloat16/float16 base the block also runs under autocast in that dtype, with peft's
    input casting off, so the float32 LoRA branches multiply in the base's dtype instead of
    upcasting every activation to float32. LoRA weights, their gradients and the optimizer stay
    float32, as in any mixed-precision training (measured on the embedded model on CPU: a policy
    training pass takes 20% less time). A float32 base runs exactly as before."""
    param = next(model.parameters())
    with _adapter_flags(model, name), torch.autocast(param.device.type, dtype=param.dtype,
                                                     enabled=_low_precision(model)):
        yield


@contextlib.contextmanager
def temporarily_merged(model: nn.Module, name: str) -> Iterator[None]:
    """Run the block as adapter `name` with its LoRA folded into scratch copies of the weights it
    adapts, and every adapter off: the same function as `use_adapter(model, name)` up to rounding,
    for sampling.

    Decoding runs one token per sequence at a time, where the LoRA branch's two small matmuls,
    casts and adds per adapted layer cost as much as the base matmul. Folded weights drop them
    (measured on the embedded model with a bfloat16 base: 48 tokens for 8 prompts on 2 CPU
    cores took 3.3-3.5 s instead of 4.3-4.7 s). The scratch weights exist only inside the block; the base
    and the adapters are never modified. Layers that cannot be folded this way (DoRA, non-Linear
    LoRA) keep their adapter branch."""
    from peft.tuners.lora import Linear as LoraLinear

    swaps: list[tuple[nn.Module, nn.Parameter]] = []
    unfolded: list[nn.Module] = []
    try:
        with torch.no_grad():
            for m in _tuner_layers(model):
                if name not in getattr(m, "lora_A", {}):
                    continue
                if not isinstance(m, LoraLinear) or m.use_dora.get(name, False):
                    unfolded.append(m)
                    continue
                base = m.get_base_layer()
                original = base.weight
                folded = (original.float() + m.get_delta_weight(name).float()).to(original.dtype)
                base.weight = nn.Parameter(folded, requires_grad=False)
                swaps.append((base, original))
        with use_adapter(model, None):
            for m in unfolded:  # these keep their branch: adapter on for them alone
                m._active_adapter, m._disable_adapters = [name], False
            yield
    finally:
        for base, original in swaps:
            base.weight = original


def load_score_head(adapter_dir: Path, hidden_size: int, dtype: torch.dtype) -> nn.Linear:
    from safetensors.torch import load_file

    path = Path(adapter_dir) / SCORE_HEAD_FILE
    tensors = load_file(str(path))
    weight = tensors["weight"]
    if weight.shape != (1, hidden_size):
        raise ValueError(f"{path}: score head has shape {tuple(weight.shape)}, expected (1, {hidden_size})")
    head = nn.Linear(hidden_size, 1, bias="bias" in tensors, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight.to(dtype))
        if "bias" in tensors:
            head.bias.copy_(tensors["bias"].to(dtype))
    return head


def _adapter_lora_config(adapter_dir: Path):
    """The RM adapter's LoRA config, re-targeted at the causal LM (no score head in modules_to_save)."""
    from peft import LoraConfig

    raw = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    cfg = LoraConfig(
        r=raw["r"], lora_alpha=raw["lora_alpha"], lora_dropout=0.0, target_modules=raw["target_modules"],
        bias=raw.get("bias", "none"), use_rslora=raw.get("use_rslora", False), task_type="CAUSAL_LM",
    )
    return cfg


def _load_lora_weights(model: nn.Module, adapter_dir: Path, adapter_name: str) -> None:
    """Load the LoRA weights of a saved adapter into the already-added adapter `adapter_name`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    lora_state = {k: v for k, v in state.items() if "lora_" in k}
    if not lora_state:
        raise ValueError(f"{adapter_dir}: no LoRA weights found in adapter_model.safetensors")
    result = set_peft_model_state_dict(model, lora_state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"{adapter_dir}: {len(unexpected)} LoRA weights do not fit the base model (first: {unexpected[0]})")
    expected = {n for n, _ in model.named_parameters() if f".{adapter_name}." in n and "lora_" in n}
    missing = [k for k in getattr(result, "missing_keys", []) if k in expected]
    if missing:
        raise ValueError(f"{adapter_dir}: {len(missing)} LoRA weights of adapter '{adapter_name}' were not in the file (first: {missing[0]})")


def centred_value_head(reward_adapter_dir: Path, hidden_size: int, score_mean: float) -> nn.Linear:
    """The critic's head at the start: the reward head with a bias, lowered by `score_mean`, so
    that V = RM score - score_mean, the centred score PPO's rewards are made of. Float32, trainable."""
    reward = load_score_head(reward_adapter_dir, hidden_size, torch.float32)
    head = nn.Linear(hidden_size, 1, bias=True, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(reward.weight)
        head.bias.fill_(-float(score_mean))
        if reward.bias is not None:
            head.bias.add_(reward.bias)
    return head


def build_roles(
    base: nn.Module, policy_lora, reward_adapter_dir: Path, value_on_policy: bool = False, score_mean: float = 0.0,
    critic: bool = True, no_grad_attn: str | None = None, activation_checkpointing: bool = False,
    compile_layers: bool = False,
) -> Roles:
    """Wrap a loaded causal LM (`sft/model`) into the PPO roles.

    base: AutoModelForCausalLM, frozen here. policy_lora: a peft LoraConfig for the policy (its
    dropout is forced to 0). reward_adapter_dir: the RM stage's `rm/adapter` (LoRA weights +
    score_head.safetensors). score_mean: the RM's training mean, which PPO subtracts from scores;
    the value head starts lowered by it (centred_value_head). critic=False: no value adapter and no
    value head (policy, reference and reward only), for the critic-free algorithms and evaluation;
    value_on_policy is then moot. no_grad_attn: the attention kernel for sampling
    (models.no_grad_attn_implementation; None keeps the model's). activation_checkpointing
    (`model.gradient_checkpointing`): the updates recompute each decoder layer in their backward
    instead of keeping its activations (Roles.training_pass); without it, attention, SwiGLU and
    RMSNorm keep less for the backward and make the rest again (rlhf.recompute). compile_layers
    (`model.compile`): the updates run each decoder layer through torch.compile
    (rlhf.compile_layers). Sampling and scoring are unchanged either way."""
    from peft import get_peft_model

    base.requires_grad_(False)
    policy_lora.lora_dropout = 0.0
    model = get_peft_model(base, policy_lora, adapter_name="policy")
    reward_cfg = _adapter_lora_config(reward_adapter_dir)
    model.add_adapter("reward", reward_cfg)
    _load_lora_weights(model, reward_adapter_dir, "reward")
    hidden = base.config.get_text_config().hidden_size
    reward_head = load_score_head(reward_adapter_dir, hidden, torch.float32).requires_grad_(False)
    value_head = None
    if critic:
        value_head = centred_value_head(reward_adapter_dir, hidden, score_mean).requires_grad_(True)
        if not value_on_policy:
            model.add_adapter("value", reward_cfg)
            _load_lora_weights(model, reward_adapter_dir, "value")
    # Trainable set, fixed from here on: policy LoRA, value LoRA, value head. Nothing else.
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name and (".policy." in name or ".value." in name))
    _contiguous_lm_head_input(base)
    if activation_checkpointing:
        # Non-reentrant: restores autocast in the recompute and needs no input that requires grad,
        # so the embedding hook transformers adds for reentrant checkpointing goes (it would make
        # every backward differentiate down to the frozen embeddings).
        base.activation_checkpointing_enable({"use_reentrant": False})
        base.disable_input_require_grads()
    else:
        keep_fewer_activations(model)  # SwiGLU and RMSNorm keep less for the backward (rlhf.recompute)
    device = next(base.parameters()).device
    model.eval()  # dropout off in every role, for the whole run (docs/ppo.md §5)
    if value_head is not None:
        value_head = value_head.to(device).eval()
    compiled = compile_layer_forwards(model) if compile_layers else []
    return Roles(model, reward_head.to(device).eval(), value_head, value_on_policy and critic, no_grad_attn,
                 activation_checkpointing, compiled)


def _contiguous_lm_head_input(lm: nn.Module) -> None:
    """Make the LM head's input contiguous before the matmul.

    Causal LMs slice the hidden states before the head (`logits_to_keep`, and the last position
    while decoding). On CPU, torch multiplies such a strided 3-D view by broadcasting the
    (V, H) head weight to (B, H, V) and copying it: with a 49k vocabulary that copy took
    60% of a training pass and most of each decoding step. A contiguous input takes the
    plain 2-D matmul instead. The head itself still runs through the model's own forward,
    so model-specific logit scaling or soft-capping is kept."""
    head = lm.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that skip left padding: cumsum(mask) - 1, clamped at 0 (docs/ppo.md §4)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def head_forward(roles: Roles, adapter: str, head: nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Backbone with `adapter` active, then a scalar head at every position: (B, T) float32."""
    with use_adapter(roles.model, adapter):
        hidden = roles.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    return head(hidden.float()).squeeze(-1)
