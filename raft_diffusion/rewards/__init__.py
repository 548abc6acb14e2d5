from raft_diffusion.rewards.base import (
    FunctionReward,
    Reward,
    RewardError,
    WeightedReward,
    available_rewards,
    build_reward,
    register_reward,
)

__all__ = [
    "FunctionReward",
    "Reward",
    "RewardError",
    "WeightedReward",
    "available_rewards",
    "build_reward",
    "register_reward",
]
