"""Stage 1 (SFT) as a script, for `accelerate launch stages/sft.py --config pipeline.yaml`."""

from rlhf.sft import run
from rlhf.stage_script import stage_script

if __name__ == "__main__":
    stage_script(run, __doc__)
