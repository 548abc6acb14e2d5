"""RAFT (Reward rAnked FineTuning) for diffusion models and causal language models.

    from raft_diffusion import train

    def redness(images, prompts):
        return [img.getchannel("R").getextrema()[1] / 255 for img in images]

    run = train("configs/demo.yaml", rewards=[redness], overrides=["run.stages=2"])
    run.final  # the exported LoRA, loadable with diffusers' load_lora_weights

Importing the package is cheap: the API, the models and the rewards load when first used.
"""

from raft_diffusion.core import plugins

# This package's own plug-ins, found by name from a checkout that was never installed; installed
# packages add theirs as entry points (see raft_diffusion/core/plugins.py).
plugins.declare_builtins("adapters", {
    "diffusion": "raft_diffusion.adapters.diffusion:DiffusionAdapter",
    "llm": "raft_diffusion.adapters.llm:LLMAdapter",
})
plugins.declare_builtins("rewards", {
    "aesthetic": "raft_diffusion.rewards.image:AestheticReward",
    "clip_score": "raft_diffusion.rewards.image:ClipScoreReward",
    "jpeg_compressibility": "raft_diffusion.rewards.image:jpeg_compressibility",
    "jpeg_incompressibility": "raft_diffusion.rewards.image:jpeg_incompressibility",
    "brightness": "raft_diffusion.rewards.image:brightness",
    "pickscore": "raft_diffusion.rewards.preference:PickScoreReward",
    "hpsv2": "raft_diffusion.rewards.preference:HPSv2Reward",
    "image_reward": "raft_diffusion.rewards.image_reward:ImageRewardReward",
    "http": "raft_diffusion.rewards.http:HttpReward",
    "hf_reward_model": "raft_diffusion.rewards.text:hf_reward_model",
    "word_count": "raft_diffusion.rewards.text:word_count",
    "filtered": "raft_diffusion.rewards.text:filtered",
    "demo_gold": "raft_diffusion.demo.gold:demo_gold",
    "demo_gold_align": "raft_diffusion.demo.gold:demo_gold_align",
    "demo_gold_sentiment": "raft_diffusion.demo.text_world:demo_gold_sentiment",
})
plugins.declare_builtins("prompts", {
    "demo_train": "raft_diffusion.demo.world:train_prompts",
    "demo_eval": "raft_diffusion.demo.world:eval_prompts",
    "demo_fit": "raft_diffusion.demo.world:fit_prompts",
    "demo_val": "raft_diffusion.demo.world:val_prompts",
    "llm_demo_train": "raft_diffusion.demo.text_world:train_prompts",
    "llm_demo_eval": "raft_diffusion.demo.text_world:eval_prompts",
})

_API = {
    "train": "raft_diffusion.api",
    "Run": "raft_diffusion.api",
    "load_config": "raft_diffusion.core.config",
    "Config": "raft_diffusion.core.config",
    "register_reward": "raft_diffusion.rewards.registry",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'raft_diffusion' has no attribute {name!r}")
