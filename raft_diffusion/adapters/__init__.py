"""Adapters connect the model-agnostic RAFT loop to a model library (the contract: core/protocols.py)."""

from __future__ import annotations

from raft_diffusion.core import plugins
from raft_diffusion.core.config import ConfigError
from raft_diffusion.core.protocols import Adapter


def build_adapter(config, accelerator) -> Adapter:
    """The adapter ``config.model.kind`` names (an installed adapter or a ``package.module:Class``),
    built as ``Adapter(config, accelerator)``."""
    try:
        cls = plugins.find("adapters", config.model.kind, what="model.kind")
    except plugins.PluginError as err:
        raise ConfigError(f"model.kind: {err}") from None
    return cls(config, accelerator)


__all__ = ["Adapter", "build_adapter"]
