"""rlhf.recompute: a training pass that keeps fewer tensors gives the plain pass's values and
gradients bit for bit, keeps fewer bytes, and leaves what it cannot recompute exactly alone."""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch

import rlhf.recompute
from rlhf.recompute import RECOMPUTED_EAGER, keep_fewer_activations, recomputed_attention, remade_activations


def _lora_lm(dtype: torch.dtype = torch.float32, **config):
    """The tiny Llama (2 layers, grouped-query attention, SwiGLU) with eager attention and LoRA on
    every linear layer, A and B random so every gradient path carries something."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.config import ModelConfig
    from rlhf.models import resolve_model

    path = resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama"))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", **config)
    base.requires_grad_(False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: the masks go through the recomputation too
    return ids, mask


def _training_pass(model, recompute: bool):
    """One forward and backward under bfloat16 autocast where the base is bfloat16 (as the
    stages train). Returns the logits, every LoRA gradient, the bytes the forward kept for its
    backward (parameters and their views excluded), and the bytes of the tensors it kept recipes
    for instead (remade_activations)."""
    ids, mask = _batch()
    params = dict(model.named_parameters())
    param_storages = {p.untyped_storage().data_ptr() for p in params.values()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    remade: dict[int, tuple] = {}  # id -> (recipe, bytes of the tensor it stands for)

    def pack_remade(t: torch.Tensor):
        packed = rlhf.recompute._pack(t)  # remade_activations' own hook, then the count
        if isinstance(packed, torch.Tensor):
            return pack(packed)
        remade[id(packed[0])] = (packed[0], t.untyped_storage().nbytes())
        return packed

    from peft.helpers import disable_input_dtype_casting

    low = next(model.parameters()).dtype == torch.bfloat16
    hooks = (pack_remade, rlhf.recompute._unpack) if recompute else (pack, lambda t: t)
    # As the stages train under autocast: LoRA branches take their input as it comes (roles.use_adapter,
    # best_checkpoint.train), not a float32 copy that autocast would cast straight back.
    with contextlib.ExitStack() as stack, disable_input_dtype_casting(model, active=low):
        if recompute:
            stack.enter_context(recomputed_attention(model))
            stack.enter_context(remade_activations())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low), torch.autograd.graph.saved_tensors_hooks(*hooks):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        (logits.sin() * mask[..., None]).sum().backward()
    grads = {n: p.grad for n, p in params.items() if p.requires_grad}
    return logits.detach(), grads, sum(kept.values()), sum(b for _, b in remade.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_pass_equals_the_plain_one_and_keeps_fewer_bytes(dtype):
    plain = _training_pass(_lora_lm(dtype), recompute=False)
    model = _lora_lm(dtype)
    assert keep_fewer_activations(model) == {"rmsnorm": 5, "swiglu": 2}  # 2 norms per layer and the final one
    lean = _training_pass(model, recompute=True)

    assert torch.equal(lean[0], plain[0])
    assert plain[1].keys() == lean[1].keys() and len(plain[1]) == 2 * 7 * 2  # A and B of 7 linears × 2 layers
    for name, grad in plain[1].items():
        assert grad is not None and torch.equal(lean[1][name], grad), name
    # What goes: the attention probabilities and repeated keys/values, silu(gate), and the outputs
    # the LoRA branches would keep (both norms', silu(gate)·up), made again. At least the float32
    # probabilities, silu(gate), and those outputs of every layer must be gone, the outputs into
    # recipes.
    cfg = model.get_base_model().config
    rows, length = _batch()[0].shape
    probabilities = cfg.num_hidden_layers * rows * cfg.num_attention_heads * length**2 * 4
    silu = cfg.num_hidden_layers * rows * length * cfg.intermediate_size * dtype.itemsize
    # (The first layer's input norm reads the frozen embeddings: no gradient, nothing registered.)
    remade = (cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.intermediate_size) - cfg.hidden_size) \
        * rows * length * dtype.itemsize
    assert lean[3] >= remade
    assert plain[2] - lean[2] >= probabilities + silu + remade
    assert model.get_base_model().config._attn_implementation == "eager"  # restored after the pass


def test_a_recipe_and_the_tensors_it_makes_its_output_from_go_with_the_backward():
    """A recipe holds what it makes its output from (a norm's input and 1/rms, gate and up). Once
    the output has died, only the backward nodes that kept the recipe hold it, so those tensors
    are freed layer by layer as the backward runs, not all at the end of the block."""
    model = _lora_lm()
    keep_fewer_activations(model)
    ids, mask = _batch()
    recipes = []

    def pack(t: torch.Tensor):
        packed = rlhf.recompute._pack(t)
        if not isinstance(packed, torch.Tensor):
            recipes.append(weakref.ref(packed[0]))
        return packed

    with remade_activations():
        with torch.autograd.graph.saved_tensors_hooks(pack, rlhf.recompute._unpack):
            loss = model(input_ids=ids, attention_mask=mask).logits.sin().sum()
        assert recipes and all(r() is not None for r in recipes)  # held by the graph until its backward
        assert not rlhf.recompute._REMADE  # the registry forgot each output when it died
        loss.backward()
        assert all(r() is None for r in recipes)


def test_attention_dropout_draws_the_same_masks_when_recomputed():
    """With attention dropout in training mode, the recomputation replays the random state, so
    the gradients are still those of the pass that drew the masks."""
    runs = []
    for recompute in (False, True):
        model = _lora_lm(attention_dropout=0.5)
        model.train()
        torch.manual_seed(3)
        runs.append(_training_pass(model, recompute))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


def test_only_what_can_be_recomputed_exactly_is_changed():
    # Another activation: the MLP has SwiGLU's attribute names but not its formula.
    gelu = _lora_lm(hidden_act="gelu")
    assert keep_fewer_activations(gelu) == {"rmsnorm": 5, "swiglu": 0}
    # A module whose forward something else already replaced (accelerate's offloading hooks) keeps it.
    model = _lora_lm()
    mlp = model.get_base_model().model.layers[0].mlp
    hooked = mlp.forward
    mlp.forward = hooked
    assert keep_fewer_activations(model) == {"rmsnorm": 5, "swiglu": 1} and mlp.forward is hooked
    # Without gradients nothing is recomputed: the modules run as they are, same values.
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           _lora_lm()(input_ids=ids, attention_mask=mask).logits)
    # Another attention kernel keeps no probabilities: left as it is.
    sdpa = _lora_lm()
    sdpa.get_base_model().set_attn_implementation("sdpa")
    with recomputed_attention(sdpa):
        assert sdpa.get_base_model().config._attn_implementation == "sdpa"
    with recomputed_attention(model):
        assert model.get_base_model().config._attn_implementation == RECOMPUTED_EAGER


def test_the_kernels_are_used_for_the_standard_eager_function_and_rmsnorm_only():
    """Eager functions that are Llama's, or a verbatim copy of it (most architectures), get the
    attention kernel; a variant (here soft-capped scores) would get the wrong gradients from it and
    is recomputed whole instead. Likewise RMSNorm: Qwen2's is Llama's, Gemma's (1 + weight) is not."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from rlhf.recompute import _is_llama_rmsnorm, _is_standard_eager

    assert _is_llama_rmsnorm(modeling_llama.LlamaRMSNorm(8)) and _is_llama_rmsnorm(Qwen2RMSNorm(8))
    assert not _is_llama_rmsnorm(GemmaRMSNorm(8))
    assert _is_standard_eager(modeling_llama.eager_attention_forward)
    assert _is_standard_eager(modeling_qwen2.eager_attention_forward)

    def soft_capped(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value_states = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        scores = torch.tanh(torch.matmul(query, key_states.transpose(2, 3)) * scaling / 50) * 50
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(probs, value_states).transpose(1, 2).contiguous(), probs

    assert not _is_standard_eager(soft_capped)


def test_sft_and_rm_stages_train_the_same_weights_as_without_the_kernels(tmp_path, monkeypatch):
    """The SFT and RM stages train with eager attention's kernel, the leaner norms and MLPs and
    their outputs made again in the backward; trained again with them off, the adapters and the
    score head come out the same bit for bit."""
    from safetensors.torch import load_file

    import rlhf.recompute
    from rlhf import rm, sft
    from rlhf.config import load_config

    from .conftest import one_torch_thread, write_config

    real = rlhf.recompute.train_keeping_fewer_activations
    runs = {}
    for kernels in (True, False):
        seen = []

        def spy(model, kernels=kernels, seen=seen, **kwargs):
            if kernels:
                real(model, **kwargs)
            seen.append((model.config._attn_implementation, sum("forward" in vars(m) for m in model.modules())))

        monkeypatch.setattr(rlhf.recompute, "train_keeping_fewer_activations", spy)
        folder = tmp_path / ("with" if kernels else "without")
        folder.mkdir()
        cfg = load_config(write_config(folder))
        with one_torch_thread():
            sft.run(cfg)
            rm.run(cfg)
        # Both stages' models: 2 layers × (2 norms + an MLP), the final norm and the model's forward
        # (inside remade_activations) changed, and the kernel on.
        assert seen == ([(rlhf.recompute.RECOMPUTED_EAGER, 8)] * 2 if kernels else [("eager", 0)] * 2)
        runs[kernels] = cfg
    for stage, files in (("sft", ["adapter_model.safetensors"]), ("rm", ["adapter_model.safetensors", "score_head.safetensors"])):
        for name in files:
            a = load_file(runs[True].stage_dir(stage) / "adapter" / name)
            b = load_file(runs[False].stage_dir(stage) / "adapter" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (stage, name)


def test_sharded_launches_are_recognised(monkeypatch):
    """What the SFT and RM stages check before changing the model (ZeRO-3 and FSDP parameters are
    not materialised at load time) and what PPO refuses."""
    from rlhf.errors import UserError
    from rlhf.launch import sharding_in_use
    from rlhf.ppo.stage import _refuse_sharding

    for env in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(env, raising=False)
    assert sharding_in_use() is None
    _refuse_sharding()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding_in_use() == "FSDP"
    with pytest.raises(UserError, match="cannot run under FSDP"):
        _refuse_sharding()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "1")
    assert sharding_in_use() == "DeepSpeed ZeRO"
