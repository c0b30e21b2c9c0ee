"""`accelerate launch` for the stage scripts, ending in one line and the workers' own exit status.

rlhf.launch starts `python -m rlhf.accelerate_launch ARGS` instead of `accelerate launch ARGS`.
accelerate (through torchrun) stops every worker when one fails, then raises ChildFailedError: a
traceback and exit status 1, whatever the workers' status was, so a diverged run (3) or a user
mistake (2) on several processes would reach `run-all` as a crash. Here that error becomes one
`error:` line naming the process that failed and how, and the exit status is the workers' own
(outcome() decides which, from the exit status of every failed worker).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass

OWN_STATUSES = {2: "a user mistake", 3: "the training diverged"}  # what rlhf's processes exit with on purpose


@dataclass(frozen=True)
class WorkerExit:
    rank: int
    exitcode: int  # negative: killed by that signal
    pid: int | None = None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def outcome(exits: list[WorkerExit], world: int) -> tuple[int, str]:
    """(exit status, one line) of a launch whose failed workers are `exits`, first-observed first.

    In order: a worker that stopped on purpose (2 or 3, after printing its `error:` line) gives its
    status; else one killed by a signal other than SIGTERM (SIGTERM is how the launcher stops the
    others) is named, status 1; else the first crash's status (its traceback is above); else the
    SIGTERM, status 1."""
    own = [e for e in exits if e.exitcode in OWN_STATUSES]
    if own:
        status = own[0].exitcode
        ranks = sorted(e.rank for e in own if e.exitcode == status)
        who = (f"all {world} processes" if len(ranks) == world and world > 1
               else f"process{'es' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {world}")
        rest = "" if len(ranks) == world else "; the other processes were stopped"
        return status, f"{who} stopped with exit status {status} ({OWN_STATUSES[status]}, see the error above){rest}"
    killed = [e for e in exits if e.exitcode < 0 and -e.exitcode != signal.SIGTERM]
    crashed = [e for e in exits if e.exitcode > 0]
    if killed or not crashed:
        e = (killed or exits)[0]
        pid = f", pid {e.pid}" if e.pid else ""
        return 1, (f"process {e.rank} of {world} was killed by {_signal_name(-e.exitcode)}{pid}; the other processes "
                   "were stopped. Rerun to resume from the last checkpoint")
    e = crashed[0]
    return e.exitcode, (f"process {e.rank} of {world} failed with exit status {e.exitcode} (its traceback is above); "
                        "the other processes were stopped")


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    world = args.num_processes or 1
    try:
        launch_command(args)
    except ChildFailedError as e:
        failures = sorted(e.failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        status, line = outcome([WorkerExit(rank, f.exitcode, f.pid) for rank, f in failures], world)
    except subprocess.CalledProcessError as e:  # accelerate's one-process launcher
        status, line = outcome([WorkerExit(0, e.returncode)], 1)
    else:
        return
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    raise SystemExit(status)


if __name__ == "__main__":
    main()
