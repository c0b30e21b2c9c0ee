"""Checks of the committed demo data set (data/demo/) that every stage of the demo reads.

The files are plain JSONL in TRL's conversational formats; these tests need nothing but the
standard library. The last test regenerates the files with data/build_demo.py and compares
bytes; it runs only where chatterbot-corpus is installed and is skipped everywhere else.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
FILES = ("sft_train", "sft_eval", "rm_train", "rm_eval", "ppo_train", "ppo_eval")
SIZES = {
    "sft_train": (200, 600),
    "sft_eval": (40, 100),
    "rm_train": (250, 800),
    "rm_eval": (80, 150),
    "ppo_train": (150, 300),
    "ppo_eval": (40, 80),
}
KINDS = ("off_topic", "truncated", "repetition", "repeat_prompt", "evasive", "word_salad")
MAX_REPLY_CHARS = 300


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def load(name: str) -> list[dict]:
    path = DEMO / f"{name}.jsonl"
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), f"{path} must end with a newline"
    assert b"\r" not in raw, f"{path} must use \\n line endings"
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8").split("\n")[:-1], start=1):
        assert line.strip(), f"{path}:{lineno} is blank"
        row = json.loads(line)
        assert isinstance(row, dict), f"{path}:{lineno} is not a JSON object"
        rows.append(row)
    return rows


def check_message(msg: dict, role: str, where: str) -> str:
    assert set(msg) == {"role", "content"}, where
    assert msg["role"] == role, where
    assert isinstance(msg["content"], str) and msg["content"].strip() == msg["content"] != "", where
    return msg["content"]


def user_texts(name: str, row: dict) -> list[str]:
    """Every user message of a row, whatever the stage."""
    if name.startswith("sft"):
        return [m["content"] for m in row["messages"] if m["role"] == "user"]
    return [row["prompt"][0]["content"]]


@pytest.mark.parametrize("name", FILES)
def test_file_parses_and_size_in_range(name):
    rows = load(name)
    lo, hi = SIZES[name]
    assert lo <= len(rows) <= hi, f"{name}: {len(rows)} rows, expected {lo}..{hi}"


def test_folder_is_small():
    total = sum(p.stat().st_size for p in DEMO.iterdir())
    assert total < 1_000_000, f"data/demo is {total} bytes"
    assert sorted(p.name for p in DEMO.iterdir()) == sorted(f"{n}.jsonl" for n in FILES)


@pytest.mark.parametrize("name", ["sft_train", "sft_eval"])
def test_sft_rows(name):
    for i, row in enumerate(load(name)):
        where = f"{name}:{i + 1}"
        assert set(row) == {"messages"}, where
        messages = row["messages"]
        assert len(messages) >= 2 and len(messages) % 2 == 0, where
        for j, msg in enumerate(messages):
            text = check_message(msg, ("user", "assistant")[j % 2], where)
            if msg["role"] == "assistant":
                assert len(text) <= MAX_REPLY_CHARS, where


@pytest.mark.parametrize("name", ["rm_train", "rm_eval"])
def test_rm_rows(name):
    rows = load(name)
    for i, row in enumerate(rows):
        where = f"{name}:{i + 1}"
        assert set(row) == {"prompt", "chosen", "rejected", "rejected_kind"}, where
        assert len(row["prompt"]) == len(row["chosen"]) == len(row["rejected"]) == 1, where
        check_message(row["prompt"][0], "user", where)
        chosen = check_message(row["chosen"][0], "assistant", where)
        rejected = check_message(row["rejected"][0], "assistant", where)
        assert norm(chosen) != norm(rejected), f"{where}: chosen == rejected"
        assert len(chosen) <= MAX_REPLY_CHARS and len(rejected) <= MAX_REPLY_CHARS, where
        assert row["rejected_kind"] in KINDS, where
    # Every kind is present and none dominates.
    for kind in KINDS:
        share = sum(r["rejected_kind"] == kind for r in rows) / len(rows)
        assert 0.05 <= share <= 0.40, f"{name}: {kind} is {share:.0%} of the pairs"


@pytest.mark.parametrize("name", ["ppo_train", "ppo_eval"])
def test_ppo_rows(name):
    rows = load(name)
    for i, row in enumerate(rows):
        where = f"{name}:{i + 1}"
        assert set(row) == {"prompt"}, where
        assert len(row["prompt"]) == 1, where
        check_message(row["prompt"][0], "user", where)
    keys = [norm(r["prompt"][0]["content"]) for r in rows]
    assert len(keys) == len(set(keys)), f"{name} repeats a prompt"


def test_eval_prompts_never_in_train():
    train = {norm(t) for n in FILES if n.endswith("_train") for r in load(n) for t in user_texts(n, r)}
    for name in (n for n in FILES if n.endswith("_eval")):
        for i, row in enumerate(load(name)):
            for text in user_texts(name, row):
                assert norm(text) not in train, f"{name}:{i + 1}: {text!r} is also in a train split"


def test_regenerates_byte_identical(tmp_path):
    pytest.importorskip("chatterbot_corpus")
    pytest.importorskip("yaml")
    # A fresh interpreter with hash randomisation forced on: the output must not depend on it.
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    subprocess.run([sys.executable, str(ROOT / "data" / "build_demo.py"), "--out", str(tmp_path)],
                   check=True, env=env, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.jsonl" for n in FILES)
    for name in FILES:
        fresh = (tmp_path / f"{name}.jsonl").read_bytes()
        assert fresh == (DEMO / f"{name}.jsonl").read_bytes(), (
            f"data/demo/{name}.jsonl is stale: run `python data/build_demo.py`")
