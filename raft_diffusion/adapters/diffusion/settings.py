"""The ``diffusion:`` config section: settings of the diffusion adapter, for every model family.

Keys that belong to one training objective live in their own sub-section (``diffusion.ddpm`` for the
UNet families, ``diffusion.flow`` for the flow-matching transformers); the adapter refuses, in one
line naming the family, a sub-section or a setting that means nothing for the model it loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from raft_diffusion.core.config import ConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DDPMSettings:
    """The denoising objective of SD 1.x/2.x and SDXL: epsilon or v target (the model's own)."""

    snr_gamma: float = 0.0  # min-SNR weighting gamma (0: off; 5 is the usual value)
    # Which noise levels fine-tuning draws, as diffusers' SDXL training script biases them: a share of
    # the timesteps (the noisiest with `later`, the cleanest with `earlier`, [begin, end) with `range`)
    # is drawn `multiplier` times as often as the rest (0: never); `none` draws uniformly.
    timestep_bias_strategy: str = "none"  # none | later | earlier | range
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25  # later/earlier: the share of the timesteps biased
    timestep_bias_begin: int = 0  # range: first biased timestep
    timestep_bias_end: int = 1000  # range: one past the last

    def __post_init__(self):
        strategies = ("none", "later", "earlier", "range")
        _check(self.timestep_bias_strategy in strategies,
               f"diffusion.ddpm.timestep_bias_strategy: {self.timestep_bias_strategy!r} is not one of {', '.join(strategies)}")
        _check(self.snr_gamma >= 0, f"diffusion.ddpm.snr_gamma must be >= 0, got {self.snr_gamma}")
        _check(self.timestep_bias_multiplier >= 0,
               f"diffusion.ddpm.timestep_bias_multiplier must be >= 0, got {self.timestep_bias_multiplier}")
        _check(0.0 < self.timestep_bias_portion <= 1.0,
               f"diffusion.ddpm.timestep_bias_portion must be in (0, 1], got {self.timestep_bias_portion}")
        _check(0 <= self.timestep_bias_begin < self.timestep_bias_end,
               "diffusion.ddpm.timestep_bias_begin must be >= 0 and below timestep_bias_end, "
               f"got {self.timestep_bias_begin} and {self.timestep_bias_end}")


# diffusers.training_utils.compute_density_for_timestep_sampling draws logit_normal and mode; the
# other schemes draw uniformly and weight the loss (compute_loss_weighting_for_sd3).
WEIGHTING_SCHEMES = ("logit_normal", "uniform", "mode", "cosmap", "sigma_sqrt")


@dataclass
class FlowSettings:
    """The rectified-flow objective of SD3/SD3.5 and FLUX.1, as diffusers' SD3 and FLUX LoRA training
    scripts define it: velocity target ``noise - x0`` at ``x_t = (1 - sigma) x0 + sigma noise``."""

    weighting_scheme: str = "logit_normal"  # logit_normal | uniform | mode | cosmap | sigma_sqrt
    # logit_normal: the mean of the normal draw. As in diffusers' scripts the draw indexes the schedule
    # from its noisiest level, so a negative mean draws mostly the noisier levels (the opposite sign of
    # the SD3 paper's t): -1.0 puts sigma between 0.50 and 0.88 within one std at shift 1.
    logit_mean: float = 0.0
    logit_std: float = 1.0  # logit_normal: its standard deviation
    mode_scale: float = 1.29  # mode: the scale of the mode-sampling density
    precondition: bool = False  # SD3's preconditioning: loss on x0 = x_t - sigma * v instead of v

    def __post_init__(self):
        _check(self.weighting_scheme in WEIGHTING_SCHEMES,
               f"diffusion.flow.weighting_scheme: {self.weighting_scheme!r} is not one of {', '.join(WEIGHTING_SCHEMES)}")
        _check(self.logit_std > 0 and math.isfinite(self.logit_std), f"diffusion.flow.logit_std must be > 0, got {self.logit_std}")


@dataclass
class DiffusionSettings:
    # Loading
    scheduler: Optional[str] = None  # sampler: ddim | ddpm | dpm++ | euler | euler_a | pndm | unipc | pretrained (the
    # folder's own) or a diffusers class name; None: ddim for the UNet families, the folder's own flow-matching one otherwise
    safety_checker: bool = False  # SD 1.x/2.x: load and run the pipeline's safety checker
    vae: Optional[str] = None  # a separate VAE folder/id (e.g. an fp16-safe SDXL VAE)
    text_encoder_lora: bool = False  # also put a LoRA on the CLIP text encoder(s) (SD 1.x/2.x, SDXL)
    offload_text_encoders: bool = False  # keep the text encoders on the CPU, on the accelerator only while
    # they encode prompts (once per prompt and stage): SD3's and FLUX's T5-XXL is 9.5 GB in bfloat16
    # Sampling, as the stock pipeline's __call__ takes it
    steps: Optional[int] = None  # denoising steps; None: the pipeline's default (SD/SDXL 50, SD3/FLUX 28)
    guidance_scale: Optional[float] = None  # classifier-free guidance (1: off, half the cost); FLUX.1-dev: the
    # distilled guidance its transformer embeds; None: the pipeline's default (SD 7.5, SDXL 5, SD3 7, FLUX 3.5)
    guidance_rescale: float = 0.0  # rescale the guided prediction toward the conditional one's std (0: off;
    # Lin et al. 2023, the stock pipelines' guidance_rescale: against over-exposure, suggested 0.7)
    eta: float = 0.0  # DDIM eta (0: deterministic; > 0 needed for log_ratio)
    height: Optional[int] = None  # pixels; None: the model's default
    width: Optional[int] = None
    negative_prompt: str = ""
    max_sequence_length: Optional[int] = None  # T5 tokens per prompt (SD3 256, FLUX 512 by default)
    compile: bool = False  # torch.compile the denoiser for sampling (static shapes)
    fuse_lora: bool = True  # sample with the LoRA folded into float32 weights, as diffusers' fuse_lora does
    # (faster, most of all with LoRA on convolutions; costs a copy of the targeted weights while sampling;
    # 16-bit weights always sample unfused: the sum would round small LoRA updates away)
    # Fine-tuning, every family
    caption_dropout: float = 0.0  # probability of training a sample on the empty prompt (keeps CFG working)
    guided_loss: bool = False  # the loss on the guided prediction sampling uses (uncond + w * (cond - uncond)),
    # as DDPO trains; twice the denoiser passes
    # The training objective's own settings; give only the one of the loaded model's family
    ddpm: Optional[DDPMSettings] = None  # SD 1.x/2.x, SDXL
    flow: Optional[FlowSettings] = None  # SD3/SD3.5, FLUX.1

    def __post_init__(self):
        _check(self.steps is None or self.steps >= 1, f"diffusion.steps must be >= 1, got {self.steps}")
        _check(self.guidance_scale is None or self.guidance_scale >= 0,
               f"diffusion.guidance_scale must be >= 0, got {self.guidance_scale}")
        _check(0.0 <= self.guidance_rescale <= 1.0, f"diffusion.guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
        _check(0.0 <= self.eta <= 1.0, f"diffusion.eta must be in [0, 1], got {self.eta}")
        for dim in ("height", "width"):
            value = getattr(self, dim)
            _check(value is None or (value >= 8 and value % 8 == 0), f"diffusion.{dim} must be a multiple of 8, got {value}")
        _check(self.max_sequence_length is None or self.max_sequence_length >= 1,
               f"diffusion.max_sequence_length must be >= 1, got {self.max_sequence_length}")
        _check(0.0 <= self.caption_dropout < 1.0, f"diffusion.caption_dropout must be in [0, 1), got {self.caption_dropout}")
