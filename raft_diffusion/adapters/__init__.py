"""Adapters connect the model-agnostic RAFT loop to a model library."""

from __future__ import annotations

from raft_diffusion.adapters.base import Adapter, Candidate, has_log_ratio


def build_adapter(config, accelerator) -> Adapter:
    """The adapter for ``config.model.kind``, placed on ``accelerator.device``."""
    if config.model.kind == "diffusion":
        from raft_diffusion.adapters.diffusion import DiffusionAdapter

        return DiffusionAdapter(config, accelerator)
    if config.model.kind == "llm":
        from raft_diffusion.adapters.llm import LLMAdapter

        return LLMAdapter(config, accelerator)
    raise ValueError(f"model.kind: unknown kind {config.model.kind!r}")


__all__ = ["Adapter", "Candidate", "build_adapter", "has_log_ratio"]
