"""The denoising objective of the UNet families (SD 1.x/2.x, SDXL): the model's own target (epsilon,
v or the sample) at ``add_noise(x0, noise, t)``, min-SNR weighting and timestep bias optional, as
diffusers' text-to-image training scripts define them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raft_diffusion.adapters.diffusion.settings import DDPMSettings
from raft_diffusion.core.config import ConfigError


class DDPMObjective:
    section = "ddpm"

    def __init__(self, scheduler_config, settings: DDPMSettings | None):
        from diffusers import DDPMScheduler

        self.settings = settings or DDPMSettings()
        # Training noise follows the model's own schedule (its scheduler config), whatever the sampler.
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        self.weights = timestep_weights(self.settings, self.scheduler.config.num_train_timesteps)

    def draw(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """``b`` training timesteps (long), uniform or biased."""
        if self.weights is None:
            return torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)
        return torch.multinomial(self.weights, b, replacement=True, generator=generator)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B]: mean squared error to the model's target, min-SNR-weighted with ``snr_gamma`` > 0."""
        from diffusers.training_utils import compute_snr

        kind = self.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:  # sample
            target = x0
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
        gamma = self.settings.snr_gamma
        if gamma > 0:  # Min-SNR (Hang et al. 2023), as in diffusers' train_text_to_image.py
            snr = compute_snr(self.scheduler, t)
            weights = torch.clamp(snr, max=gamma)
            weights = weights / snr if kind == "epsilon" else weights / (snr + 1) if kind == "v_prediction" else weights
            loss = loss * weights
        return loss


def timestep_weights(settings: DDPMSettings, num_timesteps: int) -> torch.Tensor | None:
    """Relative draw weights of the training timesteps under ``timestep_bias_*`` (None: uniform).

    The semantics of diffusers' SDXL text-to-image training script (``--timestep_bias_strategy``),
    whose helper lives in its examples, not in the library.
    """
    strategy = settings.timestep_bias_strategy
    if strategy == "none" or settings.timestep_bias_multiplier == 1.0:
        return None
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    if strategy == "range":
        begin, end = settings.timestep_bias_begin, min(settings.timestep_bias_end, num_timesteps)
        if begin >= end:
            raise ConfigError(f"diffusion.ddpm.timestep_bias_begin {begin} is not below the model's {num_timesteps} timesteps")
        biased = slice(begin, end)
    else:
        n = max(1, int(settings.timestep_bias_portion * num_timesteps))
        biased = slice(num_timesteps - n, None) if strategy == "later" else slice(0, n)
    weights[biased] *= settings.timestep_bias_multiplier
    if weights.sum() == 0:
        raise ConfigError("diffusion.ddpm.timestep_bias_*: every timestep has weight 0 (a multiplier of 0 over all of them)")
    return weights / weights.sum()
