"""The rectified-flow objective of SD3/SD3.5 and FLUX.1, as diffusers' SD3 and FLUX DreamBooth-LoRA
scripts train it: a noise level drawn by ``compute_density_for_timestep_sampling`` indexes the
model's own flow-matching schedule, ``x_t = (1 - sigma) x0 + sigma noise``, the denoiser predicts the
velocity ``noise - x0``, weighted by ``compute_loss_weighting_for_sd3`` (optionally preconditioned to
predict x0, as SD3's script can)."""

from __future__ import annotations

import torch

from raft_diffusion.adapters.diffusion.settings import FlowSettings


class FlowMatchingObjective:
    section = "flow"

    def __init__(self, scheduler_config, settings: FlowSettings | None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.settings = settings or FlowSettings()
        # A fresh copy of the folder's schedule, never set_timesteps'd: its timesteps and sigmas are
        # the training grid (the scripts' noise_scheduler_copy).
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def draw(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """``b`` indices into the schedule's training grid."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        s = self.settings
        u = compute_density_for_timestep_sampling(s.weighting_scheme, b, s.logit_mean, s.logit_std, s.mode_scale,
                                                  generator=generator)
        return (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.scheduler.timesteps) - 1)

    def sigmas(self, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = self.scheduler.sigmas[index.cpu()].to(like.device, torch.float32)
        return sigma.view(-1, *[1] * (like.dim() - 1))

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas(index, x0)
        return (1.0 - sigma) * x0 + sigma * noise

    def model_timestep(self, index: torch.Tensor) -> torch.Tensor:
        return self.scheduler.timesteps[index.cpu()]

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigma = self.sigmas(index, x0)
        pred = pred.float()
        if self.settings.precondition:
            pred, target = pred * (-sigma) + noisy.float(), x0.float()
        else:
            target = noise.float() - x0.float()
        weighting = compute_loss_weighting_for_sd3(self.settings.weighting_scheme, sigma)
        return (weighting.float() * (pred - target) ** 2).reshape(len(pred), -1).mean(dim=1)
