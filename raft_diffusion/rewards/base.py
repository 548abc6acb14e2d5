"""Reward protocol, registry, ``module:function`` plug-ins and weighted composition.

A reward maps generated outputs (PIL images for diffusion, strings for language models) and
their prompts to one float per output; higher is better. Anything callable as
``reward(outputs, prompts) -> sequence of floats`` is a reward. Built-in rewards are
registered by name with :func:`register_reward` on a *factory*: a function or class that takes
the config's ``args`` as keywords and returns the callable.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch


class RewardError(ValueError):
    """A reward could not be built or returned something unusable (one-line message)."""


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., Any]] = {}

# Modules that register built-in rewards on import; imported lazily so that a text-only run
# does not pay for open_clip, and an image-only run does not pay for transformers.
_BUILTIN_MODULES = (
    "raft_diffusion.rewards.image",
    "raft_diffusion.rewards.text",
    "raft_diffusion.demo.gold",
    "raft_diffusion.demo.text_world",
)


def register_reward(name: str):
    """Register a reward factory under ``name`` (usable as ``rewards: [{name: ...}]``)."""

    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            # Only a missing optional module is tolerated, not a broken import inside it.
            if err.name != module:
                raise


def available_rewards() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def import_target(target: str) -> Any:
    """Resolve ``"package.module:attribute"`` to the object it names."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward target {target!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import failure is the user's plug-in, report it in one line
        raise RewardError(f"cannot import reward module {module_name!r} ({type(err).__name__}: {err})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _call_factory(factory: Callable[..., Any], args: dict, device: str | None, label: str) -> Any:
    params = inspect.signature(factory).parameters
    kwargs = dict(args)
    if device is not None and "device" in params and "device" not in kwargs:
        kwargs["device"] = device
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise RewardError(f"reward {label!r}: bad args {sorted(args)} ({err})") from None


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
    """Adapts any ``(outputs, prompts) -> floats`` callable to the Reward protocol."""

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


def build_reward_fn(spec: dict, device: str | None = None) -> tuple[str, Callable]:
    """Build one reward from ``{name: ..., args: {...}}`` or ``{target: "module:function", args: {...}}``.

    A target that names a plain function with the ``(outputs, prompts)`` signature is used as is;
    a target that names a class or a factory (any callable taking the args) is called with the args.
    """
    args = dict(spec.get("args") or {})
    if spec.get("target"):
        target = spec["target"]
        obj = import_target(target)
        if not callable(obj):
            raise RewardError(f"reward target {target!r} is not callable")
        label = spec.get("name") or target.rpartition(":")[2]
        if args or inspect.isclass(obj):
            obj = _call_factory(obj, args, device, target)
            if not callable(obj):
                raise RewardError(f"reward target {target!r} did not return a callable")
        return label, obj
    name = spec.get("name")
    _load_builtins()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (available: {', '.join(sorted(_REGISTRY))})"
        raise RewardError(f"unknown reward {name!r}{hint}")
    return name, _call_factory(_REGISTRY[name], args, device, name)


def build_reward(specs: list[dict], device: str | None = None) -> WeightedReward:
    """Build the weighted sum of the rewards a config lists."""
    if not specs:
        raise RewardError("no rewards configured")
    parts = []
    seen: set[str] = set()
    for spec in specs:
        label, fn = build_reward_fn(spec, device)
        if label in seen:  # two rewards of one kind keep distinct names, e.g. demo_gold_align_colour
            simple = [str(v) for v in (spec.get("args") or {}).values() if isinstance(v, (str, int, float))]
            label = "_".join([label, *simple]) if simple else label
        while label in seen:
            label += "_"
        seen.add(label)
        weight = float(spec.get("weight", 1.0))
        if not math.isfinite(weight):
            raise RewardError(f"reward {label!r}: weight must be finite")
        parts.append((label, weight, fn))
    return WeightedReward(parts)
