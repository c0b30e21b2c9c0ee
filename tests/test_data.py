"""Data: every accepted form per stage, every reader, errors that name file + line/row + column,
held-out splits, and the drop rules with their counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from rlhf.data import needs_chat_template, ppo_data, prepare, render, rm_data, sft_data
from rlhf.data.prepare import check_data, filter_preferences, filter_prompts
from rlhf.data.read import Rows, is_local, read_local, read_splits
from rlhf.data.records import preference_records, prompt_records, sft_records
from rlhf.config import DataConfig, ModelConfig, validate_config
from rlhf.errors import UserError

DEMO = REPO / "data" / "demo"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(records: list[dict], source: str = "mem") -> Rows:
    return Rows.from_list(source, records, [f"line {i + 1}" for i in range(len(records))])


def raises(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.fixture(scope="module")
def tok():
    from rlhf.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path="embedded:tiny-random-llama"))


def stage_cfg(**sections) -> object:
    """A validated PipelineConfig with the given stage sections (sft is always required)."""
    raw = {"model": {"name_or_path": "embedded:tiny-random-llama"}, "seed": 0}
    raw.setdefault("sft", {"data": {"path": str(DEMO / "sft_train.jsonl")}})
    raw.update(sections)
    return validate_config(raw)


# ---------------------------------------------------------------------------- SFT forms


def test_sft_messages_become_prompt_completion_with_completion_only_loss():
    conv = [{"role": "system", "content": "be brief"}, user("hi"), bot("hello"), user("and?"), bot("bye")]
    recs = sft_records(rows_of([{"messages": conv}]), completion_only_loss=True).to_list()
    assert recs == [{"prompt": conv[:-1], "completion": conv[-1:]}]


def test_sft_messages_kept_without_completion_only_loss():
    conv = [user("hi"), bot("hello")]
    assert sft_records(rows_of([{"messages": conv}]), completion_only_loss=False).to_list() == [{"messages": conv}]


def test_sft_prompt_completion_text_and_conversational():
    text = sft_records(rows_of([{"prompt": "Q: 2+2?", "completion": " 4", "extra": 1}]), True).to_list()
    assert text == [{"prompt": "Q: 2+2?", "completion": " 4"}]
    conv = sft_records(rows_of([{"prompt": [user("2+2?")], "completion": [bot("4")]}]), True).to_list()
    assert conv == [{"prompt": [user("2+2?")], "completion": [bot("4")]}]


def test_sft_text():
    assert sft_records(rows_of([{"text": "once upon a time"}]), True).to_list() == [{"text": "once upon a time"}]


def test_sft_mixed_prompt_and_completion_types_is_an_error():
    msg = raises(sft_records, rows_of([{"prompt": "q", "completion": [bot("a")]}]), True)
    assert msg.startswith("mem, line 1:") and "both be text or both be message lists" in msg


def test_sft_last_message_must_be_assistant():
    rows = rows_of([{"messages": [user("a"), bot("b")]}, {"messages": [user("a"), bot("b"), user("c")]}])
    msg = raises(sft_records, rows, True)
    assert msg.startswith("mem, line 2:") and "last message must be the assistant's reply" in msg


def test_sft_assistant_only_conversation_needs_a_prompt_turn():
    msg = raises(sft_records, rows_of([{"messages": [bot("b")]}]), True)
    assert "needs a prompt turn" in msg
    assert sft_records(rows_of([{"messages": [bot("b")]}]), False).to_list() == [{"messages": [bot("b")]}]


def test_sft_bad_role_names_row_and_column():
    msg = raises(sft_records, rows_of([{"messages": [{"role": "bot", "content": "x"}, bot("y")]}]), True)
    assert msg == "mem, line 1: messages[0] has role 'bot'; use one of system, user, assistant, tool"


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": "hello"}, "column 'messages' must be a non-empty list"),
        ({"messages": []}, "column 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages[0] must be an object with 'role' and 'content'"),
        ({"messages": [user("a"), {"role": "assistant", "content": 3}]}, "messages[1].content must be a string"),
        ({"prompt": 3, "completion": "x"}, "column 'prompt' must be a string or a list of messages, got int"),
        ({"prompt": "q", "completion": None}, "column 'completion' is empty"),
        ({"text": 7}, "column 'text' must be a non-empty string"),
        ({"text": "   "}, "column 'text' must be a non-empty string"),
    ],
)
def test_sft_wrong_types_name_the_column(row, expected):
    msg = raises(sft_records, rows_of([row]), True)
    assert msg.startswith("mem, line 1: ") and expected in msg


def test_missing_column_lists_what_is_needed_and_found():
    msg = raises(sft_records, rows_of([{"question": "q", "answer": "a"}]), True)
    assert msg == "mem, line 1: SFT data needs columns messages or prompt+completion or text; found: question, answer"


def test_later_row_with_missing_column_is_reported_by_line():
    rows = rows_of([{"prompt": "q", "completion": "a"}, {"prompt": "q2", "completion": "a2"}, {"prompt": "q3"}])
    msg = raises(sft_records, rows, True)
    assert msg.startswith("mem, line 3:") and "'completion'" in msg


# ---------------------------------------------------------------------------- RM forms


def test_rm_explicit_prompt_text_and_conversational():
    text = preference_records(rows_of([{"prompt": "Q?", "chosen": " good", "rejected": " bad"}])).to_list()
    assert text == [{"prompt": "Q?", "chosen": " good", "rejected": " bad"}]
    conv = preference_records(rows_of([{"prompt": [user("Q?")], "chosen": [bot("good")], "rejected": [bot("bad")]}])).to_list()
    assert conv == [{"prompt": [user("Q?")], "chosen": [bot("good")], "rejected": [bot("bad")]}]


def test_rm_implicit_prompt_is_the_shared_prefix():
    conv = preference_records(rows_of([{"chosen": [user("Q?"), bot("good")], "rejected": [user("Q?"), bot("bad")]}])).to_list()
    assert conv == [{"prompt": [user("Q?")], "chosen": [bot("good")], "rejected": [bot("bad")]}]
    text = preference_records(rows_of([{"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}])).to_list()
    assert text == [{"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"}]


def test_rm_margin_column():
    recs = preference_records(rows_of([{"prompt": "q", "chosen": "a", "rejected": "b", "m": 2}]), margin_column="m")
    assert recs[0]["margin"] == 2.0 and isinstance(recs[0]["margin"], float)
    msg = raises(preference_records, rows_of([{"prompt": "q", "chosen": "a", "rejected": "b", "m": "big"}]), "m")
    assert msg.startswith("mem, line 1:") and "margin column 'm' must hold a number" in msg
    assert "must hold a number" in raises(preference_records, rows_of([{"prompt": "q", "chosen": "a", "rejected": "b"}]), "m")


def test_rm_type_mismatch_and_missing_columns():
    msg = raises(preference_records, rows_of([{"prompt": "q", "chosen": "a", "rejected": [bot("b")]}]))
    assert "chosen and rejected must both be text or both be message lists" in msg
    msg = raises(preference_records, rows_of([{"prompt": [user("q")], "chosen": "a", "rejected": "b"}]))
    assert "prompt, chosen and rejected must all be text or all be message lists" in msg
    msg = raises(preference_records, rows_of([{"prompt": "q", "chosen": "a"}]))
    assert "preference data needs columns prompt+chosen+rejected or chosen+rejected; found: prompt, chosen" in msg


def test_rm_drop_rules_with_counts(tok):
    from datasets import Dataset

    recs = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "  ", "rejected": "b"},
        {"prompt": "q", "chosen": "x" * 100, "rejected": "b"},
    ]
    conv = [{"prompt": [user("q")], "chosen": [bot("")], "rejected": [bot("b")]}]  # text and messages: two sets
    kept, report = filter_preferences(Dataset.from_list(recs), [f"line {i}" for i in range(1, 5)], tok, max_length=50)
    kept_conv, report_conv = filter_preferences(Dataset.from_list(conv), ["line 5"], tok, max_length=50)
    assert kept.select_columns(["prompt", "chosen", "rejected"]).to_list() == recs[:1] and len(kept_conv) == 0
    assert report.summary() == {"kept": 1, "dropped": {
        "chosen == rejected": 1, "chosen or rejected is empty": 1, "longer than max_length=50 tokens": 1}}
    assert report_conv.summary() == {"kept": 0, "dropped": {"chosen or rejected is empty": 1}}
    assert "line 4" in report.describe("RM")


# ---------------------------------------------------------------------------- PPO forms


def test_ppo_prompt_text_conversational_and_messages():
    assert prompt_records(rows_of([{"prompt": "Tell me"}])).to_list() == [{"prompt": "Tell me"}]
    assert prompt_records(rows_of([{"prompt": [user("hi")]}])).to_list() == [{"prompt": [user("hi")]}]
    recs = prompt_records(rows_of([{"messages": [user("hi"), bot("hello")]}, {"messages": [user("q")]}])).to_list()
    assert recs == [{"prompt": [user("hi")]}, {"prompt": [user("q")]}]


def test_ppo_errors():
    assert "no prompt turn" in raises(prompt_records, rows_of([{"messages": [bot("only")]}]))
    assert "column 'prompt' is empty" in raises(prompt_records, rows_of([{"prompt": "  "}]))
    assert "PPO data needs columns prompt or messages" in raises(prompt_records, rows_of([{"text": "x"}]))


def test_ppo_drops_long_prompts(tok):
    from datasets import Dataset

    recs = [{"prompt": "short"}, {"prompt": "y" * 200}]
    conv = [{"prompt": [user("z" * 200)]}]  # text and messages: two sets
    kept, report = filter_prompts(Dataset.from_list(recs), ["line 1", "line 2"], tok, max_length=64)
    kept_conv, report_conv = filter_prompts(Dataset.from_list(conv), ["line 3"], tok, max_length=64)
    assert kept["prompt"][:] == ["short"] and len(kept_conv) == 0
    reason = "prompt longer than max_prompt_length=64 tokens"
    assert report.summary() == {"kept": 1, "dropped": {reason: 1}} and report_conv.summary() == {"kept": 0, "dropped": {reason: 1}}


# ---------------------------------------------------------------------------- readers


ROWS = [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": "a2"}, {"prompt": "q3", "completion": "a3"}]


def test_read_jsonl_labels_by_line_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    rows = read_local(str(path))
    assert rows.to_list() == ROWS[:2]
    assert rows.labels == ["line 1", "line 3"]
    assert rows.where(1) == f"{path}, line 3"


def test_read_json_list_and_data_key(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    for name in ("a.json", "b.json"):
        rows = read_local(str(tmp_path / name))
        assert rows.to_list() == ROWS and rows.labels == ["row 1", "row 2", "row 3"]
    (tmp_path / "c.json").write_text(json.dumps({"prompt": "q"}))
    assert "expected a JSON list of objects" in raises(read_local, str(tmp_path / "c.json"))
    (tmp_path / "d.json").write_text('[{"prompt": "q"},\n {"prompt": }]')
    assert raises(read_local, str(tmp_path / "d.json")).startswith(f"{tmp_path / 'd.json'}, line 2: malformed JSON")


def test_read_parquet_conversational(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conv = [{"messages": [user("hi"), bot("hello")]}, {"messages": [user("q"), bot("a")]}]
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "d.parquet")
    rows = read_local(str(tmp_path / "d.parquet"))
    assert rows.to_list() == conv and rows.labels == ["row 1", "row 2"]
    assert sft_records(rows, True)[1] == {"prompt": [user("q")], "completion": [bot("a")]}
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert "not a readable parquet file" in raises(read_local, str(tmp_path / "bad.parquet"))


def test_read_csv_rows_are_numbered_after_the_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nq1,a1\n\"q, 2\",a2\n")
    rows = read_local(str(path))
    assert rows.to_list() == [{"prompt": "q1", "completion": "a1"}, {"prompt": "q, 2", "completion": "a2"}]
    assert rows.labels == ["row 2", "row 3"]
    msg = raises(sft_records, read_local(str(jsonl_csv(tmp_path))), True)
    assert msg.startswith(f"{tmp_path / 'e.csv'}, row 3:") and "'completion'" in msg


def jsonl_csv(tmp_path: Path) -> Path:
    path = tmp_path / "e.csv"
    path.write_text("prompt,completion\nq1,a1\nq2\n")  # row 3 has no completion
    return path


def test_read_folder_concatenates_files_in_name_order(tmp_path):
    jsonl(tmp_path / "b.jsonl", ROWS[1:])
    jsonl(tmp_path / "a.jsonl", ROWS[:1])
    (tmp_path / "notes.txt").write_text("ignored")
    rows = read_local(str(tmp_path))
    assert rows.to_list() == ROWS
    assert rows.labels == ["a.jsonl line 1", "b.jsonl line 1", "b.jsonl line 2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "folder holds no .jsonl, .json, .parquet, .csv files" in raises(read_local, str(empty))


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    assert "unsupported file type '.txt'" in raises(read_local, str(tmp_path / "d.txt"))
    assert "data file not found" in raises(read_local, str(tmp_path / "nope.jsonl"))


def test_is_local():
    assert is_local(str(DEMO / "sft_train.jsonl"))
    assert is_local("missing/file.parquet") and is_local("./x") and is_local("~/x")
    assert not is_local("HuggingFaceH4/ultrachat_200k")


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"prompt": "q3", "completion": }\n')
    msg = raises(read_local, str(path))
    assert msg.startswith(f"{path}, line 3: malformed JSON") and "column 32" in msg


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    assert raises(read_local, str(path)) == f"{path}, line 2: expected a JSON object per line, got list"


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    msg = raises(read_local, str(path))
    assert msg.startswith(f"{path}, line 2: not UTF-8 text (byte 15)")
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"prompt,completion\ncaf\xe9,x\n")
    assert "not UTF-8 text" in raises(read_local, str(csv_path))


# ---------------------------------------------------------------------------- splits


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    msg = raises(read_splits, DataConfig(path=str(tmp_path / "e.jsonl")), 0)
    assert msg == f"{tmp_path / 'e.jsonl'}: the data set is empty"


def test_empty_eval_file_is_an_error(tmp_path, tok):
    jsonl(tmp_path / "t.jsonl", ROWS)
    (tmp_path / "e.jsonl").write_text("")
    cfg = stage_cfg(sft={"data": {"path": str(tmp_path / "t.jsonl"), "eval_path": str(tmp_path / "e.jsonl")}})
    assert raises(sft_data, cfg, tok) == f"{tmp_path / 'e.jsonl'}: the held-out data set is empty"


def test_eval_split_is_deterministic_disjoint_and_complete(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(40)]
    jsonl(tmp_path / "t.jsonl", rows)
    data = DataConfig(path=str(tmp_path / "t.jsonl"), eval_split=0.25)
    train, held = read_splits(data, seed=1)
    train2, held2 = read_splits(data, seed=1)
    _, held3 = read_splits(data, seed=2)
    assert len(held) == 10 and len(train) == 30
    assert held.to_list() == held2.to_list() and train.to_list() == train2.to_list()
    assert held.to_list() != held3.to_list()
    texts = {r["text"] for r in train.to_list()}
    held_texts = {r["text"] for r in held.to_list()}
    assert not texts & held_texts and texts | held_texts == {r["text"] for r in rows}
    assert held.labels[0].startswith("line ")
    # training rows keep file order (for reporting); the trainer shuffles
    assert train.labels == sorted(train.labels, key=lambda s: int(s.split()[1]))


def test_eval_split_needs_enough_rows_and_hub_split_names(tmp_path):
    jsonl(tmp_path / "t.jsonl", ROWS[:1])
    msg = raises(read_splits, DataConfig(path=str(tmp_path / "t.jsonl"), eval_split=0.5), 0)
    assert "too few to hold out 50%" in msg
    msg = raises(read_splits, DataConfig(path=str(tmp_path / "t.jsonl"), eval_split="test"), 0)
    assert "names a hub split" in msg and "is a local file" in msg


def test_no_eval_and_eval_path(tmp_path):
    jsonl(tmp_path / "t.jsonl", ROWS)
    jsonl(tmp_path / "e.jsonl", ROWS[:1])
    train, held = read_splits(DataConfig(path=str(tmp_path / "t.jsonl"), eval_split=None), 0)
    assert held is None and train.to_list() == ROWS
    train, held = read_splits(DataConfig(path=str(tmp_path / "t.jsonl"), eval_path=str(tmp_path / "e.jsonl")), 0)
    assert train.to_list() == ROWS and held.to_list() == ROWS[:1]  # eval_path wins over the default eval_split


def test_max_rows_applies_after_the_held_out_carve(tmp_path):
    jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(20)])
    train, held = read_splits(DataConfig(path=str(tmp_path / "t.jsonl"), eval_split=0.5, max_rows=3), 0)
    assert len(train) == 3 and len(held) == 10
    assert not {r["text"] for r in train.to_list()} & {r["text"] for r in held.to_list()}


# ---------------------------------------------------------------------------- per stage


def test_sft_drops_too_long_rows_with_counts(tmp_path, tok):
    rows = [{"messages": [user("hi"), bot("ok")]}, {"messages": [user("x" * 300), bot("ok")]},
            {"messages": [user("yo"), bot("fine")]}, {"messages": [user("q"), bot("z" * 300)]}]
    jsonl(tmp_path / "t.jsonl", rows)
    cfg = stage_cfg(sft={"data": {"path": str(tmp_path / "t.jsonl"), "eval_split": None}, "max_length": 64})
    out = sft_data(cfg, tok)
    assert len(out.train) == 2 and out.eval is None and out.conversational
    assert out.report == {"train": {"kept": 2, "dropped": {"longer than max_length=64 tokens": 2}}}
    assert out.train[0] == {"prompt": [user("hi")], "completion": [bot("ok")]}


def test_sft_with_every_row_too_long_is_an_error(tmp_path, tok):
    jsonl(tmp_path / "t.jsonl", [{"text": "w" * 100}, {"text": "v" * 100}])
    cfg = stage_cfg(sft={"data": {"path": str(tmp_path / "t.jsonl"), "eval_split": None}, "max_length": 16})
    msg = raises(sft_data, cfg, tok)
    assert "no usable train rows left" in msg and "2 dropped (longer than max_length=16 tokens; first: line 1, line 2)" in msg


def test_sft_data_on_demo_files(tok):
    cfg = stage_cfg(sft={"data": {"path": str(DEMO / "sft_train.jsonl"), "eval_path": str(DEMO / "sft_eval.jsonl"),
                                  "max_rows": 8}})
    out = sft_data(cfg, tok)
    assert len(out.train) == 8 and len(out.eval) == 60 and out.conversational
    assert set(out.train.column_names) == {"prompt", "completion"}


def test_rm_and_ppo_data_on_demo_files(tok):
    cfg = stage_cfg(
        rm={"data": {"path": str(DEMO / "rm_train.jsonl"), "eval_split": 0.1, "max_rows": 20}},
        ppo={"data": {"path": str(DEMO / "ppo_train.jsonl"), "eval_split": None}, "max_prompt_length": 30},
    )
    rm = rm_data(cfg, tok)
    assert len(rm.train) == 20 and len(rm.eval) == 32 and rm.conversational  # 10% of the 320 demo pairs
    assert set(rm.train.column_names) == {"prompt", "chosen", "rejected"}
    ppo = ppo_data(cfg, tok)
    assert ppo.conversational and ppo.eval is None
    dropped = ppo.report["train"]["dropped"].get("prompt longer than max_prompt_length=30 tokens", 0)
    assert dropped > 0 and len(ppo.train) + dropped == 200


def test_needs_chat_template():
    assert needs_chat_template(DataConfig(path=str(DEMO / "sft_train.jsonl")), 0)


def test_text_data_does_not_need_a_chat_template(tmp_path):
    jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(5)])
    assert not needs_chat_template(DataConfig(path=str(tmp_path / "t.jsonl")), 0)


def test_check_data_counts_rows_and_checks_held_out(tmp_path):
    jsonl(tmp_path / "t.jsonl", ROWS)
    jsonl(tmp_path / "e.jsonl", [{"prompt": "q"}])
    assert check_data(DataConfig(path=str(tmp_path / "t.jsonl"), eval_split=None), 0, lambda r: sft_records(r, True)) == 3
    msg = raises(check_data, DataConfig(path=str(tmp_path / "t.jsonl"), eval_path=str(tmp_path / "e.jsonl")), 0,
                 lambda r: sft_records(r, True))
    assert msg.startswith(f"{tmp_path / 'e.jsonl'}, line 1: SFT data needs columns")


# ---------------------------------------------------------------------------- reading through Arrow


def test_jsonl_values_read_as_pythons_json_reads_them(tmp_path):
    """pyarrow's reader would turn date-like strings into timestamps and an int among floats into a
    float; such files are read in Python, so every value reaches the checks as written."""
    path = jsonl(tmp_path / "d.jsonl", [{"text": "2024-01-02"}, {"text": "2024-01-03 10:00:00", "meta": 1},
                                        {"text": "x", "meta": "mixed types in a column no stage reads"}])
    assert read_local(str(path)).to_list() == [
        {"text": "2024-01-02", "meta": None}, {"text": "2024-01-03 10:00:00", "meta": 1},
        {"text": "x", "meta": "mixed types in a column no stage reads"}]
    msg = raises(prompt_records, read_local(str(jsonl(tmp_path / "n.jsonl", [{"prompt": 1.5}, {"prompt": 2}]))))
    assert msg == f"{tmp_path / 'n.jsonl'}, line 1: column 'prompt' must be a string or a list of messages, got float"
    msg = raises(prompt_records, read_local(str(jsonl(tmp_path / "i.jsonl", [{"prompt": 2}, {"prompt": 1.5}]))))
    assert msg.endswith("line 1: column 'prompt' must be a string or a list of messages, got int")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert raises(read_local, str(bom)).startswith(f"{bom}, line 1: malformed JSON (Unexpected UTF-8 BOM")


def test_needs_chat_template_reads_only_the_first_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps({"messages": [user("a"), bot("b")]}) + "\n{not json at all\n")
    assert needs_chat_template(DataConfig(path=str(path)))  # the broken line 3 is the stage's to report
    assert raises(read_local, str(path)).startswith(f"{path}, line 3: malformed JSON")


# ---------------------------------------------------------------------------- tokenized once, as TRL would


def test_trl_trains_on_the_prepared_sets_exactly_what_it_would_tokenize(tmp_path, tok):
    """The ids and labels the trainers end up with from our prepared sets equal what their own
    preparation of the records gives, for conversational and text rows: SFTTrainer with its
    preparation skipped, as the SFT stage runs it (our labels and truncation stand in for TRL's,
    including a row whose EOS the truncation cuts and, with a tokenizer that adds BOS, a row left
    with no label, which both drop); RewardTrainer skipping its tokenization of a set that has
    token ids. PPO's prompt ids are the rendered prompt's tokens."""
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from rlhf.models import resolve_model
    from rlhf.sft import TRL_DATASET_KWARGS

    model_dir = resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama"))
    convs = [json.loads(line) for line in (DEMO / "sft_train.jsonl").read_text().splitlines()[:12]]
    text = jsonl(tmp_path / "text.jsonl", [{"prompt": c["messages"][0]["content"] + "\nA:",
                                            "completion": " " + c["messages"][-1]["content"]} for c in convs])
    lm = jsonl(tmp_path / "lm.jsonl", [{"text": c["messages"][-1]["content"]} for c in convs])
    pairs = jsonl(tmp_path / "pairs.jsonl", [{"chosen": f"Q{i}: sky? A: blue", "rejected": f"Q{i}: sky? A: green", "m": i}
                                             for i in range(6)])

    def trl_view(trainer_cls, args_cls, model, data, columns, ours=None, tokenizer=tok, **kwargs):
        views = []
        for train, extra in ((data.train_ids, ours or {}), (data.train, {})):
            args = args_cls(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, **kwargs, **extra)
            trainer = trainer_cls(model=model, args=args, train_dataset=train, processing_class=tokenizer)
            views.append({c: trainer.train_dataset[c][:] for c in columns})
        return views

    causal = AutoModelForCausalLM.from_pretrained(model_dir)

    def sft_views(path, max_length, tokenizer=tok, **extra):
        cfg = stage_cfg(sft={"data": {"path": path, "eval_split": None, **extra}, "max_length": max_length})
        data = sft_data(cfg, tokenizer)
        ours, trls = trl_view(SFTTrainer, SFTConfig, causal, data, ("input_ids", "labels"),
                              {"dataset_kwargs": TRL_DATASET_KWARGS},
                              tokenizer, max_length=max_length,
                              completion_only_loss=True if "prompt" in data.train.column_names else None)
        assert ours == trls and len(ours["input_ids"]) == len(data.train) > 0, path
        return data, ours

    for path, extra in ((str(DEMO / "sft_train.jsonl"), {"max_rows": 12}), (str(text), {}), (str(lm), {})):
        sft_views(path, 96, **extra)
    # max_length = the longest text row's length as the length rule counts it (no EOS): the row is
    # kept and its EOS truncated away, as TRL's truncation does
    longest = max(len(tok(c["messages"][0]["content"] + "\nA: " + c["messages"][-1]["content"])["input_ids"])
                  for c in convs)
    _, ours = sft_views(str(text), longest)
    assert max(len(x) for x in ours["input_ids"]) == longest and ours["labels"][-1][-1] != -100
    # A tokenizer that adds BOS: a one-token completion at max_length is cut away with the EOS.
    bos = copy.deepcopy(tok)
    bos.add_bos_token = True
    short = jsonl(tmp_path / "short.jsonl", [{"prompt": "Q: sky?\nA:", "completion": " blue"},
                                             {"prompt": "Q: sky colour?\nA", "completion": ":"}])
    limit = len(tok("Q: sky colour?\nA:")["input_ids"])
    data, ours = sft_views(str(short), limit, bos)
    assert len(ours["input_ids"]) == 1 and data.report["train"]["dropped"] == {
        f"no token left to train on within max_length={limit}": 1}, data.report
    scorer = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    scorer.config.pad_token_id = tok.pad_token_id
    for path, margin in ((str(DEMO / "rm_train.jsonl"), None), (str(pairs), "m")):
        cfg = stage_cfg(rm={"data": {"path": path, "eval_split": None, "max_rows": 12}, "margin_column": margin})
        data = rm_data(cfg, tok)
        ours, trls = trl_view(RewardTrainer, RewardConfig, scorer, data,
                              ("chosen_ids", "rejected_ids", *(("margin",) if margin else ())), max_length=None)
        assert ours == trls, path
    cfg = stage_cfg(rm={"data": {"path": str(DEMO / "rm_train.jsonl")}},
                    ppo={"data": {"path": str(DEMO / "ppo_train.jsonl"), "eval_split": None}})
    data = ppo_data(cfg, tok)
    texts = [render(tok, p) for p in data.train["prompt"]]
    assert data.train_ids["prompt_text"][:] == texts
    assert data.train_ids["prompt_ids"][:] == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


# ---------------------------------------------------------------------------- prepared once, cached


def test_prepared_data_is_cached_and_keyed_by_what_shapes_it(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    path = jsonl(tmp_path / "t.jsonl", [{"messages": [user(f"q{i}"), bot(f"a{i}")]} for i in range(20)])
    cfg = stage_cfg(sft={"data": {"path": str(path), "eval_split": 0.25}, "max_length": 64})
    first = sft_data(cfg, tok)
    builds = []
    real_build = prepare._build
    monkeypatch.setattr(prepare, "_build", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    again = sft_data(cfg, tok)  # a rerun (or another process) loads it
    assert builds == [] and again.report == first.report and again.conversational
    assert again.train.to_list() == first.train.to_list() and again.eval_ids.to_list() == first.eval_ids.to_list()
    assert again.train.cache_files  # memory-mapped from the cache folder
    sft_data(stage_cfg(sft={"data": {"path": str(path), "eval_split": 0.25}, "max_length": 32}), tok)
    assert builds == [1]  # another length rule: prepared afresh
    jsonl(path, [{"messages": [user(f"q{i}"), bot(f"b{i}")]} for i in range(20)])
    assert sft_data(cfg, tok).train[0]["completion"] == [bot("b1")] and builds == [1, 1]  # the file changed


PREPARE_IN_A_PROCESS = """
import json, sys
from accelerate import PartialState
state = PartialState(cpu=True)
from rlhf.data import prepare
from rlhf.config import ModelConfig, validate_config
from rlhf.models import load_tokenizer
built = []
real_build = prepare._build
prepare._build = lambda *a, **k: built.append(state.process_index) or real_build(*a, **k)
cfg = validate_config({"model": {"name_or_path": "embedded:tiny-random-llama"}, "seed": 0,
                       "sft": {"data": {"path": sys.argv[1], "eval_split": 0.1}}})
data = prepare.sft_data(cfg, load_tokenizer(cfg.model))
print(json.dumps({"built": built, "train": data.train_ids["input_ids"][:], "mapped": bool(data.train_ids.cache_files)}))
"""


def test_a_two_process_stage_prepares_its_data_once(tmp_path):
    """Under accelerate's main_process_first the main process prepares the set and the other loads it."""
    import os
    import socket
    import subprocess
    import sys

    path = jsonl(tmp_path / "t.jsonl", [{"messages": [user(f"q{i}"), bot(f"a{i}")]} for i in range(30)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RLHF_CACHE=str(tmp_path / "cache"), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE="2", ACCELERATE_USE_CPU="1", PYTHONPATH=str(REPO))
    from rlhf.models import resolve_model

    model = Path(resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama")))  # built once, shared
    (tmp_path / "cache").mkdir()
    os.symlink(model, tmp_path / "cache" / model.name)
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_IN_A_PROCESS, str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    main, other = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert main["built"] == [0] and other["built"] == []
    assert other["train"] == main["train"] and len(main["train"]) == 27 and main["mapped"] and other["mapped"]
