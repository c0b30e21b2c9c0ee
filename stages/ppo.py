"""Stage 3 (PPO) as a script, for `accelerate launch stages/ppo.py --config pipeline.yaml`."""

from rlhf.ppo import run
from rlhf.stage_script import stage_script

if __name__ == "__main__":
    stage_script(run, __doc__)
