"""Building the rewards a config names: registered names, ``module:function`` targets, weights.

A reward maps generated outputs (PIL images for diffusion, strings for language models) and
their prompts to one float per output; higher is better. Anything callable as
``reward(outputs, prompts) -> sequence of floats`` is a reward. A name refers to a reward function
registered with :func:`register_reward`, or to a *factory*: a function or class that takes the
config's ``args`` as keywords and returns the callable (``register_reward(..., factory=True)``, the
built-ins, entry points; see :mod:`raft_diffusion.core.plugins`).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

from raft_diffusion.core import plugins
from raft_diffusion.core.protocols import Reward, RewardError
from raft_diffusion.core.scores import FunctionReward, WeightedReward, to_scores

__all__ = ["FunctionReward", "Reward", "RewardError", "WeightedReward", "available_rewards", "build_reward",
           "build_reward_fn", "import_target", "register_reward", "to_scores"]


class _RewardFunction:
    """A registered ``(outputs, prompts)`` function as a factory: a config's ``args`` become its keyword arguments."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, **args):
        if not args:
            return self.fn
        inspect.signature(self.fn).bind(None, None, **args)  # a TypeError names an unknown argument
        return functools.partial(self.fn, **args)


def register_reward(name: str | Callable | None = None, *, factory: bool = False):
    """Register a reward for this process, usable as ``rewards: [{name: ...}]``.

    By default the decorated callable *is* the reward, ``(outputs, prompts) -> one float per
    output``; a config's ``args`` are passed to it as keyword arguments::

        @register_reward                    # registered as "redness"
        def redness(images, prompts): ...

        @register_reward("red")             # registered as "red"
        def redness(images, prompts, channel=0): ...

    With ``factory=True`` the decorated callable is a *factory*: called once with the config's
    ``args`` (and ``device`` if it takes one), it returns the reward (the form of the built-ins)::

        @register_reward("sharpness", factory=True)
        def sharpness(threshold=0.5):
            return lambda images, prompts: ...

    A module that registers rewards is imported by a config's ``imports: [mypkg.rewards]`` or
    ``raft-diffusion train --import mypkg.rewards``. Installed packages can also declare factories
    as entry points of the group ``raft_diffusion.rewards``.
    """
    if callable(name):  # bare @register_reward
        plugins.register("rewards", name.__name__, _RewardFunction(name))
        return name
    if name is not None and not isinstance(name, str):
        raise TypeError(f"register_reward: the name must be a string, got {type(name).__name__}")

    def wrap(fn):
        if not callable(fn):
            raise TypeError(f"register_reward: {fn!r} is not callable")
        plugins.register("rewards", name or fn.__name__, fn if factory else _RewardFunction(fn))
        return fn

    return wrap


def available_rewards() -> list[str]:
    return plugins.names("rewards")


def import_target(target: str) -> Any:
    """Resolve ``"package.module:attribute"`` to the object it names."""
    try:
        return plugins.import_target(target)
    except plugins.PluginError as err:
        raise RewardError(f"reward {target!r}: {err}") from None


def _call_factory(factory: Callable[..., Any], args: dict, device: str | None, label: str, dtype: str | None = None) -> Any:
    params = inspect.signature(factory).parameters
    kwargs = dict(args)
    if device is not None and "device" in params and "device" not in kwargs:
        kwargs["device"] = device
    # A factory whose dtype defaults to None (follow the device) scores in the run's dtype, unless args set one.
    if dtype is not None and "dtype" in params and params["dtype"].default is None and "dtype" not in kwargs:
        kwargs["dtype"] = dtype
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise RewardError(f"reward {label!r}: bad args {sorted(args)} ({err})") from None


def build_reward_fn(spec: dict, device: str | None = None, dtype: str | None = None) -> tuple[str, Callable]:
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
            obj = _call_factory(obj, args, device, target, dtype)
            if not callable(obj):
                raise RewardError(f"reward target {target!r} did not return a callable")
        return label, obj
    name = spec.get("name")
    try:
        factory = plugins.find("rewards", str(name), what="reward")
    except plugins.PluginError as err:
        raise RewardError(str(err)) from None
    return name, _call_factory(factory, args, device, name, dtype)


def build_reward(specs: list[dict], device: str | None = None, dtype: str | None = None) -> WeightedReward:
    """Build the weighted sum of the rewards a config lists (each part z-scored first where its
    ``normalize`` says ``stage`` or ``prompt``). ``device`` goes to every factory that takes one,
    ``dtype`` (the run's) to every factory whose ``dtype`` defaults to None, unless args set them."""
    if not specs:
        raise RewardError("no rewards configured")
    parts, normalize = [], {}
    seen: set[str] = set()
    for spec in specs:
        label, fn = build_reward_fn(spec, device, dtype)
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
        if spec.get("normalize", "none") not in ("none", False, None):
            normalize[label] = spec["normalize"]
    return WeightedReward(parts, normalize=normalize)


def load_models(reward: WeightedReward, missing: Callable[[int, str, FileNotFoundError, dict], Exception]) -> None:
    """Load the model of each part of ``reward`` that has one (``part.load()``), now, before any sample.

    Weights that are not on this machine raise what ``missing(index, label, err, fix)`` returns: one
    line naming ``fix``, the arguments that load local files instead (``aesthetic.WeightsNotFoundError``
    and the preference rewards carry them); the command line and the recipe spell them their own way.
    """
    for i, (label, _, part) in enumerate(reward.parts):
        if not callable(getattr(part, "load", None)):
            continue
        try:
            part.load()
        except FileNotFoundError as err:
            fix = getattr(err, "fix", None)
            if fix is None:
                raise
            raise missing(i, label, err, fix) from None
