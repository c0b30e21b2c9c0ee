"""Merged exports are the trained models: on the default bfloat16 path (the base trained in
bfloat16), sft/model, rm/model and ppo/model give the log-probs / scores of their base (loaded in
model.dtype, as each stage trained on it) plus their adapter, within 1e-3 on held-out text.

Before the export dtype existed, W + ΔW was rounded to bfloat16, which on this tiny model moved
held-out log-probs by up to 0.017."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.config import load_config
from tests.conftest import REPO, write_config

TOL = 1e-3


def _held_out_texts(tok, n: int = 6) -> list[str]:
    rows = [json.loads(line) for line in (REPO / "data/demo/sft_eval.jsonl").read_text().splitlines()[:n]]
    return [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]


def _token_logprobs(model, tok, texts: list[str]) -> torch.Tensor:
    """Log-probs of every next token of each text, concatenated (float32 compute)."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            logits = model(input_ids=ids).logits.float()
            out.append(torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1))
    return torch.cat(out)


def _trained(model_cls, base_path, adapter: Path, **kwargs):
    """What a stage trained: the base as it loaded it (bfloat16 here), its adapter on top, computed
    in float32 so that only the weights, not the arithmetic, are compared."""
    from peft import PeftModel

    base = model_cls.from_pretrained(str(base_path), dtype=torch.bfloat16, **kwargs).float()
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def _export(model_cls, path: Path, **kwargs):
    """An exported model/ folder as a user loads it (the dtype it was saved in), computed in float32."""
    model = model_cls.from_pretrained(str(path), dtype="auto", **kwargs).eval()
    assert next(model.parameters()).dtype == torch.float32  # model.export_dtype's default
    return model.float()


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    """sft -> rm -> ppo on the tiny model with a bfloat16 base (a few steps each)."""
    from rlhf import ppo, rm, sft

    tmp = tmp_path_factory.mktemp("bf16-run")
    path = write_config(tmp, {"model": {"dtype": "bfloat16"}, "ppo": {"steps": 2, "save_every": 2}})
    cfg = load_config(path)
    for stage in (sft, rm, ppo):
        stage.run(cfg)
    return path


def test_merged_causal_lms_equal_base_plus_adapter_on_a_bf16_base(bf16_run):
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_tokenizer, resolve_model

    cfg = load_config(bf16_run)
    sft_dir, ppo_dir = cfg.stage_dir("sft"), cfg.stage_dir("ppo")
    tok = load_tokenizer(cfg.model, str(sft_dir / "model"))
    texts = _held_out_texts(tok)
    # sft/model: the original base (in bf16, as SFT trained on it) + the SFT adapter
    want = _token_logprobs(_trained(AutoModelForCausalLM, resolve_model(cfg.model), sft_dir / "adapter"), tok, texts)
    got = _token_logprobs(_export(AutoModelForCausalLM, sft_dir / "model"), tok, texts)
    assert (got - want).abs().max().item() < TOL
    # ppo/model: sft/model (in bf16, as PPO's shared base and reference load it) + the policy adapter
    want = _token_logprobs(_trained(AutoModelForCausalLM, sft_dir / "model", ppo_dir / "adapter"), tok, texts)
    got = _token_logprobs(_export(AutoModelForCausalLM, ppo_dir / "model"), tok, texts)
    assert (got - want).abs().max().item() < TOL


def test_merged_reward_model_equals_base_plus_adapter_on_a_bf16_base(bf16_run):
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import load_tokenizer

    cfg = load_config(bf16_run)
    sft_dir, rm_dir = cfg.stage_dir("sft"), cfg.stage_dir("rm")
    tok = load_tokenizer(cfg.model, str(sft_dir / "model"))
    texts = _held_out_texts(tok)
    trained = _trained(AutoModelForSequenceClassification, sft_dir / "model", rm_dir / "adapter", num_labels=1)
    exported = _export(AutoModelForSequenceClassification, rm_dir / "model", num_labels=1)
    for text in texts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want, got = trained(input_ids=ids).logits.float(), exported(input_ids=ids).logits.float()
        assert (got - want).abs().max().item() < TOL
