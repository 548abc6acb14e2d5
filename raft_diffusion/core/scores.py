"""What the loop does with rewards: check what one returns, and sum several with weights."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from raft_diffusion.core.protocols import RewardError


def to_scores(values: Any, n: int, label: str) -> torch.Tensor:
    """Check and convert a reward's return value to a float32 tensor of shape [n].

    Accepted: a list or tuple of ``n`` numbers, or a numpy array or tensor of real numbers of shape
    ``(n,)`` or ``(n, 1)``. Anything else (a mapping, strings, numeric ones included, other shapes)
    is refused in one line naming its type and shape."""
    expected = f"expected a sequence, 1-D array or tensor of {n} numbers"
    kind = type(values).__name__
    if isinstance(values, (list, tuple)):
        bad = sorted({type(v).__name__ for v in values if not _is_number(v)})
        if bad:
            raise RewardError(f"reward {label!r} returned non-numeric scores ({', '.join(bad)}); {expected}")
        values = torch.tensor([float(v) for v in values], dtype=torch.float64)
    elif isinstance(values, np.ndarray):
        if values.dtype.kind not in "biuf":
            raise RewardError(f"reward {label!r} returned an array of {values.dtype} with shape {values.shape}; {expected}")
        values = torch.from_numpy(values.astype(np.float64))
    elif not isinstance(values, torch.Tensor):
        raise RewardError(f"reward {label!r} returned {type(values).__name__}; {expected}")
    elif values.is_complex():
        raise RewardError(f"reward {label!r} returned a tensor of {values.dtype}; {expected}")
    shape = tuple(values.shape)
    if shape not in ((n,), (n, 1)):
        what = f"{shape[0]} scores for {n} outputs" if len(shape) == 1 else f"{kind} of shape {shape}"
        raise RewardError(f"reward {label!r} returned {what}; {expected} (shape ({n},) or ({n}, 1))")
    return values.detach().to("cpu", torch.float32).reshape(n)


def _is_number(value: Any) -> bool:
    """A real number: int, float, numpy scalar, or a tensor or array of one element (not a string)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.numel() == 1 if isinstance(value, torch.Tensor) else value.size == 1 and value.dtype.kind in "biuf"
    return isinstance(value, numbers.Real)


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
