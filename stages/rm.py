"""Stage 2 (reward model) as a script, for `accelerate launch stages/rm.py --config pipeline.yaml`."""

from rlhf.rm import run
from rlhf.stage_script import stage_script

if __name__ == "__main__":
    stage_script(run, __doc__)
