"""Loading a Stable Diffusion (SD-1.x/2.x or SDXL) pipeline and LoRA folders, with one-line errors, and
the model families (what differs between SD and SDXL): the plumbing under :mod:`raft_diffusion.adapters.diffusion`."""

from __future__ import annotations

import functools
import json
import logging
import re
import warnings
from pathlib import Path
from typing import NoReturn

import torch

from raft_diffusion.assets import resolve
from raft_diffusion.core.errors import UserError
from raft_diffusion.hub import hub_reachable, local_files_only, no_hub_reason

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections, as in diffusers' LoRA scripts
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # model_index.json _class_name values we run


class ModelNotFoundError(UserError, FileNotFoundError):
    """The pipeline folder or hub id could not be loaded (one line: what was looked for, what to do)."""


class LoraError(UserError):
    """A LoRA folder that is missing or does not fit the model."""


class UnsupportedModelError(UserError):
    """A diffusers folder of a pipeline class this adapter does not run, or a setting it lacks."""


# ---------------------------------------------------------------------------------------------
# Loading


PRETRAINED_SCHEDULER = "pretrained"  # model.scheduler: the sampler the model folder ships with


def scheduler_class(name: str):
    """The diffusers scheduler class for a short name (``ddim``, ``dpm++`` ...) or a class name;
    ``None`` for ``pretrained``, the model folder's own."""
    import diffusers

    if name.lower() == PRETRAINED_SCHEDULER:
        return None
    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise UnsupportedModelError(
            f"model.scheduler: unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}, "
            f"{PRETRAINED_SCHEDULER} (the model's own) or a diffusers class name"
        )
    return cls


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs that support it, else float16 on GPUs; float32 on CPU."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


@functools.cache
def dtype_keyword() -> str:
    """The name under which diffusers' ``from_pretrained`` reads the weights' dtype: ``dtype`` from 0.40
    (which warns on ``torch_dtype``), ``torch_dtype`` before. Older releases drop an unknown keyword with a
    mere warning, so the wrong name would leave the weights in float32."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype"


def load_pipeline(model, dtype: torch.dtype = torch.float32):
    """``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (per the folder's ``model_index.json``)
    for a ``ModelConfig``, on the CPU, with the sampler of ``model.scheduler`` (``pretrained``: the folder's).

    ``model.pretrained`` is a local folder, a hub id (from the local cache only when offline) or
    ``demo:NAME``; ``model.vae`` replaces the pipeline's VAE. An SDXL VAE that overflows in float16
    (its config's ``force_upcast``, as diffusers' SDXL pipeline reads it) is kept in float32.
    Anything that cannot be loaded raises :class:`ModelNotFoundError` in one line.
    """
    import diffusers
    from diffusers import AutoencoderKL

    sampler_cls = scheduler_class(model.scheduler)  # refuse a bad name before loading anything
    name = _local_or_hub(resolve(model.pretrained), "model.pretrained")
    folder = Path(name)
    if not folder.is_dir():  # a hub id: the snapshot from_pretrained would fetch (only the cache when the hub is out of reach)
        try:
            folder = Path(diffusers.DiffusionPipeline.download(
                name, revision=model.revision, variant=model.variant, local_files_only=local_files_only()
            ))
        except (OSError, ValueError) as err:
            _not_loaded("model.pretrained", model.pretrained, err)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(
            f"model.pretrained={model.pretrained!r}: {folder} is not a diffusers pipeline folder (no model_index.json)"
        )
    class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    if class_name not in PIPELINES:
        raise UnsupportedModelError(
            f"model.pretrained={model.pretrained!r} is a {class_name} folder; "
            f"the diffusion adapter runs {' and '.join(PIPELINES)} folders"
        )
    xl = class_name == "StableDiffusionXLPipeline"
    kwargs = {dtype_keyword(): dtype, "revision": model.revision, "variant": model.variant}
    if xl:
        if model.safety_checker:
            raise UnsupportedModelError("model.safety_checker: StableDiffusionXLPipeline has no safety checker; set it to false")
        kwargs["add_watermarker"] = False  # we decode ourselves; rewards see the model's own pixels
    elif not model.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if model.vae:
        vae = _local_or_hub(resolve(model.vae), "model.vae")
        try:
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae, **{dtype_keyword(): dtype}, local_files_only=local_files_only())
        except (OSError, ValueError) as err:
            _not_loaded("model.vae", vae, err)
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as err:
        _not_loaded("model.pretrained", str(folder), err)
    pipe.set_progress_bar_config(disable=True)
    if sampler_cls is not None:
        pipe.scheduler = sampler_cls.from_config(pipe.scheduler.config)
    if xl:
        # SDXL's own VAE overflows in float16 (an fp16-safe one, e.g. madebyollin/sdxl-vae-fp16-fix, says so in its config).
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.vae.to(torch.float32)
        pipe.vae.enable_slicing()  # one image at a time: 1024-px activations take GBs per image
    return pipe


def _not_loaded(key: str, name: str, err: Exception) -> NoReturn:
    if Path(name).is_dir():  # a real folder that fails to load: let the real error through
        raise err
    if not hub_reachable():
        where = f"is not in the Hugging Face cache ({no_hub_reason()})"
    else:
        where = f"could not be loaded from the Hugging Face hub ({type(err).__name__})"
    raise ModelNotFoundError(
        f"{key}={name!r}: no such folder, and the hub id {where}; download it where there is network "
        f"(`hf download {name} --local-dir /path/to/folder`) and pass {key}=/path/to/folder"
    ) from None


def _local_or_hub(name: str, key: str) -> str:
    """A local pipeline/model folder, checked; anything that does not look like a path is left for the hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("model_index.json", "config.json")):
            raise ModelNotFoundError(f"{key}={name!r}: {path} is not a diffusers folder (no model_index.json/config.json)")
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or path.exists():
        raise ModelNotFoundError(
            f"{key}={name!r}: no such folder; pass {key}=/path/to/folder (a diffusers pipeline saved with save_pretrained)"
        )
    return name


_LORA_KEY = re.compile(
    r"^(unet|text_encoder|text_encoder_2)\.(.+)\."
    r"(lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)\.weight$"
)


def read_lora(path: str, pipeline_cls=None) -> tuple[str, str, dict]:
    """(folder, weight file name, state dict with diffusers keys prefixed ``unet.`` / ``text_encoder.`` /
    ``text_encoder_2.``) of an exported LoRA folder (or its ``.safetensors`` file), read by ``pipeline_cls``
    (default ``StableDiffusionPipeline``)."""
    from diffusers import StableDiffusionPipeline

    local = Path(resolve(path)).expanduser()
    if not local.exists():
        raise LoraError(f"LoRA folder {path!r} not found")
    folder, weight_name = (local.parent, local.name) if local.is_file() else (local, LORA_WEIGHTS)
    if not (folder / weight_name).is_file():
        raise LoraError(f"{path!r} holds no {LORA_WEIGHTS} (not a LoRA exported in diffusers format)")
    state_dict, _ = (pipeline_cls or StableDiffusionPipeline).lora_state_dict(str(folder), weight_name=weight_name)
    return str(folder), weight_name, state_dict


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``name`` in ``model``, with or without the ``text_model.`` prefix (transformers 5 flattened
    CLIPTextModel, not CLIPTextModelWithProjection)."""
    for candidate in (name, name.removeprefix("text_model."), f"text_model.{name}"):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise AttributeError(name)


def check_lora_fits(pipe, state_dict: dict, where: str) -> bool:
    """Refuse, in one line, a LoRA made for another model; returns whether it adapts a text encoder."""
    has_text_encoder = False
    for key, tensor in state_dict.items():
        if key.endswith(".alpha"):
            continue
        match = _LORA_KEY.match(key)
        if match is None:
            raise LoraError(f"{where}: unexpected key {key!r} (not a Stable Diffusion LoRA in diffusers format)")
        component, name, kind = match.groups()
        has_text_encoder |= component != "unet"
        try:
            module = _submodule(getattr(pipe, component, None) or torch.nn.Module(), name)
        except AttributeError:
            raise LoraError(f"{where} was made for another model: this pipeline has no {component}.{name}") from None
        base = getattr(module, "base_layer", module)
        is_down = kind.endswith("down") or kind == "lora_A"
        expected = getattr(base, "in_features" if is_down else "out_features", None)
        if expected is None:
            expected = getattr(base, "in_channels" if is_down else "out_channels", None)
        got = tensor.shape[1] if is_down else tensor.shape[0]
        if expected != got:
            raise LoraError(
                f"{where} was made for another model: {component}.{name} has {expected} "
                f"{'inputs' if is_down else 'outputs'} here, {got} in the LoRA"
            )
    return has_text_encoder


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# diffusers warns for each model a LoRA file has no keys for ("No LoRA keys associated to CLIPTextModel
# found ..."): for a UNet-only LoRA, on every load. check_lora_fits has already matched every key.
_NO_KEYS_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.peft")


def load_lora(pipe, path: str) -> bool:
    """Load an exported LoRA folder into ``pipe`` as adapter ``default`` (checked first); returns
    whether it has text-encoder layers. Rank, alpha and targets come from the folder."""
    folder, weight_name, state_dict = read_lora(path, type(pipe))
    has_text_encoder = check_lora_fits(pipe, state_dict, f"LoRA {path!r}")
    no_keys = _DropMessages("No LoRA keys associated to")
    loggers = [logging.getLogger(name) for name in _NO_KEYS_LOGGERS]
    for logger in loggers:
        logger.addFilter(no_keys)
    try:
        # From the folder, not the state dict: the file's metadata carries lora_alpha. The layers
        # diffusers drops come with a RuntimeWarning only; they are counted below instead.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="While injecting the PEFT adapters, an inconsistency")
            pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name="default")
    finally:
        for logger in loggers:
            logger.removeFilter(no_keys)
    expected = sum(1 for key in state_dict if not key.endswith(".alpha"))
    loaded = sum(1 for component in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, component, None) is not None
                 for name, _ in getattr(pipe, component).named_parameters() if re.search(r"\.lora_[AB]\.default\.", name))
    if loaded != expected:
        raise LoraError(f"LoRA {path!r}: diffusers loaded {loaded} of its {expected} tensors (the file mixes key "
                        f"namings, e.g. lora.down/lora.up with lora_A/lora_B): write it in one naming (peft's lora_A/lora_B)")
    return has_text_encoder


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


# ---------------------------------------------------------------------------------------------
# Model families: the few places where SD and SDXL differ


def model_family(pipe) -> "StableDiffusionFamily":
    """The family object for a loaded pipeline."""
    from diffusers import StableDiffusionXLPipeline

    return (StableDiffusionXLFamily if isinstance(pipe, StableDiffusionXLPipeline) else StableDiffusionFamily)(pipe)


def _token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class StableDiffusionFamily:
    """SD-1.x/2.x: one CLIP text encoder, whose last hidden states are the UNet's only condition.

    Conditioning travels as a dict of batched tensors: ``embed_keys`` come from the text encoders
    (``id_keys`` are their token ids, kept instead when a text-encoder LoRA trains), ``size_keys``
    from the image size alone. ``unet_kwargs`` turns such a dict into the UNet's keywords.
    """

    text_encoder_names = ("text_encoder",)
    embed_keys = ("prompt_embeds",)
    id_keys = ("input_ids",)
    size_keys = ()
    zeros_for_empty_prompt = False  # unconditional side of guidance: the encoded "" (not zeros)

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, name) for name in self.text_encoder_names]

    def encode(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        """The pipeline's own ``encode_prompt``: ``prompt_embeds`` [P, 77, D]."""
        return {"prompt_embeds": self.pipe.encode_prompt(prompts, device, 1, False)[0]}

    def token_ids(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": _token_ids(self.pipe.tokenizer, prompts)}

    def embed_ids(self, ids: dict, text_encoders: list, device) -> dict[str, torch.Tensor]:
        """What :meth:`encode` computes, from token ids through ``text_encoders`` (trainable or
        DDP-wrapped ones included; with grad if enabled)."""
        return {"prompt_embeds": text_encoders[0](ids["input_ids"].to(device))[0]}

    def size_conditioning(self, height: int, width: int) -> dict[str, torch.Tensor]:
        return {}

    def unet_kwargs(self, cond: dict) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"]}

    def text_encoder_lora_targets(self, name: str) -> list[str]:
        return TEXT_ENCODER_LORA_TARGETS


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP text encoders, whose penultimate hidden states are concatenated; the UNet also
    takes the pooled (projected) embedding of encoder 2 and six size ids (original size, crop
    top-left, target size), as ``added_cond_kwargs``."""

    text_encoder_names = ("text_encoder", "text_encoder_2")
    embed_keys = ("prompt_embeds", "pooled_prompt_embeds")
    id_keys = ("input_ids", "input_ids_2")
    size_keys = ("add_time_ids",)

    @property
    def zeros_for_empty_prompt(self) -> bool:
        return bool(self.pipe.config.get("force_zeros_for_empty_prompt", True))

    def encode(self, prompts, device):
        """``encode_prompt``: ``prompt_embeds`` [P, 77, D1 + D2] and ``pooled_prompt_embeds`` [P, D2]."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def token_ids(self, prompts):
        return {"input_ids": _token_ids(self.pipe.tokenizer, prompts), "input_ids_2": _token_ids(self.pipe.tokenizer_2, prompts)}

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

