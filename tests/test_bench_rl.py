"""bench/rl_vs_trl.py on the tiny model: TRL 1.16's GRPOTrainer side trains on our finished SFT and
RM stages, and our side either gives the ratios or says plainly that the loop lacks the algorithm
(never an obscure crash). One step, two prompts, two completions each: it checks that the
benchmark runs, not how fast (no timings are compared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_rl_vs_trl_runs_trl_grpo_and_reports_our_side(tiny_rm_run):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "rl_vs_trl.py"), "--config", str(tiny_rm_run), "--algorithms", "grpo",
         "--steps", "1", "--prompts", "2", "--k", "2", "--response-length", "4", "--dtype", "float32"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 3, proc.stdout + proc.stderr[-3000:]
    ours, trl, ratios = lines
    assert trl["impl"] == "trl-1.16-GRPOTrainer" and "error" not in trl, trl
    assert trl["completions"] == 4 and trl["completions_per_s"] > 0 and trl["peak_rss_gb"] > 0
    assert ratios["algorithm"] == "grpo"
    if "error" in ours:  # until the loop implements GRPO: a clear refusal, and exit status 1
        assert ours["error"].startswith("not implemented: ") and "ppo.algorithm='grpo'" in ours["error"], ours
        assert ratios["ours_error"] == ours["error"] and proc.returncode == 1
    else:
        assert {"completions_per_s_ratio", "peak_rss_ratio"} <= set(ratios) and proc.returncode == 0, ratios
