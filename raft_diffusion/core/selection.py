"""Which candidates to fine-tune on.

Candidates come grouped by prompt: ``scores`` has shape [P, K]. Every strategy returns the flat
indices (``p * K + k``) of the chosen candidates, best first. Non-finite scores are never chosen.
Ties break deterministically toward the lower index.
"""

from __future__ import annotations

import math

import torch

STRATEGIES = ("local", "global", "local_then_global")


def ranking_scores(rewards: torch.Tensor, log_ratio: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """The paper's KL-shaped ranking ``r - beta * log(p / p0)``; the loss does not change."""
    if beta and log_ratio is not None:
        return rewards - beta * log_ratio
    return rewards


def _order(values: torch.Tensor) -> torch.Tensor:
    """Indices sorted by value, descending; stable, so equal values keep index order."""
    return torch.sort(values, descending=True, stable=True).indices


def select(scores: torch.Tensor, strategy: str, keep: float) -> list[int]:
    """Flat indices of the chosen candidates for ``scores`` of shape [P, K]."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [prompts, k], got shape {tuple(scores.shape)}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    n_prompts, k = scores.shape
    scores = scores.to(torch.float64)
    finite = torch.isfinite(scores)
    masked = torch.where(finite, scores, torch.full_like(scores, -math.inf))

    if strategy == "global":
        flat = masked.reshape(-1)
        n_keep = max(1, round(keep * flat.numel()))
        return [int(i) for i in _order(flat)[:n_keep] if finite.reshape(-1)[i]]

    per_prompt = max(1, round(keep * k)) if strategy == "local" else 1
    chosen: list[int] = []
    for p in range(n_prompts):
        order = _order(masked[p])
        chosen += [p * k + int(j) for j in order[:per_prompt] if finite[p, j]]
    if strategy == "local":
        # Best first across prompts too, so the list reads like a ranking.
        return sorted(chosen, key=lambda i: (-float(masked.reshape(-1)[i]), i))
    if strategy == "local_then_global":
        best = torch.tensor([float(masked.reshape(-1)[i]) for i in chosen], dtype=torch.float64)
        n_keep = max(1, round(keep * n_prompts))
        return [chosen[int(j)] for j in _order(best)[:n_keep]] if chosen else []
    raise ValueError(f"unknown selection strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
