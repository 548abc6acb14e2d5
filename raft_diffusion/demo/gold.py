"""The demo world's gold scorers as rewards (for evaluation: they read the true quality off pixels).

``demo_gold``: the gold aesthetic score, 1-10 (see :mod:`raft_diffusion.demo.world`).
``demo_gold_align``: 1 when the image shows the colour and shape its prompt names, else 0;
``part: colour`` or ``part: shape`` scores one of the two alone.
"""

from __future__ import annotations

import torch

from raft_diffusion.demo import world
from raft_diffusion.core.protocols import RewardError

ALIGN_PARTS = ("both", "colour", "shape")


def demo_gold():
    def score(images, prompts):
        return torch.as_tensor(world.gold_aesthetic(images), dtype=torch.float32)

    score.name = "demo_gold"
    return score


def demo_gold_align(part: str = "both"):
    if part not in ALIGN_PARTS:
        raise RewardError(f"demo_gold_align: part must be one of {ALIGN_PARTS}, got {part!r}")

    def score(images, prompts):
        try:
            parts = world.gold_alignment_parts(images, prompts)
        except ValueError as err:  # a prompt outside the demo world
            raise RewardError(f"demo_gold_align: {err}") from None
        return torch.as_tensor(parts[part], dtype=torch.float32)

    score.name = "demo_gold_align"
    return score
