"""Interruptions: a sample of the kill harness (one SIGKILL per stage, aimed at a Trainer checkpoint
write, the RM's final export and PPO training), and the torn-checkpoint rules it relies on, tested
directly: a half-written checkpoint is detected, skipped with a warning, and the previous one used.
The full harness (20+ kills per stage) is `python tests/kill_harness.py --kills 20`."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import zipfile
from pathlib import Path

import pytest

from rlhf.config import load_config
from rlhf.atomic import file_problem
from tests.conftest import write_config
from tests.kill_harness import PPO_TOL, run_harness


def test_kill_harness_sample(tiny_ppo_run, tmp_path):
    """One kill per stage; the reference is the session's uninterrupted tiny run (made on one thread,
    like the harness's processes, so equal outputs are bit-equal)."""
    lines: list[str] = []
    reports = run_harness(1, workdir=tmp_path, phase_offset=1, reference=load_config(tiny_ppo_run).run_dir,
                          echo=lines.append)
    assert [r.kills for r in reports.values()] == [1, 1, 1], lines
    assert reports["sft"].aimed == {"checkpoint": 1} and reports["rm"].aimed == {"export": 1}
    assert reports["ppo"].aimed == {"train": 1}
    assert reports["ppo"].max_adapter_diff <= PPO_TOL and reports["ppo"].max_model_diff <= PPO_TOL
    for r in reports.values():
        assert r.max_adapter_diff <= 1e-6 and r.max_model_diff <= 1e-6, r.line()


# ---------------------------------------------------------------------------- file checks


def test_file_problem_reads_structure_only(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "a.safetensors"))
    torch.save({"x": torch.ones(256)}, tmp_path / "o.pt")
    (tmp_path / "s.json").write_text('{"step": 4}')
    assert [file_problem(tmp_path / n) for n in ("a.safetensors", "o.pt", "s.json")] == [None, None, None]

    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(data[: len(data) - 100])
    assert file_problem(tmp_path / "a.safetensors") == "a.safetensors is truncated"
    (tmp_path / "a.safetensors").write_bytes(data[:5])
    assert file_problem(tmp_path / "a.safetensors") == "a.safetensors is truncated"
    pt = (tmp_path / "o.pt").read_bytes()
    (tmp_path / "o.pt").write_bytes(pt[: len(pt) // 2])
    assert "o.pt is unreadable (BadZipFile)" == file_problem(tmp_path / "o.pt")
    (tmp_path / "s.json").write_text('{"step": ')
    assert file_problem(tmp_path / "s.json") == "s.json is unreadable (JSONDecodeError)"
    assert file_problem(tmp_path / "nope.json") == "nope.json is missing"


def test_file_problem_catches_a_flipped_byte_in_a_torch_zip(tmp_path):
    import torch

    torch.save({"x": torch.arange(4096, dtype=torch.float32)}, tmp_path / "o.pt")
    with zipfile.ZipFile(tmp_path / "o.pt") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    raw = bytearray((tmp_path / "o.pt").read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF  # a byte of the tensor data
    (tmp_path / "o.pt").write_bytes(bytes(raw))
    assert "o.pt is damaged" in file_problem(tmp_path / "o.pt")


# ---------------------------------------------------------------------------- Trainer checkpoints (SFT, RM)


def _sft_copy(tiny_sft_run: Path, tmp_path: Path):
    """A config in tmp_path whose run folder holds a copy of the session's finished tiny SFT stage
    (checkpoint-2 and checkpoint-4 included)."""
    src = load_config(tiny_sft_run)
    cfg = load_config(write_config(tmp_path))
    shutil.copytree(src.stage_dir("sft"), cfg.stage_dir("sft"))
    return cfg


def _tear_missing_state(ckpt: Path) -> None:
    (ckpt / "trainer_state.json").unlink()  # killed before the Trainer wrote its last file


def _tear_half_state(ckpt: Path) -> None:
    text = (ckpt / "trainer_state.json").read_text()
    (ckpt / "trainer_state.json").write_text(text[: len(text) // 2])


def _tear_weights(ckpt: Path) -> None:
    f = ckpt / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])


def _tear_optimizer(ckpt: Path) -> None:
    (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:1000])


def _tear_rng(ckpt: Path) -> None:
    for f in ckpt.glob("rng_state*.pth"):
        f.unlink()


@pytest.mark.parametrize("tear", [_tear_missing_state, _tear_half_state, _tear_weights, _tear_optimizer, _tear_rng])
def test_torn_trainer_checkpoint_is_skipped_for_the_previous_one(tiny_sft_run, tmp_path, caplog, tear):
    from rlhf.hf_trainer import resume_checkpoint

    cfg = _sft_copy(tiny_sft_run, tmp_path)
    root = cfg.stage_dir("sft") / "checkpoints"
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert resume_checkpoint(cfg, "sft") == str(root / "checkpoint-4")
    tear(root / "checkpoint-4")
    with caplog.at_level(logging.WARNING, logger="rlhf.hf_trainer"):
        assert resume_checkpoint(cfg, "sft") == str(root / "checkpoint-2")
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert not (root / "checkpoint-4").exists()  # the Trainer rewrites it from scratch, not over the debris


def test_sft_resumes_past_a_torn_checkpoint_to_the_same_adapter(tiny_sft_run, tmp_path):
    """The stage itself: checkpoint-4 torn and the outputs gone; the rerun resumes from checkpoint-2
    and ends with the uninterrupted run's adapter exactly."""
    from safetensors.torch import load_file

    from rlhf.sft import run

    cfg = _sft_copy(tiny_sft_run, tmp_path)
    stage = cfg.stage_dir("sft")
    want = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
    _tear_weights(stage / "checkpoints" / "checkpoint-4")
    shutil.rmtree(stage / "adapter")
    shutil.rmtree(stage / "model")
    manifest = json.loads((stage / "manifest.json").read_text())
    (stage / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    run(cfg)
    got = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
    assert max((want[k] - got[k]).abs().max().item() for k in want) == 0.0
    assert json.loads((stage / "manifest.json").read_text())["status"] == "done"


# ---------------------------------------------------------------------------- PPO checkpoints


def _ppo_checkpoints(tiny_ppo_run: Path, tmp_path: Path) -> Path:
    src = load_config(tiny_ppo_run).stage_dir("ppo") / "checkpoints"
    dst = tmp_path / "checkpoints"
    shutil.copytree(src, dst)
    return dst


def test_ppo_temp_checkpoint_left_by_a_kill_is_skipped(tiny_ppo_run, tmp_path, caplog):
    from rlhf.ppo.checkpoint import latest_resumable
    from rlhf.staleness import stage_hash

    root = _ppo_checkpoints(tiny_ppo_run, tmp_path)
    config_hash = stage_hash(load_config(tiny_ppo_run), "ppo")
    torn = root / "step-6.tmp-abc123"  # save_atomically's temp folder: killed before the rename
    torn.mkdir()
    (torn / "trainable.safetensors").write_bytes((root / "step-4" / "trainable.safetensors").read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="rlhf.ppo.checkpoint"):
        assert latest_resumable(root, config_hash) == root / "step-4"
    assert "skipping incomplete checkpoint" in caplog.text and "step-6.tmp-abc123" in caplog.text


def test_ppo_damaged_checkpoint_falls_back_to_the_previous_one(tiny_ppo_run, tmp_path, caplog):
    from rlhf.ppo.checkpoint import latest_resumable
    from rlhf.staleness import stage_hash

    root = _ppo_checkpoints(tiny_ppo_run, tmp_path)
    config_hash = stage_hash(load_config(tiny_ppo_run), "ppo")
    assert (root / "step-2" / "optimizer.pt").is_file()  # the run itself kept it (the newest two keep theirs)
    f = root / "step-4" / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:-32])
    with caplog.at_level(logging.WARNING, logger="rlhf.ppo.checkpoint"):
        assert latest_resumable(root, config_hash) == root / "step-2"
    assert "skipping damaged checkpoint" in caplog.text and "trainable.safetensors is truncated" in caplog.text


def test_ppo_resumes_from_the_previous_checkpoint_when_a_crash_damaged_the_newest(tiny_ppo_run, tmp_path, monkeypatch,
                                                                                  caplog):
    """The state a crash leaves when the newest checkpoint's files had not all reached the disk: the
    run writes step-4 through its real save path with trainable.safetensors cut short, and dies right
    after (the rename done, older checkpoints' optimizer state handled as the code does). The rerun
    skips step-4 with a warning, resumes from step-2 and ends with the unbroken run's adapter."""
    import safetensors.torch

    import rlhf.ppo.checkpoint as C
    from tests.test_numerical import cli, copy_stages, max_diff

    config = copy_stages(tiny_ppo_run, tmp_path, ("sft", "rm"))
    cfg = load_config(config)
    real_save_file, real_save_checkpoint = safetensors.torch.save_file, C.save_checkpoint

    def cut_short(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        path = Path(filename)
        if path.name == "trainable.safetensors" and path.parent.name.startswith("step-4.tmp-"):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def then_killed(ckpt_root, step, *args, **kwargs):
        out = real_save_checkpoint(ckpt_root, step, *args, **kwargs)
        if step == 4:
            raise SystemExit(137)  # the process dies right after writing the checkpoint
        return out

    monkeypatch.setattr(safetensors.torch, "save_file", cut_short)
    monkeypatch.setattr(C, "save_checkpoint", then_killed)
    assert cli("ppo", "--config", str(config)).exit_code == 137
    monkeypatch.undo()
    root = cfg.stage_dir("ppo") / "checkpoints"
    assert file_problem(root / "step-4" / "trainable.safetensors") == "trainable.safetensors is truncated"

    with caplog.at_level(logging.INFO, logger="rlhf.ppo"):  # checkpoint's warning, trainer's resume line
        result = cli("ppo", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert f"skipping damaged checkpoint {root / 'step-4'}" in caplog.text
    assert f"resuming PPO from {root / 'step-2'} (step 2 of 4)" in caplog.text
    ref = load_config(tiny_ppo_run).stage_dir("ppo") / "adapter" / "adapter_model.safetensors"
    assert max_diff(ref, cfg.stage_dir("ppo") / "adapter" / "adapter_model.safetensors") <= 1e-6
