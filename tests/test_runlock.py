"""One writer per run folder (rlhf.runlock): a second writing command stops at once with one line
naming the holder, `status` shows "running (pid N)" and `validate` runs without waiting, and a lock
left by a SIGKILLed command is taken over as stale."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf.cli import app
from rlhf.config import load_config
from tests.conftest import REPO, write_config


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll until `condition()`; fails if `proc` ends first (no timing is asserted)."""
    for _ in range(6000):
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def _manifest_status(cfg, stage: str) -> str | None:
    try:
        return json.loads((cfg.stage_dir(stage) / "manifest.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def _status_line(config: Path, stage: str) -> str:
    result = cli("status", "--config", str(config))
    assert result.exit_code == 0, result.output
    return next(line for line in result.stdout.splitlines() if line.count("│") > 2 and line.split("│")[1].strip() == stage)


def test_second_writer_stops_at_once_and_a_killed_holder_is_taken_over(tmp_path, caplog):
    config = write_config(tmp_path, {"eval": {"enabled": False}})
    cfg = load_config(config)
    first = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "run-all", "--config", str(config), "--only", "sft"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for(lambda: _manifest_status(cfg, "sft") == "running", "the sft stage started", first)
        os.killpg(first.pid, signal.SIGSTOP)  # hold it there: the lock stays held, nothing moves on

        assert f"running (pid {first.pid})" in _status_line(config, "sft")
        for command in (["run-all"], ["sft"], ["rm"], ["ppo", "--fresh"], ["eval"], ["report"]):
            result = cli(*command, "--config", str(config))
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert result.exit_code == 2 and len(errors) == 1, (command, result.output)
            assert errors[0].startswith(f"error: {cfg.run_dir} is in use by another rlhf command (pid {first.pid} on "
                                        f"{socket.gethostname()}, started "), errors
            assert errors[0].endswith("rlhf run-all); wait for it to finish (or stop it) and rerun: one command writes "
                                      "into a run folder at a time")
        assert cli("validate", "--config", str(config)).exit_code == 0  # read-only: never waits
        assert _manifest_status(cfg, "sft") == "running"  # nobody else wrote into the stage

        os.killpg(first.pid, signal.SIGKILL)  # the holder and its stage process, as a kill -9 of the group
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert "interrupted" in _status_line(config, "sft")
    with caplog.at_level(logging.WARNING, logger="rlhf.runlock"):
        result = cli("run-all", "--config", str(config), "--only", "sft")
    assert result.exit_code == 0, result.output
    assert f"taking over the stale lock of {cfg.run_dir / '.lock'} (pid {first.pid} on " in caplog.text
    assert _manifest_status(cfg, "sft") == "done" and "done" in _status_line(config, "sft")
    assert (cfg.run_dir / ".lock").read_text() == ""  # released


HOLD = """
import sys, time
from rlhf.runlock import run_lock
with run_lock(sys.argv[1], "holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_without_flock_a_live_holder_blocks_and_a_dead_one_is_stale(tmp_path, monkeypatch, caplog):
    """On a file system that refuses flock, the holder named in the file decides: alive on this host
    blocks, not alive (SIGKILLed) is stale and taken over."""
    import fcntl

    from rlhf.errors import UserError
    from rlhf.runlock import read_holder, run_lock

    run_dir = tmp_path / "runs" / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        def no_flock(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", no_flock)
        with pytest.raises(UserError, match=rf"in use by another rlhf command \(pid {holder.pid} on .*: holder\)"):
            with run_lock(run_dir, "second"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert read_holder(run_dir).pid == holder.pid  # a SIGKILL leaves the file naming the dead holder
    with caplog.at_level(logging.WARNING, logger="rlhf.runlock"), run_lock(run_dir, "second"):
        assert read_holder(run_dir).command == "second" and read_holder(run_dir).pid == os.getpid()
    assert f"taking over the stale lock of {run_dir / '.lock'} (pid {holder.pid} on" in caplog.text
    assert read_holder(run_dir) is None


def test_processes_the_holder_starts_inherit_the_lock(tmp_path):
    """A child of the holder (run-all's `rlhf <stage>`) neither blocks on the lock nor takes it, and it
    keeps it held while it runs: the holder's descriptor is passed down."""
    from rlhf.runlock import held_fds, run_lock

    run_dir = tmp_path / "runs" / "r"
    child = ("import sys; from rlhf.runlock import run_lock, held_fds\n"
             "with run_lock(sys.argv[1], 'child'):\n"
             "    print(len(held_fds()))\n")
    with run_lock(run_dir, "parent"):
        out = subprocess.run([sys.executable, "-c", child, str(run_dir)], cwd=REPO, capture_output=True, text=True,
                             pass_fds=held_fds())
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1"
    assert held_fds() == ()
    assert not (tmp_path / "runs").exists()  # the lock made the folders and nothing else was written: removed


def test_a_stage_that_stops_on_a_data_mistake_leaves_no_run_folder(tmp_path):
    config = write_config(tmp_path, {"sft": {"data": {"path": str(tmp_path / "missing.jsonl")}}})
    assert cli("sft", "--config", str(config)).exit_code == 2
    assert not (tmp_path / "runs").exists()
