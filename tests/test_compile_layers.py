"""model.compile: the training passes run each decoder layer through torch.compile
(rlhf.compile_layers); sampling and scoring stay eager, and training gives what eager gives, to
a rounding."""

import pytest
import torch

from rlhf.ppo.rollout import response_logprobs
from rlhf.ppo.trainer import compute_targets, final_scores, make_optimizer, ppo_update

from .test_ppo import make_roles, rollout_for


@pytest.mark.parametrize("checkpointing", [False, True])
def test_ppo_updates_run_compiled_layers_and_train_as_eager(tiny_rm_run, checkpointing):
    """Two epochs of PPO updates (policy and value adapters) with compiled layers give eager's
    weights to a float32 rounding; the layers run compiled only inside an update (sampling and the
    rollout's scoring stay eager), with and without activation checkpointing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    start, trained = [], []
    for compiled in (False, True):
        cfg, tok, roles = make_roles(tiny_rm_run, activation_checkpointing=checkpointing, compile_layers=compiled,
                                     attn_implementation="eager")
        layers = [m for m in roles.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert len(roles.compiled) == (len(layers) if compiled else 0) and layers
        ppo = cfg.ppo.model_copy(update={"ppo_epochs": 2, "rollout_batch_size": 4, "num_mini_batches": 1,
                                         "micro_batch_size": 2})
        ro = rollout_for(cfg, tok, roles, n=4, micro=2)
        assert not any("forward" in vars(layer) for layer in layers)
        with roles.training_pass("policy"):
            assert all(("forward" in vars(layer)) == compiled for layer in layers)
            fresh, _, _ = response_logprobs(roles, ro.input_ids, ro.attention_mask, ro.response_ids, 0.7, "policy")
        assert not any("forward" in vars(layer) for layer in layers)
        # The rollout's log-probs came from the eager layers: the update's equal them to a rounding.
        torch.testing.assert_close(fresh.detach().masked_fill(~ro.response_mask, 0), ro.logprobs)
        scores = final_scores(ro.scores, ro.has_stop, ppo, rm_mean=0.0)
        targets = compute_targets(ro, scores, ppo, ppo.kl_coef)
        optimizer, scheduler = make_optimizer(roles, ppo, 1)
        params = roles.policy_parameters() + roles.value_parameters()
        start.append([p.detach().clone() for p in params])
        ppo_update(roles, ro, targets, optimizer, scheduler, ppo, torch.Generator().manual_seed(0))
        trained.append([p.detach().clone() for p in params])
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled runs did compile
    assert all(torch.equal(a, b) for a, b in zip(*start))
    assert any(not torch.equal(a, b) for a, b in zip(start[0], trained[0]))  # the update moved the weights
    for eager, comp in zip(*trained):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-6)


def test_sft_and_rm_stages_train_compiled_as_eager(tmp_path):
    """model.compile in the SFT and RM stages (training and held-out evaluation through compiled
    layers): the adapters and the score head come out as eager's, to a float32 rounding."""
    from safetensors.torch import load_file

    from torch._dynamo.utils import counters

    from rlhf import rm, sft
    from rlhf.config import load_config

    from .conftest import one_torch_thread, write_config

    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        counters.clear()
        folder = tmp_path / str(compiled)
        folder.mkdir()
        cfg = load_config(write_config(folder), [f"model.compile={str(compiled).lower()}"])
        with one_torch_thread():
            sft.run(cfg)
            rm.run(cfg)
        assert (counters["stats"]["unique_graphs"] > 0) == compiled
        runs[compiled] = cfg
    for stage, files in (("sft", ["adapter_model.safetensors"]), ("rm", ["adapter_model.safetensors", "score_head.safetensors"])):
        for name in files:
            a = load_file(runs[False].stage_dir(stage) / "adapter" / name)
            b = load_file(runs[True].stage_dir(stage) / "adapter" / name)
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"{stage} {name} {k}")


def test_a_missing_compiler_is_a_user_error_before_training(monkeypatch, tmp_path):
    """Without a C++ compiler inductor would fail deep inside the first training pass; the stage says
    what is missing before any training."""
    from rlhf.compile_layers import compile_layer_forwards
    from rlhf.errors import UserError

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match="model.compile needs a C\\+\\+ compiler"):
        compile_layer_forwards(torch.nn.Linear(2, 2))


def test_compiled_layers_give_back_an_instance_forward_they_found():
    """A layer that already had an instance forward (accelerate's offloading hook sets one) gets it
    back after the block, and a layer without one gets none."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from rlhf.compile_layers import compiled_layers

    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    hooked, plain = LlamaDecoderLayer(cfg, 0), LlamaDecoderLayer(cfg, 1)
    hook = hooked.forward
    hooked.forward = hook
    with compiled_layers([(hooked, "compiled"), (plain, "compiled")]):
        assert hooked.forward == "compiled" and plain.forward == "compiled"
    assert vars(hooked)["forward"] is hook and "forward" not in vars(plain)
