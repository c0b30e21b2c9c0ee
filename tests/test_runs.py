"""The stage lifecycle (rlhf.runs.stage_run) and the up-to-date check (rlhf.staleness): a stage's
manifest goes running -> done or failed around its work; the up-to-date check reads each data file once."""

from __future__ import annotations

import os
import time

import pytest

import rlhf.staleness as staleness
from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.runs import stage_run
from rlhf.staleness import file_fingerprint, read_manifest, stage_state
from tests.conftest import write_config


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


def test_up_to_date_check_reads_each_data_file_once(tiny_eval_run, monkeypatch):
    """Every stage hash includes its upstream stages' data: the digests are kept per process, so a
    large data set costs one read per command, not one per hash that includes it."""
    from rlhf.staleness import eval_state

    reads = []
    real = staleness._sha256_files
    monkeypatch.setattr(staleness, "_DIGESTS", {})
    monkeypatch.setattr(staleness, "_sha256_files", lambda files, names: reads.extend(files) or real(files, names))
    cfg = load_config(tiny_eval_run)
    assert all(stage_state(cfg, s).status == "done" for s in ("sft", "rm", "ppo")) and eval_state(cfg)[0]
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
