"""PPO on a shared LoRA base (see PPO.md).

The pure math lives in two modules of plain torch functions, tested against values worked
out by hand:

- ``rlhf.ppo.advantages``: masked statistics, KL estimators, per-token rewards, score
  normalisation, GAE, advantage whitening and the KL-coefficient controllers.
- ``rlhf.ppo.losses``: clipped policy loss, clipped value loss, log-probabilities and
  entropy from logits, explained variance.

This file deliberately imports nothing, so importing one submodule does not pull in the
model-facing parts of the package.
"""


def run(cfg, fresh: bool = False):
    """Stage entry point (`rlhf.ppo.run(cfg)`, like `rlhf.sft.run`); see rlhf.ppo.stage."""
    from rlhf.ppo.stage import run as run_stage

    return run_stage(cfg, fresh=fresh)
