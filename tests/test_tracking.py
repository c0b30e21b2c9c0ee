"""Tracking: W&B mode selection, the Trainer-name mapping, and a tiny pipeline tracked by W&B in
offline mode — one offline run per stage (group = run name, job_type = stage, the config without
secrets), trainer metrics for SFT/RM, the RM's held-out accuracy, the PPO metric set and samples
table — read back from the runs' .wandb files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.tracking import loggable_config, read_metrics, report_to, scrub_secrets, wandb_key, wandb_mode
from tests.conftest import write_config


def read_wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb file. W&B 0.31 has no Python reader (its writer is in Go),
    so this reads the LevelDB-log framing it uses — a 7-byte file header (":W&B", magic, version),
    32 KiB blocks of chunks each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last) — and parses each record with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history_keys(records) -> set[str]:
    return {"/".join(item.nested_key) or item.key for r in records if r.WhichOneof("record_type") == "history"
            for item in r.history.item}


def test_wandb_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))

    def mode(**tracking):
        return wandb_mode(load_config(write_config(tmp_path, {"tracking": tracking})))

    assert mode(backend="none") is None
    assert mode(backend="tensorboard") is None
    assert mode(backend="wandb", mode="disabled") is None
    assert mode(backend="wandb", mode="auto") == "offline"  # no credentials
    assert mode(backend="wandb", mode="online") == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert mode(backend="wandb", mode="auto") == "online"
    assert mode(backend="wandb", mode="offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment decides `auto` (CI, tests)
    assert mode(backend="wandb", mode="auto") is None


def test_trainer_names_and_secrets():
    assert [wandb_key(k) for k in ("eval_pairs_accuracy", "train_pairs_accuracy", "loss", "score_mean", "objective/kl")] \
        == ["eval/pairs_accuracy", "train/pairs_accuracy", "train/loss", "train/score_mean", "objective/kl"]
    node = {"ppo": {"stop_token": "eos", "kl_coef": 0.05}, "hub": [{"hf_token": "hf_abc", "api_key": "k", "key": "v"}],
            "wandb_api_key": "w", "password": "", "margin_column": "m"}
    assert scrub_secrets(node) == {"ppo": {"stop_token": "eos", "kl_coef": 0.05},
                                   "hub": [{"hf_token": "***", "api_key": "***", "key": "***"}],
                                   "wandb_api_key": "***", "password": "", "margin_column": "m"}


def test_tensorboard_backend_needs_its_package(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = load_config(write_config(tmp_path, {"tracking": {"backend": "tensorboard"}}))
    with pytest.raises(UserError, match="pip install tensorboard"):
        report_to(cfg, "sft")


def test_tiny_pipeline_offline_wandb_run_per_stage(tmp_path, monkeypatch):
    """SFT, RM and PPO on 2 steps each, tracked by W&B offline (~5 s on the tiny model)."""
    import wandb

    from rlhf import ppo, rm, sft

    secret = "s3cr3t-" + "k" * 33
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    monkeypatch.setenv("WANDB_API_KEY", secret)  # must never reach a run's files
    path = write_config(tmp_path, {"run_name": "tracked", "tracking": {"backend": "wandb", "project": "rlhf-test"},
                                   "sft": {"max_steps": 2, "data": {"max_rows": 8}},
                                   "rm": {"max_steps": 2, "data": {"max_rows": 8}},
                                   "ppo": {"steps": 2, "sample_every": 2, "save_every": 2}})
    cfg = load_config(path)
    assert "s3cr3t" not in json.dumps(loggable_config(cfg)) and loggable_config(cfg)["ppo"]["stop_token"] == "eos"
    try:
        for stage in (sft, rm, ppo):
            stage.run(cfg)
    finally:
        wandb.finish()

    wanted = {
        "sft": {"train/loss", "train/learning_rate", "eval/loss", "train/global_step"},
        "rm": {"train/loss", "train/accuracy", "eval/pairs_accuracy", "train/pairs_accuracy"},
        "ppo": {"objective/scores", "objective/kl", "objective/entropy", "policy/clipfrac", "loss/policy",
                "loss/value", "response/length_mean", "response/eos_fraction", "samples/_type"},
    }
    for stage, keys in wanted.items():
        runs = list((cfg.stage_dir(stage) / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, (stage, runs)
        files = list(runs[0].glob("run-*.wandb"))
        assert len(files) == 1
        assert secret.encode() not in files[0].read_bytes()
        records = read_wandb_records(files[0])
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run.run_group, run.job_type, run.display_name, run.project) == ("tracked", stage, f"tracked-{stage}", "rlhf-test")
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["run_name"] == "tracked" and config[stage]["data"]["path"].endswith(".jsonl")
        missing = keys - history_keys(records)
        assert not missing, (stage, missing)
        assert read_metrics(cfg.stage_dir(stage) / "metrics.jsonl")  # written whatever the backend
    # the samples table: a W&B table file with the rows of samples.jsonl's last step
    tables = list((cfg.stage_dir("ppo") / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "response", "score", "has_stop"]
    assert len(table["data"]) == cfg.ppo.rollout_batch_size
    # the PPO metric values in W&B are those of metrics.jsonl, step for step
    records = read_wandb_records(next((cfg.stage_dir("ppo") / "wandb").glob("offline-run-*/run-*.wandb")))
    logged = [json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "history"
              for item in r.history.item if "/".join(item.nested_key) == "objective/kl"]
    assert logged == pytest.approx([row["objective/kl"] for row in read_metrics(cfg.stage_dir("ppo") / "metrics.jsonl")])
