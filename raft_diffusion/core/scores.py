"""What the loop does with rewards: check what one returns, and sum several with weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from raft_diffusion.core.protocols import RewardError


def to_scores(values: Any, n: int, label: str) -> torch.Tensor:
    """Check and convert a reward's return value to a float32 tensor of shape [n]."""
    if isinstance(values, torch.Tensor):
        scores = values.detach().to("cpu", torch.float32).reshape(-1)
    else:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "__len__"):
            raise RewardError(f"reward {label!r} returned {type(values).__name__}, expected a sequence of {n} floats")
        try:
            scores = torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError):
            kinds = sorted({type(v).__name__ for v in values})
            raise RewardError(f"reward {label!r} returned non-numeric scores ({', '.join(kinds)})") from None
    if scores.numel() != n:
        raise RewardError(f"reward {label!r} returned {scores.numel()} scores for {n} outputs")
    return scores


class FunctionReward:
    """Any ``(outputs, prompts) -> floats`` callable, its return value checked."""

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name

    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor:
        return to_scores(self.fn(outputs, prompts), len(outputs), self.name)


@dataclass
class WeightedReward:
    """Sum of ``weight * reward``; the parts are kept so each can be logged on its own."""

    parts: list[tuple[str, float, Callable]]
    name: str = "reward"

    def score_parts(self, outputs: list, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {name: to_scores(fn(outputs, prompts), len(outputs), name) for name, _, fn in self.parts}

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros_like(next(iter(parts.values())))
        for name, weight, _ in self.parts:
            total += weight * parts[name]
        return total

    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor:
        return self.combine(self.score_parts(outputs, prompts))
