"""Model cards: a README.md in the hub's model-card format for every model/ and adapter/ folder.

A card is YAML front matter (base_model, library_name, license, tags, datasets, pipeline_tag, read by
the hub) and markdown: which stage made the folder, the config that trained it, the data (paths or
hub ids, row counts), the held-out figures and how to load it. Everything comes from the stage's
manifest (and rm/eval.json, eval/eval.json), so a card is written when a stage is marked done
(`rlhf.runs.finish_stage`) and written again, with the evaluation's figures, by `rlhf export`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import PipelineConfig
from rlhf.stats import binomial_se

CARD_FILE = "README.md"
# Embedded bases: the hub repository each one is built from, and its licence.
EMBEDDED_BASES = {"embedded:smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

STAGE_TITLES = {
    "sft": "supervised fine-tuning (SFT)",
    "rm": "reward model (Bradley-Terry, pairwise)",
    "ppo": "PPO policy (RLHF against the reward model)",
}
STAGE_TAGS = {"sft": ["sft"], "rm": ["reward-model"], "ppo": ["ppo", "rlhf"]}
# The stage-3 algorithms (ppo.algorithm) by name, for the card of a policy not trained with PPO.
ALGORITHM_NAMES = {"ppo": "PPO", "rloo": "RLOO", "grpo": "GRPO", "reinforce_pp": "REINFORCE++"}


def stage_title_and_tags(stage: str, stage_config: dict[str, Any]) -> tuple[str, list[str]]:
    """The card's title and tags: stage 3 says which algorithm trained the policy (`ppo.algorithm`)."""
    algorithm = stage_config.get("algorithm", "ppo")
    if stage != "ppo" or algorithm == "ppo":
        return STAGE_TITLES[stage], STAGE_TAGS[stage]
    name = ALGORITHM_NAMES.get(algorithm, algorithm)
    return f"{name} policy (RLHF against the reward model)", [algorithm.replace("_", "-"), "rlhf"]


def base_model_info(model_ref: str) -> tuple[str | None, str | None]:
    """(hub id of the base, its licence) as far as they are known without the network: the embedded
    bases' sources; a hub id as given, with the licence of the hub cache's copy of its card; for a
    local folder, no hub id and the `license` of the folder's own README.md."""
    if model_ref in EMBEDDED_BASES:
        return EMBEDDED_BASES[model_ref]
    local = Path(model_ref).expanduser()
    if local.exists() or not _HUB_ID.match(model_ref):
        return None, front_matter(local / CARD_FILE).get("license")
    return model_ref, _cached_hub_license(model_ref)


def _cached_hub_license(hub_id: str) -> str | None:
    """The licence in the hub cache's copy of the base's README.md, if it was downloaded."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(hub_id, CARD_FILE)
    except Exception:  # noqa: BLE001 - a missing cache entry is the usual case
        return None
    return front_matter(Path(path)).get("license") if isinstance(path, str) else None


def front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a markdown file ({} when there is none or it does not parse)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not m:
        return {}
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _is_hub_id(path: str | None) -> bool:
    from rlhf.data.read import is_local

    return bool(path) and not is_local(path) and bool(_HUB_ID.match(path))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def held_out_figures(cfg: PipelineConfig, stage: str, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) rows for a stage's card: its manifest metrics, rm/eval.json, eval/eval.json."""
    rows: list[tuple[str, str]] = []
    if stage == "sft":
        for key, label in (("eval_loss", "held-out loss (per token)"), ("train_loss_last", "last training loss"),
                           ("global_step", "optimizer steps")):
            if key in metrics:
                rows.append((label, _fmt(metrics[key])))
    elif stage == "rm":
        acc, n = metrics.get("eval_accuracy"), metrics.get("eval_n_pairs")
        if isinstance(acc, (int, float)) and n:
            rows.append(("held-out pair accuracy (ties 0.5)", f"{acc:.3f} ± {binomial_se(acc, int(n)):.3f} over {n} pairs"))
        for key, label in (("eval_margin_mean", "held-out mean margin r(chosen) - r(rejected)"),
                           ("train_accuracy", "training pair accuracy"), ("score_mean", "score mean (training responses)"),
                           ("score_std", "score std (training responses)"), ("global_step", "optimizer steps")):
            if key in metrics:
                rows.append((label, _fmt(metrics[key])))
    else:
        for key in ("reward_mean", "score_mean", "kl_mean", "kl", "response_length_mean", "step"):
            if key in metrics and isinstance(metrics[key], (int, float)):
                rows.append((f"last PPO step: {key}", _fmt(metrics[key])))
        report = _read_json(cfg.stage_dir("eval") / "eval.json")
        policy = (report or {}).get("policy")
        if policy:
            rows.append((f"win rate vs SFT by RM score ({policy.get('n_prompts')} {policy.get('split')} prompts)",
                         f"{policy['win_rate']:.3f} ± {policy['win_rate_stderr']:.3f}"))
            rows.append(("KL(PPO‖SFT) per response, nats", _fmt(policy.get("kl_mean"))))
        judge = (report or {}).get("judge")
        if judge:
            rows.append((f"win rate vs SFT by judge {judge['judge']}",
                         f"{judge['win_rate']:.3f} ± {judge['win_rate_stderr']:.3f}"))
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _data_rows(stage_config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    data = stage_config.get("data") or {}
    counts = metrics.get("data") or {}
    lines = []
    for split, key in (("train", "path"), ("eval", "eval_path")):
        source = data.get(key)
        if split == "eval" and source is None:
            held = data.get("eval_split")
            source = f"{held} of the training split" if isinstance(held, float) else (f"split '{held}'" if held else None)
        if source is None and split not in counts:
            continue
        c = counts.get(split) or {}
        dropped = ", ".join(f"{n} {why}" for why, n in (c.get("dropped") or {}).items()) or "none"
        lines.append(f"| {split} | `{source}` | {c.get('kept', '?')} | {dropped} |")
    return lines


def _load_snippet(stage: str, kind: str, where: str, base_hint: str) -> str:
    if kind == "adapter":
        cls = "AutoModelForSequenceClassification" if stage == "rm" else "AutoModelForCausalLM"
        extra = ", num_labels=1" if stage == "rm" else ""
        return (f"from peft import PeftModel\nfrom transformers import {cls}\n\n"
                f"base = {cls}.from_pretrained(\"{base_hint}\"{extra})\n"
                f"model = PeftModel.from_pretrained(base, \"{where}\")")
    if stage == "rm":
        return ("import torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
                f"model = AutoModelForSequenceClassification.from_pretrained(\"{where}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{where}\")\n"
                "batch = tokenizer([prompt + response], return_tensors=\"pt\")\n"
                "with torch.no_grad():\n    score = model(**batch).logits[0, 0].item()  # read at the last non-pad token")
    return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{where}\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{where}\")")


def card_text(cfg: PipelineConfig, stage: str, kind: str, manifest: dict[str, Any], where: str | None = None) -> str:
    """The README.md of `runs/<name>/<stage>/<kind>` (kind: model or adapter). `where`: how the card
    names the folder in its loading code (a hub repo id once pushed; default the folder's path)."""
    from huggingface_hub import ModelCardData

    config = manifest.get("config") or {}
    stage_config = config.get(stage) or {}
    metrics = manifest.get("metrics") or {}
    model_ref = (config.get("model") or {}).get("name_or_path", cfg.model.name_or_path)
    base_id, license_ = base_model_info(model_ref)
    where = where or str(cfg.stage_dir(stage) / kind)
    data = stage_config.get("data") or {}
    datasets = [p for p in (data.get("path"), data.get("eval_path")) if _is_hub_id(p)]
    title, stage_tags = stage_title_and_tags(stage, stage_config)
    tags = ["rlhf-pipeline", *stage_tags, "lora", "trl"]
    if kind == "adapter":
        tags.append("peft")
    # The adapter of the RM and PPO stages sits on sft/model, not on the base: no hub base to name.
    adapter_on_sft = kind == "adapter" and stage in ("rm", "ppo")
    meta = ModelCardData(
        base_model=None if adapter_on_sft else base_id,
        library_name="peft" if kind == "adapter" else "transformers",
        license=license_, tags=tags, datasets=sorted(set(datasets)) or None,
        pipeline_tag="text-classification" if stage == "rm" else "text-generation",
    )
    base_hint = str(cfg.stage_dir("sft") / "model") if adapter_on_sft else (base_id or model_ref)
    lines = [
        "---", meta.to_yaml(), "---", "",
        f"# {cfg.run_name}: {title}{' (LoRA adapter)' if kind == 'adapter' else ''}", "",
        f"Made by the `rlhf` pipeline, stage `{stage}` of run `{cfg.run_name}`"
        f" (finished {manifest.get('finished', 'not yet')}, stage config hash `{str(manifest.get('config_hash', ''))[:12]}`).",
        f"Base model: `{model_ref}`" + (f" ([{base_id}](https://huggingface.co/{base_id}))" if base_id else "") + ".",
    ]
    if stage in ("rm", "ppo"):
        lines.append(f"Trained on the merged SFT model of the same run (`{cfg.stage_dir('sft') / 'model'}`).")
    if kind == "model":
        lines.append("This folder is the LoRA adapter merged into its base: a plain transformers model.")
    else:
        lines.append(f"This folder is the LoRA adapter alone; it loads on `{base_hint}`.")
    lines += ["", "## Data", "", "| split | source | rows used | rows dropped |", "|---|---|---|---|",
              *_data_rows(stage_config, metrics), ""]
    figures = held_out_figures(cfg, stage, metrics)
    lines += ["## Figures", ""]
    if figures:
        lines += ["| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in figures]]
    else:
        lines.append("No held-out figures were recorded.")
    lines += ["", "## How to load", "", "```python", _load_snippet(stage, kind, where, base_hint), "```", ""]
    if stage == "rm":
        lines += ["Score a prompt and response rendered as in training: the chat template for conversational "
                  "data, prompt + response + EOS for plain text.", ""]
    lines += ["## Training config", "",
              "The part of the pipeline file that produced this folder (the stage's hash covers exactly this):", "",
              "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_stage_cards(cfg: PipelineConfig, stage: str, manifest: dict[str, Any]) -> list[Path]:
    """Write README.md into the stage's model/ and adapter/ folders (those that exist); returns them."""
    from rlhf.atomic import write_file_atomically

    written = []
    for kind in ("model", "adapter"):
        folder = cfg.stage_dir(stage) / kind
        if folder.is_dir():
            text = card_text(cfg, stage, kind, manifest)
            write_file_atomically(folder / CARD_FILE, lambda f: f.write(text))
            written.append(folder / CARD_FILE)
    return written
