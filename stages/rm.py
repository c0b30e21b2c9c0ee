"""Stage 2 (reward model) as a script, for `accelerate launch stages/rm.py --config pipeline.yaml`."""

import argparse

from rlhf.cli import friendly_errors, setup_logging
from rlhf.config import load_config
from rlhf.rm import run


@friendly_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="pipeline file (YAML)")
    parser.add_argument("--set", action="append", default=[], help="override a config field, e.g. rm.max_steps=30")
    args = parser.parse_args()
    setup_logging()
    run(load_config(args.config, args.set))


if __name__ == "__main__":
    main()
