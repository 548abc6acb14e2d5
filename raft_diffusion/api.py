"""RAFT from Python: ``train(config, rewards=[fn], overrides=[...])`` -> :class:`Run`.

    from raft_diffusion import train

    def redness(images, prompts):
        return [...]  # one float per image, higher is better

    run = train("configs/demo.yaml", rewards=[redness], overrides=["run.stages=2"])
    run.metrics[-1]["eval_reward"], run.exported_stage, run.final
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from raft_diffusion.core import plugins
from raft_diffusion.core.config import Config, ConfigError, apply_overrides, default_config_path, from_dict, load_yaml
from raft_diffusion.core.guard import OUTCOME_FILE
from raft_diffusion.core.run_dir import RunDir

RewardLike = Union[Callable, str, dict]


@dataclass
class Run:
    """A run folder, as :func:`train` leaves it (or as :meth:`open` finds it)."""

    folder: Path  # the run folder: config.yaml, metrics.jsonl, stages/, report.html, final/
    config: Config
    metrics: list[dict]  # one record per stage (stage 0: the base model's held-out evaluation)
    exported_stage: int | None  # the stage whose LoRA is in final/ (None before the run finished)

    @property
    def final(self) -> Path:
        """The exported model: for diffusion a LoRA that ``pipe.load_lora_weights(run.final)`` loads."""
        return self.folder / "final"

    @classmethod
    def open(cls, folder: str | Path, config: Config | None = None) -> "Run":
        run_dir = RunDir(folder)
        if config is None:
            config = from_dict(load_yaml(run_dir.config))
        try:
            exported = json.loads((run_dir.root / OUTCOME_FILE).read_text(encoding="utf-8"))["exported_stage"]
        except (OSError, ValueError, KeyError):
            exported = None
        return cls(run_dir.root.resolve(), config, run_dir.read_metrics(), exported)


def _importable_name(fn: Callable) -> str | None:
    """``module:name`` when ``fn`` is a module-level function another process can import, else None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not inspect.isfunction(fn) or not module or module == "__main__" or "<" in qualname:
        return None
    target = f"{module}:{qualname}"
    try:
        return target if plugins.import_target(target) is fn else None
    except plugins.PluginError:
        return None


def _function_spec(fn: Callable, where: str, name: str | None = None) -> dict:
    """The reward spec of a callable: a ``module:function`` target when it can be imported again (so the
    run folder's config.yaml resumes from the command line), else a name registered in this process."""
    target = _importable_name(fn)
    if target:
        return {"target": target, **({"name": name} if name else {})}
    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    if not name.isidentifier():
        raise ConfigError(f"{where}: a reward function needs a name (a def, not a lambda), got {name!r}")
    from raft_diffusion.rewards.registry import _RewardFunction, register_reward

    # A function passed earlier under this name (a notebook cell run again) is replaced; a built-in is not.
    if name in plugins.names("rewards") and not isinstance(plugins.registered("rewards", name), _RewardFunction):
        raise ConfigError(f"{where}: reward function {name!r} has the name of another reward; rename the function")
    register_reward(name)(fn)
    return {"name": name}


def _reward_spec(reward: RewardLike, where: str) -> Any:
    if isinstance(reward, dict) and callable(reward.get("target")):
        rest = {k: v for k, v in reward.items() if k not in ("target", "name")}
        return {**rest, **_function_spec(reward["target"], where, reward.get("name"))}
    if callable(reward):
        return _function_spec(reward, where)
    return reward  # a name, a "module:function" target or a spec: checked with the config


def _config_data(config: str | Path | dict | Config | None, overrides: list[str]) -> dict:
    if isinstance(config, Config):
        return config.to_dict()
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config) if config is not None else default_config_path(overrides)
    plugins.add_search_folder(path.resolve().parent)
    return load_yaml(path)


def train(
    config: str | Path | dict | Config | None = None,
    rewards: list[RewardLike] | RewardLike | None = None,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> Run:
    """Run RAFT and return the run.

    ``config``: a YAML path, a mapping of the same keys, a :class:`Config`, or None for the command
    line's default (the packaged demo). ``rewards`` replace the config's: each a callable
    ``(outputs, prompts) -> one float per output`` (named after the function), a registered name,
    a ``"module:function"`` target, or a spec ``{name|target: ..., weight: ..., args: {...}}`` whose
    target may be a callable. ``overrides`` are ``key=value`` strings applied last, as on the
    command line (``"run.stages=2"``, ``"rewards.0.weight=0.5"``). ``resume``, ``overwrite`` and
    ``quiet`` are the command line's flags.
    """
    if isinstance(overrides, str):
        raise ConfigError(f"overrides: expected a list of key=value strings, got the string {overrides!r}")
    overrides = list(overrides or [])
    data = _config_data(config, overrides)
    if rewards is not None:
        items = rewards if isinstance(rewards, (list, tuple)) else [rewards]
        data["rewards"] = [_reward_spec(r, f"rewards[{i}]") for i, r in enumerate(items)]
    config = from_dict(apply_overrides(data, overrides))
    from raft_diffusion.recipe import train as run_recipe

    run_dir = run_recipe(config, resume=resume, overwrite=overwrite, quiet=quiet)
    return Run.open(run_dir.root, config)
