"""bench/rl_vs_trl.py on the tiny model: TRL 1.16's GRPOTrainer and our grpo train on the same finished
SFT and RM stages and the ratios come out; our rloo runs too. One step, two prompts, two completions
each: it checks that the benchmark runs, not how fast (no timings are compared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def bench(config, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "rl_vs_trl.py"), "--config", str(config), "--steps", "1", "--prompts", "2",
         "--k", "2", "--response-length", "4", "--dtype", "float32", *args],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_rl_vs_trl_runs_both_sides_of_grpo_and_our_rloo(tiny_rm_run):
    proc, lines = bench(tiny_rm_run, "--algorithms", "grpo")
    assert len(lines) == 3 and proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    ours, trl, ratios = lines
    assert trl["impl"] == "trl-1.16-GRPOTrainer" and "error" not in trl, trl
    assert ours["impl"] == "rlhf" and "error" not in ours, ours
    for side in (ours, trl):
        assert side["completions"] == 4 and side["completions_per_s"] > 0 and side["peak_rss_gb"] > 0
    assert ratios["algorithm"] == "grpo" and {"completions_per_s_ratio", "peak_rss_ratio"} <= set(ratios), ratios
    proc, lines = bench(tiny_rm_run, "--algorithms", "rloo", "--skip-trl")
    assert proc.returncode == 0 and lines[0]["impl"] == "rlhf" and lines[0]["algorithm"] == "rloo", proc.stderr[-3000:]
    assert lines[0]["completions"] == 4 and "error" not in lines[0]
