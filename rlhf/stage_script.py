"""The body of the scripts in stages/: parse --config and --set, then run one stage.

`accelerate launch stages/<stage>.py --config F` starts one of these per process; a user
mistake prints one line and exits 2, as the `rlhf` command does."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from typing import Callable, NoReturn

from rlhf.allocator import restart_with_tuned_allocator
from rlhf.cli import friendly_errors, setup_logging
from rlhf.config import PipelineConfig, load_config
from rlhf.errors import UserError

# What gloo's error says when another process of the group is gone (killed, or stopped on its own error).
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


class PeerGone(UserError):
    """Another process of this stage stopped, so this one cannot go on: one line, exit status 1 (the
    launcher names the process that stopped first and why)."""

    exit_code = 1


def peer_gone(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(text in str(error) for text in PEER_GONE)


def init_processes():
    """Join the process group before any stage code asks who is the main process.

    accelerate's PartialState only builds a CPU (gloo) group when told `cpu=True`; left to itself
    on a machine without CUDA it would make every launched process a lone rank 0, and they would
    all write the same files. `rlhf.launch` sets ACCELERATE_USE_CPU there; a hand-run
    `accelerate launch --multi_gpu` on such a machine is caught by the same CUDA check."""
    import torch
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"  # AcceleratorState (inside the HF Trainer) reads it too
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def stage_script(run: Callable[[PipelineConfig], object], description: str) -> None:
    restart_with_tuned_allocator()  # a no-op when `rlhf` launched us: its setting is inherited

    @friendly_errors
    def main() -> None:
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--config", required=True, help="pipeline file (YAML)")
        parser.add_argument("--set", action="append", default=[], help="override a config field, e.g. ppo.kl_coef=0.02")
        args = parser.parse_args()
        setup_logging()
        cfg = load_config(args.config, args.set)  # a config mistake fails before the process group forms
        state = init_processes()
        try:
            run(cfg)
            # Tear down together: a process that destroys its group while another is still in a
            # collective can abort in gloo ("terminate called without an active exception").
            state.wait_for_everyone()
        except RuntimeError as e:
            if state.num_processes > 1 and peer_gone(e):
                raise PeerGone(f"process {state.process_index} of {state.num_processes} lost contact with another "
                               "process of this stage, which stopped; stopping too") from None
            raise
        finally:
            state.destroy_process_group()

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        main()
        return
    try:
        main()
    except SystemExit as e:
        exit_without_native_teardown(e.code)
    exit_without_native_teardown(0)


def exit_without_native_teardown(code: int | str | None) -> NoReturn:
    """End a process of a multi-process (gloo) group that has left its group: Python's exit
    handlers run (W&B, logging, ...), then the process exits without the interpreter's native
    teardown. In that teardown torch's C++ side aborts now and then ("terminate called without an
    active exception", SIGABRT, no Python frame left): measured in a loop, about one 2-process run
    in seven, after the stage had written every output and marked itself done, which the launcher
    then reported as a failed stage."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code or 0)
