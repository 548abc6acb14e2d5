"""The human-preference rewards the field reports: PickScore, HPSv2/HPSv2.1 and ImageReward.

Each is named by hub ids or local files, loaded on ``load()`` (which ``train`` and ``score`` call
before any image is made) or on first use, and scores batches on its device in its dtype (default:
fp16 on CUDA, fp32 on the CPU; the small heads run in fp32). Without network, hub files are read
from the local cache only, and a missing one fails at once with the argument that names local files.

* ``pickscore``: a transformers ``CLIPModel`` (``yuvalkirstain/PickScore_v1``) with the processor of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; ``logit_scale.exp() * cos(image, text)`` as the model
  card computes it (about 18-24 on real images).
* ``hpsv2``: an open_clip model with the HPS state dict (``xswu/HPSv2``); the cosine of the image
  and text features (about 0.2-0.35), on the hpsv2 package's own validation preprocessing.
* ``image_reward``: ImageReward v1.0, see :mod:`raft_diffusion.rewards.image_reward`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from aesthetic.loading import ClipConfigError, WeightsNotFoundError, as_pil_images, default_device, parse_dtype
from raft_diffusion.assets import resolve
from raft_diffusion.core.protocols import RewardError
from raft_diffusion.hub import hub_reachable, local_files_only, no_hub_reason

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the CLIP normalisation hpsv2 and ImageReward use
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _why_not_found() -> str:
    return f"is not in the Hugging Face cache ({no_hub_reason()})" if not hub_reachable() else (
        "could not be downloaded from the Hugging Face hub")


def hub_file(value: str | None, repo_id: str, filename: str, arg: str, local_only: bool) -> str:
    """A local file: ``value`` itself, or (``value`` None) ``repo_id/filename`` from the hub cache or hub."""
    if value is not None:
        path = Path(resolve(str(value))).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"{arg} {path} not found", {arg: "/path/to/" + (path.name or filename)})
        return str(path)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, local_files_only=local_only)
    except Exception:  # missing from the cache, no network, a gated repo: the file is not here either way
        raise WeightsNotFoundError(f"{repo_id}/{filename} {_why_not_found()}", {arg: f"/path/to/{filename}"}) from None


def hub_pretrained(cls, value: str, arg: str, local_only: bool, **kwargs):
    """``cls.from_pretrained`` of a local folder or hub id, missing files as :class:`WeightsNotFoundError`."""
    path = Path(resolve(str(value))).expanduser()
    if path.is_dir():
        try:
            return cls.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as err:  # a folder without the files this class reads
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ClipConfigError(f"{arg} folder {path} cannot be loaded as {cls.__name__}: {first}") from None
    if path.is_absolute() or str(value).startswith((".", "~")) or str(value).count("/") > 1:
        raise WeightsNotFoundError(f"{arg} folder {path} does not exist", {arg: "/path/to/folder"})
    try:
        return cls.from_pretrained(str(value), local_files_only=local_only, **kwargs)
    except OSError:
        raise WeightsNotFoundError(f"{arg} {value!r} is not a local folder and {_why_not_found()}",
                                   {arg: "/path/to/folder"}) from None


def load_all(loaders: dict):
    """Call every loader; when files are missing, one error that names them all (and all the overrides)."""
    loaded, missing = {}, []
    for name, load in loaders.items():
        try:
            loaded[name] = load()
        except WeightsNotFoundError as err:
            missing.append(err)
    if missing:
        raise WeightsNotFoundError("; ".join(err.problem for err in missing), {k: v for err in missing for k, v in err.fix.items()})
    return loaded


def load_state_dict_file(path: str) -> dict:
    """A checkpoint file's contents: safetensors, or a torch pickle read with ``weights_only``."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors alike: not a loadable checkpoint
        raise ClipConfigError(f"{path} is not a loadable checkpoint ({type(err).__name__}: {err})") from None


def features(output) -> torch.Tensor:
    """transformers 5.x returns ``get_*_features`` as a model output whose ``pooler_output`` holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ModelReward:
    """A reward backed by a model that is built once, on ``load()`` or the first call.

    Subclasses implement ``build(local_only) -> scorer`` and ``score_batch(images, prompts) -> [n]``.
    """

    name = "model"

    def __init__(self, batch_size: int = 32, dtype=None, device=None):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = parse_dtype(dtype, self.device)  # a bad dtype fails when the reward is built
        if int(batch_size) < 1:
            raise RewardError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self._scorer = None

    def build(self, local_only: bool):
        raise NotImplementedError

    def load(self) -> None:
        """Load the model now: a run calls this before its first sample, so that weights that are
        not on this machine end it at once rather than after a round of generation."""
        _ = self.scorer

    @property
    def scorer(self):
        if self._scorer is None:
            self._scorer = self.build(local_files_only())
        return self._scorer

    def score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor:
        images = [image.convert("RGB") for image in as_pil_images(outputs)]
        prompts = [prompts] * len(images) if isinstance(prompts, str) else [str(p) for p in prompts]
        if len(prompts) != len(images):
            raise RewardError(f"{self.name} needs one prompt per image, got {len(prompts)} prompts for {len(images)} images")
        scores = [self.score_batch(images[i : i + self.batch_size], prompts[i : i + self.batch_size]).float().cpu()
                  for i in range(0, len(images), self.batch_size)]
        return torch.cat(scores) if scores else torch.zeros(0)


class PickScoreReward(ModelReward):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image, prompt)`` of a CLIP fine-tuned
    on Pick-a-Pic preferences. ``model`` and ``processor``: hub ids or local folders."""

    name = "pickscore"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, batch_size: int = 32,
                 dtype=None, device=None):
        super().__init__(batch_size, dtype, device)
        self.model, self.processor = str(model), str(processor)

    def build(self, local_only: bool):
        from transformers import AutoTokenizer, CLIPModel

        try:  # transformers 5 also has a torchvision image processor; the model card's was this, PIL's resize
            from transformers import CLIPImageProcessorPil as ImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor as ImageProcessor
        loaded = load_all({
            "model": lambda: hub_pretrained(CLIPModel, self.model, "model", local_only),
            "image_processor": lambda: hub_pretrained(ImageProcessor, self.processor, "processor", local_only),
        })
        tokenizer = hub_pretrained(AutoTokenizer, self.processor, "processor", local_only)
        return loaded["model"].to(self.device, self.dtype).eval(), loaded["image_processor"], tokenizer

    def score_batch(self, images, prompts):
        model, image_processor, tokenizer = self.scorer
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        image_embeds = F.normalize(features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        text_embeds = F.normalize(features(model.get_text_features(**text)).float(), dim=-1)
        return model.logit_scale.float().exp() * (image_embeds * text_embeds).sum(dim=-1)


def hps_transform(image_size: int):
    """The hpsv2 package's validation transform (1.2.0, ``image_transform(is_train=False)``): ``ToTensor``
    first, then a bicubic resize of the *tensor* (shorter side to ``image_size``; antialiased, as
    torchvision >= 0.17 does by default), a centre crop and the OpenAI normalisation. open_clip's own
    transform resizes the PIL image instead, which gives other pixels."""
    from torchvision import transforms as T

    return T.Compose([
        T.ToTensor(),
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(image_size),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


class HPSv2Reward(ModelReward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): an open_clip CLIP fine-tuned on HPD v2;
    the score is the cosine of the normalised image and prompt features.

    ``version``: ``v2.1`` (default) or ``v2.0``, the hub file of ``xswu/HPSv2`` to load; ``clip``: an
    open_clip model name or model-config JSON (default ``ViT-H-14``); ``checkpoint``: a local
    ``{"state_dict": ...}`` file instead of the hub's.
    """

    name = "hpsv2"

    def __init__(self, version: str = "v2.1", clip: str = "ViT-H-14", checkpoint: str | None = None,
                 batch_size: int = 32, dtype=None, device=None):
        super().__init__(batch_size, dtype, device)
        version = str(version) if str(version).startswith("v") else f"v{version}"
        if version not in HPS_FILES:
            raise RewardError(f"hpsv2: version must be one of {', '.join(HPS_FILES)}, got {version!r}")
        self.version, self.clip, self.checkpoint = version, str(clip), checkpoint

    def build(self, local_only: bool):
        import open_clip

        from aesthetic.loading import resolve_clip

        name, _ = resolve_clip(self.clip, None)
        if open_clip.get_model_config(name) is None:
            raise ClipConfigError(f"hpsv2: unknown CLIP model {self.clip!r}: not an open_clip model name or model-config .json")
        path = hub_file(self.checkpoint, HPS_REPO, HPS_FILES[self.version], "checkpoint", local_only)
        checkpoint = load_state_dict_file(path)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise ClipConfigError(f"hpsv2: {path} is not an HPS checkpoint (a dict with 'state_dict')")
        model = open_clip.create_model(name, device=self.device)  # random init on the device: fast for ViT-H
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ClipConfigError(f"hpsv2: {path} does not fit CLIP {name}: {first}") from None
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return model.to(self.device, self.dtype).eval(), hps_transform(int(size)), open_clip.get_tokenizer(name)

    def score_batch(self, images, prompts):
        model, preprocess, tokenizer = self.scorer
        pixels = torch.stack([preprocess(image) for image in images]).to(self.device, self.dtype)
        image_features = F.normalize(model.encode_image(pixels).float(), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(prompts).to(self.device)).float(), dim=-1)
        return (image_features * text_features).sum(dim=-1)




__all__ = ["HPSv2Reward", "ModelReward", "PickScoreReward", "hps_transform", "hub_file", "hub_pretrained"]
