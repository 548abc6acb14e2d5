"""Loading open_clip models and turning images into normalised CLIP image embeddings.

Shared by :class:`aesthetic.AestheticPredictor` and :class:`aesthetic.CLIPScore`. A CLIP is named
by an open_clip model name (``"ViT-L-14"``), a path to an open_clip model-config JSON file (the
model name is the file stem), or a model folder as open_clip names one (``"local-dir:/path"``,
``"hf-hub:org/repo"``). Weights come from an open_clip pretrained tag (``"openai"``), which must
already be in the local cache when there is no network, or from a local checkpoint file.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


class AestheticError(ValueError):
    """The base of every error bad input to this package causes (a name, a file, a setting)."""


class WeightsNotFoundError(AestheticError, FileNotFoundError):
    """CLIP weights are neither in the local cache nor a local file (and cannot be downloaded).

    ``problem`` says what is missing; ``fix`` holds the arguments that would load local files
    instead (e.g. ``{"pretrained": "/path/to/open_clip_pytorch_model.bin"}``), for a command line
    to write in its own syntax.
    """

    def __init__(self, problem: str, fix: dict[str, str] | None = None):
        self.problem, self.fix = problem, dict(fix or {})
        advice = ", ".join(f"{k}={v!r}" for k, v in self.fix.items())
        super().__init__(f"{problem}; pass local files instead: {advice}" if advice else problem)


class ClipConfigError(AestheticError):
    """A CLIP model name, config file or checkpoint that cannot be used."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """``None`` means fp16 on CUDA and fp32 elsewhere; strings like ``"bf16"`` or ``"float32"`` name a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if torch.device(device or default_device()).type == "cuda" else torch.float32
    if str(dtype).lower() not in _DTYPES:
        raise ClipConfigError(f"unknown dtype {dtype!r} (use one of {', '.join(_DTYPES)})")
    return _DTYPES[str(dtype).lower()]


def register_model_config(path: str | Path, name: str | None = None) -> str:
    """Register an open_clip model-config JSON with open_clip under ``name`` (default: the file stem)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ClipConfigError(f"cannot read CLIP model config {path} ({type(err).__name__}: {err})") from None
    if not isinstance(cfg, dict) or not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ClipConfigError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    import open_clip

    name = name or path.stem
    if open_clip.get_model_config(name) == cfg:
        return name
    if path.stem != name:
        # open_clip names a config after its file, so a config filed under another name is
        # registered through a copy named for the model.
        path = Path(tempfile.mkdtemp(prefix="open_clip_config_")) / f"{name}.json"
        path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


def resolve_clip(clip: str, pretrained: str | None) -> tuple[str, str | None]:
    """Map ``clip``/``pretrained`` to an open_clip model name and a tag or checkpoint path."""
    clip = str(clip)
    if clip.endswith(".json"):
        if not os.path.isfile(clip):
            raise ClipConfigError(f"CLIP model config {clip} not found")
        return register_model_config(clip), pretrained
    return clip, pretrained


def load_clip(clip: str = "ViT-L-14", pretrained: str | None = "openai",
              local_files_only: bool | None = None) -> tuple[nn.Module, Any, str]:
    """Build an open_clip model and its validation transform, on the CPU in fp32.

    Returns ``(model, preprocess, model_name)``. ``pretrained`` is an open_clip tag, a local
    checkpoint (``.bin``, ``.pt``, ``.safetensors``) or ``None`` for random weights; with
    a ``local-dir:``/``hf-hub:`` folder its own weights are used and ``pretrained`` is ignored.
    ``local_files_only``: read tagged weights from the local cache only, never the hub (default:
    ``HF_HUB_OFFLINE``); a caller that knows the hub cannot be reached passes True.
    OpenAI weights from a local file need the ``-quickgelu`` model (``ViT-L-14-quickgelu``): a file
    does not say which activation it was trained with.
    """
    import open_clip  # imported on use: slow to import, and the CLIP-free image rewards use this module too

    if local_files_only is None:
        from huggingface_hub import constants

        local_files_only = constants.HF_HUB_OFFLINE
    name, pretrained = resolve_clip(clip, pretrained)
    if name.startswith("hf-hub:"):
        name = _hub_model_dir(name, local_files_only)
    if name.startswith("local-dir:"):
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name)
        except (OSError, RuntimeError, ValueError) as err:
            raise WeightsNotFoundError(f"cannot load CLIP {name!r} ({err})", {"clip": "local-dir:/path/to/folder"}) from None
        return model.eval(), preprocess, name
    if open_clip.get_model_config(name) is None:
        raise ClipConfigError(
            f"unknown CLIP model {clip!r}: not an open_clip model name, a model-config .json file or a local-dir: folder"
        )
    quick_gelu, preprocess = False, {}
    if pretrained:
        pretrained = str(pretrained)
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if tag_cfg:
            # A tag knows how its weights were trained (OpenAI CLIPs use QuickGELU) and preprocessed;
            # a bare file does not, so the tag's settings go along with the file it resolves to.
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
            preprocess = {f"image_{k}": tag_cfg[k] for k in _TAG_PREPROCESS_KEYS if tag_cfg.get(k) is not None}
            pretrained = _tag_weights(name, pretrained, tag_cfg, local_files_only)
        elif not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(name)
            known = f"known tags: {', '.join(tags)}" if tags else "no known tags"
            raise WeightsNotFoundError(
                f"CLIP weights {pretrained!r} for {name}: no such file and not an open_clip tag ({known})"
            )
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, force_quick_gelu=quick_gelu, **preprocess
        )
    except RuntimeError as err:  # a checkpoint that does not fit the architecture
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClipConfigError(f"CLIP weights {pretrained} do not fit model {name}: {first_line}") from None
    return model.eval(), transform, name


# The preprocessing a tag's config may set, as create_model_and_transforms takes it (image_<key>).
_TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _tag_weights(name: str, tag: str, tag_cfg: dict, local_files_only: bool) -> str:
    """The local file of an open_clip tag's weights: from the Hugging Face cache, else downloaded.

    Found in the cache, the file is used without asking the hub; missing, it is downloaded unless
    ``local_files_only`` (the caller knows the hub cannot be reached), so that without network the
    error comes at once instead of after retries.
    """
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    hub_file = tag_cfg.get("hf_hub", "")
    if hub_file and open_clip.pretrained.has_hf_hub():
        # open_clip's convention: "org/repo/" (its default file name) or "org/repo/file"; it prefers
        # a .safetensors twin of a pickle file.
        repo_id, filename = os.path.split(hub_file)
        filename = filename or open_clip.constants.HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == open_clip.constants.HF_WEIGHTS_NAME:
            candidates.insert(0, open_clip.constants.HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for candidate in candidates:
            cached = try_to_load_from_cache(repo_id, candidate)
            if isinstance(cached, str):
                return cached
    fix = {"pretrained": "/path/to/open_clip_pytorch_model.bin"}
    if tag_cfg.get("quick_gelu") and f"{name}-quickgelu" in open_clip.list_models():
        fix = {"clip": f"{name}-quickgelu", **fix}  # a bare file does not say it needs QuickGELU
    if hub_file and local_files_only:
        raise WeightsNotFoundError(f"CLIP weights {name}/{tag} are not in the local cache", fix)
    try:
        return open_clip.download_pretrained(tag_cfg)
    except Exception as err:  # any download failure means the same to the user: the file is not here
        raise WeightsNotFoundError(f"CLIP weights {name}/{tag} cannot be downloaded ({type(err).__name__})", fix) from None


def _hub_model_dir(name: str, local_files_only: bool) -> str:
    """``hf-hub:org/repo`` as ``local-dir:`` of its cached snapshot with ``local_files_only`` (no retries)."""
    from huggingface_hub import try_to_load_from_cache

    if not local_files_only:
        return name
    repo_id = name.removeprefix("hf-hub:")
    config = try_to_load_from_cache(repo_id, "open_clip_config.json")
    if not isinstance(config, str):
        raise WeightsNotFoundError(
            f"CLIP {name!r} is not in the local cache", {"clip": "local-dir:/path/to/folder"}
        )
    return f"local-dir:{os.path.dirname(config)}"


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):  # CHW, float in [0, 1] or uint8
        if image.ndim != 3:
            raise ValueError(f"expected a CHW image tensor, got shape {tuple(image.shape)}")
        image = image.detach().to("cpu").permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):  # HWC or HW, uint8 or float in [0, 1]
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.floating):
                raise ValueError(f"expected uint8 or float pixels, got {image.dtype}")
            image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"expected an HWC image with 1, 3 or 4 channels, got shape {image.shape}")
        return Image.fromarray(image)
    raise ValueError(f"cannot read an image from {type(image).__name__}")


def as_pil_images(images: Any) -> list[Image.Image]:
    """PIL images from PIL images, uint8 HWC arrays, float CHW tensors in [0, 1], or NCHW/NHWC batches."""
    if isinstance(images, Image.Image):
        raise ValueError("expected a list of images, got a single PIL image")
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim != 4:
        raise ValueError(f"expected a batch of images (NCHW tensor or NHWC array), got shape {tuple(images.shape)}")
    return [_to_pil(image) for image in images]


def clip_embed_dim(clip_model: nn.Module) -> int:
    """Width of the model's image embedding."""
    dim = getattr(getattr(clip_model, "visual", None), "output_dim", None)
    if dim is None:  # towers without the attribute (timm): ask the model
        size = getattr(clip_model.visual, "image_size", 224)
        size = size if isinstance(size, (tuple, list)) else (size, size)
        param = next(clip_model.parameters())
        with torch.no_grad():
            dim = clip_model.encode_image(torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)).shape[-1]
    return int(dim)


class ClipImageEmbedder:
    """A CLIP image tower with its preprocessing: images in, L2-normalised embeddings out.

    The model is moved and cast in place: to ``device`` (default: CUDA when available) and
    ``dtype`` (default: fp16 on CUDA, fp32 on the CPU). Embeddings are returned in fp32.
    """

    def __init__(self, clip_model: nn.Module, preprocess, device=None, dtype=None, batch_size: int = 64):
        if int(batch_size) < 1:
            raise ClipConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = parse_dtype(dtype, self.device)
        self.clip_model = clip_model.to(self.device, self.dtype).eval()
        self.preprocess = preprocess
        self.batch_size = int(batch_size)
        self.embed_dim = clip_embed_dim(self.clip_model)

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        # PIL resizing releases the GIL, so a few threads keep preprocessing off the critical path.
        if len(images) >= 8:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                pixels = list(pool.map(self.preprocess, images))
        else:
            pixels = [self.preprocess(image) for image in images]
        return torch.stack(pixels).to(self.device, self.dtype, non_blocking=True)

    def batches(self, images: Any) -> Sequence[list[Image.Image]]:
        pil = as_pil_images(images)
        return [pil[i : i + self.batch_size] for i in range(0, len(pil), self.batch_size)]

    @torch.no_grad()
    def embed_batch(self, images: list[Image.Image]) -> torch.Tensor:
        features = self.clip_model.encode_image(self._pixels(images)).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def embed(self, images: Any) -> torch.Tensor:
        """L2-normalised image embeddings, float32 ``[N, embed_dim]`` on ``self.device``."""
        chunks = [self.embed_batch(batch) for batch in self.batches(images)]
        if not chunks:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(chunks)
