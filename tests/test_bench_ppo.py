"""The PPO benchmarks on the tiny model. bench/ppo_profile.py: every phase of the roofline table comes
out, with its work counted, in both precisions; the oneDNN-packed decoding row only where it applies
(bfloat16 with oneDNN). bench/ppo_vs_trl.py (our side; the TRL 1.12 side needs its own venv): the
step's time split into phases that add up to it. They check that the benchmarks run and report,
not how fast (no timings are compared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rlhf.config import ModelConfig
from rlhf.models import resolve_model
from tests.conftest import REPO

PHASES = ["generation", "decoding's matmuls alone (3 steps of batch 2)", "rollout: policy log-probs",
          "rollout: reference log-probs", "rollout: value", "rollout: reward", "update: policy (fwd + bwd)",
          "update: value (fwd + bwd)", "optimizer step"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ppo_profile_reports_every_phase(dtype):
    model_dir = resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ppo_profile.py"), "--model-dir", str(model_dir), "--batch", "2",
         "--response-length", "4", "--repeats", "1", "--dtype", dtype],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["dtype"] == f"torch.{dtype}" and report["peak_matmul_gflop_per_s"] > 0
    assert report["bandwidth_gb_per_s"] > 0
    expected = list(PHASES)
    if dtype == "bfloat16" and torch.backends.mkldnn.is_available():
        expected.insert(2, "decoding's matmuls alone (3 steps of batch 2, oneDNN-packed weights)")
    rows = {row["phase"]: row for row in report["rows"]}
    assert list(rows) == expected
    for name, row in rows.items():
        assert row["s"] >= 0 and row["pct_peak_matmul"] >= 0
        assert (row["flops"] > 0) == (name != "optimizer step"), row
        assert ("pct_bandwidth_bound" in row) == name.startswith(("generation", "decoding")), row
    decoding = [row for name, row in rows.items() if name.startswith("decoding")]
    assert all(row["bytes"] == decoding[0]["bytes"] for row in decoding)  # the same weights, packed or not
    assert rows["generation"]["bytes"] > decoding[0]["bytes"]  # the weights and the KV cache
    assert "| update: policy (fwd + bwd) |" in proc.stderr  # the printed table


def test_ppo_vs_trl_splits_our_step_into_phases_that_add_up():
    model_dir = resolve_model(ModelConfig(name_or_path="embedded:tiny-random-llama"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "ppo_vs_trl.py"), "--model-dir", str(model_dir), "--batch", "2",
         "--response-length", "4", "--ppo-epochs", "2", "--steps", "2", "--dtype", "float32", "--skip-baseline"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads(proc.stdout.splitlines()[-1])
    phases = ours["phases_s_per_step"]
    assert list(phases) == ["generation", "rollout scoring", "update forward", "backward", "optimizer step", "rest"]
    assert all(phases[k] > 0 for k in ("generation", "rollout scoring", "update forward", "backward")), phases
    assert phases["rest"] >= 0  # nothing counted twice: the timed phases fit inside the loop's time
    assert abs(sum(phases.values()) - ours["s_per_step"]) < 0.01, (phases, ours["s_per_step"])
