"""PPO, RLOO, GRPO and REINFORCE++ (`ppo.algorithm`) on a shared LoRA base (specified in docs/ppo.md).

The pure math lives in three modules of plain torch functions, tested against values worked
out by hand:

- ``rlhf.ppo.advantages``: masked statistics, KL estimators, per-token rewards, score
  normalisation, GAE, advantage whitening and the KL-coefficient controllers.
- ``rlhf.ppo.losses``: clipped policy loss, clipped value loss, log-probabilities and
  entropy from logits, explained variance; the RLOO (sequence-ratio) and GRPO losses.
- ``rlhf.ppo.critic_free``: the critic-free algorithms' advantages (RLOO leave-one-out, GRPO and
  Dr. GRPO group normalisation, REINFORCE++ returns with global whitening).

``rlhf.ppo.algorithms`` dispatches the targets and the policy loss on the algorithm; the loop
(``rlhf.ppo.trainer``) is the same for all four.

This file deliberately imports nothing, so importing one submodule does not pull in the
model-facing parts of the package.
"""


def run(cfg, fresh: bool = False):
    """Stage entry point (`rlhf.ppo.run(cfg)`, like `rlhf.sft.run`); see rlhf.ppo.stage.

    Refuses a `ppo.algorithm` the training loop does not implement (`rlhf.ppo.trainer.ALGORITHMS`, today
    every one the config accepts) rather than train PPO under another algorithm's name."""
    from rlhf.errors import UserError
    from rlhf.ppo import trainer
    from rlhf.ppo.stage import run as run_stage

    implemented = trainer.ALGORITHMS
    if cfg.ppo is not None and cfg.ppo.algorithm not in implemented:
        raise UserError(f"ppo.algorithm '{cfg.ppo.algorithm}' is not implemented by the training loop yet (it runs "
                        f"{', '.join(implemented)}); use ppo.algorithm: ppo")

    return run_stage(cfg, fresh=fresh)
