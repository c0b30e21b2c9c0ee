"""Canary for the peft internals PPO relies on (rlhf.ppo.roles): adapter switching sets the private
per-layer attributes `_active_adapter`, `_disable_adapters` and `cast_input_dtype_enabled`, and
temporarily_merged folds with `get_delta_weight`. If a peft release renames or reinterprets any of
them, these tests fail loudly here instead of PPO silently training the wrong adapter. pyproject
bounds peft to the tested minor series; raise the bound only after this file passes on the new one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

PRIVATE = ("_active_adapter", "_disable_adapters", "cast_input_dtype_enabled")


@pytest.fixture(scope="module")
def two_adapters():
    """The tiny Llama with LoRA adapters 'a' and 'b', both with non-zero B (so each changes the output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.config import ModelConfig
    from rlhf.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama")),
                                                dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora, adapter_name="a")
    model.add_adapter("b", lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.eval()
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    return model, ids


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tuner_layers_have_the_private_attributes_use_adapter_sets(two_adapters):
    from peft.tuners.lora import Linear as LoraLinear

    from rlhf.ppo.roles import _tuner_layers

    model, _ = two_adapters
    layers = _tuner_layers(model)
    assert layers and all(isinstance(m, LoraLinear) for m in layers)
    for m in layers:
        missing = [a for a in PRIVATE if not hasattr(m, a)]
        assert not missing, f"peft {type(m).__name__} no longer has {missing}: rlhf.ppo.roles.use_adapter must change"
        assert callable(getattr(m, "get_delta_weight", None)) and isinstance(m.use_dora, dict)
        assert set(m.lora_A) == {"a", "b"}


def test_use_adapter_matches_peft_public_switching(two_adapters):
    """use_adapter(name) computes what peft's own set_adapter(name) computes, peft reads back the
    adapter it set (`active_adapters`), use_adapter(None) is peft's disable_adapter(), and
    requires_grad is left as it was (the reason for setting the attributes directly)."""
    from rlhf.ppo.roles import _tuner_layers, temporarily_merged, use_adapter

    model, ids = two_adapters
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with use_adapter(model, "b"):
        ours_b = _logits(model, ids)
        assert all(m.active_adapters == ["b"] for m in _tuner_layers(model))
    with use_adapter(model, None):
        ours_off = _logits(model, ids)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    with temporarily_merged(model, "b"):
        folded_b = _logits(model, ids)

    model.set_adapter("b")
    peft_b = _logits(model, ids)
    with model.disable_adapter():
        peft_off = _logits(model, ids)
    model.set_adapter("a")
    peft_a = _logits(model, ids)
    with use_adapter(model, "a"):
        ours_a = _logits(model, ids)

    assert torch.allclose(ours_b, peft_b, atol=1e-6) and torch.allclose(ours_a, peft_a, atol=1e-6)
    assert torch.allclose(ours_off, peft_off, atol=1e-6)
    assert torch.allclose(folded_b, peft_b, atol=1e-4)
    assert (peft_a - peft_b).abs().max() > 1e-3 and (peft_b - peft_off).abs().max() > 1e-3  # three functions


def test_pyproject_bounds_peft_to_the_installed_tested_series():
    import importlib.metadata

    spec = re.search(r'"peft>=([\d.]+),<([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert spec, "pyproject.toml must bound peft above (the tested minor series)"
    installed = tuple(int(x) for x in importlib.metadata.version("peft").split(".")[:2])
    low, high = (tuple(int(x) for x in v.split(".")[:2]) for v in spec.groups())
    assert low <= installed < high
    pinned = re.search(r"^peft==([\d.]+)$", Path(REPO / "constraints.txt").read_text(), re.M)
    assert pinned and pinned.group(1) == importlib.metadata.version("peft")
