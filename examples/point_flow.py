"""A third adapter, in about 30 lines: a flow-matching model of 2-D points, run by the same RAFT loop.

    raft-diffusion train --config examples/point_flow.yaml

Candidates are points drawn by integrating a small MLP velocity field from seeded Gaussian noise;
fine-tuning is the flow-matching (rectified flow) loss toward the chosen points. Nothing in
raft_diffusion/core knows this class: ``model.kind: examples.point_flow:PointFlowAdapter`` names it.
"""

import torch

from raft_diffusion.core.protocols import Candidate


class PointFlowAdapter:
    def __init__(self, config, accelerator):
        torch.manual_seed(config.run.seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.train.lr)
        self.steps, self.train_steps = config.model.args.get("euler_steps", 8), config.train.steps_per_stage

    def velocity(self, x, t):
        return self.net(torch.cat([x, t.expand(len(x), 1)], dim=1))

    @torch.no_grad()
    def generate(self, prompts, k, seeds):
        x = torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(s)) for s in seeds])
        for i in range(self.steps):  # Euler steps from noise (t = 0) to a sample (t = 1)
            x = x + self.velocity(x, torch.tensor([[i / self.steps]])) / self.steps
        return [Candidate(prompts[i // k], s, x[i].tolist(), {"x1": x[i]}) for i, s in enumerate(seeds)]

    def finetune(self, chosen):
        x1 = torch.stack([c.payload["x1"] for c in chosen])
        for _ in range(self.train_steps):  # regress the velocity onto the straight path noise -> chosen point
            x0, t = torch.randn_like(x1), torch.rand(len(x1), 1)
            loss = ((self.net(torch.cat([(1 - t) * x0 + t * x1, t], dim=1)) - (x1 - x0)) ** 2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return {"loss": loss.item(), "steps": self.train_steps}

    def save(self, path):
        torch.save({"net": self.net.state_dict(), "opt": self.opt.state_dict(), "rng": torch.get_rng_state()}, f"{path}/flow.pt")

    def load(self, path):
        state = torch.load(f"{path}/flow.pt", weights_only=True)
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])

    def export(self, path):
        torch.save(self.net.state_dict(), f"{path}/flow.pt")


def near_corner(points, prompts):
    """Reward: closeness to (2, 2)."""
    return [-((x - 2) ** 2 + (y - 2) ** 2) ** 0.5 for x, y in points]
