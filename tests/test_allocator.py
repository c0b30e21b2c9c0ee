"""rlhf.allocator: the `rlhf` command and the stage scripts start themselves again, once, with
glibc's tcache off, keeping the user's own tunables, and leave alone an environment that opts out
or has chosen a tcache count."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import rlhf.__main__ as rlhf_command
from rlhf import allocator, cli, stage_script
from rlhf.allocator import KEEP, TCACHE_OFF, glibc_version, tuned_environment


def test_tcache_goes_off_and_the_users_own_tunables_stay():
    assert tuned_environment({"PATH": "/bin"}, "2.36") == {"PATH": "/bin", "GLIBC_TUNABLES": TCACHE_OFF}
    mine = "glibc.malloc.arena_max=2"
    assert tuned_environment({"GLIBC_TUNABLES": mine}, "2.39")["GLIBC_TUNABLES"] == f"{mine}:{TCACHE_OFF}"


@pytest.mark.parametrize("env, glibc", [
    ({"PATH": "/bin"}, None),                                           # musl, macOS, Windows
    ({KEEP: "1"}, "2.36"),                                              # the user opts out
    ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}, "2.36"),        # the user chose a count
    ({"GLIBC_TUNABLES": TCACHE_OFF}, "2.36"),                           # already restarted
])
def test_nothing_changes_where_it_should_not(env, glibc):
    assert tuned_environment(env, glibc) is None


def test_rlhf_keep_malloc_0_does_not_opt_out():
    assert tuned_environment({KEEP: "0"}, "2.36")["GLIBC_TUNABLES"] == TCACHE_OFF


@pytest.mark.skipif(glibc_version() is None, reason="glibc only")
def test_the_process_restarts_once_in_place_with_the_setting():
    """A real restart: same pid, the code after the call runs once, under the new environment."""
    code = ("import os; from rlhf.allocator import restart_with_tuned_allocator; "
            "restart_with_tuned_allocator(); print(os.getpid(), os.environ['GLIBC_TUNABLES'])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", KEEP)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert out.split() == [str(proc.pid), TCACHE_OFF]


class Restarted(Exception):
    pass


@pytest.fixture
def execve(monkeypatch):
    """os.execve replaced by a recorder that stops the caller, as the real one would."""
    calls = []

    def record(path, argv, env):
        calls.append((path, list(argv), env))
        raise Restarted

    monkeypatch.setattr(allocator.os, "execve", record)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(KEEP, raising=False)
    monkeypatch.setattr(allocator, "glibc_version", lambda: "2.36")
    return calls


@pytest.mark.parametrize("entry", ["rlhf", "python -m rlhf.cli", "stage script"])
def test_the_entry_points_restart_before_doing_anything(execve, monkeypatch, entry):
    ran = []
    monkeypatch.setattr(cli, "app", lambda: ran.append("app"))
    with pytest.raises(Restarted):
        if entry == "rlhf":
            rlhf_command.main()
        elif entry == "python -m rlhf.cli":
            cli.main()
        else:
            stage_script.stage_script(lambda cfg: ran.append("stage"), "a stage")
    assert ran == []
    [(path, argv, env)] = execve
    assert path == sys.executable and argv == sys.orig_argv and env["GLIBC_TUNABLES"] == TCACHE_OFF


def test_an_opted_out_command_runs_without_restarting(execve, monkeypatch):
    monkeypatch.setenv(KEEP, "1")
    ran = []
    monkeypatch.setattr(cli, "app", lambda: ran.append("app"))
    rlhf_command.main()
    assert ran == ["app"] and execve == []
