"""One writer per run folder: every `rlhf` command that writes into a run folder holds its lock.

Two `rlhf run-all` on one folder would both train into the same checkpoints and manifests. So the
commands that write (the stages, run-all, eval, report) take `<run folder>/.lock` for their
whole run: an exclusive `flock` on the file, which also names the holder (pid, host, start time,
command) for the error a second writer gets, and for `rlhf status`. The kernel drops a flock when
its process dies, however it dies, so a lock left by a SIGKILLed command is never in the way: the
next writer takes it over and says so ("stale"). Where the file system refuses flock, the file's
holder is checked instead: a pid that is not alive on this host is a stale holder and is taken over.

The processes a holder starts (run-all starts each stage as `rlhf <stage>`, which starts the
launcher of a multi-process stage) inherit the lock: RLHF_RUN_LOCK tells them not to take it
again, and they are given the locked file descriptor (`pass_fds=held_fds()`), so that the lock
stays held while any of them runs, even when the command that took it was killed alone. Read-only
commands (`status`, `validate`, `score`, `generate`) never take it and never wait for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from rlhf.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
INHERITED = "RLHF_RUN_LOCK"  # "<lock file>:<holder pid>:<fd>", set for the processes the holder starts
NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # file systems without flock support


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_FILE


def read_holder(run_dir: Path) -> Holder | None:
    """Who the lock file names, or None (no file, empty: released, or unreadable)."""
    try:
        raw = json.loads(lock_path(run_dir).read_text(encoding="utf-8") or "null")
        return Holder(int(raw["pid"]), str(raw["host"]), str(raw["started"]), str(raw["command"])) if raw else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def holder_alive(holder: Holder) -> bool:
    """Whether the named holder may still be running: alive on this host, or on another host (which
    cannot be checked from here)."""
    return holder.host != socket.gethostname() or pid_alive(holder.pid)


def running_holder(run_dir: Path) -> Holder | None:
    """The command writing into `run_dir` now, or None; reads the file only (never locks, never waits)."""
    holder = read_holder(run_dir)
    return holder if holder is not None and holder_alive(holder) else None


def _inherited_value() -> tuple[str, str, int | None]:
    """(lock file, holder pid, fd) from RLHF_RUN_LOCK; ('', '', None) when unset or malformed."""
    parts = os.environ.get(INHERITED, "").rsplit(":", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return "", "", None
    return parts[0], parts[1], int(parts[2])


def _inherited(path: Path) -> bool:
    """True in a process started by the lock's holder: RLHF_RUN_LOCK names this lock file and the
    holder that the file names."""
    where, pid, _ = _inherited_value()
    holder = read_holder(path.parent)
    return bool(where) and where == str(path.resolve()) and holder is not None and str(holder.pid) == pid


def held_fds() -> tuple[int, ...]:
    """The locked file descriptor this process holds or inherited, for `pass_fds` of the processes it
    starts (empty when it holds no lock)."""
    _, _, fd = _inherited_value()
    if fd is None:
        return ()
    try:
        os.fstat(fd)
    except OSError:
        return ()
    return (fd,)


def _in_use(run_dir: Path, holder: Holder | None) -> UserError:
    if holder is None:
        who = "another rlhf command (its details are being written)"
    elif holder_alive(holder):
        who = f"another rlhf command ({holder.describe()})"
    else:
        who = f"processes that {holder.describe()} started (that command itself is no longer running)"
    return UserError(f"{run_dir} is in use by {who}; wait for it to finish (or stop it) and rerun: "
                     "one command writes into a run folder at a time")


def _open_locked(run_dir: Path) -> int:
    """Create (if need be) and lock the lock file; returns its descriptor, or raises UserError naming
    the holder. A releasing holder may remove a lock file (and run folder) it created, so the file
    locked must still be the one at the path; if not, it starts again with the new one."""
    path = lock_path(run_dir)
    for _ in range(100):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:
            continue  # the folder was removed between the two calls by a releasing holder
        except OSError as e:
            raise UserError(f"output_dir: cannot write to {run_dir} ({e.strerror}); choose a writable output_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(run_dir, read_holder(run_dir)) from None
        except OSError as e:
            if e.errno not in NO_FLOCK:
                os.close(fd)
                raise
            holder = read_holder(run_dir)
            if holder is not None and holder.pid != os.getpid() and holder_alive(holder):
                os.close(fd)
                raise _in_use(run_dir, holder) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file its holder unlinked on release
    raise UserError(f"{run_dir}: could not take the run folder's lock {path}; rerun")


def _remove_if_unused(run_dir: Path, created: list[Path]) -> None:
    """On release, with the lock still held: if this lock created the run folder and nothing but the
    lock file was written into it (e.g. the command stopped on a data mistake), remove them again,
    so a command that did nothing leaves nothing behind."""
    if run_dir not in created or [p.name for p in run_dir.iterdir()] != [LOCK_FILE]:
        return
    lock_path(run_dir).unlink(missing_ok=True)
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block, or raise UserError (exit 2) naming the holder at once."""
    run_dir = Path(run_dir)
    path = lock_path(run_dir)
    if _inherited(path):
        yield
        return
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # folders this lock makes
    fd = _open_locked(run_dir)
    try:
        previous = read_holder(run_dir)
        if previous is not None and previous.pid != os.getpid():
            log.warning("taking over the stale lock of %s (%s): that process is no longer running", path,
                        previous.describe())
        me = Holder(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"), command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
        os.fsync(fd)
        before = os.environ.get(INHERITED)
        os.environ[INHERITED] = f"{path.resolve()}:{me.pid}:{fd}"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(INHERITED, None)
            else:
                os.environ[INHERITED] = before
            os.ftruncate(fd, 0)  # released: nobody holds it (a SIGKILL skips this; the flock goes anyway)
            _remove_if_unused(run_dir, created)
    finally:
        os.close(fd)  # closing drops the flock
