"""Image rewards: LAION aesthetic score, CLIP score, JPEG (in)compressibility, brightness.

Each takes the generated images (PIL, RGB) and their prompts and returns float32 ``[N]``.
The CLIP-based rewards load their model once, on ``load()`` (which ``train`` and ``score`` call
before any image is made) or on first use; string arguments written ``demo:NAME`` name packaged
demo assets.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from aesthetic.loading import as_pil_images, parse_dtype
from raft_diffusion.assets import resolve
from raft_diffusion.core.protocols import RewardError
from raft_diffusion.hub import hub_reachable, local_files_only, no_hub_reason


def _resolve(value):
    return resolve(value) if isinstance(value, str) else value


DEMO_CLIP = "demo"  # clip: demo names the packaged demo CLIP (and, for aesthetic, its head)
DEMO_CLIP_CONFIG, DEMO_CLIP_WEIGHTS = "demo-clip.json", "open_clip_model.safetensors"


class _ClipReward:
    """Holds the arguments of a CLIP-based scorer and builds it on the first call."""

    name = "clip"

    def __init__(self, clip, pretrained, batch_size, dtype, device):
        # Bad arguments and missing demo assets fail when the reward is built, not mid-run.
        parse_dtype(dtype, device or "cpu")
        if int(batch_size) < 1:
            raise RewardError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.demo = clip == DEMO_CLIP
        if self.demo:  # the packaged folder: an open_clip model config (named for its file) and weights
            folder = resolve("demo:clip")
            clip, pretrained = f"{folder}/{DEMO_CLIP_CONFIG}", f"{folder}/{DEMO_CLIP_WEIGHTS}"
        self.kwargs = dict(
            clip=clip, pretrained=_resolve(pretrained), device=device, dtype=dtype, batch_size=int(batch_size)
        )
        self._scorer = None

    def build(self, local_files_only: bool):
        raise NotImplementedError

    def load(self) -> None:
        """Load the CLIP (and head) now: a run calls this before its first sample, so that weights
        that are not on this machine end it at once rather than after a round of generation."""
        _ = self.scorer

    @property
    def scorer(self):
        if self._scorer is None:
            from aesthetic.loading import WeightsNotFoundError

            try:
                # Tagged weights from the local cache alone when the hub cannot be reached (no retries);
                # the demo CLIP is a local folder and needs no hub at all.
                self._scorer = self.build(local_files_only=self.demo or local_files_only())
            except WeightsNotFoundError as err:
                if hub_reachable():
                    raise
                raise WeightsNotFoundError(f"{err.problem} ({no_hub_reason()})", err.fix) from None
        return self._scorer


class AestheticReward(_ClipReward):
    """LAION aesthetic score (AVA scale 1-10). Defaults: OpenAI CLIP ViT-L/14 and the LAION head."""

    name = "aesthetic"

    def __init__(self, clip="ViT-L-14", pretrained="openai", head=None, batch_size=64, dtype=None, device=None):
        super().__init__(clip, pretrained, batch_size, dtype, device)
        self.head = _resolve(head if head is not None or not self.demo else "demo:aesthetic_head.pth")

    def build(self, local_files_only: bool):
        from aesthetic.predictor import AestheticPredictor

        return AestheticPredictor.from_pretrained(head=self.head, local_files_only=local_files_only, **self.kwargs)

    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor:
        return self.scorer.score(outputs)


class ClipScoreReward(_ClipReward):
    """CLIP score ``100 * max(cos(image, prompt), 0)``."""

    name = "clip_score"

    def __init__(self, clip="ViT-L-14", pretrained="openai", batch_size=64, dtype=None, device=None):
        super().__init__(clip, pretrained, batch_size, dtype, device)

    def build(self, local_files_only: bool):
        from aesthetic.clip_score import CLIPScore

        return CLIPScore.from_pretrained(local_files_only=local_files_only, **self.kwargs)

    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor:
        return self.scorer.score(outputs, prompts)


def jpeg_size_kb(images) -> torch.Tensor:
    """Size of each image saved as JPEG at quality 95, in kB (DDPO's compressibility measure)."""
    sizes = []
    for image in as_pil_images(images):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility():
    """Negative JPEG size in kB: smaller files (simpler images) score higher."""
    return lambda outputs, prompts: -jpeg_size_kb(outputs)


def jpeg_incompressibility():
    """JPEG size in kB: larger files (more detailed images) score higher."""
    return lambda outputs, prompts: jpeg_size_kb(outputs)


def brightness():
    """Mean pixel value in [0, 1] over all RGB channels."""

    def score(outputs, prompts):
        means = [np.asarray(image.convert("RGB"), dtype=np.float32).mean() / 255.0 for image in as_pil_images(outputs)]
        return torch.tensor(means, dtype=torch.float32)

    return score
