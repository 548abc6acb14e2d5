"""Rewards: the built-in image and text rewards, and building the weighted reward a config names."""

from raft_diffusion.rewards.registry import (
    FunctionReward,
    Reward,
    RewardError,
    WeightedReward,
    available_rewards,
    build_reward,
    load_models,
    register_reward,
)

__all__ = [
    "FunctionReward",
    "Reward",
    "RewardError",
    "WeightedReward",
    "available_rewards",
    "build_reward",
    "load_models",
    "register_reward",
]
