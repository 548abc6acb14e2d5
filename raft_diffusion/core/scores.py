"""What the loop does with rewards: check what one returns, normalise parts, and sum them with weights."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from raft_diffusion.core.config import NORMALIZE_MODES
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
