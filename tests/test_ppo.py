"""PPO on the tiny model: roles, rollout masks and logprobs, update isolation, exact resume,
health checks, the stage's outputs, and a toy run where a hand-written reward must rise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.config import load_config
from rlhf.data import ppo_data, render
from rlhf.models import load_tokenizer, lora_config
from rlhf.ppo.advantages import last_valid_index
from rlhf.ppo.losses import logprobs_from_logits, value_loss
from rlhf.ppo.roles import build_roles, head_forward, position_ids, use_adapter
from rlhf.errors import TrainingDiverged
from rlhf.ppo.checkpoint import checkpoint_dirs, trainable_state
from rlhf.ppo.rollout import collect_rollout, response_logprobs, token_values
from rlhf.ppo.trainer import compute_targets, final_scores, prompt_indices, run_loop
from rlhf.sampling import left_pad, sequence_scores, truncate_at_stop
from rlhf.tracking import MetricsWriter, read_metrics
from tests.conftest import write_config


def make_roles(config_path: Path, seed: int = 0, value_on_policy: bool = False, dtype=torch.float32,
               score_mean: float = 0.0, algorithm: str = "ppo", overrides: tuple[str, ...] = (),
               activation_checkpointing: bool = False, attn_implementation: str | None = None,
               compile_layers: bool = False):
    """The roles as the stage builds them for `algorithm` (a critic for ppo only); cfg has ppo.algorithm
    and `overrides` set. attn_implementation None: transformers' default kernel."""
    from transformers import AutoModelForCausalLM

    from rlhf.ppo.algorithms import needs_critic

    cfg = load_config(config_path, [f"ppo.algorithm={algorithm}", *overrides])
    sft = cfg.stage_dir("sft") / "model"
    tok = load_tokenizer(cfg.model, str(sft))
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    base = AutoModelForCausalLM.from_pretrained(sft, dtype=dtype, **kwargs)
    roles = build_roles(base, lora_config(cfg.lora, "CAUSAL_LM"), cfg.stage_dir("rm") / "adapter", value_on_policy,
                        score_mean=score_mean, critic=needs_critic(algorithm),
                        activation_checkpointing=activation_checkpointing, compile_layers=compile_layers)
    return cfg, tok, roles


def tokenized_prompts(cfg, tok):
    data = ppo_data(cfg, tok)
    texts = [render(tok, p) for p in data.train["prompt"]]
    return texts, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def rollout_for(cfg, tok, roles, n=4, response_length=12, micro=2, seed=0):
    texts, prompts = tokenized_prompts(cfg, tok)
    q, qm = left_pad(prompts[:n], tok.pad_token_id)
    torch.manual_seed(seed)
    return collect_rollout(roles, q, qm, response_length=response_length, temperature=0.7, stop_id=tok.eos_token_id,
                           pad_id=tok.pad_token_id, micro_batch_size=micro)


@pytest.fixture(scope="module")
def roles_env(tiny_rm_run):
    return make_roles(tiny_rm_run)


# ---------------------------------------------------------------------------- masks (docs/ppo.md §3, §7, §8)


def test_truncate_at_stop_masks_by_position_even_when_pad_equals_eos():
    eos = pad = 2
    tokens = torch.tensor([[5, 6, 2, 7, 8], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9]])
    out, mask, has_stop = truncate_at_stop(tokens, eos, pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_stop.tolist() == [True, True, False]
    assert out.tolist() == [[5, 6, 2, 2, 2], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9]]
    # `ids != pad` would have hidden the real EOS of rows 0 and 1:
    assert ((out != pad) != mask).any()


def test_truncate_without_stop_token_keeps_everything():
    tokens = torch.tensor([[1, 2, 3]])
    _, mask, has_stop = truncate_at_stop(tokens, None, 0)
    assert mask.all() and not has_stop.any()


def test_missing_eos_rule_uses_response_only():
    from rlhf.config import PPOConfig

    ppo = PPOConfig(data={"path": "x.jsonl"})
    raw = torch.tensor([1.0, 2.0])
    has_stop = torch.tensor([True, False])
    assert final_scores(raw, has_stop, ppo, rm_mean=0.5).tolist() == [0.5, -1.0]
    ppo_pen = PPOConfig(data={"path": "x.jsonl"}, missing_eos_penalty=2.0)
    assert final_scores(raw, has_stop, ppo_pen, rm_mean=0.5).tolist() == [0.5, -0.5]
    # In units of the RM's score std: replaced by -1 · 0.25, or 1.5 - 2 · 0.25; stopped responses untouched.
    assert final_scores(raw, has_stop, ppo, rm_mean=0.5, rm_std=0.25).tolist() == [0.5, -0.25]
    assert final_scores(raw, has_stop, ppo_pen, rm_mean=0.5, rm_std=0.25).tolist() == [0.5, 1.0]
    no_rule = PPOConfig(data={"path": "x.jsonl"}, missing_eos_score=None)
    assert final_scores(raw, has_stop, no_rule, rm_mean=0.5, rm_std=0.25).tolist() == [0.5, 1.5]
    # A prompt that contains EOS does not count: has_stop comes from truncate_at_stop on response tokens only.
    _, _, stop = truncate_at_stop(torch.tensor([[4, 5, 6]]), 2, 0)
    assert not stop.any()


def test_left_pad_and_positions():
    ids, mask = left_pad([[7, 8, 9], [5]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert position_ids(mask.long()).tolist() == [[0, 1, 2], [0, 0, 0]]


# ---------------------------------------------------------------------------- roles


def test_reference_is_the_sft_model_exactly(roles_env):
    from transformers import AutoModelForCausalLM

    cfg, tok, roles = roles_env
    sft = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft") / "model").eval()
    ids = torch.tensor([tok("hello there", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), use_adapter(roles.model, None):
        ref = roles.model(input_ids=ids, attention_mask=mask).logits
        expected = sft(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ref, expected)


def test_one_base_and_the_trainable_set(roles_env):
    cfg, tok, roles = roles_env
    base_params = sum(p.numel() for n, p in roles.model.named_parameters() if "lora_" not in n)
    sft_params = sum(p.numel() for p in load_sft(cfg).parameters())
    assert base_params == sft_params  # one copy of the base, whatever the number of roles
    trainable = {n for n, p in roles.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and (".policy." in n or ".value." in n) for n in trainable)
    assert any(".value." in n for n in trainable) and any(".policy." in n for n in trainable)
    assert not any(p.requires_grad for p in roles.reward_head.parameters())
    assert all(p.requires_grad for p in roles.value_head.parameters())
    # switching adapters leaves the trainable set alone (peft's set_adapter would not)
    with use_adapter(roles.model, "reward"):
        pass
    assert {n for n, p in roles.model.named_parameters() if p.requires_grad} == trainable


def test_critic_free_roles_have_no_value_adapter_or_head(tiny_rm_run):
    """critic=False (rloo, grpo, reinforce_pp; rlhf eval): policy, reward and the reference only. No
    value adapter is added and no head built, the rollout has no value pass, the optimizer has one
    group and a checkpoint holds the policy LoRA alone."""
    from rlhf.ppo.trainer import make_optimizer

    cfg, tok, roles = make_roles(tiny_rm_run, algorithm="rloo")
    assert roles.value_head is None and not roles.has_critic and roles.value_parameters() == []
    assert "value" not in roles.model.peft_config and not any(".value." in n for n, _ in roles.model.named_parameters())
    trainable = {n for n, p in roles.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".policy." in n for n in trainable)
    ro = rollout_for(cfg, tok, roles, n=2)
    assert ro.values is None and ro.select(torch.tensor([1])).values is None
    optimizer, _ = make_optimizer(roles, cfg.ppo, 1)
    assert [g["name"] for g in optimizer.param_groups] == ["policy"]
    assert set(trainable_state(roles)) == {f"model.{n}" for n in trainable}


def load_sft(cfg):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft") / "model")


def test_reward_role_matches_the_rm_stage(roles_env, tiny_rm_run):
    """The reward adapter + head on the causal LM gives the RM stage's merged model's score."""
    from transformers import AutoModelForSequenceClassification

    cfg, tok, roles = roles_env
    rm = AutoModelForSequenceClassification.from_pretrained(cfg.stage_dir("rm") / "model").eval()
    ids, mask = left_pad([tok("a question and an answer", add_special_tokens=False)["input_ids"]], tok.pad_token_id)
    with torch.no_grad():
        ours = sequence_scores(roles, ids, mask.long())
        theirs = rm(input_ids=ids, attention_mask=mask.long()).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_value_starts_as_the_reward(roles_env):
    cfg, tok, roles = roles_env
    ids, mask = left_pad([tok("some text here", add_special_tokens=False)["input_ids"]], tok.pad_token_id)
    with torch.no_grad():
        v = head_forward(roles, "value", roles.value_head, ids, mask.long())
        r = head_forward(roles, "reward", roles.reward_head, ids, mask.long())
    assert torch.equal(v, r)


def test_value_starts_centred_on_the_scores_ppo_trains_on(tiny_rm_run):
    """PPO's rewards are RM scores minus the RM's training score_mean: at step 0 the critic's value at
    the last real token equals that centred score (each, hence their mean), not the raw score."""
    from rlhf.ppo.stage import _rm_score_mean

    mean = _rm_score_mean(load_config(tiny_rm_run))
    assert abs(mean) > 1e-3  # an offset the test can see
    cfg, tok, roles = make_roles(tiny_rm_run, score_mean=mean)
    ro = rollout_for(cfg, tok, roles, n=4)
    last = last_valid_index(ro.attention_mask.bool()).unsqueeze(1)
    with torch.no_grad():
        values = head_forward(roles, "value", roles.value_head, ro.input_ids, ro.attention_mask).gather(1, last).squeeze(1)
    centred = ro.scores - mean
    assert torch.allclose(values, centred, atol=1e-5)
    assert values.mean().item() == pytest.approx(centred.mean().item(), abs=1e-5)


def test_ppo_stage_starts_its_critic_centred(tiny_ppo_run):
    """The stage passes the RM's score_mean on: its checkpoints' value head has a bias near -score_mean
    (4 small value updates from it by step 2)."""
    from safetensors.torch import load_file

    from rlhf.ppo.stage import _rm_score_mean

    cfg = load_config(tiny_ppo_run)
    mean = _rm_score_mean(cfg)
    bias = load_file(str(cfg.stage_dir("ppo") / "checkpoints" / "step-2" / "trainable.safetensors"))["value_head.bias"]
    assert abs(bias.item() + mean) < abs(mean) / 2


# ---------------------------------------------------------------------------- rollout (docs/ppo.md §4, §5, §6, §9)


def test_first_minibatch_ratio_one_and_kl_zero(roles_env):
    """Fresh policy adapter (LoRA B = 0): KL == 0 exactly, and the update's recomputed log-probs on a
    reshuffled micro-batch equal the rollout's, so the ratio is exactly 1 (dropout off everywhere)."""
    cfg, tok, roles = roles_env
    ro = rollout_for(cfg, tok, roles, n=4, micro=2)
    assert torch.equal(ro.logprobs, ro.ref_logprobs)
    idx = torch.tensor([3, 0])
    mb = ro.select(idx)
    with torch.no_grad():
        new, _, _ = response_logprobs(roles, mb.input_ids, mb.attention_mask, mb.response_ids, 0.7, "policy")
        values = token_values(roles, mb.input_ids, mb.attention_mask, mb.response_ids.shape[1])
    new = new.masked_fill(~mb.response_mask, 0)
    assert torch.equal(torch.exp(new - mb.logprobs)[mb.response_mask], torch.ones(int(mb.response_mask.sum())))
    assert torch.equal(values.masked_fill(~mb.response_mask, 0), mb.values)


def test_sampling_kernel_switch_leaves_the_compared_log_probs_on_the_training_kernel(tiny_rm_run, monkeypatch):
    """With the CPU default (eager attention, models.no_grad_attn_implementation: sdpa for sampling),
    only generation runs SDPA: the rollout's log-probs, the reference's and the update's recomputed
    ones all come from eager, so a fresh policy still has KL == 0 and ratio == 1 exactly, and the
    model is back on eager afterwards."""
    from transformers import AutoModelForCausalLM

    import rlhf.sampling
    from rlhf.config import ModelConfig
    from rlhf.models import no_grad_attn_implementation

    assert no_grad_attn_implementation(ModelConfig()) == "sdpa"  # a CPU, attention left to us
    assert no_grad_attn_implementation(ModelConfig(attn_implementation="eager")) is None  # the user's choice stays
    cfg = load_config(tiny_rm_run)
    tok = load_tokenizer(cfg.model, str(cfg.stage_dir("sft") / "model"))
    base = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("sft") / "model", attn_implementation="eager")
    roles = build_roles(base, lora_config(cfg.lora, "CAUSAL_LM"), cfg.stage_dir("rm") / "adapter",
                        no_grad_attn="sdpa")
    lm = roles.model.get_base_model()
    seen = []
    real_generate = rlhf.sampling.generate

    def spy(*args, **kwargs):
        seen.append(lm.config._attn_implementation)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(rlhf.sampling, "generate", spy)
    ro = rollout_for(cfg, tok, roles, n=4, micro=2)
    assert seen == ["sdpa"] and lm.config._attn_implementation == "eager"
    assert torch.equal(ro.logprobs, ro.ref_logprobs)
    mb = ro.select(torch.tensor([3, 0]))
    new, _, _ = response_logprobs(roles, mb.input_ids, mb.attention_mask, mb.response_ids, 0.7, "policy")
    assert lm.config._attn_implementation == "eager"
    assert torch.equal(new.detach().masked_fill(~mb.response_mask, 0), mb.logprobs)


def test_bfloat16_base_keeps_trained_and_compared_tensors_float32(tiny_rm_run):
    """A bf16 base (model.dtype bfloat16, or auto on bf16 hardware): LoRA weights, heads, values and
    log-probs are float32; a fresh policy still gives KL == 0 and ratio == 1 exactly; an update
    moves the policy and stays finite."""
    from rlhf.ppo.trainer import make_optimizer, ppo_update

    cfg, tok, roles = make_roles(tiny_rm_run, dtype=torch.bfloat16)
    assert roles.model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    trained = roles.policy_parameters() + roles.value_parameters()
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert roles.reward_head.weight.dtype == torch.float32
    ro = rollout_for(cfg, tok, roles, n=4, micro=2)
    assert ro.logprobs.dtype == ro.values.dtype == ro.scores.dtype == torch.float32
    assert torch.equal(ro.logprobs, ro.ref_logprobs)
    mb = ro.select(torch.tensor([3, 0]))
    with torch.no_grad():
        new, _, _ = response_logprobs(roles, mb.input_ids, mb.attention_mask, mb.response_ids, 0.7, "policy")
    assert torch.equal(new.masked_fill(~mb.response_mask, 0), mb.logprobs)
    ppo = cfg.ppo.model_copy(update={"ppo_epochs": 1, "micro_batch_size": 2, "learning_rate": 1e-2})
    before = [p.detach().clone() for p in roles.policy_parameters()]
    optimizer, scheduler = make_optimizer(roles, ppo, 1)
    targets = compute_targets(ro, final_scores(ro.scores, ro.has_stop, ppo, 0.0), ppo, ppo.kl_coef)
    stats = ppo_update(roles, ro, targets, optimizer, scheduler, ppo, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, roles.policy_parameters()))


def test_gradient_buffers_are_made_before_the_first_pass_and_kept(tiny_rm_run):
    """make_optimizer gives every trained parameter a zeroed gradient buffer before any pass, and
    the updates zero it in place instead of freeing it (so each step's gradients do not land between
    its activations in the heap); the trained weights are those of buffers made by the first backward."""
    from rlhf.ppo.trainer import make_optimizer, ppo_update

    runs = []
    for made_first in (True, False):
        cfg, tok, roles = make_roles(tiny_rm_run)
        ro = rollout_for(cfg, tok, roles, n=4, micro=2)
        ppo = cfg.ppo.model_copy(update={"ppo_epochs": 2, "micro_batch_size": 2, "learning_rate": 1e-2})
        optimizer, scheduler = make_optimizer(roles, ppo, 2)
        trained = [p for g in optimizer.param_groups for p in g["params"]]
        assert len(trained) == len(roles.policy_parameters() + roles.value_parameters())
        assert all(p.grad is not None and not p.grad.any() for p in trained)
        if not made_first:
            for p in trained:
                p.grad = None
        buffers = [p.grad for p in trained]
        targets = compute_targets(ro, final_scores(ro.scores, ro.has_stop, ppo, 0.0), ppo, ppo.kl_coef)
        ppo_update(roles, ro, targets, optimizer, scheduler, ppo, torch.Generator().manual_seed(0))
        if made_first:  # after the optimizer steps, the same tensors, zeroed
            assert all(p.grad is b and not b.any() for p, b in zip(trained, buffers))
        runs.append([p.detach().clone() for p in trained])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def sampled_and_forward_logprobs(cfg, tok, roles, sampling_context):
    """Sample 10 tokens for 3 prompts inside `sampling_context` and return (the sampler's own log-probs
    (logits / T), the policy's and the reference's log-probs from a padded forward pass), each (3, 10)."""
    from transformers import GenerationConfig

    texts, prompts = tokenized_prompts(cfg, tok)
    q, qm = left_pad(prompts[:3], tok.pad_token_id)
    T, R = 0.7, 10
    gen = GenerationConfig(do_sample=True, temperature=T, top_k=0, top_p=1.0, max_new_tokens=R, min_new_tokens=R,
                           pad_token_id=tok.pad_token_id, eos_token_id=None, output_logits=True,
                           return_dict_in_generate=True)
    torch.manual_seed(0)
    with torch.no_grad(), sampling_context:
        out = roles.model.generate(input_ids=q, attention_mask=qm.long(), generation_config=gen)
    response = out.sequences[:, q.shape[1]:]
    sampled = logprobs_from_logits(torch.stack(out.logits, dim=1), response, T)  # raw logits of each sampled step
    mask = torch.cat([qm, torch.ones_like(response, dtype=torch.bool)], 1).long()
    with torch.no_grad():
        policy, _, _ = response_logprobs(roles, torch.cat([q, response], 1), mask, response, T, "policy")
        reference, _, _ = response_logprobs(roles, torch.cat([q, response], 1), mask, response, T, None)
    return sampled, policy, reference


def test_forward_logprobs_match_generation(roles_env):
    """Logprobs recomputed by a padded forward pass match the sampler's own (logits / T) within 1e-4."""
    cfg, tok, roles = roles_env
    sampled, policy, _ = sampled_and_forward_logprobs(cfg, tok, roles, use_adapter(roles.model, "policy"))
    assert torch.allclose(policy, sampled, atol=1e-4)


def test_folded_policy_samples_from_the_policy_and_leaves_the_base_alone(tiny_rm_run):
    """Generation folds the policy LoRA into scratch weights (temporarily_merged): with a
    trained-looking policy, the sampler's log-probs equal the unfolded forward pass's within 1e-4 (and differ from
    the reference's), and afterwards the base holds its own weight tensors, unchanged."""
    from rlhf.ppo.roles import temporarily_merged

    cfg, tok, roles = make_roles(tiny_rm_run)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in roles.model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                p.normal_(0.0, 0.5)
    base = {n: (p, p.detach().clone()) for n, p in roles.model.named_parameters() if "lora_" not in n}
    sampled, policy, reference = sampled_and_forward_logprobs(cfg, tok, roles, temporarily_merged(roles.model, "policy"))
    assert torch.allclose(policy, sampled, atol=1e-4)
    assert (policy - reference).abs().max() > 1e-2
    current = dict(roles.model.named_parameters())
    for name, (param, value) in base.items():
        assert current[name] is param and torch.equal(param, value)


def _folder_with_foreign_generation_config(tiny_rm_run, tmp_path: Path) -> Path:
    """A copy of sft/model whose generation_config.json sets everything PPO must not inherit."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(load_config(tiny_rm_run).stage_dir("sft") / "model", folder)
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text())
    gen.update(do_sample=True, temperature=3.0, top_k=5, top_p=0.5, min_p=0.2, typical_p=0.8, no_repeat_ngram_size=1,
               repetition_penalty=1.8, suppress_tokens=list(range(100, 140)), bad_words_ids=[[i] for i in range(140, 150)],
               eos_token_id=list(range(150, 260)), min_new_tokens=2)
    path.write_text(json.dumps(gen))
    return folder


@pytest.mark.parametrize("stop", ["eos", None])
def test_sampling_inherits_nothing_from_the_model_folder(tiny_rm_run, tmp_path, monkeypatch, stop):
    """transformers fills every generation field left unset from the model's generation_config.json.
    With a folder that sets top_k, min_p, typical_p, n-gram and repetition rules, suppressed and banned
    tokens and a list of EOS ids, the sampler still draws from softmax(logits / T): the probability it
    gave each sampled token equals the forward pass's log-prob; and with stop_token null every counted
    position was sampled (no EOS from the file ends a response early)."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(tiny_rm_run)
    tok = load_tokenizer(cfg.model, str(cfg.stage_dir("sft") / "model"))
    base = AutoModelForCausalLM.from_pretrained(_folder_with_foreign_generation_config(tiny_rm_run, tmp_path))
    assert base.generation_config.min_p == 0.2  # the folder's settings did load
    roles = build_roles(base, lora_config(cfg.lora, "CAUSAL_LM"), cfg.stage_dir("rm") / "adapter")
    real, sampled = torch.multinomial, []

    def recording(probs, num_samples, *args, **kwargs):
        out = real(probs, num_samples, *args, **kwargs)
        sampled.append(probs.gather(1, out).log().squeeze(1))
        return out

    monkeypatch.setattr(torch, "multinomial", recording)
    _, prompts = tokenized_prompts(cfg, tok)
    q, qm = left_pad(prompts[:4], tok.pad_token_id)
    torch.manual_seed(0)
    ro = collect_rollout(roles, q, qm, response_length=12, temperature=0.7,
                         stop_id=tok.eos_token_id if stop else None, pad_id=tok.pad_token_id, micro_batch_size=4)
    monkeypatch.undo()
    if stop is None:
        assert len(sampled) == 12 and bool(ro.response_mask.all())  # 12 sampled tokens per row, all of them counted
    steps = torch.stack(sampled, dim=1)[:, :ro.response_ids.shape[1]]
    assert torch.allclose(steps[ro.response_mask], ro.logprobs[ro.response_mask], atol=1e-4)


def test_rollout_masks_scores_and_padding(roles_env):
    cfg, tok, roles = roles_env
    ro = rollout_for(cfg, tok, roles, n=4, response_length=12)
    B, R = ro.response_ids.shape
    assert B == 4 and R == int(ro.response_mask.sum(1).max()) <= 12  # trimmed to the longest response
    # everything after the stop token is masked out and zero in every per-token tensor
    for t in (ro.logprobs, ro.ref_logprobs, ro.values, ro.entropy):
        assert torch.all(t[~ro.response_mask] == 0)
    # the score sits at the last real token: recompute it on each unpadded sequence alone
    for i in range(B):
        real = ro.input_ids[i][ro.attention_mask[i].bool()].unsqueeze(0)
        with torch.no_grad():
            alone = head_forward(roles, "reward", roles.reward_head, real, torch.ones_like(real))[0, -1]
        assert torch.allclose(alone, ro.scores[i], atol=1e-5)
    assert torch.equal(last_valid_index(ro.attention_mask.bool()), ro.query_ids.shape[1] + ro.response_mask.sum(1) - 1)


def test_rollout_with_pad_equal_to_eos(tiny_rm_run):
    """A tokenizer whose pad is its EOS: masks still end at the first EOS, and an EOS sampled as the
    first token is kept as a one-token response."""
    cfg, tok, roles = make_roles(tiny_rm_run)
    tok.pad_token = tok.eos_token
    texts, prompts = tokenized_prompts(cfg, tok)
    q, qm = left_pad(prompts[:4], tok.pad_token_id)
    bias = torch.zeros(roles.model.get_base_model().config.vocab_size)
    bias[tok.eos_token_id] = 4.0  # make EOS likely so some rows stop early

    head = roles.model.get_base_model().lm_head
    handle = head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        torch.manual_seed(1)
        ro = collect_rollout(roles, q, qm, response_length=10, temperature=0.7, stop_id=tok.eos_token_id,
                             pad_id=tok.pad_token_id, micro_batch_size=4)
    finally:
        handle.remove()
    assert ro.has_stop.any()
    for i in range(4):
        if ro.has_stop[i]:
            first = int((ro.response_ids[i] == tok.eos_token_id).nonzero()[0])
            assert ro.response_mask[i].sum() == first + 1


# ---------------------------------------------------------------------------- update (docs/ppo.md §16-§19)


def test_value_loss_leaves_policy_adapter_untouched(roles_env):
    cfg, tok, roles = roles_env
    ro = rollout_for(cfg, tok, roles, n=2, micro=2)
    roles.model.zero_grad(set_to_none=True)
    values = token_values(roles, ro.input_ids, ro.attention_mask, ro.response_ids.shape[1])
    loss, _ = value_loss(values, ro.values, ro.values + 1.0, ro.response_mask)
    loss.backward()
    policy_grads = [p.grad for p in roles.policy_parameters()]
    value_grads = [p.grad for p in roles.value_parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in policy_grads)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in value_grads)
    roles.model.zero_grad(set_to_none=True)
    roles.value_head.zero_grad(set_to_none=True)


def test_value_on_policy_value_loss_never_moves_the_policy(tiny_rm_run):
    """value_head_on_policy: one forward gives log-probs and values, but the value's gradient stops at
    the policy's features: a value loss alone leaves every policy LoRA gradient empty and trains the head."""
    cfg, tok, roles = make_roles(tiny_rm_run, value_on_policy=True)
    ro = rollout_for(cfg, tok, roles, n=2, micro=2)
    roles.model.zero_grad(set_to_none=True)
    _, _, values = response_logprobs(roles, ro.input_ids, ro.attention_mask, ro.response_ids, 0.7, "policy",
                                     need_values=True)
    loss, _ = value_loss(values, ro.values, ro.values + 1.0, ro.response_mask)
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in roles.policy_parameters())
    assert roles.value_parameters() == list(roles.value_head.parameters())
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in roles.value_parameters())


def test_advantages_are_whitened_over_valid_tokens(roles_env):
    cfg, tok, roles = roles_env
    ro = rollout_for(cfg, tok, roles, n=4)
    targets = compute_targets(ro, ro.scores, cfg.ppo, kl_coef=0.05)
    valid = targets.advantages[ro.response_mask]
    assert abs(valid.mean().item()) < 1e-5 and abs(valid.std().item() - 1) < 1e-3
    assert torch.all(targets.advantages[~ro.response_mask] == 0)


def test_prompt_order_is_a_pure_function_of_step():
    a = [prompt_indices(10, 4, s, seed=3) for s in range(6)]
    b = [prompt_indices(10, 4, s, seed=3) for s in range(6)]
    assert a == b
    first_epoch = a[0] + a[1] + a[2][:2]
    assert sorted(first_epoch) == list(range(10))  # every prompt once per epoch
    assert prompt_indices(10, 4, 0, seed=4) != a[0]


def test_step_prompts_are_whole_groups_on_one_process():
    """rollout_batch_size counts responses: with k samples per prompt a step has rollout_batch_size / k
    prompts per process, each k times in a row; the processes' prompts are disjoint consecutive shares
    of the step's prompt_indices (a group never spans two processes); k = 1 is PPO's plain slice."""
    from rlhf.config import PPOConfig
    from rlhf.ppo.trainer import step_prompt_indices

    rloo = PPOConfig(data={"path": "x.jsonl"}, algorithm="rloo", rollout_batch_size=8, micro_batch_size=4)  # k = 4
    shares = [step_prompt_indices(10, rloo, 3, seed=1, rank=r, world=2) for r in (0, 1)]
    step = prompt_indices(10, 4, 3, seed=1)
    assert shares == [[step[0]] * 4 + [step[1]] * 4, [step[2]] * 4 + [step[3]] * 4]
    ppo = PPOConfig(data={"path": "x.jsonl"}, rollout_batch_size=8, micro_batch_size=4)
    assert step_prompt_indices(10, ppo, 3, seed=1, rank=1, world=2) == prompt_indices(10, 16, 3, seed=1)[8:]


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "reinforce_pp"])
def test_critic_free_update_moves_the_policy_towards_the_better_responses(tiny_rm_run, algorithm):
    """One optimizer step on 2 prompts × 4 samples with a hand-written score, through the loop's own
    targets and update. At a fresh policy (= reference: KL 0) the loss's gradient is −Σ w·∇log π, with
    weights worked out from the scores alone: RLOO score − group mean (per response), GRPO the same over
    the group std and the response length, REINFORCE++ score − the batch's token-weighted mean (per
    token). Adam's first step moves along −sign(gradient), so the weighted change of the responses'
    log-probabilities must be positive (and is negative had any sign been flipped)."""
    from rlhf.ppo.trainer import make_optimizer, ppo_update

    cfg, tok, roles = make_roles(tiny_rm_run, algorithm=algorithm)
    ppo = cfg.ppo.model_copy(update={"ppo_epochs": 1, "rollout_batch_size": 8, "micro_batch_size": 8,
                                     "stop_token": None, "response_length": 8})
    if algorithm == "reinforce_pp":
        ppo = ppo.model_copy(update={"samples_per_prompt": 4})
    _, prompts = tokenized_prompts(cfg, tok)
    q, qm = left_pad([prompts[0]] * 4 + [prompts[1]] * 4, tok.pad_token_id)
    token_id_sum = lambda q, r, m: (r * m).sum(1).float() / 1000  # noqa: E731 - varies between any two responses
    torch.manual_seed(0)
    ro = collect_rollout(roles, q, qm, response_length=8, temperature=0.7, stop_id=None, pad_id=tok.pad_token_id,
                         micro_batch_size=8, reward_fn=token_id_sum)
    assert ro.values is None and torch.equal(ro.logprobs, ro.ref_logprobs)
    scores = final_scores(ro.scores, ro.has_stop, ppo, rm_mean=0.0)
    targets = compute_targets(ro, scores, ppo, ppo.kl_coef)
    optimizer, scheduler = make_optimizer(roles, ppo, 1)
    ppo_update(roles, ro, targets, optimizer, scheduler, ppo, torch.Generator().manual_seed(0))
    with torch.no_grad():
        new, _, _ = response_logprobs(roles, ro.input_ids, ro.attention_mask, ro.response_ids, 0.7, "policy")
    mask = ro.response_mask
    change = torch.where(mask, new - ro.logprobs, torch.zeros(()))
    groups = scores.reshape(2, 4)
    centred = (groups - groups.mean(1, keepdim=True)).reshape(-1)
    if algorithm == "rloo":
        weights = centred[:, None] * mask
    elif algorithm == "grpo":
        spread = groups.std(1, keepdim=True).expand(2, 4).reshape(-1)
        weights = (centred / spread / mask.sum(1))[:, None] * mask
    else:
        token_mean = (scores[:, None] * mask).sum() / mask.sum()
        weights = (scores - token_mean)[:, None] * mask
    moved = (weights * change).sum().item()
    assert moved > 0, moved
    assert change.abs().max() > 1e-4  # the step did move the policy


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_checkpointing_gives_the_same_update_and_keeps_fewer_activations(tiny_rm_run, dtype, attn):
    """model.gradient_checkpointing in stage 3: PPO's policy and value updates (two adapters, each
    backward recomputing its layers) give the same weights as without it, while a policy forward keeps
    a fraction of the activations. Recomputing in the backward with the adapter active at that time
    (not the one of the forward) would change the value adapter's gradients; dropout stays off.

    Without it, the updates still recompute the cheap parts (rlhf.recompute: eager attention's
    probabilities, silu(gate)), with the adapter of the forward too, and the policy's
    recomputed log-probs equal the rollout's exactly (a fresh policy's ratio is 1)."""
    from rlhf.ppo.trainer import make_optimizer, ppo_update

    def saved_bytes(roles, ro):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with roles.training_pass("policy"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            response_logprobs(roles, ro.input_ids, ro.attention_mask, ro.response_ids, 0.7, "policy")
        return sum(total)

    trained, kept = [], []
    for checkpointing in (False, True):
        cfg, tok, roles = make_roles(tiny_rm_run, dtype=dtype, activation_checkpointing=checkpointing,
                                     attn_implementation=attn)
        lm = roles.model.get_base_model()
        replaced = [m for m in lm.modules() if "forward" in vars(m)]
        assert len(replaced) == (0 if checkpointing else 3 * lm.config.num_hidden_layers + 1)  # MLP, 2 norms; final norm
        ppo = cfg.ppo.model_copy(update={"ppo_epochs": 1, "rollout_batch_size": 4, "num_mini_batches": 1,
                                         "micro_batch_size": 2})
        ro = rollout_for(cfg, tok, roles, n=4, micro=2)
        with roles.training_pass("policy"):
            kernel = lm.config._attn_implementation
            fresh, _, _ = response_logprobs(roles, ro.input_ids, ro.attention_mask, ro.response_ids, 0.7, "policy")
        assert torch.equal(fresh.detach().masked_fill(~ro.response_mask, 0), ro.logprobs)
        assert kernel == ("eager_recomputed" if attn == "eager" and not checkpointing else attn)
        assert lm.config._attn_implementation == attn
        scores = final_scores(ro.scores, ro.has_stop, ppo, rm_mean=0.0)
        targets = compute_targets(ro, scores, ppo, ppo.kl_coef)
        optimizer, scheduler = make_optimizer(roles, ppo, 1)
        kept.append(saved_bytes(roles, ro))
        ppo_update(roles, ro, targets, optimizer, scheduler, ppo, torch.Generator().manual_seed(0))
        assert not any(m.training for m in roles.model.modules())
        trained.append([p.detach().clone() for p in roles.policy_parameters() + roles.value_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*trained))
    assert kept[1] < kept[0] / 3, kept


# ---------------------------------------------------------------------------- resume and health


def _loop(cfg, tok, roles, ckpt: Path, **kw):
    texts, prompts = tokenized_prompts(cfg, tok)
    return run_loop(roles, tok, prompts, texts, cfg.ppo, seed=cfg.seed, rm_mean=0.0, ckpt_root=ckpt,
                    config_hash="h", metrics_writer=MetricsWriter(ckpt / "metrics.jsonl"),
                    samples_path=ckpt.parent / f"{ckpt.name}-samples.jsonl", **kw)


@pytest.mark.parametrize("algorithm,compiled", [("ppo", False), ("rloo", False), ("grpo", False),
                                                ("reinforce_pp", False), ("ppo", True)])
def test_resume_gives_identical_weights(tiny_rm_run, tmp_path, algorithm, compiled):
    """0→4 unbroken vs 0→2, stop, new process state, resume 2→4: max abs diff ≤ 1e-6 (exact on CPU),
    for every algorithm (the critic-free ones: 1 prompt × 4 samples, or 4 × 1, per step, no critic),
    and for PPO with compiled layers (model.compile: the resumed run compiles again).
    The critic-free runs score with the RM alone (the tiny model's responses rarely reach EOS, and
    equal missing-EOS scores would give RLOO and GRPO nothing to learn: weights that never move
    would resume trivially)."""
    # RLOO and GRPO at a fresh policy: KL 0, so equal scores would mean zero advantages
    overrides = () if algorithm == "ppo" else ("ppo.missing_eos_score=null",)
    cfg, tok, roles = make_roles(tiny_rm_run, seed=5, algorithm=algorithm, overrides=overrides, compile_layers=compiled)
    _loop(cfg, tok, roles, tmp_path / "a")
    unbroken = trainable_state(roles)
    assert any(v.abs().max() > 0 for k, v in unbroken.items() if "lora_B" in k)  # the policy did train
    cfg, tok, roles = make_roles(tiny_rm_run, seed=5, algorithm=algorithm, overrides=overrides, compile_layers=compiled)
    _loop(cfg, tok, roles, tmp_path / "b", stop_after=2)
    torch.manual_seed(999)  # disturb every RNG: resume must restore them
    cfg, tok, roles = make_roles(tiny_rm_run, seed=77, algorithm=algorithm, overrides=overrides,  # overwritten
                                 compile_layers=compiled)
    if compiled:
        torch._dynamo.reset()  # as a new process would: compile again
    last = _loop(cfg, tok, roles, tmp_path / "b")
    resumed = trainable_state(roles)
    # Resumed at the last step (a kill during the final export): no step runs, the final metrics
    # are the checkpoint's.
    assert _loop(cfg, tok, roles, tmp_path / "b") == last and last
    assert max((unbroken[k] - resumed[k]).abs().max().item() for k in unbroken) <= 1e-6
    assert [d.name for d in checkpoint_dirs(tmp_path / "b")] == ["step-2", "step-4"]
    assert (tmp_path / "b" / "step-2" / "optimizer.pt").is_file()  # the newest two keep their optimizer state
    assert any(k.startswith("value_head.") for k in resumed) == (algorithm == "ppo")
    assert ("value/explained_variance" in last) == ("loss/value" in last) == (algorithm == "ppo")
    assert ("loss/kl" in last) == (algorithm == "grpo")


def test_nan_scores_abort_and_keep_last_checkpoint(tiny_rm_run, tmp_path):
    cfg, tok, roles = make_roles(tiny_rm_run)
    _loop(cfg, tok, roles, tmp_path / "c", stop_after=2)
    good = trainable_state(roles)
    cfg, tok, roles = make_roles(tiny_rm_run)

    def nan_reward(q, r, m):
        return torch.full((r.shape[0],), float("nan"))

    with pytest.raises(TrainingDiverged, match="scores"):
        _loop(cfg, tok, roles, tmp_path / "c", reward_fn=nan_reward)
    assert [d.name for d in checkpoint_dirs(tmp_path / "c")] == ["step-2"]
    from safetensors.torch import load_file

    kept = load_file(str(tmp_path / "c" / "step-2" / "trainable.safetensors"))
    assert all(torch.equal(kept[k], good[k]) for k in good)


def test_health_warnings_fire(roles_env, caplog):
    from rlhf.ppo.metrics import health_warnings

    cfg, tok, roles = roles_env
    ro = rollout_for(cfg, tok, roles, n=2)
    ro.response_ids[1] = ro.response_ids[0]
    ro.response_mask[1] = ro.response_mask[0]
    kl = torch.tensor([25.0, 25.0])
    warnings = health_warnings({"objective/kl": 25.0, "response/eos_fraction": 0.0}, ro, cfg.ppo, kl)
    text = " ".join(warnings)
    assert "exceeds kl_warn_bound" in text and "stop token" in text and "identical" in text
    noisy = torch.tensor([-3.0, 1.0])  # mean -1, but within noise
    assert "negative" not in " ".join(health_warnings({"objective/kl": -1.0, "response/eos_fraction": 0.5}, ro, cfg.ppo, noisy))
    clear = torch.tensor([-1.0, -1.01])
    assert "negative" in " ".join(health_warnings({"objective/kl": -1.005, "response/eos_fraction": 0.5}, ro, cfg.ppo, clear))


def test_group_methods_warn_when_no_prompt_has_a_learning_signal(roles_env):
    """rloo/grpo: when every prompt's samples scored alike (typically all cut off, all given
    missing_eos_score), the leave-one-out or group baseline makes every advantage 0: one line says so.
    One group that differs is enough to stay quiet, and PPO (a learned baseline) never warns."""
    from rlhf.ppo.metrics import health_warnings

    cfg, tok, roles = roles_env
    ro = rollout_for(cfg, tok, roles, n=4)
    grpo = cfg.ppo.model_copy(update={"algorithm": "grpo", "samples_per_prompt": 2})
    metrics, kl = {"objective/kl": 0.0, "response/eos_fraction": 0.5}, torch.zeros(4)
    flat = torch.tensor([-1.0, -1.0, 0.3, 0.3])

    def said(ppo, scores):
        return [w for w in health_warnings(metrics, ro, ppo, kl, scores_used=scores) if "learning signal" in w]

    assert said(grpo, flat) == ["every prompt's 2 samples got the same score (when none reaches the stop token, all "
                                "get missing_eos_score): the group baseline leaves no learning signal"]
    assert said(grpo, torch.tensor([-1.0, -1.0, 0.3, 0.4])) == []
    assert said(cfg.ppo, flat) == []


def test_sft_eos_warning_names_the_rate_the_length_and_the_scaled_rule():
    from rlhf.config import PPOConfig
    from rlhf.ppo.metrics import sft_eos_warning

    ppo = PPOConfig(data={"path": "x.jsonl"}, response_length=48)
    text = sft_eos_warning(0.25, ppo, rm_std=0.5)
    assert text.startswith("only 25% of the SFT policy's responses reach the stop token within ppo.response_length=48")
    assert "missing_eos_score × RM score_std = -0.5" in text and "raise ppo.response_length (e.g. to 96)" in text
    assert sft_eos_warning(0.5, ppo) is None  # half or more: no warning
    assert sft_eos_warning(0.0, ppo.model_copy(update={"stop_token": None})) is None
    pen = sft_eos_warning(0.0, ppo.model_copy(update={"missing_eos_score": None, "missing_eos_penalty": 2.0}), 0.25)
    assert "missing_eos_penalty × RM score_std = 0.5" in pen
    assert "scored cut off" in sft_eos_warning(0.1, ppo.model_copy(update={"missing_eos_score": None}))


def test_first_step_eos_warning_replaces_the_plain_one(roles_env):
    from rlhf.ppo.metrics import health_warnings

    cfg, tok, roles = roles_env
    ro = rollout_for(cfg, tok, roles, n=2)
    kl = torch.tensor([0.0, 0.0])
    metrics = {"objective/kl": 0.0, "response/eos_fraction": 0.0}
    later = [w for w in health_warnings(metrics, ro, cfg.ppo, kl) if "stop token" in w]
    first = [w for w in health_warnings(metrics, ro, cfg.ppo, kl, first_step=True) if "stop token" in w]
    assert later == ["no response ended with the stop token; raise response_length or check stop_token"]
    assert len(first) == 1 and first[0].startswith("only 0% of the SFT policy's responses")


def test_fresh_run_warns_once_about_a_low_sft_eos_rate_and_scales_the_rule(tiny_rm_run, tmp_path, caplog):
    """The tiny model's responses rarely reach EOS within 16 tokens: the first step of a fresh run
    warns once (not at later steps, not on resume), and the missing-EOS score is -1 · rm_std."""
    cfg, tok, roles = make_roles(tiny_rm_run)
    zero = lambda q, r, m: torch.zeros(r.shape[0])  # noqa: E731 - the score is then the missing-EOS rule alone
    ckpt = tmp_path / "eos"
    with caplog.at_level("WARNING", logger="rlhf.ppo.trainer"):
        _loop(cfg, tok, roles, ckpt, stop_after=2, reward_fn=zero, rm_std=0.5)
    said = [r.getMessage() for r in caplog.records if "of the SFT policy's responses reach the stop token" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("step 1: only ")
    assert "ppo.response_length=16 tokens" in said[0] and "score_std = -0.5" in said[0]
    for row in read_metrics(ckpt / "metrics.jsonl"):
        assert row["objective/scores_used"] == pytest.approx(-0.5 * (1 - row["response/eos_fraction"]), abs=1e-6)
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf.ppo.trainer"):
        _loop(cfg, tok, roles, ckpt, stop_after=3, reward_fn=zero, rm_std=0.5)
    assert not [r for r in caplog.records if "SFT policy" in r.getMessage()]


# ---------------------------------------------------------------------------- end to end


def test_ppo_stage_writes_outputs_and_merged_model_loads(tiny_rm_run):
    from transformers import AutoModelForCausalLM

    from rlhf.ppo import run

    cfg = load_config(tiny_rm_run)
    out = run(cfg)
    stage = cfg.stage_dir("ppo")
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "done"
    rows = read_metrics(stage / "metrics.jsonl")
    assert len(rows) == cfg.ppo.steps
    for name in ("objective/scores", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward",
                 "objective/entropy", "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value",
                 "value/clipfrac", "value/explained_variance", "response/length_mean", "response/eos_fraction", "lr",
                 "episode", "time/rollout_s", "time/update_s", "throughput/tokens_per_s"):
        assert name in rows[-1]
    assert (stage / "samples.jsonl").read_text().strip()
    # The stage scales the missing-EOS score by the RM's recorded score std: the step-2 samples
    # (that step's rollout, raw scores) give that step's mean reward score.
    rm_metrics = json.loads((cfg.stage_dir("rm") / "manifest.json").read_text())["metrics"]
    rm_eval = json.loads((cfg.stage_dir("rm") / "eval.json").read_text())
    assert rm_metrics["score_std"] == rm_eval["score_std"] > 0
    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    step2 = [r for r in samples if r["step"] == 2]
    expected = sum(r["score"] - rm_metrics["score_mean"] if r["has_stop"] else cfg.ppo.missing_eos_score * rm_metrics["score_std"]
                   for r in step2) / len(step2)
    assert rows[1]["objective/scores_used"] == pytest.approx(expected, abs=1e-3)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = load_tokenizer(cfg.model, str(out))
    ids = tok("hi", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    # the merged policy differs from the SFT model: PPO trained the adapter
    sft = load_sft(cfg)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), sft.state_dict().values()))


def test_ppo_needs_rm_stage(tiny_sft_run, tmp_path):
    from rlhf.errors import UserError
    from rlhf.ppo import run

    cfg = load_config(write_config(tmp_path))
    with pytest.raises(UserError, match="rlhf sft"):
        run(cfg)


def test_toy_reward_rises_with_bounded_kl(tiny_rm_run, tmp_path):
    """A hand-written reward (the number of response tokens that are lowercase letters, ~1 of 12
    for the random tiny model) must rise clearly within 30 steps while KL stays bounded: the
    optimiser works end to end. (The count, not the share: the critic starts from the tiny RM,
    whose value noise would drown a reward that varies by 0.1.)"""
    cfg, tok, roles = make_roles(tiny_rm_run, seed=0)
    letters = torch.tensor(tok.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz")))

    def letter_count(q, r, m):
        return (torch.isin(r, letters) & m).float().sum(1)

    toy = cfg.ppo.model_copy(update=dict(steps=30, rollout_batch_size=8, micro_batch_size=8, ppo_epochs=4,
                                         response_length=12, learning_rate=3e-3, kl_coef=0.05, stop_token=None,
                                         save_every=100, sample_every=100))
    texts, prompts = tokenized_prompts(cfg, tok)
    ckpt = tmp_path / "toy"
    run_loop(roles, tok, prompts, texts, toy, seed=0, rm_mean=0.0, ckpt_root=ckpt, config_hash="toy",
             metrics_writer=MetricsWriter(ckpt / "metrics.jsonl"), samples_path=tmp_path / "s.jsonl",
             reward_fn=letter_count)
    rows = read_metrics(ckpt / "metrics.jsonl")
    first = sum(r["objective/scores"] for r in rows[:5]) / 5
    last = sum(r["objective/scores"] for r in rows[-5:]) / 5
    assert last > first + 1.5, (first, last)
    assert max(r["objective/kl"] for r in rows) < 30.0


def test_append_after_stop_places_suffix_after_last_real_token():
    from rlhf.sampling import append_after_stop

    ids = torch.tensor([[0, 5, 6, 2, 0], [7, 8, 9, 9, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    out, m = append_after_stop(ids, mask, torch.tensor([True, False]), [42], pad_id=0)
    assert out.tolist() == [[0, 5, 6, 2, 42, 0], [7, 8, 9, 9, 9, 0]]
    assert m.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]


def test_policy_response_scored_as_the_rm_stage_scores_it(roles_env):
    """A stopped response scored inside PPO (query + response + template suffix) gets the score the
    RM stage's merged model gives the same conversation rendered by the chat template."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import turn_end_suffix
    from rlhf.rm import encode
    from rlhf.sampling import append_after_stop

    cfg, tok, roles = roles_env
    prompt = [{"role": "user", "content": "How are you?"}]
    reply = "I am fine, thanks."
    query = tok(render(tok, prompt), add_special_tokens=False)["input_ids"]
    response = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([query + response])
    mask = torch.ones_like(ids)
    ids, mask = append_after_stop(ids, mask, torch.tensor([True]), turn_end_suffix(tok), tok.pad_token_id)
    expected_ids = encode(tok, prompt, [{"role": "assistant", "content": reply}])
    assert ids[0].tolist() == expected_ids
    rm = AutoModelForSequenceClassification.from_pretrained(cfg.stage_dir("rm") / "model").eval()
    with torch.no_grad():
        ours = sequence_scores(roles, ids, mask)
        theirs = rm(input_ids=torch.tensor([expected_ids])).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "reinforce_pp"])
def test_run_all_with_another_algorithm_reruns_only_ppo_and_eval(tiny_eval_run, tmp_path, algorithm):
    """`run-all --set ppo.algorithm=X` on a finished tiny run: SFT and RM are up to date (the algorithm is
    in the PPO stage's hash only), PPO and eval rerun. The critic-free run logs PPO's metric names less
    the critic's, checkpoints the policy adapter alone, writes its samples table in whole groups, and
    `rlhf eval` reads its checkpoints for the over-optimisation curve; `rlhf status` shows it done."""
    import shutil

    from safetensors.torch import load_file

    from rlhf.status import stage_rows
    from tests.test_numerical import cli

    config = write_config(tmp_path, {"eval": {"max_prompts": 2, "samples_per_prompt": 1, "overopt_prompts": 2,
                                              "batch_size": 4}})
    # the RM's scores alone: the tiny model rarely reaches EOS, and equal missing-EOS scores give the
    # group methods nothing to learn
    overrides = [f"ppo.algorithm={algorithm}", "ppo.missing_eos_score=null"]
    cfg = load_config(config, overrides)
    shutil.copytree(load_config(tiny_eval_run).run_dir, cfg.run_dir)
    upstream = {s: (cfg.stage_dir(s) / "manifest.json").read_text() for s in ("sft", "rm")}
    result = cli("run-all", "--config", str(config), *[a for o in overrides for a in ("--set", o)])
    assert result.exit_code == 0, result.output
    said = result.stdout.splitlines()
    for stage in ("sft", "rm"):
        assert any(line.startswith(f"{stage}: up to date, skipped") for line in said), said
        assert (cfg.stage_dir(stage) / "manifest.json").read_text() == upstream[stage]
    assert any(line.startswith("ppo: running") for line in said) and any(line.startswith("eval: running") for line in said)

    stage = cfg.stage_dir("ppo")
    rows = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"objective/scores", "objective/kl", "objective/rlhf_reward", "policy/approxkl", "loss/policy",
            "response/length_mean"} <= set(rows[-1])
    assert not any(k.startswith("value/") or k == "loss/value" for r in rows for k in r)
    assert rows[-1]["objective/kl"] != 0.0  # the policy moved away from the reference
    assert rows[-1]["episode"] == cfg.ppo.steps * cfg.ppo.rollout_batch_size  # responses, as for PPO
    for step in (2, 4):
        saved = load_file(str(stage / "checkpoints" / f"step-{step}" / "trainable.safetensors"))
        assert saved and all(k.startswith("model.") and ".policy." in k for k in saved)
    k = cfg.ppo.samples_per_prompt
    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * cfg.ppo.rollout_batch_size  # steps 2 and 4
    prompts = [r["prompt"] for r in samples]
    assert all(len(set(prompts[i:i + k])) == 1 for i in range(0, len(prompts), k))

    name = {"rloo": "RLOO", "grpo": "GRPO", "reinforce_pp": "REINFORCE++"}[algorithm]
    assert f"# tiny: {name} policy (RLHF against the reward model)\n" in (stage / "model" / "README.md").read_text()
    report = json.loads((cfg.stage_dir("eval") / "eval.json").read_text())
    assert [p["step"] for p in report["overoptimisation"]] == [0, 2, 4]
    assert report["policy"]["n_prompts"] == 2
    row = {r.stage: r for r in stage_rows(cfg)}["ppo"]
    assert row.state == "done" and {"score", "KL"} <= set(row.metrics), row
    assert {r.stage: r for r in stage_rows(load_config(config))}["ppo"].state == "stale"  # back to ppo: rerun
