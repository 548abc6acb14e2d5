"""The LAION "improved aesthetic predictor": a CLIP image embedding scored by a small MLP head.

The head is an affine map in practice (no activations) from the L2-normalised CLIP image
embedding to a score on the AVA 1-10 scale. The released head
(``sac+logos+ava1-l14-linearMSE.pth``, for OpenAI CLIP ViT-L/14) ships with this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from aesthetic.loading import AestheticError, ClipImageEmbedder, load_clip

DEFAULT_HEAD = Path(__file__).resolve().parent / "weights" / "sac+logos+ava1-l14-linearMSE.pth"
HEAD_LINEARS = (0, 2, 4, 6, 7)  # positions of the Linear layers in AestheticHead.layers


class HeadError(AestheticError):
    """An aesthetic head that cannot be loaded or does not fit the CLIP model."""


class AestheticHead(nn.Module):
    """``Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear``; state-dict keys match LAION's."""

    def __init__(self, widths: tuple[int, ...] = (768, 1024, 128, 64, 16)):
        super().__init__()
        d_in, h1, h2, h3, h4 = widths
        self.layers = nn.Sequential(
            nn.Linear(d_in, h1),
            nn.Dropout(0.2),
            nn.Linear(h1, h2),
            nn.Dropout(0.2),
            nn.Linear(h2, h3),
            nn.Dropout(0.1),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def _expected_shapes(embed_dim: int, widths: list[int]) -> str:
    dims = [embed_dim, *widths, 1]
    return ", ".join(f"layers.{i}.weight [{dims[j + 1]}, {dims[j]}]" for j, i in enumerate(HEAD_LINEARS))


def head_from_state_dict(state_dict: dict, embed_dim: int, source: str = "<state dict>") -> AestheticHead:
    """Build an :class:`AestheticHead` whose widths are read from ``state_dict``; checks it fits ``embed_dim``."""
    expected_keys = {f"layers.{i}.{kind}" for i in HEAD_LINEARS for kind in ("weight", "bias")}
    if not isinstance(state_dict, dict) or set(state_dict) != expected_keys or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        got = sorted(state_dict)[:6] if isinstance(state_dict, dict) else type(state_dict).__name__
        raise HeadError(
            f"aesthetic head {source} is not an MLP head state dict: expected keys "
            f"layers.{{0,2,4,6,7}}.{{weight,bias}} ({_expected_shapes(embed_dim, [1024, 128, 64, 16])}), got {got}"
        )
    weights = [state_dict[f"layers.{i}.weight"] for i in HEAD_LINEARS]
    hidden = [int(w.shape[0]) for w in weights[:-1]] if all(w.ndim == 2 for w in weights) else [1024, 128, 64, 16]
    dims = [embed_dim, *hidden, 1]
    fits = all(
        tuple(w.shape) == (dims[j + 1], dims[j]) and tuple(state_dict[f"layers.{i}.bias"].shape) == (dims[j + 1],)
        for j, (i, w) in enumerate(zip(HEAD_LINEARS, weights))
    )
    if not fits:
        got = ", ".join(f"layers.{i}.weight {list(w.shape)}" for i, w in zip(HEAD_LINEARS, weights))
        raise HeadError(
            f"aesthetic head {source} does not fit a CLIP with embed dim {embed_dim}: "
            f"expected {_expected_shapes(embed_dim, hidden)}; got {got}"
        )
    head = AestheticHead(tuple(dims[:-1]))
    head.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return head


def load_head(head: str | Path | dict | nn.Module, embed_dim: int) -> nn.Module:
    """An aesthetic head from a ``.pth``/``.safetensors`` file, a state dict or a module."""
    if isinstance(head, nn.Module):
        device = next(head.parameters(), torch.zeros(0)).device
        try:
            with torch.no_grad():
                out = head.float().eval()(torch.zeros(2, embed_dim, device=device))
        except RuntimeError as err:
            raise HeadError(f"aesthetic head module does not accept [N, {embed_dim}] embeddings ({err})") from None
        if out.numel() != 2:
            raise HeadError(f"aesthetic head module must return one score per embedding, got shape {tuple(out.shape)}")
        return head
    if isinstance(head, dict):
        return head_from_state_dict(head, embed_dim)
    path = Path(head)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors alike: the file is not a state dict
        raise HeadError(f"aesthetic head {path} is not a loadable state dict ({type(err).__name__})") from None
    return head_from_state_dict(state_dict, embed_dim, str(path))


class AestheticPredictor(ClipImageEmbedder):
    """Aesthetic score (AVA scale, about 1-10) of images: LAION's MLP head on normalised CLIP embeddings.

    Args:
        clip_model, preprocess: a model and its validation transform from
            ``open_clip.create_model_and_transforms``.
        head: a ``.pth`` or ``.safetensors`` file, a state dict or an ``nn.Module``; its widths are
            read from the state dict and its input must match the CLIP embedding width.
        device, dtype: where and in which precision the CLIP runs (default: CUDA in fp16 when
            available, else CPU in fp32); the head always runs in fp32.
        batch_size: images per CLIP forward pass.
    """

    def __init__(self, clip_model, preprocess, head, device=None, dtype=None, batch_size: int = 64):
        super().__init__(clip_model, preprocess, device=device, dtype=dtype, batch_size=batch_size)
        self.head = load_head(head, self.embed_dim).to(self.device, torch.float32).eval()

    @classmethod
    def from_pretrained(
        cls,
        clip: str = "ViT-L-14",
        pretrained: str | None = "openai",
        head: str | Path | dict | nn.Module | None = None,
        device=None,
        dtype=None,
        batch_size: int = 64,
        local_files_only: bool | None = None,
    ) -> "AestheticPredictor":
        """Load the CLIP (an open_clip name, model-config ``.json`` or ``local-dir:`` folder) and the head.

        ``head=None`` means the LAION head shipped with this package. Without network, tagged weights
        must be in the local cache (``local_files_only``: see :func:`aesthetic.load_clip`); otherwise
        pass a checkpoint: ``pretrained="/path/to/open_clip_pytorch_model.bin"``.
        """
        if head is None:
            head = DEFAULT_HEAD
        model, preprocess, _ = load_clip(clip, pretrained, local_files_only)
        return cls(model, preprocess, head, device=device, dtype=dtype, batch_size=batch_size)

    @torch.no_grad()
    def score(self, images: Any) -> torch.Tensor:
        """Aesthetic scores, float32 ``[N]`` on the CPU.

        ``images``: PIL images, uint8 HWC arrays, or float tensors in [0, 1] (NCHW or a list of CHW).
        """
        scores = [self.head(self.embed_batch(batch)).reshape(-1) for batch in self.batches(images)]
        if not scores:
            return torch.zeros(0)
        return torch.cat(scores).float().cpu()

    __call__ = score
