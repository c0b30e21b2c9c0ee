"""Rollouts: sample responses with the policy, then score them with every role (PPO.md items 1-7).

Shapes: B prompts per batch, P = longest prompt in the batch (prompts left-padded), R = longest
response in the batch, at most `response_length` (responses right-padded to exactly R, so every
forward pass of a rollout has the same (B, P + R) shape whatever the batch grouping).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from rlhf.ppo.advantages import last_valid_index
from rlhf.ppo.losses import entropy_from_logits, logprobs_from_logits
from rlhf.ppo.roles import Roles, head_forward, position_ids, temporarily_merged, use_adapter


# A scorer used instead of the reward model: (query_ids (B, P), response_ids (B, R),
# response_mask (B, R)) -> scores (B,). Tests use it for a hand-written reward.
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Rollout:
    """Everything one PPO step needs about its sampled responses. Float tensors are float32."""

    query_ids: torch.Tensor  # (B, P) prompt tokens, left-padded with pad_id
    query_mask: torch.Tensor  # (B, P) bool, True on real prompt tokens
    response_ids: torch.Tensor  # (B, R) sampled tokens; pad_id after the stop token
    response_mask: torch.Tensor  # (B, R) bool, True up to and including the stop token
    logprobs: torch.Tensor  # (B, R) policy log π(a_t | s_t) at temperature T; 0 where masked
    ref_logprobs: torch.Tensor  # (B, R) reference (adapters off) log-probs at temperature T; 0 where masked
    values: torch.Tensor  # (B, R) value estimate V(s_t) before each response token; 0 where masked
    scores: torch.Tensor  # (B,) raw RM score at the last real token of prompt + response
    has_stop: torch.Tensor  # (B,) bool, the response contains the stop token
    entropy: torch.Tensor  # (B, R) policy entropy at temperature T; 0 where masked

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + R) prompt and response."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) long mask: real prompt tokens and response tokens up to the stop token."""
        return torch.cat([self.query_mask, self.response_mask], dim=1).long()

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows `index` of every tensor (a mini- or micro-batch)."""
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (ids (B, P), mask (B, P) bool), left-padded to the longest (PPO.md item 2)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = True
    return ids.to(device), mask.to(device)


def truncate_at_stop(tokens: torch.Tensor, stop_id: int | None, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token (PPO.md item 5).

    tokens: (B, R) generated ids. Returns (tokens with pad_id after the stop token (B, R),
    mask (B, R) bool — True up to and including the first stop token, or everywhere when there is
    none, has_stop (B,) bool). Masks come from positions, never from `tokens != pad_id`: when pad
    and EOS are the same id, that test would hide the real EOS (item 1)."""
    B, R = tokens.shape
    if stop_id is None:
        return tokens, torch.ones_like(tokens, dtype=torch.bool), torch.zeros(B, dtype=torch.bool, device=tokens.device)
    is_stop = tokens == stop_id
    has_stop = is_stop.any(dim=1)
    first = torch.where(has_stop, is_stop.float().argmax(dim=1), torch.full_like(has_stop, R, dtype=torch.long))
    positions = torch.arange(R, device=tokens.device).expand(B, R)
    mask = positions <= first.unsqueeze(1)
    return tokens.masked_fill(~mask, pad_id), mask, has_stop


def pinned_generation_config(max_new_tokens: int, temperature: float, stop_id: int | None, pad_id: int):
    """The whole sampling configuration, every field chosen here (PPO.md item 4): plain sampling from
    softmax(logits / T) (top_k 0, top_p 1; temperature 0 = greedy), no length, repetition or n-gram
    rules, no suppressed or banned tokens, one sequence, KV cache on, stopping at `stop_id` only
    (None: never, every response is max_new_tokens long).

    Use it through generate_pinned: transformers fills every field left None from the model's own
    generation_config.json (min_p, typical_p, no_repeat_ngram_size, suppress_tokens, bad_words_ids,
    an eos_token_id when stop_id is None, ...), which would make the sampler's distribution differ
    from the log-probs PPO trains on; the fields that are off only as None cannot be pinned by value."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    # Fields left None here are the ones whose None means "off"; generate_pinned keeps the model's
    # file from filling them, so transformers' global defaults (also "off") apply.
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=stop_id, pad_token_id=pad_id, num_beams=1,
        num_return_sequences=1, use_cache=True, repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, renormalize_logits=False, remove_invalid_values=False, **sampling,
    )


def generate_pinned(model: torch.nn.Module, config, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`model.generate` with `config` (pinned_generation_config) and nothing else: the model's own
    generation_config, which generate merges into every field left None, is swapped for `config`
    during the call. `model`: a transformers causal LM or a peft model around one."""
    import copy

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = lm.generation_config
    lm.generation_config = copy.deepcopy(config)
    try:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        lm.generation_config = own


@torch.no_grad()
def generate(roles: Roles, query_ids: torch.Tensor, query_mask: torch.Tensor, response_length: int, temperature: float,
             stop_id: int | None, pad_id: int, adapter: str | None = "policy") -> torch.Tensor:
    """Sample (B, R) response tokens with `adapter` (folded into scratch weights, see
    roles.temporarily_merged; None = the reference) under pinned_generation_config: temperature T,
    top_k 0, top_p 1 (PPO.md item 4), nothing inherited from the model folder. `generate` gets the
    attention mask only and derives positions itself. Responses that stop early are right-padded
    to exactly R."""
    config = pinned_generation_config(response_length, temperature, stop_id, pad_id)
    with use_adapter(roles.model, None) if adapter is None else temporarily_merged(roles.model, adapter):
        out = generate_pinned(roles.model, config, query_ids, query_mask.long())
    response = out[:, query_ids.shape[1]:]
    if response.shape[1] < response_length:
        fill = torch.full((response.shape[0], response_length - response.shape[1]), pad_id, dtype=response.dtype,
                          device=response.device)
        response = torch.cat([response, fill], dim=1)
    return response


def response_logprobs(roles: Roles, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
                      temperature: float, adapter: str | None, need_values: bool = False):
    """Log-probs (B, R) of the response tokens under `adapter` (None = reference), computed from
    logits / T; plus the entropy (B, R) and, for the value-on-policy variant, values (B, R).

    Only the last R + 1 positions go through the LM head (`logits_to_keep`), since the prompt's
    next-token logits are never used. The value-on-policy variant reads the policy's final hidden
    states detached: the value loss trains the value head only and never moves the policy adapter
    (PPO.md: the value loss must not send gradients into the policy)."""
    R = response_ids.shape[1]
    with use_adapter(roles.model, adapter):
        out = roles.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                          use_cache=False, logits_to_keep=R + 1, output_hidden_states=need_values)
    logits = out.logits[:, :-1]  # position P-1+t predicts response token t
    logprobs = logprobs_from_logits(logits, response_ids, temperature)
    values = None
    if need_values:
        hidden = out.hidden_states[-1][:, -R - 1:-1]
        values = roles.value_head(hidden.detach().float()).squeeze(-1)
    return logprobs, logits, values


def token_values(roles: Roles, input_ids: torch.Tensor, attention_mask: torch.Tensor, R: int) -> torch.Tensor:
    """(B, R) critic values V(s_t) for the state before each response token (value adapter + head)."""
    return head_forward(roles, "value", roles.value_head, input_ids, attention_mask)[:, -R - 1:-1]


def sequence_scores(roles: Roles, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) reward-model scores at the last real token of prompt + response (PPO.md item 7): the
    stop token when there is one, never a pad position."""
    per_token = head_forward(roles, "reward", roles.reward_head, input_ids, attention_mask)
    last = last_valid_index(attention_mask.bool())
    return per_token.gather(1, last.unsqueeze(1)).squeeze(1)


def append_after_stop(input_ids: torch.Tensor, attention_mask: torch.Tensor, has_stop: torch.Tensor, suffix: list[int],
                      pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append `suffix` (S tokens) right after the last real token of each row that stopped.

    input_ids, attention_mask: (B, W); has_stop: (B,). Returns (B, W + S) tensors. The reward
    model was trained on chat-template renderings, where the end-of-turn token is followed by
    the template's own suffix (e.g. a newline in ChatML); scoring the policy's responses the same
    way reads the score where the RM learned to put it (PPO.md item 7)."""
    if not suffix:
        return input_ids, attention_mask
    B, W = input_ids.shape
    S = len(suffix)
    ids = torch.cat([input_ids, input_ids.new_full((B, S), pad_id)], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_zeros((B, S))], dim=1)
    last = last_valid_index(attention_mask.bool())
    tail = torch.tensor(suffix, dtype=ids.dtype, device=ids.device)
    for row in has_stop.nonzero().flatten().tolist():
        start = int(last[row]) + 1
        ids[row, start:start + S] = tail
        mask[row, start:start + S] = 1
    return ids, mask


@torch.no_grad()
def collect_rollout(roles: Roles, query_ids: torch.Tensor, query_mask: torch.Tensor, *, response_length: int,
                    temperature: float, stop_id: int | None, pad_id: int, micro_batch_size: int,
                    reward_fn: RewardFn | None = None, score_suffix: list[int] | None = None) -> Rollout:
    """Generate responses for a batch of left-padded prompts and evaluate them with every role.

    The forward passes run in micro-batches of `micro_batch_size`, the size the update uses.
    `reward_fn`, if given, replaces the reward model: a rule-based or external scorer.
    `score_suffix`: tokens the chat template puts after the end-of-turn token; the reward model
    reads responses that stopped with this suffix appended, as it saw them in training."""
    tokens = generate(roles, query_ids, query_mask, response_length, temperature, stop_id, pad_id)
    response_ids, response_mask, has_stop = truncate_at_stop(tokens, stop_id, pad_id)
    # Columns past the longest response are padding in every row: drop them, so the four
    # rollout passes and every update pass skip them (one width for the whole batch keeps
    # shapes identical across micro-batch groupings).
    width = int(response_mask.sum(1).max())
    response_ids, response_mask = response_ids[:, :width], response_mask[:, :width]
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1).long()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logprobs", "ref_logprobs", "values", "scores", "entropy")}
    for start in range(0, input_ids.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        ids, mask, resp, rmask = input_ids[sl], attention_mask[sl], response_ids[sl], response_mask[sl]
        logprobs, logits, values = response_logprobs(roles, ids, mask, resp, temperature, "policy",
                                                     need_values=roles.value_on_policy)
        ref_logprobs, _, _ = response_logprobs(roles, ids, mask, resp, temperature, None)
        if values is None:
            values = token_values(roles, ids, mask, width)
        parts["logprobs"].append(logprobs.masked_fill(~rmask, 0.0))
        parts["ref_logprobs"].append(ref_logprobs.masked_fill(~rmask, 0.0))
        parts["values"].append(values.masked_fill(~rmask, 0.0))
        parts["entropy"].append(entropy_from_logits(logits, temperature).masked_fill(~rmask, 0.0))
        if reward_fn is None:
            scored_ids, scored_mask = append_after_stop(ids, mask, has_stop[sl], score_suffix or [], pad_id)
            parts["scores"].append(sequence_scores(roles, scored_ids, scored_mask))
    if reward_fn is not None:
        parts["scores"].append(reward_fn(query_ids, response_ids, response_mask).float())
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return Rollout(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, response_mask=response_mask,
                   has_stop=has_stop, **cat)
