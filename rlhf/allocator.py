"""The C allocator setting that the `rlhf` command and the stage scripts run under: glibc's
per-thread cache of freed small blocks (tcache) off, on Linux with glibc.

Why. PyTorch takes every CPU tensor from `posix_memalign(64, n)`. glibc serves that by carving a
block a little larger than n out of a free chunk and freeing the few bytes before the 64-byte
boundary as a tiny chunk of their own. Freed tiny chunks go to the tcache, which never merges
a chunk with its neighbours, so these slivers sit between the activations a training step frees
and keep the holes apart; and a hole exactly the size of the tensor that left it cannot take the
next tensor of that size, which asks for n plus the alignment's slack (glibc before 2.38 never
looks for an already aligned spot). Through a PPO step the heap therefore grows far past what is
in use: on SmolLM2 in float32, 0.86-1.0 GB in use in a heap of 2.2-2.4 GB. With the tcache off
the slivers go to glibc's fast bins, which it merges into their neighbours before every large
request, and the holes are reused: peak RSS of our side of the PPO benchmark 2.37-2.48 GB
instead of 2.74-2.96 in float32 and 1.57-1.61 instead of 1.71-1.77 in bfloat16, at the same
speed (bench/README.md).

glibc reads the setting (`GLIBC_TUNABLES`) only when a process starts, so the command starts
itself again, once, with it added, before it imports anything heavy; the processes it launches
inherit it. `RLHF_KEEP_MALLOC=1`, or a `GLIBC_TUNABLES` that already sets the tcache count, leaves
the environment as it is.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

TCACHE_OFF = "glibc.malloc.tcache_count=0"
KEEP = "RLHF_KEEP_MALLOC"  # set to 1: run under the C allocator's settings as they are


def glibc_version() -> str | None:
    """This process's glibc version ("2.36"), or None where the C library is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):  # not POSIX, musl, or no such confstr name
        return None
    return version if name == "glibc" else None


def tuned_environment(env: Mapping[str, str], glibc: str | None) -> dict[str, str] | None:
    """`env` with the tcache turned off in GLIBC_TUNABLES (the user's other tunables kept), or None
    where nothing should change: not glibc, RLHF_KEEP_MALLOC=1, or a tcache count already chosen."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if glibc is None or env.get(KEEP, "") not in ("", "0") or "glibc.malloc.tcache_count" in tunables:
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{TCACHE_OFF}" if tunables else TCACHE_OFF}


def restart_with_tuned_allocator() -> None:
    """Replace this process (same pid, same arguments, same interpreter flags) with one that runs
    under tuned_environment; return without doing anything where it needs no change or the
    restart cannot be made. Call it first thing in a command's entry point."""
    env = tuned_environment(os.environ, glibc_version())
    if env is None:
        return
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # no usable interpreter path (an embedded Python): run as we are
        return
