"""Rollouts: sample responses with the policy, then score them with every role (docs/ppo.md §3-§9).

Sampling, the cut at the stop token and the reward score come from rlhf.sampling.sample_and_score,
the path `rlhf eval` uses too; this module adds what only PPO needs: the policy's and the
reference's log-probs, the entropy and (with a critic) the values of the sampled tokens.

Shapes: B prompts per batch, P = longest prompt in the batch (prompts left-padded), R = longest
response in the batch, at most `response_length` (responses right-padded to exactly R, so every
forward pass of a rollout has the same (B, P + R) shape whatever the batch grouping).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlhf.ppo.losses import entropy_from_logits, head_logprobs, logprobs_from_logits
from rlhf.ppo.roles import Roles, head_forward, position_ids, use_adapter
from rlhf.sampling import RewardFn, ScoredResponses, sample_and_score


@dataclass
class Rollout(ScoredResponses):
    """Everything one PPO step needs about its sampled responses: the responses, their masks, stop
    flags and raw RM scores (ScoredResponses: query_ids, query_mask, response_ids, response_mask,
    has_stop, scores), and what the roles say about each sampled token. Float tensors are float32."""

    logprobs: torch.Tensor  # (B, R) policy log π(a_t | s_t) at temperature T; 0 where masked
    ref_logprobs: torch.Tensor  # (B, R) reference (adapters off) log-probs at temperature T; 0 where masked
    # (B, R) value estimate V(s_t) before each response token; 0 where masked. None without a critic.
    values: torch.Tensor | None
    entropy: torch.Tensor  # (B, R) policy entropy at temperature T; 0 where masked

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows `index` of every tensor (a mini- or micro-batch)."""
        def rows(value):
            return None if value is None else value[index]

        return Rollout(**{f.name: rows(getattr(self, f.name)) for f in fields(self)})


def response_logprobs(roles: Roles, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
                      temperature: float, adapter: str | None, need_values: bool = False, need_entropy: bool = False):
    """Log-probs (B, R) of the response tokens under `adapter` (None = reference), computed from
    logits / T; plus the entropy (B, R) when `need_entropy` (detached; else None) and, for the
    value-on-policy variant, values (B, R) (else None).

    Only the last R + 1 positions reach the LM head, since the prompt's next-token logits are never
    used. With a plain frozen linear head (no logit scaling or soft-capping in the model's config)
    the log-probs come from the final hidden states in chunks (losses.head_logprobs), so no
    (B, R, V) logits are held; otherwise through the model's own forward (`logits_to_keep`). The
    value-on-policy variant reads the policy's final hidden states detached: the value loss trains
    the value head only and never moves the policy adapter (docs/ppo.md §2: the value loss must
    not send gradients into the policy)."""
    R = response_ids.shape[1]
    head = _plain_lm_head(roles.model.get_base_model())
    with use_adapter(roles.model, adapter):
        if head is not None:
            hidden = roles.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
            hidden = hidden[:, -R - 1:-1]  # position P-1+t predicts response token t
            logprobs, entropy = head_logprobs(hidden, head.weight, response_ids, temperature, need_entropy)
        else:
            out = roles.model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), use_cache=False, logits_to_keep=R + 1,
                              output_hidden_states=need_values)
            logits = out.logits[:, :-1]
            logprobs = logprobs_from_logits(logits, response_ids, temperature)
            entropy = entropy_from_logits(logits.detach(), temperature) if need_entropy else None
            hidden = out.hidden_states[-1][:, -R - 1:-1] if need_values else None
    values = roles.value_head(hidden.detach().float()).squeeze(-1) if need_values else None
    return logprobs, entropy, values


# Config fields with which a model scales or caps its logits after the head (as TRL's fused LM head reads them).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def _plain_lm_head(lm) -> torch.nn.Linear | None:
    """The causal LM's head when logits are exactly `F.linear(final hidden, head.weight)` and it is
    frozen; None when the model's own forward must compute them."""
    head = lm.get_output_embeddings()
    text = lm.config.get_text_config()
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    if any(getattr(text, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


def token_values(roles: Roles, input_ids: torch.Tensor, attention_mask: torch.Tensor, R: int) -> torch.Tensor:
    """(B, R) critic values V(s_t) for the state before each response token (value adapter + head)."""
    return head_forward(roles, "value", roles.value_head, input_ids, attention_mask)[:, -R - 1:-1]


@torch.no_grad()
def collect_rollout(roles: Roles, query_ids: torch.Tensor, query_mask: torch.Tensor, *, response_length: int,
                    temperature: float, stop_id: int | None, pad_id: int, micro_batch_size: int,
                    reward_fn: RewardFn | None = None, score_suffix: list[int] | None = None) -> Rollout:
    """Generate responses for a batch of left-padded prompts and evaluate them with every role.

    Sampling and scores: rlhf.sampling.sample_and_score with the policy adapter. The forward
    passes run in micro-batches of `micro_batch_size`, the size the update uses.
    `reward_fn`, if given, replaces the reward model: a rule-based or external scorer.
    `score_suffix`: tokens the chat template puts after the end-of-turn token; the reward model
    reads responses that stopped with this suffix appended, as it saw them in training. Without a
    critic (roles.has_critic false) there is no value pass and `values` is None."""
    sampled = sample_and_score(roles, query_ids, query_mask, response_length=response_length, temperature=temperature,
                               stop_id=stop_id, pad_id=pad_id, micro_batch_size=micro_batch_size,
                               score_suffix=score_suffix or (), reward_fn=reward_fn)
    input_ids, attention_mask = sampled.input_ids, sampled.attention_mask
    response_ids, response_mask = sampled.response_ids, sampled.response_mask
    width = response_ids.shape[1]
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logprobs", "ref_logprobs", "values", "entropy")}
    for start in range(0, input_ids.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        ids, mask, resp, rmask = input_ids[sl], attention_mask[sl], response_ids[sl], response_mask[sl]
        logprobs, entropy, values = response_logprobs(roles, ids, mask, resp, temperature, "policy",
                                                      need_values=roles.value_on_policy, need_entropy=True)
        ref_logprobs, _, _ = response_logprobs(roles, ids, mask, resp, temperature, None)
        if values is None and roles.has_critic:
            values = token_values(roles, ids, mask, width)
        parts["logprobs"].append(logprobs.masked_fill(~rmask, 0.0))
        parts["ref_logprobs"].append(ref_logprobs.masked_fill(~rmask, 0.0))
        if values is not None:
            parts["values"].append(values.masked_fill(~rmask, 0.0))
        parts["entropy"].append(entropy.masked_fill(~rmask, 0.0))
    cat = {k: torch.cat(v) if v else None for k, v in parts.items()}
    return Rollout(**{f.name: getattr(sampled, f.name) for f in fields(sampled)}, **cat)
