"""The GPU example configs in configs/gpu/: `rlhf validate` accepts each without the network
(hub data sets and the hub model are checked by name only), they are bf16 + LoRA on the data sets
they name, and the 8-GPU file's launcher works for SFT/RM (ZeRO-2) and, as its header says, for
PPO once launcher.accelerate_config points at the DDP file."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.launch import check_launch
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs" / "gpu").glob("*.yaml"))


@pytest.fixture(autouse=True)
def offline_from_repo_root(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # validation must not need the hub
    monkeypatch.chdir(REPO)  # the configs name configs/accelerate/*.yaml relative to the repository


def test_there_are_one_and_eight_gpu_configs():
    assert {p.name for p in CONFIGS} >= {"qwen2.5-0.5b-1gpu.yaml", "qwen2.5-0.5b-8gpu-zero2.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_validate_accepts_without_network(path):
    result = CliRunner().invoke(app, ["validate", "--config", str(path.relative_to(REPO))])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("hub data set") == 3
    assert "valid (model Qwen/Qwen2.5-0.5B-Instruct" in result.stdout


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bf16_lora_and_standard_hub_data(path):
    cfg = load_config(path)
    assert cfg.model.dtype == "bfloat16" and cfg.lora.target_modules == "all-linear"
    assert cfg.rm.data.path == "trl-lib/ultrafeedback_binarized" and cfg.rm.data.eval_split == "test"
    assert cfg.ppo.data.path == "trl-lib/ultrafeedback-prompt"
    assert cfg.sft.data.path in ("trl-lib/Capybara", "HuggingFaceH4/ultrachat_200k")
    assert cfg.ppo.rollout_batch_size % cfg.ppo.num_mini_batches == 0
    if cfg.launcher.accelerate_config:
        assert (REPO / cfg.launcher.accelerate_config).is_file()


def test_eight_gpu_launch_plan():
    path = REPO / "configs" / "gpu" / "qwen2.5-0.5b-8gpu-zero2.yaml"
    cfg = load_config(path)
    assert cfg.launcher.num_processes == 8 and cfg.launcher.accelerate_config == "configs/accelerate/zero2.yaml"
    check_launch("sft", cfg)
    check_launch("rm", cfg)
    with pytest.raises(UserError, match="ddp.yaml"):
        check_launch("ppo", cfg)
    check_launch("ppo", load_config(path, ["launcher.accelerate_config=configs/accelerate/ddp.yaml"]))
    assert "launcher.accelerate_config=configs/accelerate/ddp.yaml" in path.read_text()  # the documented command
