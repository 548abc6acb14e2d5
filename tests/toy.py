"""A model-library-free adapter for testing the loop: the policy is a Gaussian N(mu, sigma^2)
with a learnable mean, and fine-tuning is maximum likelihood on the chosen samples."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raft_diffusion.core.protocols import Candidate
from raft_diffusion.core import dist
from raft_diffusion.core.scores import FunctionReward, WeightedReward


class GaussianAdapter:
    def __init__(self, mu: float = 0.0, sigma: float = 1.0, lr: float = 1.0, steps: int = 1):
        self.mu = torch.nn.Parameter(torch.tensor(float(mu), dtype=torch.float64))
        self.sigma = sigma
        self.steps = steps
        # SGD with lr 1 on 0.5 * mean((x - mu)^2) lands exactly on the sample mean: the MLE.
        self.optimizer = torch.optim.SGD([self.mu], lr=lr, momentum=0.5)
        self.generated = 0

    def generate(self, prompts, k, seeds):
        assert len(seeds) == len(prompts) * k
        out = []
        for i, seed in enumerate(seeds):
            noise = torch.randn((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            x = float(self.mu.detach() + self.sigma * noise)
            out.append(Candidate(prompt=prompts[i // k], seed=seed, output=x, payload={"x": torch.tensor(x, dtype=torch.float64)}))
        self.generated += len(out)
        return out

    def finetune(self, chosen):
        xs = torch.stack([c.payload["x"] for c in chosen])
        for _ in range(self.steps):
            self.optimizer.zero_grad()
            loss = 0.5 * ((xs - self.mu) ** 2).mean()
            loss.backward()
            self.optimizer.step()
        return {"loss": float(loss.detach())}

    def log_ratio(self, candidates):
        # log N(x; mu, s) - log N(x; 0, s): the policy against a reference centred at 0
        x = torch.tensor([c.output for c in candidates], dtype=torch.float64)
        mu = float(self.mu.detach())
        return ((x**2 - (x - mu) ** 2) / (2 * self.sigma**2)).float()

    def save(self, path):
        path = Path(path)
        if dist.is_main():
            torch.save({"mu": self.mu.detach().clone(), "optimizer": self.optimizer.state_dict()}, path / "toy.pt")

    def load(self, path):
        state = torch.load(Path(path) / "toy.pt", weights_only=True)
        with torch.no_grad():
            self.mu.copy_(state["mu"])
        self.optimizer.load_state_dict(state["optimizer"])

    def export(self, path):
        (Path(path) / "mu.json").write_text(json.dumps({"mu": float(self.mu.detach())}))


def reward_of(fn, name="toy") -> WeightedReward:
    return WeightedReward([(name, 1.0, FunctionReward(fn, name))])


def toy_config(tmp_path, **overrides):
    from raft_diffusion.core.config import from_dict

    data = {
        "run": {"name": "toy", "output_dir": str(tmp_path), "stages": 3, "seed": 0, "save_images": False},
        "sampling": {"k": 4, "prompts_per_stage": 8},
        "selection": {"strategy": "local", "keep": 0.25},
        "train": {"steps_per_stage": 1},
        "prompts": {"items": [f"p{i}" for i in range(8)], "eval_items": ["e0", "e1"]},
        "eval": {"every": 1, "k": 4},
        "log": {"report": False, "tensorboard": False},
        "rewards": [{"target": "tests.toy:negative_distance"}],
    }
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return from_dict(data)


def negative_distance(outputs, prompts, target: float = 3.0):
    return [-abs(x - target) for x in outputs]


def near(outputs, prompts, target: float = 1.2):
    """An eval-only 'gold' that peaks on the way: RAFT toward 3 passes it, then over-shoots it."""
    return [-abs(x - target) for x in outputs]


def big_up(outputs, prompts):
    """x on a scale a thousand times larger: summed as it is, it drowns any reward on a unit scale."""
    return [1000.0 * x for x in outputs]


def small_down(outputs, prompts):
    return [-x for x in outputs]
