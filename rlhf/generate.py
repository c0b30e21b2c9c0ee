"""`rlhf generate`: one response from a stage's merged model folder, with plain transformers.

The model is the exported `sft/model` or `ppo/model` (no adapters, no roles), sampled with the
pinned generation config PPO samples with (rlhf.sampling), so what it prints is what the stage's
policy would have drawn at that temperature.
"""

from __future__ import annotations

import logging

import torch

from rlhf.config import PipelineConfig
from rlhf.errors import UserError

log = logging.getLogger(__name__)


def generate_text(cfg: PipelineConfig, stage: str, prompt: str, max_new_tokens: int | None = None,
                  temperature: float | None = None, seed: int | None = None) -> str:
    """One response from a stage's merged model folder (sft/model or ppo/model) loaded with plain
    transformers; the prompt goes through the chat template as a user turn when the tokenizer has
    one. temperature 0 is greedy decoding."""
    from transformers import AutoModelForCausalLM

    from rlhf.data import render
    from rlhf.models import load_tokenizer, model_kwargs
    from rlhf.runs import STAGE_COMMAND
    from rlhf.staleness import stage_state
    from rlhf.sampling import generate_pinned, pinned_generation_config, stop_token_id

    if stage not in ("sft", "ppo"):
        raise UserError(f"--stage {stage}: choose sft or ppo (the reward model scores, it does not generate: use rlhf score)")
    if getattr(cfg, stage) is None:
        raise UserError(f"{cfg.source}: no '{stage}' section, so there is no {stage} model to generate with")
    model_dir = cfg.stage_dir(stage) / "model"
    state = stage_state(cfg, stage)
    if state.status not in ("done", "stale") or not (model_dir / "config.json").is_file():
        raise UserError(f"no finished {stage} model in {model_dir} ({state.status}: {state.reason}); "
                        f"run `{STAGE_COMMAND[stage]} --config {cfg.source or 'pipeline.yaml'}` first")
    if state.status == "stale":
        log.warning("the %s model in %s is stale (%s); generating with it anyway", stage, model_dir, state.reason)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if temperature is not None and temperature < 0:
        raise UserError(f"--temperature {temperature}: must be 0 (greedy) or more")
    ppo = cfg.ppo
    max_new_tokens = max_new_tokens or cfg.eval.response_length or (ppo.response_length if ppo else 64)
    temperature = temperature if temperature is not None else (cfg.eval.temperature or (ppo.temperature if ppo else 0.7))
    tokenizer = load_tokenizer(cfg.model, str(model_dir), need_chat_template=False)
    text = render(tokenizer, [{"role": "user", "content": prompt}]) if tokenizer.chat_template else prompt
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = model_kwargs(cfg.model)
    kwargs["dtype"] = "auto"  # as saved (model.export_dtype): a 16-bit cast would round part of the trained update off again
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).to(device).eval()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
    # PPO's stop token; without one (ppo.stop_token null) still stop at EOS: one answer, not a page of text.
    stop_id = stop_token_id(cfg.ppo.stop_token if cfg.ppo is not None else "eos", tokenizer)
    config = pinned_generation_config(max_new_tokens, temperature, tokenizer.eos_token_id if stop_id is None else stop_id,
                                      tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed if seed is None else seed)
    with torch.no_grad():
        out = generate_pinned(model, config, ids["input_ids"], ids["attention_mask"])
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
