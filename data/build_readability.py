"""Build the second demo task, "readability": preferences labelled by a scorer nobody on the project wrote.

The first demo (data/build_demo.py) makes its preference pairs by hand-written rules, and the
pipeline's defaults were first tried on it. This task checks that the defaults transfer: the same
prompts source, but responses sampled from the embedded SmolLM2-135M-Instruct itself and the
preference given by the Flesch reading-ease score of `textstat` (a PyPI package; higher = plainer
English). The same scorer is the gold judge of `configs/readability.yaml` (`eval.judge:
rlhf.judges:reading_ease`), so `rlhf eval` measures PPO's gain on the label source directly, on
prompts and samples the reward model never saw.

    data/readability/sft_train.jsonl  sft_eval.jsonl   {"messages": [user, assistant]}
    data/readability/rm_train.jsonl   rm_eval.jsonl    {"prompt": [user], "chosen": [assistant],
                                                        "rejected": [assistant],
                                                        "chosen_ease": float, "rejected_ease": float}
    data/readability/ppo_train.jsonl  ppo_eval.jsonl   {"prompt": [user]}

How (see data/README.md):
1. Prompts: the distinct first user turns of the English chatterbot-corpus, split into train and
   eval groups exactly as build_demo.py splits them (no eval prompt occurs in any train row).
2. Responses: SAMPLES_PER_PROMPT samples per prompt from SmolLM2-135M-Instruct through its chat
   template, temperature TEMPERATURE, at most MAX_NEW_TOKENS tokens, with a seed per batch. A
   sample cut off at MAX_NEW_TOKENS keeps its complete sentences (none: dropped), so no side of a
   pair ends mid-sentence: the reward model must learn readability, not "finished beats cut off".
3. SFT: one kept sample per prompt, drawn at random (not the most readable one: the demonstrations
   carry the model's own style, so SFT teaches the format and stopping, and the preference is
   left to the reward model and PPO).
4. RM: per prompt, the most and the least readable sample (eval prompts: also the next two
   inwards), when their scores differ by at least MIN_EASE_GAP points (smaller gaps are mostly
   syllable-count noise); chosen = more readable. Length is no cue: the chosen side is shorter in
   about half of the pairs.
5. PPO: prompts of each split, as build_demo.py picks them.

Reproducibility: prompts, splits and every random choice are seeded as in build_demo.py; the
samples come from torch's seeded sampler in bfloat16 with one thread, which repeats for one torch
build on one CPU type (another CPU may round differently and draw other tokens).
tests/test_readability_data.py checks the committed files' labels against textstat.

Usage (needs the project's venv, chatterbot-corpus and textstat; takes ~12 min on 2 cores):

    pip install --no-deps chatterbot-corpus==1.3.3 && pip install textstat==0.7.8
    python data/build_readability.py [--out data/readability]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# build_demo.py's prompt source, split, seeded helpers and writer
from build_demo import Dialogue, corpus_dir, norm, read_corpus, rng_for, split_keys, take, write_files  # noqa: E402

# Samples per prompt: eval prompts are fewer, so they get more samples and up to two pairs each.
SAMPLES_PER_PROMPT = {"train": 4, "eval": 8}
PAIRS_PER_PROMPT = {"train": 1, "eval": 2}
TEMPERATURE = 0.9
MAX_NEW_TOKENS = 48
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
BATCH_PROMPTS = 16
DTYPE = "bfloat16"  # 4x float32's speed on CPUs with bf16 matmuls; elsewhere slower, not different
MIN_EASE_GAP = 20.0
MAX_PROMPT_CHARS = 150

# Sizes like a small user task: ~160 demonstrations, ~280 training pairs, 240 prompts.
SIZES = {"train": {"sft": 160, "rm": 280, "ppo": 240}, "eval": {"sft": 40, "rm": 100, "ppo": 60}}


def prompts_by_split() -> dict[str, list[str]]:
    """Distinct first user turns (at most MAX_PROMPT_CHARS), per split, in a seeded order."""
    dialogues: list[Dialogue] = read_corpus(corpus_dir())
    split = split_keys(dialogues)
    out: dict[str, dict[str, str]] = {"train": {}, "eval": {}}
    for d in dialogues:
        if len(d.turns[0]) <= MAX_PROMPT_CHARS:
            out[split[d.key]].setdefault(d.key, d.turns[0])
    return {name: take([p[k] for k in sorted(p)], len(p), f"readability/prompts/{name}") for name, p in out.items()}


def sample_responses(prompts: list[str], samples: int, seed_name: str) -> list[list[str]]:
    """Up to `samples` distinct responses per prompt from the embedded SmolLM2: each up to its
    end-of-turn token, or, when cut off at MAX_NEW_TOKENS, up to its last complete sentence."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from rlhf.config import ModelConfig
    from rlhf.models import load_tokenizer, resolve_model

    torch.set_num_threads(1)
    model_cfg = ModelConfig(name_or_path="embedded:smollm2-135m-instruct")
    path = resolve_model(model_cfg)
    tok = load_tokenizer(model_cfg, path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, DTYPE)).eval()
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    # Every field pinned: transformers fills unset ones from the model's generation_config.json.
    gen = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, min_p=None,
                           max_new_tokens=MAX_NEW_TOKENS, eos_token_id=stop, pad_token_id=tok.pad_token_id,
                           repetition_penalty=1.0, use_cache=True)
    tok.padding_side = "left"
    out: list[list[str]] = []
    for start in range(0, len(prompts), BATCH_PROMPTS):
        batch = prompts[start:start + BATCH_PROMPTS]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in batch for _ in range(samples)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(rng_for(f"{seed_name}/{start}").getrandbits(63))
        with torch.inference_mode():
            ids = model.generate(**enc, generation_config=gen)[:, enc["input_ids"].shape[1]:]
        for i in range(len(batch)):
            kept = []
            for row in ids[i * samples:(i + 1) * samples].tolist():
                finished = stop in row
                text = " ".join(tok.decode(row[: row.index(stop)] if finished else row, skip_special_tokens=True).split())
                if not finished:  # cut off at MAX_NEW_TOKENS: keep its complete sentences, if any
                    ends = [m.end() for m in SENTENCE_END.finditer(text)]
                    text = text[: ends[-1]].strip() if ends else ""
                if text and norm(text) and text not in kept:
                    kept.append(text)
            out.append(kept)
        print(f"  {seed_name}: {min(start + BATCH_PROMPTS, len(prompts))}/{len(prompts)} prompts", file=sys.stderr)
    return out


def build(out: Path) -> dict[str, list[dict]]:
    from rlhf.judges import flesch_reading_ease

    files: dict[str, list[dict]] = {}
    for name, prompts in prompts_by_split().items():
        sizes = SIZES[name]
        # Every prompt of the split is sampled: the RM keeps only prompts whose samples differ enough.
        samples = sample_responses(prompts, SAMPLES_PER_PROMPT[name], f"readability/sample/{name}")
        user = [[{"role": "user", "content": p}] for p in prompts]

        files[f"ppo_{name}"] = [{"prompt": u} for u in user[: sizes["ppo"]]]

        sft_rows = []
        for i, kept in enumerate(samples):
            if kept:
                reply = rng_for(f"readability/sft/{name}/{i}").choice(kept)
                sft_rows.append({"messages": user[i] + [{"role": "assistant", "content": reply}]})
        files[f"sft_{name}"] = take(sft_rows, sizes["sft"], f"readability/sft/{name}")

        rm_rows = []
        for i, kept in enumerate(samples):
            # Pair the most readable with the least readable sample, then the next two inwards.
            scored = sorted(((flesch_reading_ease(t), t) for t in kept))
            for k in range(min(PAIRS_PER_PROMPT[name], len(scored) // 2)):
                (r_ease, rejected), (c_ease, chosen) = scored[k], scored[-1 - k]
                if c_ease - r_ease < MIN_EASE_GAP:
                    break
                rm_rows.append({"prompt": user[i], "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}],
                                "chosen_ease": round(c_ease, 2), "rejected_ease": round(r_ease, 2)})
        files[f"rm_{name}"] = take(rm_rows, sizes["rm"], f"readability/rm/{name}")

    write_files(out, files)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "readability",
                        help="output folder (default: data/readability next to this script)")
    args = parser.parse_args(argv)
    files = build(args.out)
    for fname in sorted(files):
        print(f"{fname}.jsonl: {len(files[fname])} rows")


if __name__ == "__main__":
    main()
