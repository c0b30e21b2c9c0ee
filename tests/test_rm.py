"""The reward-model stage on the tiny random model: outputs, their equivalence, data forms, drop
rules, errors, and the pure pair metrics."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import write_config
from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.rm import TRAIN_SCORE_PAIRS, encode, pairwise_metrics, score, score_pairs_with_classifier, train_sample

PAIRS = [
    {"prompt": [{"role": "user", "content": "What color is the sky?"}],
     "chosen": [{"role": "assistant", "content": "Blue, on a clear day."}],
     "rejected": [{"role": "assistant", "content": "Potato."}]},
    {"prompt": [{"role": "user", "content": "Say hi"}],
     "chosen": [{"role": "assistant", "content": "Hi!"}],
     "rejected": [{"role": "assistant", "content": "Say hi Say hi Say hi"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "I am not sure what you mean by that."}]},
]


def _stage(cfg_path: Path, stage: str = "rm") -> Path:
    return load_config(cfg_path).stage_dir(stage)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _variant(tmp_path: Path, sft_cfg: Path, rm: dict) -> Path:
    """A config in tmp_path whose run folder holds a copy of the finished tiny SFT stage, with the rm
    section changed by `rm` (so the shared tiny_rm_run outputs are never overwritten)."""
    cfg = write_config(tmp_path, {"rm": rm})
    shutil.copytree(_stage(sft_cfg, "sft"), load_config(cfg).stage_dir("sft"),
                    ignore=shutil.ignore_patterns("checkpoints"))
    return cfg


def _fast(data: dict, **more) -> dict:
    return {"data": {"eval_split": None, "max_rows": None, **data}, "max_steps": 1, "batch_size": 4,
            "save_steps": 100, **more}


# ---------------------------------------------------------------------------- pure math


def test_pairwise_metrics_by_hand():
    m = pairwise_metrics([2.0, 1.0, 0.5, 3.0], [1.0, 1.0, 1.0, -1.0])
    assert m["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # the tie counts 0.5
    assert m["ties"] == 1 and m["n_pairs"] == 4
    assert m["margin_mean"] == pytest.approx((1 + 0 - 0.5 + 4) / 4)
    assert m["chosen_mean"] == pytest.approx(1.625)
    assert m["chosen_std"] == pytest.approx(math.sqrt(3.6875 / 4))
    assert m["rejected_mean"] == pytest.approx(0.5)
    assert m["rejected_std"] == pytest.approx(math.sqrt(0.75))


def test_train_sample_is_a_seeded_subset_in_file_order():
    """The RM's training-set figures and score_mean come from at most TRAIN_SCORE_PAIRS pairs: the
    same ones for the same seed, in file order, a different choice for another seed; all when fewer."""
    pairs = [{"id": i} for i in range(1000)]
    a, b, c = train_sample(pairs, 42), train_sample(pairs, 42), train_sample(pairs, 7)
    assert len(a) == TRAIN_SCORE_PAIRS == 128 and a == b and a != c
    ids = [p["id"] for p in a]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert max(ids) > 900 and min(ids) < 100  # spread over the file, not its head
    assert train_sample(pairs[:50], 42) == pairs[:50]


def test_pairwise_metrics_edges():
    assert pairwise_metrics([0.3, 0.3], [0.3, 0.3])["accuracy"] == 0.5  # a constant RM is a coin flip
    assert pairwise_metrics([1.0], [2.0])["accuracy"] == 0.0
    assert pairwise_metrics([], [])["n_pairs"] == 0
    with pytest.raises(ValueError):
        pairwise_metrics([1.0], [1.0, 2.0])


# ---------------------------------------------------------------------------- tokenization = RewardTrainer's


@pytest.mark.parametrize("form", ["conversational", "text"])
def test_scoring_matches_reward_trainer(tiny_sft_run, tmp_path, form):
    """encode() gives RewardTrainer's token ids, and score_pairs_with_classifier() the rewards its loss sees."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    sft_model = _stage(tiny_sft_run, "sft") / "model"
    tok = AutoTokenizer.from_pretrained(sft_model)
    records = PAIRS
    if form == "text":
        records = [{k: "".join(m["content"] for m in v) for k, v in r.items()} for r in PAIRS]
    model = AutoModelForSequenceClassification.from_pretrained(sft_model, num_labels=1)
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], max_length=None, bf16=False,
                        activation_checkpointing=False, use_cpu=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok)
    prepared = trainer.train_dataset
    for i, r in enumerate(records):
        assert encode(tok, r["prompt"], r["chosen"]) == prepared[i]["chosen_ids"]
        assert encode(tok, r["prompt"], r["rejected"]) == prepared[i]["rejected_ids"]
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)([prepared[i] for i in range(len(records))])
    with torch.no_grad():
        rewards = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = score_pairs_with_classifier(model, tok, records, batch_size=2)
    assert torch.allclose(torch.tensor(chosen + rejected), rewards, atol=1e-5)


# ---------------------------------------------------------------------------- the stage


def test_rm_stage_writes_outputs(tiny_rm_run):
    stage = _stage(tiny_rm_run)
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "done"
    metrics = manifest["metrics"]
    for key in ("score_mean", "score_std", "eval_accuracy", "eval_margin_mean", "eval_chosen_mean", "eval_chosen_std",
                "eval_rejected_mean", "eval_rejected_std", "global_step"):
        assert isinstance(metrics[key], (int, float)), key
    assert metrics["score_std"] > 0 and metrics["global_step"] == 4
    for rel in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/score_head.safetensors",
                "model/config.json", "model/model.safetensors", "model/tokenizer_config.json", "eval.json"):
        assert (stage / rel).is_file(), rel
    config = json.loads((stage / "model" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and len(config["id2label"]) == 1
    from transformers import AutoTokenizer

    assert config["pad_token_id"] == AutoTokenizer.from_pretrained(stage / "model").pad_token_id
    report = json.loads((stage / "eval.json").read_text())
    assert report["n_pairs"] == 100 and 0 <= report["accuracy"] <= 1 and report["accuracy"] == metrics["eval_accuracy"]
    assert report["score_mean"] == metrics["score_mean"] and report["train"]["n_pairs"] == 32
    # evaluations at steps 2 and 4 (rm.eval_steps 2): the curve, and which one was exported
    assert [r["step"] for r in report["curve"]] == [2, 4] and report["best_step"] in (2, 4)
    assert report["last_step"] == 4 and metrics["best_step"] == report["best_step"]
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows)
    assert rows[-1]["eval_pairs_accuracy"] == report["accuracy"] and "score_mean" in rows[-1]


def test_merged_equals_adapter_and_head_file(tiny_rm_run):
    """rm/model, sft/model + rm/adapter, and backbone + score_head.safetensors give the same scores."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    stage, sft_model = _stage(tiny_rm_run), _stage(tiny_rm_run, "sft") / "model"
    tok = AutoTokenizer.from_pretrained(stage / "model")
    merged = AutoModelForSequenceClassification.from_pretrained(stage / "model")
    base = AutoModelForSequenceClassification.from_pretrained(sft_model, num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    peft_model = PeftModel.from_pretrained(base, stage / "adapter").eval()
    merged_scores = score_pairs_with_classifier(merged, tok, PAIRS, batch_size=4)
    peft_scores = score_pairs_with_classifier(peft_model, tok, PAIRS, batch_size=4)
    assert torch.allclose(torch.tensor(merged_scores), torch.tensor(peft_scores), atol=1e-4)
    assert torch.tensor(merged_scores).std() > 0  # not a constant

    # What PPO does: the adapted backbone's final hidden state at the last token, times the head.
    with safe_open(str(stage / "adapter" / "score_head.safetensors"), "pt") as f:
        assert set(f.keys()) == {"weight"}  # Llama heads have no bias
        weight = f.get_tensor("weight")
    assert weight.shape == (1, merged.config.hidden_size)
    assert torch.equal(weight, merged.score.weight.detach())
    ids = encode(tok, PAIRS[0]["prompt"], PAIRS[0]["chosen"])
    with torch.no_grad():
        hidden = peft_model.get_base_model().model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    assert float(hidden @ weight[0]) == pytest.approx(merged_scores[0][0], abs=1e-4)


def test_ppo_style_scoring_matches_merged(tiny_rm_run):
    """PPO's contract: sft/model as a causal LM with rm/adapter loaded as adapter "reward" beside a
    policy adapter, plus score_head.safetensors applied at the last token, equals rm/model."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    stage, sft_model = _stage(tiny_rm_run), _stage(tiny_rm_run, "sft") / "model"
    tok = AutoTokenizer.from_pretrained(stage / "model")
    causal = AutoModelForCausalLM.from_pretrained(sft_model)
    policy = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(causal, policy, adapter_name="policy")
    result = model.load_adapter(str(stage / "adapter"), adapter_name="reward", is_trainable=False)
    assert not result.missing_keys  # every LoRA weight found its layer (only the head is left over)
    model.set_adapter("reward")
    weight = load_file(str(stage / "adapter" / "score_head.safetensors"))["weight"]
    merged = AutoModelForSequenceClassification.from_pretrained(stage / "model")
    for pair in PAIRS:
        ids = encode(tok, pair["prompt"], pair["chosen"])
        with torch.no_grad():
            hidden = model.eval().get_base_model().model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            expected = merged(input_ids=torch.tensor([ids])).logits[0, 0]
        assert float(hidden @ weight[0]) == pytest.approx(float(expected), abs=1e-4)


def test_trained_parameters_changed(tiny_rm_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, set_seed

    stage, cfg = _stage(tiny_rm_run), load_config(tiny_rm_run)
    tensors = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero
    assert not any("score" in k and "lora" in k for k in tensors)  # the head is not LoRA-wrapped
    set_seed(cfg.seed)  # the stage draws the initial head the same way
    init = AutoModelForSequenceClassification.from_pretrained(_stage(tiny_rm_run, "sft") / "model", num_labels=1)
    trained = tensors["base_model.model.score.weight"]
    assert trained.shape == init.score.weight.shape
    assert not torch.allclose(trained, init.score.weight.detach())


def test_score_api_and_cli(tiny_rm_run):
    from typer.testing import CliRunner

    from rlhf.cli import app

    cfg = load_config(tiny_rm_run)
    responses = ["Blue, on a clear day.", "Potato."]
    scores = score(cfg, "What color is the sky?", responses)
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    chosen, rejected = score_pairs_with_classifier(*_load_rm(cfg), PAIRS[:1])
    assert scores == pytest.approx([chosen[0], rejected[0]], abs=1e-5)  # strings became user/assistant turns
    from_dir = score(cfg.stage_dir("rm") / "model", PAIRS[0]["prompt"], [PAIRS[0]["chosen"]])
    assert from_dir == pytest.approx(chosen, abs=1e-5)

    result = CliRunner().invoke(app, ["score", "--config", str(tiny_rm_run), "--prompt", "What color is the sky?",
                                      "--response", responses[0], "--response", responses[1]])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line[:1] in "+-"]
    assert len(lines) == 2 and float(lines[0].split()[0]) == pytest.approx(scores[0], abs=1e-3)


def _load_rm(cfg):
    from rlhf.rm import load_reward_model

    return load_reward_model(cfg.stage_dir("rm") / "model")


# ---------------------------------------------------------------------------- data forms


def _conv(role, text):
    return [{"role": role, "content": text}]


def _rows(form: str, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q, good, bad = f"Question {i}: what is {i} plus {i}?", f"It is {2 * i}.", "Potato potato potato."
        if form == "explicit_conversational":
            rows.append({"prompt": _conv("user", q), "chosen": _conv("assistant", good),
                         "rejected": _conv("assistant", bad)})
        elif form == "implicit_conversational":
            rows.append({"chosen": _conv("user", q) + _conv("assistant", good),
                         "rejected": _conv("user", q) + _conv("assistant", bad)})
        elif form == "explicit_text":
            rows.append({"prompt": f"Q: {q}\nA:", "chosen": f" {good}", "rejected": f" {bad}"})
        elif form == "implicit_text":
            rows.append({"chosen": f"Q: {q}\nA: {good}", "rejected": f"Q: {q}\nA: {bad}"})
        elif form == "margin":
            rows.append({"prompt": f"Q: {q}\nA:", "chosen": f" {good}", "rejected": f" {bad}",
                         "strength": float(i % 3)})
    return rows


FORMS = ["explicit_conversational", "implicit_conversational", "explicit_text", "implicit_text", "margin"]


@pytest.mark.parametrize("form", FORMS)
def test_data_forms_train(tiny_sft_run, tmp_path, form):
    train = _write_jsonl(tmp_path / "train.jsonl", _rows(form, 8))
    held = _write_jsonl(tmp_path / "eval.jsonl", _rows(form, 4))
    extra = {}
    if form == "margin":  # also: the margin column, the centring term, and evaluation every eval_steps
        extra = {"margin_column": "strength", "center_rewards_coefficient": 0.01, "eval_steps": 1, "max_steps": 2}
    cfg_path = _variant(tmp_path, tiny_sft_run, _fast({"path": str(train), "eval_path": str(held)}, **extra))
    from rlhf.rm import run

    run(load_config(cfg_path))
    stage = _stage(cfg_path)
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "done"
    assert manifest["metrics"]["data"]["train"] == {"kept": 8, "dropped": {}}
    assert manifest["metrics"]["conversational"] == form.endswith("conversational")
    assert json.loads((stage / "eval.json").read_text())["n_pairs"] == 4
    if form == "margin":
        rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
        during = [r for r in rows if "eval_pairs_accuracy" in r and "train_pairs_accuracy" not in r]
        assert [r["step"] for r in during] == [1, 2] and all(r["eval_pairs_n_pairs"] == 4 for r in during)


def test_margin_reaches_the_loss(tiny_sft_run):
    """rm.margin_column becomes the `margin` column RewardTrainer's collator and loss read."""
    from rlhf.data.read import Rows
    from rlhf.data.records import preference_records

    rows = Rows.from_list("mem", _rows("margin", 3), ["line 1", "line 2", "line 3"])
    assert [r["margin"] for r in preference_records(rows, "strength")] == [0.0, 1.0, 2.0]
    from trl.trainer.reward_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=0)([{"chosen_ids": [1], "rejected_ids": [2], "margin": 2.0}])
    assert batch["margin"].tolist() == [2.0]


# ---------------------------------------------------------------------------- drop rules and errors


def test_drop_rules_end_to_end(tiny_sft_run, tmp_path, caplog):
    good = _rows("explicit_conversational", 6)
    long_reply = _conv("assistant", "word " * 200)
    rows = [
        good[0],
        {**good[1], "rejected": good[1]["chosen"]},            # line 2: identical
        good[2],
        {**good[3], "chosen": _conv("assistant", "  ")},        # line 4: empty chosen
        {**good[4], "rejected": long_reply},                    # line 5: too long
        {**good[5], "rejected": good[5]["chosen"]},             # line 6: identical
        {**good[0], "rejected": _conv("assistant", "")},        # line 7: empty rejected
        good[1], good[2], good[3],
    ]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    held = _write_jsonl(tmp_path / "eval.jsonl", good[:4])
    cfg_path = _variant(tmp_path, tiny_sft_run, _fast({"path": str(train), "eval_path": str(held)}, max_length=200))
    from rlhf.rm import run

    with caplog.at_level(logging.INFO, logger="rlhf.data"):
        run(load_config(cfg_path))
    report = json.loads((_stage(cfg_path) / "manifest.json").read_text())["metrics"]["data"]["train"]
    assert report["kept"] == 5
    assert report["dropped"] == {"chosen == rejected": 2, "chosen or rejected is empty": 2,
                                 "longer than max_length=200 tokens": 1}
    log = caplog.text
    assert "first: line 2, line 6" in log and "first: line 4, line 7" in log and "first: line 5" in log


def test_no_usable_rows_is_a_user_error(tiny_sft_run, tmp_path):
    same = _rows("explicit_text", 3)
    rows = [{**r, "rejected": r["chosen"]} for r in same]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg_path = _variant(tmp_path, tiny_sft_run, _fast({"path": str(train)}))
    from rlhf.rm import run

    with pytest.raises(UserError, match=r"train\.jsonl: no usable train rows left .*3 dropped \(chosen == rejected"):
        run(load_config(cfg_path))
    assert not (_stage(cfg_path) / "manifest.json").exists()  # nothing started


def test_missing_sft_stage(tmp_path):
    cfg_path = write_config(tmp_path)
    from rlhf.rm import run

    with pytest.raises(UserError, match=r"needs a finished sft stage .*run `rlhf sft --config .*pipeline\.yaml` first"):
        run(load_config(cfg_path))
    assert not _stage(cfg_path).exists()


def test_missing_rm_stage_for_scoring(tiny_sft_run, tmp_path):
    cfg_path = _variant(tmp_path, tiny_sft_run, {})
    with pytest.raises(UserError, match=r"run `rlhf rm --config"):
        score(load_config(cfg_path), "hi", ["hello"])


def test_rm_stage_script_and_cli_command_exist():
    from typer.testing import CliRunner

    from rlhf.cli import app

    assert Path(__file__).resolve().parent.parent.joinpath("stages", "rm.py").is_file()
    out = CliRunner().invoke(app, ["--help"]).output
    assert " rm " in out and " score " in out
