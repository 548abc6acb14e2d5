"""Stable Diffusion 3 / 3.5: an MMDiT transformer over 2x2-patched latents, conditioned on the
concatenated hidden states of two CLIP encoders and a T5 (zeros where the folder has no T5) and on
their pooled embeddings; rectified-flow objective, classifier-free guidance."""

from __future__ import annotations

from raft_diffusion.adapters.diffusion.families.base import FlowTransformerFamily


class StableDiffusion3Family(FlowTransformerFamily):
    name = "Stable Diffusion 3"
    pipelines = ("StableDiffusion3Pipeline",)
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_guidance = 7.0

    def encode(self, prompts, device, settings):
        """``encode_prompt``: ``prompt_embeds`` [P, 77 + T5 tokens, D] and ``pooled_prompt_embeds`` [P, D2]."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=settings.max_sequence_length or 256,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def size_multiple(self):
        return self.vae_scale_factor * self.denoiser.config.patch_size

    def set_timesteps(self, scheduler, steps, latent_size, device):
        """The stock pipeline's schedule: the folder's shift, or a resolution-dependent one where the
        scheduler shifts dynamically (SD3.5)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            patch = self.denoiser.config.patch_size
            seq_len = (latent_size[0] // patch) * (latent_size[1] // patch)
            c = scheduler.config
            kwargs["mu"] = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, device=device, **kwargs)

    def predict(self, denoiser, x, t, cond, guidance=None):
        timestep = t.expand(x.shape[0]) if t.dim() == 0 else t
        return denoiser(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
