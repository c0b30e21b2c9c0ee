"""The stage lifecycle (rlhf.runs.stage_run) and the up-to-date check (rlhf.staleness): a stage's
manifest goes running -> done or failed around its work; `run-all` on a finished run decides from
manifests and hashes alone, loading no ML library and reading each data file once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

import rlhf.staleness as staleness
from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.runs import stage_run
from rlhf.staleness import file_fingerprint, read_manifest, stage_state
from tests.conftest import REPO, write_config

HEAVY = ("torch", "transformers", "trl", "datasets", "accelerate")


def test_stage_run_marks_the_manifest_failed_on_an_error_and_done_on_finish(tmp_path):
    cfg = load_config(write_config(tmp_path))
    stage = stage_run(cfg, "sft")
    assert not stage.dir.exists()  # the checks write nothing
    with pytest.raises(RuntimeError, match="boom"):
        with stage:
            assert read_manifest(stage.dir)["status"] == "running"
            raise RuntimeError("boom")
    manifest = read_manifest(stage.dir)
    assert (manifest["status"], manifest["error"]) == ("failed", "RuntimeError: boom")
    assert stage_state(cfg, "sft").status == "failed"

    with stage_run(cfg, "sft") as stage:
        stage.finish({"loss": 1.0}, {"model": str(stage.dir / "model")})
    manifest = read_manifest(stage.dir)
    assert (manifest["status"], manifest["metrics"]) == ("done", {"loss": 1.0})
    assert stage_state(cfg, "sft").status == "done"


def test_stage_run_checks_the_section_and_the_upstream_stages_first(tmp_path):
    cfg = load_config(write_config(tmp_path))
    with pytest.raises(UserError, match="the rm stage needs a finished sft stage .* \\(missing: never run\\)"):
        stage_run(cfg, "rm")
    with pytest.raises(UserError, match="rlhf eval needs a finished, current sft stage"):
        stage_run(cfg, "eval")
    no_rm = load_config(write_config(tmp_path, name="no-rm.yaml"), ["rm=null", "ppo=null"])
    with pytest.raises(UserError, match="no 'rm' section; add one to run the reward-model stage"):
        stage_run(no_rm, "rm")
    with pytest.raises(UserError, match="rlhf eval needs an rm section"):
        stage_run(no_rm, "eval")
    assert not cfg.run_dir.exists()


def test_no_op_run_all_loads_no_ml_library(tiny_eval_run, tmp_path, monkeypatch):
    """Everything up to date: run-all says so from the manifests and hashes, without importing
    torch, transformers, trl, datasets or accelerate (seconds of imports) or validating data that
    nothing will read."""
    config = write_config(tmp_path, {"eval": {"max_prompts": 8, "overopt_prompts": 4, "batch_size": 4}})
    shutil.copytree(load_config(tiny_eval_run).run_dir, load_config(config).run_dir)
    code = ("import sys\nfrom rlhf.cli import app\ntry:\n    app(['run-all', '--config', sys.argv[1]])\n"
            "except SystemExit as e:\n    status = e.code\n"
            f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(status)\n")
    result = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for stage in ("sft", "rm", "ppo", "eval"):
        assert f"{stage}: up to date, skipped" in result.stdout
    assert "imported: []" in result.stdout
    assert "columns and types OK" not in result.stdout

    # With a stage to run, `validate`'s checks come first as before.
    import rlhf.pipeline
    from typer.testing import CliRunner

    from rlhf.cli import app

    started = []
    monkeypatch.setattr(rlhf.pipeline, "_run_command", lambda command, *a, **k: started.append(command) or 0)
    result = CliRunner().invoke(app, ["run-all", "--from", "ppo", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert result.stdout.index("200 training rows, columns and types OK") < result.stdout.index("ppo: running")
    assert started == ["ppo", "eval"]


def test_up_to_date_check_reads_each_data_file_once(tiny_eval_run, monkeypatch):
    """Every stage hash includes its upstream stages' data: the digests are kept per process, so a
    large data set costs one read per command, not one per hash that includes it."""
    from rlhf.pipeline import nothing_to_run

    reads = []
    real = staleness._sha256_files
    monkeypatch.setattr(staleness, "_DIGESTS", {})
    monkeypatch.setattr(staleness, "_sha256_files", lambda files, names: reads.extend(files) or real(files, names))
    cfg = load_config(tiny_eval_run)
    assert nothing_to_run(cfg)
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 6  # train and held-out files of three stages


def test_a_changed_data_file_gets_a_new_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(staleness, "_DIGESTS", {})
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(data, ns=(hour_ago, hour_ago))
    first = file_fingerprint(str(data))
    assert file_fingerprint(str(data)) == first
    data.write_text('{"text": "b"}\n')  # same size, new mtime
    assert file_fingerprint(str(data)) != first
    # Modified just now: not kept, so a change within the same mtime tick is still seen.
    st = data.stat()
    second = file_fingerprint(str(data))
    data.write_text('{"text": "c"}\n')
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_fingerprint(str(data)) not in (first, second)
