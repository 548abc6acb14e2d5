"""What the loop does with rewards: check what one returns, normalise parts, and sum them with weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from raft_diffusion.core.config import NORMALIZE_MODES
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


def moments(x: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of the finite entries; (0, 1) when there are none."""
    finite = x[torch.isfinite(x)].double()
    if not finite.numel():
        return 0.0, 1.0
    return float(finite.mean()), float(finite.std(unbiased=False)) if finite.numel() > 1 else 0.0


def zscore(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(x - mean) / std``; a part with no spread (std 0) contributes 0, it prefers no candidate.
    Non-finite scores stay non-finite, so selection still passes them over."""
    centred = x.double() - mean
    return (centred / std if std > 1e-12 else centred * 0.0).float()


def group_zscore(x: torch.Tensor, groups: Sequence) -> torch.Tensor:
    """Z-score within each group of equal keys (a prompt's K candidates)."""
    out = torch.empty_like(x)
    members: dict[Any, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    for idx in members.values():
        out[idx] = zscore(x[idx], *moments(x[idx]))
    return out


class FunctionReward:
    """Any ``(outputs, prompts) -> floats`` callable, its return value checked."""

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name

    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor:
        return to_scores(self.fn(outputs, prompts), len(outputs), self.name)


@dataclass
class WeightedReward:
    """Sum of ``weight * reward``; the parts are kept so each can be logged on its own.

    ``normalize`` maps a part's name to ``stage`` or ``prompt``: that part is z-scored over all the
    scored outputs, or within each group (prompt) of them, before it is weighted, so that a reward on
    a large scale does not drown one on a small scale. Parts not named are summed as they are.
    """

    parts: list[tuple[str, float, Callable]]
    name: str = "reward"
    normalize: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for part, mode in self.normalize.items():
            if mode not in NORMALIZE_MODES:
                raise RewardError(f"reward {part!r}: normalize must be one of {', '.join(NORMALIZE_MODES)}, got {mode!r}")

    @property
    def normalized_parts(self) -> list[str]:
        return [name for name, _, _ in self.parts if self.normalize.get(name, "none") != "none"]

    def score_parts(self, outputs: list, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {name: to_scores(fn(outputs, prompts), len(outputs), name) for name, _, fn in self.parts}

    def normalized(self, parts: dict[str, torch.Tensor], groups: Sequence | None = None,
                   reference: dict[str, tuple[float, float]] | None = None) -> dict[str, torch.Tensor]:
        """Each part as it enters the weighted sum. ``groups``: one key per output (its prompt), for
        ``prompt`` normalisation. ``reference``: fixed ``(mean, std)`` per normalised part, used instead
        of the outputs' own statistics (held-out evaluations compare stages on one fixed scale)."""
        out = {}
        for name, _, _ in self.parts:
            mode, value = self.normalize.get(name, "none"), parts[name]
            if mode == "none":
                out[name] = value
            elif reference is not None:
                out[name] = zscore(value, *reference[name])
            elif mode == "stage" or groups is None:
                out[name] = zscore(value, *moments(value))
            else:
                if len(groups) != value.numel():
                    raise RewardError(f"reward {name!r}: {len(groups)} group keys for {value.numel()} scores")
                out[name] = group_zscore(value, groups)
        return out

    def combine(self, parts: dict[str, torch.Tensor], groups: Sequence | None = None,
                reference: dict[str, tuple[float, float]] | None = None) -> torch.Tensor:
        values = self.normalized(parts, groups, reference)
        total = torch.zeros_like(next(iter(values.values())))
        for name, weight, _ in self.parts:
            total += weight * values[name]
        return total

    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor:
        """The weighted sum; ``prompt`` normalisation groups the outputs by their prompt."""
        return self.combine(self.score_parts(outputs, prompts), groups=list(prompts))
