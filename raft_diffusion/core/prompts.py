"""Prompt sources: inline lists, text and JSONL files, built-in sets; and the per-stage draw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raft_diffusion.core import plugins
from raft_diffusion.core.errors import UserError

# The paper's SD-1.5 experiment prompts with the ten CIFAR-10 class names.
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# DDPO's 45 common animals (ddpo-pytorch assets/simple_animals.txt).
SIMPLE_ANIMALS = """cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox
wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose
bee pig turkey fly llama camel bat gorilla hedgehog kangaroo""".split()


class PromptError(UserError):
    """A prompt source that cannot be used (one-line message)."""


# The prompt sets this module holds; others (the demo worlds', a user's) are plug-ins of kind
# "prompts": a function of no arguments returning a list of strings (see core/plugins.py).
BUILTIN = {
    "cifar10": lambda: list(CIFAR10),
    "simple_animals": lambda: list(SIMPLE_ANIMALS),
}


def builtin_prompts(name: str, what: str = "prompts") -> list[str]:
    """A built-in or plug-in prompt set by name."""
    if name in BUILTIN:
        return BUILTIN[name]()
    if name not in plugins.names("prompts") and not plugins.is_target(name):
        import difflib

        known = [*BUILTIN, *plugins.names("prompts")]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (available: {', '.join(known)})"
        raise PromptError(f"{what}: unknown built-in prompt set {name!r}{hint}")
    try:
        source = plugins.find("prompts", name)
    except plugins.PluginError as err:
        raise PromptError(f"{what}: {err}") from None
    prompts = list(source() if callable(source) else source)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PromptError(f"{what}: prompt set {name!r} is not a non-empty list of strings")
    return prompts


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (blank lines and ``#`` comments skipped), or JSONL with a ``prompt`` field."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptError(f"prompt file {path} is not UTF-8 text (bad byte at offset {err.start})") from None
    prompts = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise PromptError(f"{path}:{lineno}: not a JSON object") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise PromptError(f"{path}:{lineno}: needs a string field 'prompt'")
            prompts.append(record["prompt"])
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                prompts.append(line)
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts")
    return prompts


def _source(items: list[str], file: str | None, builtin: str | None, what: str) -> list[str]:
    if items:
        return list(items)
    if file:
        return read_prompt_file(file)
    if builtin:
        return builtin_prompts(builtin, what)
    return []


def load_prompts(cfg) -> tuple[list[str], list[str]]:
    """Training and held-out prompts of a ``PromptsConfig``."""
    train = _source(cfg.items, cfg.file, cfg.builtin, "prompts")
    if not train:
        raise PromptError("prompts: no prompts configured (set prompts.items, prompts.file or prompts.builtin)")
    held_out = _source(cfg.eval_items, cfg.eval_file, cfg.eval_builtin, "prompts.eval")
    return train, held_out


def stage_prompts(prompts: list[str], n: int, seed: int, stage: int, shuffle: bool = True) -> list[str]:
    """The ``n`` prompts of stage ``stage`` (from 1): a pure function of (seed, stage), so a resumed run draws the same.

    Prompts are taken in epochs: each pass over the prompt list is a fresh seeded permutation
    (or the plain order without ``shuffle``), so every prompt is seen equally often.
    """
    start = (stage - 1) * n  # stages count from 1
    out = []
    for position in range(start, start + n):
        epoch, index = divmod(position, len(prompts))
        if shuffle:
            order = np.random.default_rng([seed, 7919, epoch]).permutation(len(prompts))
            index = int(order[index])
        out.append(prompts[index])
    return out
