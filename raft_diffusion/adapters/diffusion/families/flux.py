"""FLUX.1 (dev and schnell): a transformer over latents packed 2x2 into tokens, with rotary position
ids for image and text tokens, conditioned on T5 hidden states and the pooled CLIP embedding;
rectified-flow objective. Dev embeds the guidance scale (no classifier-free guidance); schnell
has no guidance at all."""

from __future__ import annotations

import numpy as np
import torch

from raft_diffusion.adapters.diffusion.families.base import FlowTransformerFamily


class FluxFamily(FlowTransformerFamily):
    name = "FLUX.1"
    pipelines = ("FluxPipeline",)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    default_guidance = 3.5
    classifier_free_guidance = False

    @property
    def embedded_guidance(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    def encode(self, prompts, device, settings):
        """``encode_prompt``: T5 ``prompt_embeds`` [P, tokens, D] and CLIP ``pooled_prompt_embeds`` [P, D2]
        (the text position ids are zeros, rebuilt at each call)."""
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                                    max_sequence_length=settings.max_sequence_length or 512)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def default_size(self):
        return self.pipe.default_sample_size * self.vae_scale_factor

    def size_multiple(self):
        return self.vae_scale_factor * 2  # latents are packed 2x2

    def latent_channels(self):
        return self.denoiser.config.in_channels // 4

    def prepare_latents(self, n, height, width, device, generators):
        """The stock pipeline's draw (unpacked shape, then packed), unpacked again: the same numbers."""
        packed, _ = self.pipe.prepare_latents(n, self.latent_channels(), height, width, torch.float32, device, generators)
        return self.pipe._unpack_latents(packed, height, width, self.vae_scale_factor)

    def set_timesteps(self, scheduler, steps, latent_size, device):
        """The stock pipeline's schedule: sigmas from 1 to 1/steps, shifted by the image's token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler.config
        seq_len = (latent_size[0] // 2) * (latent_size[1] // 2)
        mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sigmas = None if c.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(steps, device=device, sigmas=sigmas, mu=mu)

    def predict(self, denoiser, x, t, cond, guidance=None):
        b, c, h, w = x.shape
        packed = self.pipe._pack_latents(x, b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        embeds = cond["prompt_embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype)
        timestep = (t.expand(b) if t.dim() == 0 else t).to(x.dtype) / 1000
        if self.embedded_guidance:
            guidance = torch.full([b], self.default_guidance if guidance is None else guidance, device=x.device, dtype=torch.float32)
        else:
            guidance = None
        out = denoiser(hidden_states=packed, timestep=timestep, guidance=guidance, pooled_projections=cond["pooled_prompt_embeds"],
                       encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return self.pipe._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor)
