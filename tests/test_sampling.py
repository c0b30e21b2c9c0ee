"""rlhf.sampling: the stop-token choice, and the one sampling-and-scoring path that PPO's rollout
and `rlhf eval` share (so eval measures the policy exactly as PPO sampled and scored it)."""

from __future__ import annotations

import torch

from rlhf.config import load_config
from rlhf.sampling import left_pad, stop_token_id


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
