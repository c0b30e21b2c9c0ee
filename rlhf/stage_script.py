"""The body of the scripts in stages/: parse --config and --set, then run one stage.

`accelerate launch stages/<stage>.py --config F` starts one of these per process; a user
mistake prints one line and exits 2, as the `rlhf` command does."""

from __future__ import annotations

import argparse
from typing import Callable

from rlhf.cli import friendly_errors, setup_logging
from rlhf.config import PipelineConfig, load_config


def stage_script(run: Callable[[PipelineConfig], object], description: str) -> None:
    @friendly_errors
    def main() -> None:
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--config", required=True, help="pipeline file (YAML)")
        parser.add_argument("--set", action="append", default=[], help="override a config field, e.g. ppo.kl_coef=0.02")
        args = parser.parse_args()
        setup_logging()
        run(load_config(args.config, args.set))

    main()
