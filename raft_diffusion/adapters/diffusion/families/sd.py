"""Stable Diffusion 1.x/2.x: one CLIP text encoder, whose last hidden states are the UNet's only condition."""

from __future__ import annotations

from raft_diffusion.adapters.diffusion.families.base import Family, token_ids


class StableDiffusionFamily(Family):
    name = "Stable Diffusion 1.x/2.x"
    pipelines = ("StableDiffusionPipeline",)
    id_keys = ("input_ids",)

    def encode(self, prompts, device, settings):
        """The pipeline's own ``encode_prompt``: ``prompt_embeds`` [P, 77, D]."""
        return {"prompt_embeds": self.pipe.encode_prompt(prompts, device, 1, False)[0]}

    def token_ids(self, prompts):
        return {"input_ids": token_ids(self.pipe.tokenizer, prompts)}

    def embed_ids(self, ids, text_encoders, device):
        """What :meth:`encode` computes, from token ids through ``text_encoders`` (trainable or
        DDP-wrapped ones included; with grad if enabled)."""
        return {"prompt_embeds": text_encoders[0](ids["input_ids"].to(device))[0]}

    def size_multiple(self):
        return self.vae_scale_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def unet_kwargs(self, cond: dict) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"]}

    def predict(self, denoiser, x, t, cond, guidance=None):
        return denoiser(x, t, **self.unet_kwargs(cond), return_dict=False)[0]

