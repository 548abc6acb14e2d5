"""What every model family provides the diffusion adapter: loading details, prompt encoding, the
denoiser call, latent layout, the VAE's scale and shift, default LoRA targets and export names.

A family wraps one loaded diffusers pipeline. Conditioning travels as a dict of batched tensors:
``embed_keys`` come from the text encoders (``id_keys``, their token ids, are kept instead when a
text-encoder LoRA trains; empty: the family has none), ``size_keys`` from the image size alone.
Latents are kept in the VAE's layout [B, C, h, w] everywhere; a family that packs them for its
denoiser (FLUX) does so inside :meth:`Family.predict`.
"""

from __future__ import annotations

import torch

ATTENTION_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # as in diffusers' LoRA scripts
# An MMDiT's attention of both streams: the image's and the prompt's context branch.
MMDIT_LORA_TARGETS = ATTENTION_LORA_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class Family:
    name = ""  # how messages name the family
    pipelines: tuple[str, ...] = ()  # model_index.json _class_name values it runs
    objective = "ddpm"  # ddpm | flow: the training objective (objectives/)
    denoiser_name = "unet"  # the pipeline attribute, and save_lora_weights' <name>_lora_layers keyword
    lora_targets = ATTENTION_LORA_TARGETS
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    embed_keys: tuple[str, ...] = ("prompt_embeds",)
    id_keys: tuple[str, ...] = ()
    size_keys: tuple[str, ...] = ()
    zeros_for_empty_prompt = False  # unconditional side of guidance: the encoded "" (not zeros)
    classifier_free_guidance = True  # samples with classifier-free guidance (and a negative prompt)
    embedded_guidance = False  # the guidance scale is a denoiser input (FLUX.1-dev)
    default_steps = 50  # the stock pipeline's __call__ defaults
    default_guidance = 7.5
    default_scheduler = "ddim"  # None: the folder's own
    uses_t5 = False  # diffusion.max_sequence_length means something

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, name) for name in self.text_encoder_names if getattr(self.pipe, name, None) is not None]

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    # Prompts ------------------------------------------------------------------------------------

    def encode(self, prompts: list[str], device, settings) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def token_ids(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def embed_ids(self, ids: dict, text_encoders: list, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def size_conditioning(self, height: int, width: int) -> dict[str, torch.Tensor]:
        return {}

    def text_encoder_lora_targets(self, name: str) -> list[str]:
        return TEXT_ENCODER_LORA_TARGETS

    # Images and latents -------------------------------------------------------------------------

    def default_size(self) -> int:
        """The pipeline's default height and width in pixels."""
        return self.denoiser.config.sample_size * self.vae_scale_factor

    def size_multiple(self) -> int:
        raise NotImplementedError

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def prepare_latents(self, n: int, height: int, width: int, device, generators: list) -> torch.Tensor:
        """Initial latents [n, C, h, w] float32, as the stock pipeline draws them from the generators."""
        return self.pipe.prepare_latents(n, self.latent_channels(), height, width, torch.float32, device, generators)

    def set_timesteps(self, scheduler, steps: int, latent_size: tuple[int, int], device) -> None:
        """The sampler's schedule for ``steps`` steps at latents of ``latent_size`` (h, w), as the stock pipeline sets it."""
        scheduler.set_timesteps(steps, device=device)

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents in the VAE decoder's units: undo the scale (and shift) training applied."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        shift = vae.config.get("shift_factor")
        return latents + shift if shift is not None else latents

    # The denoiser -------------------------------------------------------------------------------

    def predict(self, denoiser, x: torch.Tensor, t, cond: dict, guidance: float | None = None) -> torch.Tensor:
        """The denoiser's output for latents ``x`` [B, C, h, w] at scheduler timestep ``t`` (a scalar or
        [B]), conditioned on ``cond`` (batched, in the model dtype)."""
        raise NotImplementedError


class FlowTransformerFamily(Family):
    """What SD3 and FLUX.1 share: a transformer trained with rectified flow, sampled with the folder's
    own flow-matching scheduler, conditioned on per-token and pooled prompt embeddings, with a T5."""

    objective = "flow"
    denoiser_name = "transformer"
    lora_targets = MMDIT_LORA_TARGETS
    embed_keys = ("prompt_embeds", "pooled_prompt_embeds")
    default_steps = 28
    default_scheduler = None
    uses_t5 = True
