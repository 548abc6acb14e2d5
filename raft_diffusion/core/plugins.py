"""Finding adapters, rewards and prompt sets by name, without the loop knowing any of them.

A name given in a config (``model.kind``, ``rewards[].name``, ``prompts.builtin``) is looked up,
in this order, among

1. what was registered in this process: ``register("rewards", "sharpness", fn)`` (what
   ``@register_reward`` does);
2. the entry points of installed packages, group ``raft_diffusion.<kind>``: this package declares
   its own adapters, rewards and demo prompt sets there (``pyproject.toml``), and any installed
   package can add its own the same way;
3. a ``package.module:attribute`` target, imported as written.

Only the entry asked for is imported, so a text run never pays for open_clip.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from raft_diffusion.core.errors import UserError

KINDS = ("adapters", "rewards", "prompts")
_REGISTERED: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


class PluginError(UserError, LookupError):
    """A name that is not registered, or a target that cannot be imported (one-line message)."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"plug-in kind must be one of {KINDS}, got {kind!r}")


def register(kind: str, name: str, obj: Any) -> Any:
    """Make ``obj`` available as ``name`` for this process (it wins over an installed entry point)."""
    _check_kind(kind)
    _REGISTERED[kind][name] = obj
    return obj


@lru_cache(maxsize=None)
def _entry_points(kind: str) -> dict:
    return {ep.name: ep for ep in entry_points(group=f"raft_diffusion.{kind}")}


def names(kind: str) -> list[str]:
    """Every name ``kind`` can be looked up by (registered or installed)."""
    _check_kind(kind)
    return sorted(set(_REGISTERED[kind]) | set(_entry_points(kind)))


def is_target(name: str) -> bool:
    return isinstance(name, str) and ":" in name


def import_target(target: str) -> Any:
    """Resolve ``"package.module:attribute"`` to the object it names."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{target!r} must look like 'package.module:attribute'")
    # A user's module next to the config (``mypkg/rewards.py`` in the working folder) is found as
    # ``python -m`` would find it; the working folder comes last, so it never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # whatever a plug-in's import raises is reported in one line
        raise PluginError(f"cannot import module {module_name!r} ({type(err).__name__}: {err})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def find(kind: str, name: str, what: str | None = None) -> Any:
    """The object registered or installed as ``name`` (or named by a ``module:attribute`` target)."""
    _check_kind(kind)
    if name in _REGISTERED[kind]:
        return _REGISTERED[kind][name]
    if name in _entry_points(kind):
        return _entry_points(kind)[name].load()
    if is_target(name):
        return import_target(name)
    known = names(kind)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (available: {', '.join(known)})"
    raise PluginError(f"unknown {what or kind[:-1]} {name!r}{hint}")
