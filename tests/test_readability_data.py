"""Checks of the second demo task (data/readability/, configs/readability.yaml).

Its preferences are labelled by textstat's Flesch reading ease (data/build_readability.py), and
the same scorer is the task's gold judge (rlhf.judges:reading_ease): every committed pair must
carry the label that scorer gives it today, the eval prompts must be unseen in training, and the
config must be the default pipeline with only the data and the judge swapped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "data" / "readability"
FILES = ("sft_train", "sft_eval", "rm_train", "rm_eval", "ppo_train", "ppo_eval")
SIZES = {"sft_train": 160, "sft_eval": 40, "rm_train": 280, "rm_eval": 100, "ppo_train": 240, "ppo_eval": 60}
MIN_EASE_GAP = 20.0


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def load(name: str) -> list[dict]:
    raw = (TASK / f"{name}.jsonl").read_text(encoding="utf-8")
    assert raw.endswith("\n") and "\r" not in raw
    return [json.loads(line) for line in raw.split("\n")[:-1]]


def user_text(name: str, row: dict) -> str:
    return (row["messages"] if name.startswith("sft") else row["prompt"])[0]["content"]


@pytest.mark.parametrize("name", FILES)
def test_sizes_and_schema(name):
    rows = load(name)
    assert len(rows) == SIZES[name]
    keys = {"sft": {"messages"}, "rm": {"prompt", "chosen", "rejected", "chosen_ease", "rejected_ease"},
            "ppo": {"prompt"}}[name.split("_")[0]]
    for i, row in enumerate(rows):
        assert set(row) == keys, f"{name}:{i + 1}"
        turns = row.get("messages") or row["prompt"] + row.get("chosen", []) + row.get("rejected", [])
        for msg in turns:
            assert set(msg) == {"role", "content"} and msg["content"].strip() == msg["content"] != ""


def test_folder_is_small():
    assert sum(p.stat().st_size for p in TASK.iterdir()) < 1_000_000


@pytest.mark.parametrize("name", ["rm_train", "rm_eval"])
def test_pairs_carry_the_judges_label(name):
    pytest.importorskip("textstat")
    from rlhf.judges import flesch_reading_ease

    for i, row in enumerate(load(name)):
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        c, r = flesch_reading_ease(chosen), flesch_reading_ease(rejected)
        assert (round(c, 2), round(r, 2)) == (row["chosen_ease"], row["rejected_ease"]), f"{name}:{i + 1}"
        assert c - r >= MIN_EASE_GAP, f"{name}:{i + 1}: gap {c - r:.1f}"


def test_eval_prompts_never_in_train():
    train = {norm(user_text(n, r)) for n in FILES if n.endswith("_train") for r in load(n)}
    for name in (n for n in FILES if n.endswith("_eval")):
        for row in load(name):
            assert norm(user_text(name, row)) not in train, f"{name}: {user_text(name, row)!r}"


def test_config_is_the_default_pipeline_with_other_data_and_a_judge():
    default = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    task = yaml.safe_load((ROOT / "configs" / "readability.yaml").read_text())
    assert task["eval"].pop("judge") == "rlhf.judges:reading_ease"
    for stage in ("sft", "rm", "ppo"):
        for key, split in (("path", "train"), ("eval_path", "eval")):
            assert task[stage]["data"].pop(key) == f"data/readability/{stage}_{split}.jsonl"
            default[stage]["data"].pop(key)
    assert task.pop("run_name") == "readability"
    default.pop("run_name")
    assert task == default


def test_judge_loads_through_eval_and_scores_textstat():
    pytest.importorskip("textstat")
    import textstat

    from rlhf.judges import load_judge

    judge = load_judge("rlhf.judges:reading_ease")
    text = "The cat sat on the mat. It was warm."
    assert judge([{"role": "user", "content": "Hi"}], text) == textstat.flesch_reading_ease(text)
    assert judge("any prompt", "Yes.") > judge("any prompt", "Phenomenological deliberation necessitates consideration.")
