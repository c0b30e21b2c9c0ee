"""Shared fixtures: an isolated model cache, tiny-model configs in a temp run folder, and a
finished tiny SFT stage that the RM and PPO tests build on (trained once per session)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"

# Built models are cached per user by default; tests keep their own cache unless one is given
# (CI shares one between runs so the embedded SmolLM2 is converted once).
os.environ.setdefault("RLHF_CACHE", str(REPO / ".cache" / "rlhf"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def one_torch_thread():
    """Train on one torch thread, as the tests' own runs do (torch_threads below): results that are
    compared exactly must come from the same thread count. Session fixtures run before the
    autouse fixture of the first test that needs them, so they ask for it themselves."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def torch_threads(request):
    """One torch thread for tests on the tiny model: its matrices are too small to split, and on a
    busy 2-core machine two threads spin against each other (a 0.3 s training loop took 22 s).
    Tests marked slow (the embedded SmolLM2) keep the default."""
    import torch

    before = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_config(tmp_path: Path, overrides: dict | None = None, base: Path = TINY, name: str = "pipeline.yaml") -> Path:
    """Copy a config into tmp_path with output_dir inside tmp_path, data paths absolute, and
    `overrides` (a nested dict) merged in."""
    raw = yaml.safe_load(base.read_text())
    raw["output_dir"] = str(tmp_path / "runs")
    for stage in ("sft", "rm", "ppo"):
        data = (raw.get(stage) or {}).get("data") or {}
        for key in ("path", "eval_path"):
            if data.get(key) and not Path(data[key]).is_absolute():
                data[key] = str(REPO / data[key])

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(raw, overrides or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory) -> Path:
    """A config file whose run folder already holds a finished tiny SFT stage."""
    from rlhf.config import load_config
    from rlhf.sft import run

    tmp = tmp_path_factory.mktemp("tiny-run")
    path = write_config(tmp)
    with one_torch_thread():
        run(load_config(path))
    return path


@pytest.fixture(scope="session")
def tiny_rm_run(tiny_sft_run) -> Path:
    """The tiny_sft_run config whose run folder also holds a finished tiny RM stage
    (rm/adapter with score_head.safetensors, rm/model, rm/eval.json, rm/manifest.json)."""
    from rlhf.config import load_config
    from rlhf.rm import run

    with one_torch_thread():
        run(load_config(tiny_sft_run))
    return tiny_sft_run


@pytest.fixture(scope="session")
def tiny_ppo_run(tiny_rm_run, tmp_path_factory) -> Path:
    """A config file whose own run folder holds finished tiny SFT, RM and PPO stages: a copy of
    tiny_rm_run's folder (output_dir is not part of the stage hashes, so the copies stay done)
    plus a PPO run, so tests that rerun PPO in tiny_rm_run's folder do not disturb it.
    Read it only; tests that change it should copy it first."""
    import shutil

    from rlhf.config import load_config
    from rlhf.ppo import run

    tmp = tmp_path_factory.mktemp("tiny-full-run")
    path = write_config(tmp)
    cfg = load_config(path)
    src = load_config(tiny_rm_run)
    for stage in ("sft", "rm"):
        shutil.copytree(src.stage_dir(stage), cfg.stage_dir(stage), ignore=shutil.ignore_patterns("checkpoints"))
    with one_torch_thread():
        run(cfg)
    return path


@pytest.fixture(scope="session")
def tiny_eval_run(tiny_ppo_run, tmp_path_factory) -> Path:
    """A copy of tiny_ppo_run's folder with a finished `rlhf eval` (eval/eval.json, samples.jsonl,
    rm_calibration.png, overoptimisation.png; 8 prompts, 4 per checkpoint). Read it only."""
    import shutil

    from rlhf.config import load_config
    from rlhf.evaluate import run

    tmp = tmp_path_factory.mktemp("tiny-eval-run")
    path = write_config(tmp, {"eval": {"max_prompts": 8, "overopt_prompts": 4, "batch_size": 4}})
    cfg = load_config(path)
    shutil.copytree(load_config(tiny_ppo_run).run_dir, cfg.run_dir)
    with one_torch_thread():
        run(cfg)
    return path
