"""rlhf: a three-stage RLHF pipeline (SFT -> reward model -> PPO) on LoRA adapters."""

__version__ = "0.1.0"
