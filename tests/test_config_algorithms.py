"""ppo.algorithm (ppo | rloo | grpo | reinforce_pp): the defaults each algorithm brings, and the
settings that make no sense for it, rejected with one clear message (all problems at once)."""

from __future__ import annotations

import pytest

from tests.conftest import write_config
from rlhf.config import load_config
from rlhf.staleness import stage_hash
from rlhf.errors import UserError


def error_of(path, overrides: list[str]) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    "algorithm, samples, kl_coef, estimator, epochs",
    [
        ("ppo", 1, 0.05, "k1", 4),
        ("rloo", 4, 0.05, "k1", 1),  # TRL RLOOTrainer beta 0.05, k1; one update per batch
        ("grpo", 4, 0.04, "k3", 1),  # DeepSeekMath beta 0.04, k3 in the loss, mu = 1
        ("reinforce_pp", 1, 0.01, "k1", 1),  # OpenRLHF init_kl_coef 0.01, k1, max_epochs 1
    ],
)
def test_each_algorithm_loads_with_its_defaults(tmp_path, algorithm, samples, kl_coef, estimator, epochs):
    # a ppo section that sets none of the algorithm-dependent fields
    path = write_config(tmp_path, {"ppo": {"ppo_epochs": None, "rollout_batch_size": 8, "micro_batch_size": 4}})
    ppo = load_config(path, [f"ppo.algorithm={algorithm}"]).ppo
    assert (ppo.algorithm, ppo.samples_per_prompt, ppo.kl_coef, ppo.kl_estimator, ppo.ppo_epochs) == (
        algorithm, samples, kl_coef, estimator, epochs)
    assert ppo.prompts_per_step == 8 // samples  # rollout_batch_size counts responses, whatever the algorithm


def test_settings_given_explicitly_win_over_the_algorithm_defaults(tmp_path):
    path = write_config(tmp_path)  # configs/tiny.yaml sets ppo_epochs: 2
    ppo = load_config(path, ["ppo.algorithm=grpo", "ppo.kl_coef=0.1", "ppo.samples_per_prompt=2",
                             "ppo.dr_grpo=true"]).ppo
    assert (ppo.kl_coef, ppo.samples_per_prompt, ppo.ppo_epochs, ppo.dr_grpo) == (0.1, 2, 2, True)
    # null means "the algorithm's default", like leaving the key out
    assert load_config(path, ["ppo.algorithm=grpo", "ppo.kl_coef=null"]).ppo.kl_coef == 0.04
    ppo = load_config(path, ["ppo.algorithm=reinforce_pp", "ppo.samples_per_prompt=4", "ppo.reinforce_pp_baseline=true",
                             "ppo.gamma=0.99"]).ppo
    assert (ppo.samples_per_prompt, ppo.reinforce_pp_baseline, ppo.gamma) == (4, True, 0.99)


def test_assigning_another_algorithm_rederives_only_the_unset_fields(tmp_path):
    ppo = load_config(write_config(tmp_path), ["ppo.kl_coef=0.2"]).ppo
    ppo.algorithm = "rloo"
    assert (ppo.samples_per_prompt, ppo.kl_coef, ppo.ppo_epochs) == (4, 0.2, 2)  # kl_coef and ppo_epochs were set


def test_value_model_settings_are_rejected_without_a_critic(tmp_path):
    path = write_config(tmp_path)
    msg = error_of(path, ["ppo.algorithm=rloo", "ppo.vf_coef=0.2", "ppo.lam=0.9"])
    assert msg.count("\n") == 0, msg
    assert msg.startswith(f"{path}:") and ": ppo: " in msg
    assert "vf_coef, lam configure PPO's value model; algorithm 'rloo' trains no critic: remove them" in msg
    msg = error_of(path, ["ppo.algorithm=reinforce_pp", "ppo.value_head_on_policy=false"])
    assert "value_head_on_policy configures PPO's value model; algorithm 'reinforce_pp' trains no critic: remove it" in msg
    # gamma belongs to per-token returns: fine for reinforce_pp (above), not for the group methods
    assert "gamma discounts per-token returns; algorithm 'grpo'" in error_of(path, ["ppo.algorithm=grpo", "ppo.gamma=1.0"])
    # and all of them are PPO's own
    assert load_config(path, ["ppo.vf_coef=0.2", "ppo.lam=0.9", "ppo.gamma=0.99"]).ppo.vf_coef == 0.2


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_group_methods_need_two_samples_per_prompt(tmp_path, algorithm):
    msg = error_of(write_config(tmp_path), [f"ppo.algorithm={algorithm}", "ppo.samples_per_prompt=1"])
    assert f"algorithm '{algorithm}' compares the samples of a prompt with each other: samples_per_prompt must be " \
           "at least 2 (got 1)" in msg


def test_algorithm_specific_switches_are_rejected_elsewhere(tmp_path):
    path = write_config(tmp_path)
    assert "dr_grpo applies to algorithm 'grpo' only (algorithm is 'rloo')" in error_of(
        path, ["ppo.algorithm=rloo", "ppo.dr_grpo=true"])
    assert "reinforce_pp_baseline applies to algorithm 'reinforce_pp' only (algorithm is 'ppo')" in error_of(
        path, ["ppo.reinforce_pp_baseline=true"])
    assert "reinforce_pp_baseline subtracts the mean score of a prompt's samples: samples_per_prompt must be at " \
           "least 2 (got 1)" in error_of(path, ["ppo.algorithm=reinforce_pp", "ppo.reinforce_pp_baseline=true"])
    assert "the k1 estimator's expected gradient is zero" in error_of(path, ["ppo.algorithm=grpo", "ppo.kl_estimator=k1"])
    assert load_config(path, ["ppo.algorithm=rloo", "ppo.kl_estimator=k3"]).ppo.kl_estimator == "k3"


def test_every_problem_is_reported_at_once(tmp_path):
    msg = error_of(write_config(tmp_path), ["ppo.algorithm=grpo", "ppo.samples_per_prompt=1", "ppo.vf_coef=0.2",
                                            "ppo.kl_estimator=k1", "ppo.reinforce_pp_baseline=false"])
    assert msg.count("\n") == 0, msg
    for part in ("vf_coef configures", "samples_per_prompt must be at least 2", "k1 estimator",
                 "reinforce_pp_baseline applies to algorithm 'reinforce_pp' only"):
        assert part in msg, part


def test_batches_count_responses_not_prompts(tmp_path):
    """rollout_batch_size counts responses (TRL's per-device batch), so a critic-free step costs what a PPO
    step costs: 4 responses are 1 prompt × 4 for rloo, 4 prompts × 1 for ppo."""
    path = write_config(tmp_path)  # rollout_batch_size 4, micro_batch_size 4
    assert load_config(path, ["ppo.algorithm=rloo"]).ppo.prompts_per_step == 1
    assert load_config(path).ppo.prompts_per_step == 4
    msg = error_of(path, ["ppo.algorithm=rloo", "ppo.samples_per_prompt=3"])
    assert msg.count("\n") == 0, msg
    assert "rollout_batch_size (4) counts responses and must be a multiple of samples_per_prompt (3): each step " \
           "samples rollout_batch_size / samples_per_prompt prompts, 3 times each" in msg
    assert "rollout_batch_size (4) must be a multiple of num_mini_batches (3)" in error_of(
        path, ["ppo.algorithm=rloo", "ppo.num_mini_batches=3"])
    # 16 responses (4 prompts × 4) in 8 mini-batches of 2: fine, though a mini-batch holds half a group
    # (the advantages are computed over the whole step before the update)
    assert load_config(path, ["ppo.algorithm=rloo", "ppo.rollout_batch_size=16", "ppo.num_mini_batches=8",
                              "ppo.micro_batch_size=2"]).ppo.prompts_per_step == 4
    msg = error_of(path, ["ppo.algorithm=grpo", "ppo.rollout_batch_size=16", "ppo.num_mini_batches=2",
                          "ppo.micro_batch_size=3"])
    assert "a mini-batch (8 = rollout_batch_size / num_mini_batches) must be a multiple of micro_batch_size (3)" in msg
    assert "rollout_batch_size (4) must be a multiple of num_mini_batches (3)" in error_of(path, ["ppo.num_mini_batches=3"])


def test_algorithm_changes_only_the_ppo_stage_and_an_explicit_default_changes_nothing(tmp_path):
    path = write_config(tmp_path)
    base = load_config(path)
    rloo = load_config(path, ["ppo.algorithm=rloo"])
    assert stage_hash(rloo, "ppo") != stage_hash(base, "ppo")
    assert stage_hash(rloo, "rm") == stage_hash(base, "rm") and stage_hash(rloo, "sft") == stage_hash(base, "sft")
    # the resolved value is hashed, so spelling out a default is the same run
    assert stage_hash(load_config(path, ["ppo.kl_coef=0.05", "ppo.kl_estimator=k1"]), "ppo") == stage_hash(base, "ppo")


def test_the_loop_implements_every_configurable_algorithm_and_the_stage_refuses_others(tiny_config, monkeypatch):
    """rlhf.ppo.trainer.ALGORITHMS lists every ppo.algorithm the config accepts; an algorithm missing
    there (a new one added to the config first) is refused by `rlhf ppo` before it touches the run
    folder, instead of training PPO under its name."""
    from typing import get_args

    from rlhf.config import Algorithm
    from rlhf.ppo import run, trainer

    assert set(trainer.ALGORITHMS) == set(get_args(Algorithm))
    monkeypatch.setattr(trainer, "ALGORITHMS", ("ppo",))
    cfg = load_config(tiny_config, ["ppo.algorithm=rloo"])
    with pytest.raises(UserError, match="ppo.algorithm 'rloo' is not implemented by the training loop yet"):
        run(cfg)
    assert not cfg.run_dir.exists()
