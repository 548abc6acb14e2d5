"""CLIP score: how well an image matches its prompt, ``100 * max(cos(image, text), 0)``."""

from __future__ import annotations

from typing import Any

import torch

from aesthetic.loading import ClipImageEmbedder, load_clip


class CLIPScore(ClipImageEmbedder):
    """Prompt-image similarity on an open_clip model, on the usual CLIPScore scale [0, 100].

    Args:
        clip_model, preprocess: from ``open_clip.create_model_and_transforms``.
        tokenizer: the model's tokenizer (``open_clip.get_tokenizer(model_name)``).
        device, dtype, batch_size: as for :class:`aesthetic.AestheticPredictor`.
    """

    def __init__(self, clip_model, preprocess, tokenizer, device=None, dtype=None, batch_size: int = 64):
        super().__init__(clip_model, preprocess, device=device, dtype=dtype, batch_size=batch_size)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls, clip: str = "ViT-L-14", pretrained: str | None = "openai", device=None, dtype=None, batch_size: int = 64,
        local_files_only: bool | None = None,
    ) -> "CLIPScore":
        """Load a CLIP by open_clip name, model-config ``.json`` path or ``local-dir:`` folder (see ``load_clip``)."""
        import open_clip

        model, preprocess, name = load_clip(clip, pretrained, local_files_only)
        return cls(model, preprocess, open_clip.get_tokenizer(name), device=device, dtype=dtype, batch_size=batch_size)

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, float32 ``[N, embed_dim]`` on ``self.device``."""
        chunks = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[i : i + self.batch_size])).to(self.device)
            features = self.clip_model.encode_text(tokens).float()
            chunks.append(features / features.norm(dim=-1, keepdim=True))
        if not chunks:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(chunks)

    @torch.no_grad()
    def score(self, images: Any, prompts: list[str]) -> torch.Tensor:
        """One score per (image, prompt) pair, float32 ``[N]`` on the CPU."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        image_embeds = self.embed(images)
        if len(prompts) != len(image_embeds):
            raise ValueError(
                f"CLIP score needs one prompt per image, got {len(prompts)} prompts for {len(image_embeds)} images"
            )
        cosine = (image_embeds * self.embed_text(prompts)).sum(dim=-1)
        return (100.0 * cosine.clamp(min=0)).cpu()

    __call__ = score
