"""Finding adapters, rewards and prompt sets by name, without the loop knowing any of them.

A name given in a config (``model.kind``, ``rewards[].name``, ``prompts.builtin``) is looked up,
in this order, among

1. what was registered in this process: ``register("rewards", "sharpness", fn)`` (what
   ``@register_reward`` does), for instance by a module a config lists under ``imports``;
2. this package's built-ins (its adapters, rewards and demo prompt sets), declared as
   ``module:attribute`` targets by ``raft_diffusion/__init__.py``, so a checkout works uninstalled;
3. the entry points of installed packages, group ``raft_diffusion.<kind>``: any installed
   package can add its own there (``pyproject.toml``);
4. a ``package.module:attribute`` target, imported as written.

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
_BUILTIN: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}


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


def registered(kind: str, name: str) -> Any:
    """What was registered in this process as ``name`` (None if nothing was)."""
    _check_kind(kind)
    return _REGISTERED[kind].get(name)


def declare_builtins(kind: str, targets: dict[str, str]) -> None:
    """Declare this package's own ``name -> "module:attribute"`` entries (imported when first asked for)."""
    _check_kind(kind)
    _BUILTIN[kind].update(targets)


@lru_cache(maxsize=None)
def _entry_points(kind: str) -> dict:
    return {ep.name: ep for ep in entry_points(group=f"raft_diffusion.{kind}")}


def names(kind: str) -> list[str]:
    """Every name ``kind`` can be looked up by (registered, built in or installed)."""
    _check_kind(kind)
    return sorted(set(_REGISTERED[kind]) | set(_BUILTIN[kind]) | set(_entry_points(kind)))


def is_target(name: str) -> bool:
    return isinstance(name, str) and ":" in name


def add_search_folder(folder: str | os.PathLike) -> None:
    """Let user modules in ``folder`` (a config file's folder) be imported from any working folder.

    It goes last on ``sys.path``, so it never shadows an installed package."""
    folder = os.path.abspath(folder)
    if folder not in sys.path:
        sys.path.append(folder)


def import_module(module_name: str) -> Any:
    """Import a user's module from ``sys.path``, to which the folders of the configs loaded
    (:func:`add_search_folder`) and the working folder are appended; whatever its import raises
    becomes one line."""
    add_search_folder(os.getcwd())  # as ``python -m`` would find it, but last: it never shadows a package
    try:
        return importlib.import_module(module_name)
    except Exception as err:  # whatever a plug-in's import raises is reported in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise PluginError(f"cannot import module {module_name!r} ({type(err).__name__}: {first})") from None


def import_target(target: str) -> Any:
    """Resolve ``"package.module:attribute"`` to the object it names."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{target!r} must look like 'package.module:attribute'")
    module = import_module(module_name)
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
    if name in _BUILTIN[kind]:  # this package's own code: an error in it keeps its traceback
        module_name, _, attr = _BUILTIN[kind][name].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    if name in _entry_points(kind):
        return _entry_points(kind)[name].load()
    if is_target(name):
        return import_target(name)
    known = names(kind)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (available: {', '.join(known)})"
    raise PluginError(f"unknown {what or kind[:-1]} {name!r}{hint}")
