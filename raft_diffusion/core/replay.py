"""The replay pool: what a stage fine-tunes on besides its own chosen candidates.

* **Replay**: the chosen candidates of the previous ``replay.stages`` stages, with the payloads
  they were generated with (no regeneration), capped at ``replay.max_samples`` by reward, so a
  stage's few chosen samples are not repeated over and over.
* **Anchors** (prior preservation, as in DreamBooth): ``replay.anchor_samples`` unselected
  candidates of stage 1, drawn by the starting model, make up ``replay.anchor_share`` of the
  training samples and are trained toward themselves, which holds the model near where it started.

The pool is saved with every checkpoint (``replay.safetensors`` + ``replay.json``), so a resumed
run trains on exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raft_diffusion.core.protocols import Candidate

TENSORS_FILE = "replay.safetensors"
INDEX_FILE = "replay.json"


@dataclass
class Entry:
    candidate: Candidate
    reward: float
    stage: int
    anchor: bool = False


class ReplayPool:
    def __init__(self, config, seed: int):
        self.config = config.replay
        self.seed = seed
        self.entries: list[Entry] = []

    @property
    def active(self) -> bool:
        return self.config.stages > 0 or self.config.anchor_share > 0

    @property
    def wants_anchors(self) -> bool:
        return self.config.anchor_share > 0 and not any(e.anchor for e in self.entries)

    def anchor_indices(self, n: int, stage: int) -> list[int]:
        """Which of a stage's ``n`` candidates (flat indices) become anchors: a seeded draw."""
        rng = np.random.default_rng([self.seed, 0xA7C4, stage])
        return sorted(rng.choice(n, size=min(n, self.config.anchor_samples), replace=False).tolist())

    def add_anchors(self, stage: int, candidates: list[Candidate], rewards: list[float]) -> None:
        self.entries += [Entry(c, r, stage, anchor=True) for c, r in zip(candidates, rewards)]

    def training_set(self, stage: int, chosen: list[Candidate], chosen_rewards: list[float]) -> tuple[list[Candidate], dict]:
        """This stage's chosen candidates, the replayed ones of earlier stages and the anchors, and
        what they are made of: ``n_trained_on``, ``n_replayed`` (targets from earlier stages) and
        ``reward_trained_mean`` (the mean reward of the targets, anchors left out)."""
        replayed = [e for e in self.entries if not e.anchor and stage - e.stage <= self.config.stages]
        targets = [Entry(c, r, stage) for c, r in zip(chosen, chosen_rewards)] + replayed
        if self.config.max_samples and len(targets) > self.config.max_samples:
            targets = sorted(targets, key=lambda e: -e.reward)[: self.config.max_samples]  # stable: newest first on ties
        out = [e.candidate for e in targets]
        stats = {"n_replayed": sum(e.stage < stage for e in targets),
                 "reward_trained_mean": float(np.mean([e.reward for e in targets]))}
        anchors = [e.candidate for e in self.entries if e.anchor]
        share = self.config.anchor_share
        if share > 0 and anchors:
            n = round(share / (1 - share) * len(out))
            rng = np.random.default_rng([self.seed, 0xA7C5, stage])
            picks = np.concatenate([rng.permutation(len(anchors)) for _ in range(-(-n // len(anchors)))])[:n]
            out += [anchors[int(i)] for i in picks]
        return out, {"n_trained_on": len(out), **stats}

    def update(self, stage: int, chosen: list[Candidate], chosen_rewards: list[float]) -> None:
        """Keep this stage's chosen candidates; forget what no later stage will replay."""
        if self.config.stages > 0:
            self.entries += [Entry(_light(c), r, stage) for c, r in zip(chosen, chosen_rewards)]
        self.entries = [e for e in self.entries if e.anchor or stage + 1 - e.stage <= self.config.stages]

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """The pool's payloads, each tensor once: candidates of one prompt share their conditioning
        (the same tensor object), and it is written once and shared again when loaded."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors, names, index = {}, {}, []
        for i, e in enumerate(self.entries):
            c = e.candidate
            refs = {}
            for key, value in c.payload.items():
                if id(value) not in names:
                    names[id(value)] = f"{i}/{key}"
                    tensors[names[id(value)]] = value.clone()  # a copy: safetensors refuses shared storage
                refs[key] = names[id(value)]
            index.append({"prompt": c.prompt, "seed": c.seed, "prompt_index": c.prompt_index, "k_index": c.k_index,
                          "reward": e.reward, "stage": e.stage, "anchor": e.anchor, "tensors": refs})
        save_file(tensors, str(path / TENSORS_FILE))
        (path / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{path}: no replay pool ({INDEX_FILE}); was it written with replay off?")
        tensors = load_file(str(path / TENSORS_FILE))
        self.entries = []
        for i, row in enumerate(json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))):
            # "keys": a pool written with one copy of every tensor per candidate
            refs = row.get("tensors") or {key: f"{i}/{key}" for key in row["keys"]}
            payload = {key: tensors[name] for key, name in refs.items()}
            cand = Candidate(row["prompt"], row["seed"], None, payload, row["prompt_index"], row["k_index"])
            self.entries.append(Entry(cand, row["reward"], row["stage"], row["anchor"]))


def _light(c: Candidate) -> Candidate:
    """The candidate without its output (an image or text: fine-tuning reads only the payload)."""
    return Candidate(c.prompt, c.seed, None, c.payload, c.prompt_index, c.k_index)
