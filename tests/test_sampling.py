"""rlhf.sampling: the stop-token choice, the one sampling-and-scoring path that PPO's rollout
and `rlhf eval` share (so eval measures the policy exactly as PPO sampled and scored it), and the
packed linear weights decoding uses on a CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rlhf import sampling
from rlhf.config import load_config
from rlhf.sampling import generate_pinned, left_pad, pinned_generation_config, stop_token_id


class _Tokenizer:
    eos_token_id = 2

    @staticmethod
    def convert_tokens_to_ids(token: str) -> int:
        return {"<|im_end|>": 7}[token]


def test_stop_token_id_reads_the_configured_token():
    assert stop_token_id("eos", _Tokenizer()) == 2
    assert stop_token_id("<|im_end|>", _Tokenizer()) == 7
    assert stop_token_id(None, _Tokenizer()) is None


def test_eval_draws_and_scores_what_the_rollout_draws_and_scores(tiny_ppo_run):
    """The trained policy through `rlhf eval`'s respond and through PPO's collect_rollout, same
    prompts, seed and batch: the same tokens, stop flags and RM scores, bit for bit, and eval's KL
    is the rollout's per-token log-ratio summed."""
    from rlhf.data import ppo_data, render
    from rlhf.evaluate import load_env, load_policy_adapter, respond
    from rlhf.models import load_tokenizer
    from rlhf.ppo.rollout import collect_rollout
    from rlhf.stats import kl_per_response

    cfg = load_config(tiny_ppo_run)
    tok = load_tokenizer(cfg.model, str(cfg.stage_dir("sft") / "model"))
    data = ppo_data(cfg, tok)
    prompts = [tok(render(tok, p), add_special_tokens=False)["input_ids"] for p in list(data.eval["prompt"])[:4]]
    env = load_env(cfg, tok, data.conversational)
    load_policy_adapter(env, cfg.stage_dir("ppo") / "adapter")
    env.batch_size = 4  # one batch, seeded with env.seed
    assert env.score_suffix  # the chat template's suffix is part of what both score
    out = respond(env, "policy", prompts, "test")
    q, qm = left_pad(prompts, env.pad_id, env.device)
    torch.manual_seed(env.seed)
    ro = collect_rollout(env.roles, q, qm, response_length=env.response_length, temperature=env.temperature,
                         stop_id=env.stop_id, pad_id=env.pad_id, micro_batch_size=4, score_suffix=env.score_suffix)
    assert out.scores == ro.scores.tolist()
    assert out.has_stop == ro.has_stop.tolist() and out.lengths == ro.response_mask.sum(1).tolist()
    assert out.texts == [tok.decode(r[m], skip_special_tokens=True) for r, m in zip(ro.response_ids, ro.response_mask)]
    assert out.kl == kl_per_response(ro.logprobs, ro.ref_logprobs, ro.response_mask).tolist()


def _tiny_lm(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from rlhf.config import ModelConfig
    from rlhf.models import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama")),
                                                dtype=dtype)


def _linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@pytest.mark.skipif(not sampling.onednn_bf16_linear(), reason="packing needs oneDNN with native bfloat16")
def test_packed_decoding_samples_the_same_tokens_and_leaves_the_model_as_it_was(monkeypatch):
    """A bfloat16 model samples the same tokens, bit for bit, with its linear layers packed for
    decoding (the default on such a CPU) as with plain `F.linear`; inside the block every plain
    linear layer is packed, and afterwards none is and the weights are untouched."""
    model = _tiny_lm(torch.bfloat16)
    weights = [m.weight.clone() for m in _linears(model)]
    config = pinned_generation_config(12, 0.7, None, 0)
    ids = torch.randint(3, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def sample():
        torch.manual_seed(1)
        return generate_pinned(model, config, ids, mask)

    with sampling.packed_linear_weights(model, batch=3):
        assert all("forward" in vars(m) for m in _linears(model))
    packed = sample()
    monkeypatch.setattr(sampling, "packed_linear_weights", lambda model, batch: contextlib.nullcontext())
    plain = sample()
    assert packed.shape == (3, 17) and torch.equal(packed, plain)
    assert all("forward" not in vars(m) for m in _linears(model))
    assert all(torch.equal(m.weight, w) for m, w in zip(_linears(model), weights))


def test_packing_leaves_float32_layers_and_replaced_forwards_alone(monkeypatch):
    model = _tiny_lm(torch.float32)
    with sampling.packed_linear_weights(model, batch=2):
        assert not any("forward" in vars(m) for m in _linears(model))  # float32: another library, not packed
    # bfloat16, but the packed copies would take a quarter of the memory available
    model = _tiny_lm(torch.bfloat16)
    monkeypatch.setattr(sampling, "_available_memory", lambda: 4 * sum(m.weight.nbytes for m in _linears(model)))
    with sampling.packed_linear_weights(model, batch=2):
        assert not any("forward" in vars(m) for m in _linears(model))
    monkeypatch.undo()
    hooked = _linears(model)[0]
    hooked.forward = hook = lambda x: x  # as accelerate's offloading hooks replace it
    with sampling.packed_linear_weights(model, batch=2):
        assert hooked.forward is hook
        if sampling.onednn_bf16_linear():  # the others are packed
            assert all("forward" in vars(m) for m in _linears(model)[1:])
    assert hooked.forward is hook


@pytest.mark.skipif(not sampling.onednn_bf16_linear(), reason="packing needs oneDNN with native bfloat16")
def test_a_packed_layer_with_a_bias_gives_the_same_output():
    """Qwen-style projections carry a bias; a (batch, tokens, in) input as the decoder passes it."""
    layer = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    plain = layer(x)
    with sampling.packed_linear_weights(layer, batch=5):
        assert "forward" in vars(layer)
        packed = layer(x)
    assert torch.equal(packed, plain)
