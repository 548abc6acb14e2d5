"""SDXL: two CLIP text encoders, whose penultimate hidden states are concatenated; the UNet also takes
the pooled (projected) embedding of encoder 2 and six size ids (original size, crop top-left, target
size), as ``added_cond_kwargs``."""

from __future__ import annotations

import torch

from raft_diffusion.adapters.diffusion.families.base import TEXT_ENCODER_LORA_TARGETS, token_ids
from raft_diffusion.adapters.diffusion.families.sd import StableDiffusionFamily


class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "SDXL"
    pipelines = ("StableDiffusionXLPipeline",)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    embed_keys = ("prompt_embeds", "pooled_prompt_embeds")
    id_keys = ("input_ids", "input_ids_2")
    size_keys = ("add_time_ids",)
    default_guidance = 5.0

    @property
    def zeros_for_empty_prompt(self) -> bool:
        return bool(self.pipe.config.get("force_zeros_for_empty_prompt", True))

    def encode(self, prompts, device, settings):
        """``encode_prompt``: ``prompt_embeds`` [P, 77, D1 + D2] and ``pooled_prompt_embeds`` [P, D2]."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def token_ids(self, prompts):
        return {"input_ids": token_ids(self.pipe.tokenizer, prompts), "input_ids_2": token_ids(self.pipe.tokenizer_2, prompts)}

    def embed_ids(self, ids, text_encoders, device):
        out_1 = text_encoders[0](ids["input_ids"].to(device), output_hidden_states=True)
        out_2 = text_encoders[1](ids["input_ids_2"].to(device), output_hidden_states=True)
        embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": out_2.text_embeds}

    def size_conditioning(self, height, width):
        """``add_time_ids`` [1, 6] float32: (height, width) original and target size, crop (0, 0), as the
        stock pipeline's defaults."""
        projection_dim = self.pipe.text_encoder_2.config.projection_dim
        time_ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=torch.float32,
                                               text_encoder_projection_dim=projection_dim)
        return {"add_time_ids": time_ids}

    def unet_kwargs(self, cond):
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["add_time_ids"]}
        return {"encoder_hidden_states": cond["prompt_embeds"], "added_cond_kwargs": added}

    def text_encoder_lora_targets(self, name):
        if name == "text_encoder_2":
            return TEXT_ENCODER_LORA_TARGETS
        # Encoder 1 is read at its penultimate layer: a LoRA on its last layer would never get a
        # gradient (dead weights, and an error under DDP). Full module names leave that layer out.
        encoder = self.pipe.text_encoder
        last = f"layers.{encoder.config.num_hidden_layers - 1}."
        return [n for n, _ in encoder.named_modules() if n.rsplit(".", 1)[-1] in TEXT_ENCODER_LORA_TARGETS and last not in n]
