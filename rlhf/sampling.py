"""Sampling and scoring responses, the one path PPO's rollout, `rlhf eval` and `rlhf generate` share.

A change to how responses are drawn or scored is made here once, so eval measures the policy
exactly as PPO trained it:

    generate (pinned_generation_config, the adapter folded in) -> truncate_at_stop ->
    drop the all-padding columns -> append_after_stop (the chat template's suffix) ->
    sequence_scores (reward role, last real token)

`sample_and_score` is that chain for a batch of left-padded prompts (rlhf.ppo.rollout.collect_rollout
and rlhf.evaluate.respond call it); `generate_pinned` with `pinned_generation_config` is the
sampler alone, for a plain transformers model (rlhf.generate); `stop_token_id` reads the stop
token of the config (`ppo.stop_token`); `left_pad` batches tokenized prompts.

Shapes: B prompts per batch, P = longest prompt in the batch (prompts left-padded), R = longest
response in the batch, at most `response_length` (responses right-padded to exactly R, so every
forward pass over a batch has the same (B, P + R) shape whatever the micro-batch grouping).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from rlhf.ppo.advantages import last_valid_index
from rlhf.ppo.roles import Roles, head_forward, temporarily_merged, use_adapter

# A scorer used instead of the reward model: (query_ids (B, P), response_ids (B, R),
# response_mask (B, R)) -> scores (B,). Tests use it for a hand-written reward.
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def stop_token_id(stop_token: str | None, tokenizer) -> int | None:
    """The token id a response stops at: `stop_token` "eos" is the tokenizer's EOS, another string
    is that token, None is no stop token (every response runs to the length limit)."""
    if stop_token is None:
        return None
    return tokenizer.eos_token_id if stop_token == "eos" else tokenizer.convert_tokens_to_ids(stop_token)


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (ids (B, P), mask (B, P) bool), left-padded to the longest (docs/ppo.md §4)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = True
    return ids.to(device), mask.to(device)


def truncate_at_stop(tokens: torch.Tensor, stop_id: int | None, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token (docs/ppo.md §7).

    tokens: (B, R) generated ids. Returns (tokens with pad_id after the stop token (B, R),
    mask (B, R) bool — True up to and including the first stop token, or everywhere when there is
    none, has_stop (B,) bool). Masks come from positions, never from `tokens != pad_id`: when pad
    and EOS are the same id, that test would hide the real EOS (docs/ppo.md §3)."""
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
    """The whole sampling configuration, every field chosen here (docs/ppo.md §6): plain sampling from
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
    during the call. `model`: a transformers causal LM or a peft model around one. On a CPU, its
    bfloat16 linear layers decode with packed weights (packed_linear_weights)."""
    import copy

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = lm.generation_config
    lm.generation_config = copy.deepcopy(config)
    try:
        with packed_linear_weights(model, batch=input_ids.shape[0]):
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        lm.generation_config = own


@contextlib.contextmanager
def packed_linear_weights(model: torch.nn.Module, batch: int) -> Iterator[None]:
    """Inside the block, every plain bfloat16 `nn.Linear` of `model` on a CPU multiplies with its
    weight reordered once into oneDNN's blocked layout; outside it, nothing of the model changed.

    Why: decoding multiplies every weight by a handful of rows per new token, and at that shape
    `F.linear` re-lays the weight out on every call: the model's matrix products alone read its
    weights at 18 % of this machine's memory bandwidth as they are and at 37 % packed
    (bench/ppo_profile.py, SmolLM2, batch 8); a generation of 48 tokens × 8 took 1.52 s instead of
    1.66-1.91 s, packing (~0.09 s) included. In bfloat16 the packed product is oneDNN's same
    kernel, so the tokens are the same bit for bit (tests/test_sampling.py); float32 goes through
    another library, so it is left alone, as are GPUs, Linear subclasses (quantized layers) and
    modules whose forward something else already replaced (accelerate's offloading hooks).
    Uses torch's oneDNN ops behind `torch.compile`'s CPU freezing (`torch.ops.mkldnn`); where a
    build lacks them or the CPU has no native bfloat16 (F.linear then takes another path), nothing
    is packed. The packed copies live for the call beside the weights (0.27 GB for SmolLM2-135M);
    where they would take more than a quarter of the memory available, nothing is packed."""
    packable = [m for m in model.modules()
                if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
                and "forward" not in vars(m)]
    packed = []
    if packable and onednn_bf16_linear() and sum(m.weight.nbytes for m in packable) < _available_memory() / 4:
        try:
            packed = [(m, packed_weight(m.weight, batch)) for m in packable]
        except RuntimeError:  # a shape or build oneDNN declines: decode as is
            packed = []
    try:
        for m, weight in packed:
            m.forward = functools.partial(packed_linear, weight=weight, bias=m.bias)
        yield
    finally:
        for m, _ in packed:
            vars(m).pop("forward", None)


def packed_weight(weight: torch.Tensor, batch: int) -> torch.Tensor:
    """`weight` reordered into oneDNN's blocked layout, for products with about `batch` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, W, bias)` with W as `packed_weight` made it."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _available_memory() -> float:
    """Bytes of memory available now (Linux's MemAvailable); infinite where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return float("inf")


@functools.cache
def onednn_bf16_linear() -> bool:
    """Whether this torch build has the packed-linear ops and runs bfloat16 `F.linear` through oneDNN
    (a CPU with native bfloat16): only then is the packed product the same kernel as the plain one."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and all(hasattr(mkldnn, op) for op in (
        "_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported"))
        and bool(mkldnn._is_mkldnn_bf16_supported()))


@torch.no_grad()
def generate(roles: Roles, query_ids: torch.Tensor, query_mask: torch.Tensor, response_length: int, temperature: float,
             stop_id: int | None, pad_id: int, adapter: str | None = "policy") -> torch.Tensor:
    """Sample (B, R) response tokens with `adapter` (folded into scratch weights, see
    roles.temporarily_merged; None = the reference) under pinned_generation_config: temperature T,
    top_k 0, top_p 1 (docs/ppo.md §6), nothing inherited from the model folder. `generate` gets the
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


def sequence_scores(roles: Roles, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) reward-model scores at the last real token of prompt + response (docs/ppo.md §9): the
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
    way reads the score where the RM learned to put it (docs/ppo.md §9)."""
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


@dataclass
class ScoredResponses:
    """Sampled responses to a batch of left-padded prompts, cut at the stop token and scored."""

    query_ids: torch.Tensor  # (B, P) prompt tokens, left-padded with pad_id
    query_mask: torch.Tensor  # (B, P) bool, True on real prompt tokens
    response_ids: torch.Tensor  # (B, R) sampled tokens; pad_id after the stop token
    response_mask: torch.Tensor  # (B, R) bool, True up to and including the stop token
    has_stop: torch.Tensor  # (B,) bool, the response contains the stop token
    scores: torch.Tensor  # (B,) float32 raw score: the reward role's, or reward_fn's

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + R) prompt and response."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) long mask: real prompt tokens and response tokens up to the stop token."""
        return torch.cat([self.query_mask, self.response_mask], dim=1).long()


@torch.no_grad()
def sample_and_score(roles: Roles, query_ids: torch.Tensor, query_mask: torch.Tensor, *, response_length: int,
                     temperature: float, stop_id: int | None, pad_id: int, micro_batch_size: int,
                     adapter: str | None = "policy", score_suffix: Sequence[int] = (),
                     reward_fn: RewardFn | None = None) -> ScoredResponses:
    """Sample a response per prompt with `adapter` ("policy", or None = the reference/SFT model),
    cut it after its first stop token, and score it.

    query_ids (B, P), query_mask (B, P) bool: left-padded prompts (left_pad). Sampling draws from
    the global torch RNG (seed it first for reproducible samples). Columns past the longest
    response are padding in every row and are dropped, so the responses are (B, R), R <= response_length.
    Scores: the reward role at the last real token, with `score_suffix` (the tokens the chat
    template puts after the end-of-turn token) appended to the responses that stopped, as the
    reward model saw them in training; in micro-batches of `micro_batch_size` rows. `reward_fn`,
    if given, replaces the reward model: a rule-based or external scorer, called once on the batch."""
    # Sampling only: the log-probs and values PPO compares must come from the kernel the update uses.
    with roles.no_grad_attention():
        tokens = generate(roles, query_ids, query_mask, response_length, temperature, stop_id, pad_id, adapter=adapter)
    response_ids, response_mask, has_stop = truncate_at_stop(tokens, stop_id, pad_id)
    # Columns past the longest response are padding in every row: drop them, so every pass over
    # the batch skips them (one width for the whole batch keeps shapes identical across
    # micro-batch groupings).
    width = int(response_mask.sum(1).max())
    response_ids, response_mask = response_ids[:, :width], response_mask[:, :width]
    if reward_fn is not None:
        scores = reward_fn(query_ids, response_ids, response_mask).float()
    else:
        input_ids = torch.cat([query_ids, response_ids], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1).long()
        parts = []
        for start in range(0, input_ids.shape[0], micro_batch_size):
            sl = slice(start, start + micro_batch_size)
            scored_ids, scored_mask = append_after_stop(input_ids[sl], attention_mask[sl], has_stop[sl],
                                                        list(score_suffix), pad_id)
            parts.append(sequence_scores(roles, scored_ids, scored_mask))
        scores = torch.cat(parts)
    return ScoredResponses(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                           response_mask=response_mask, has_stop=has_stop, scores=scores)
