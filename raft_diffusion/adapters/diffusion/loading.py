"""Loading a diffusers pipeline folder of a supported family and exported LoRA folders, with one-line errors."""

from __future__ import annotations

import functools
import json
import logging
import re
import warnings
from pathlib import Path
from typing import NoReturn

import torch

from raft_diffusion.adapters.diffusion.families import Family, family_for, supported_pipelines
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
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class ModelNotFoundError(UserError, FileNotFoundError):
    """The pipeline folder or hub id could not be loaded (one line: what was looked for, what to do)."""


class LoraError(UserError):
    """A LoRA folder that is missing or does not fit the model."""


class UnsupportedModelError(UserError):
    """A diffusers folder of a pipeline class this adapter does not run, or a setting it lacks."""


# ---------------------------------------------------------------------------------------------
# Loading


PRETRAINED_SCHEDULER = "pretrained"  # diffusion.scheduler: the sampler the model folder ships with


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
            f"diffusion.scheduler: unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}, "
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


def load_pipeline(model, settings, dtype: torch.dtype = torch.float32) -> tuple[object, Family]:
    """The pipeline of a ``ModelConfig`` (per the folder's ``model_index.json``) on the CPU, with the sampler
    of ``settings.scheduler`` (``pretrained``: the folder's), and its :class:`Family`.

    ``model.pretrained`` is a local folder, a hub id (from the local cache only when offline) or
    ``demo:NAME``; ``settings.vae`` replaces the pipeline's VAE. Anything that cannot be loaded
    raises :class:`ModelNotFoundError` in one line.
    """
    import diffusers
    from diffusers import AutoencoderKL

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
    model_index = json.loads(index.read_text(encoding="utf-8"))
    class_name = model_index.get("_class_name")
    family = family_for(class_name)
    if family is None:
        raise UnsupportedModelError(
            f"model.pretrained={model.pretrained!r} is a {class_name} folder; "
            f"the diffusion adapter runs {', '.join(supported_pipelines())} folders"
        )
    scheduler_name = settings.scheduler or family.default_scheduler or PRETRAINED_SCHEDULER
    sampler_cls = scheduler_class(scheduler_name)  # refuse a bad name before loading weights
    if family.objective == "flow" and sampler_cls is not None and not sampler_cls.__name__.startswith("FlowMatch"):
        raise UnsupportedModelError(
            f"diffusion.scheduler={settings.scheduler!r} is not a flow-matching sampler; a {family.name} model samples "
            "with its folder's own (leave diffusion.scheduler unset) or a FlowMatch* diffusers class"
        )
    kwargs = {dtype_keyword(): dtype, "revision": model.revision, "variant": model.variant}
    # A component the folder saved as [null, null] (an SD3 folder without T5) is passed as None:
    # diffusers' from_pretrained refuses such a folder otherwise.
    kwargs.update({name: None for name, value in model_index.items()
                   if not name.startswith("_") and value in ([None, None], (None, None))})
    if class_name == "StableDiffusionPipeline":
        if not settings.safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
    elif settings.safety_checker:
        raise UnsupportedModelError(f"diffusion.safety_checker: {class_name} has no safety checker; set it to false")
    if class_name == "StableDiffusionXLPipeline":
        kwargs["add_watermarker"] = False  # we decode ourselves; rewards see the model's own pixels
    if settings.vae:
        vae = _local_or_hub(resolve(settings.vae), "diffusion.vae")
        try:
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae, **{dtype_keyword(): dtype}, local_files_only=local_files_only())
        except (OSError, ValueError) as err:
            _not_loaded("diffusion.vae", vae, err)
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as err:
        _not_loaded("model.pretrained", str(folder), err)
    pipe.set_progress_bar_config(disable=True)
    if sampler_cls is not None:
        pipe.scheduler = sampler_cls.from_config(pipe.scheduler.config)
    if class_name == "StableDiffusionXLPipeline":
        # SDXL's own VAE overflows in float16 (an fp16-safe one, e.g. madebyollin/sdxl-vae-fp16-fix, says so in its config).
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.vae.to(torch.float32)
        pipe.vae.enable_slicing()  # one image at a time: 1024-px activations take GBs per image
    return pipe, family(pipe)


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
    r"^(unet|transformer|text_encoder|text_encoder_2)\.(.+)\."
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
    out = (pipeline_cls or StableDiffusionPipeline).lora_state_dict(str(folder), weight_name=weight_name)
    state_dict = out[0] if isinstance(out, tuple) else out  # the UNet families also return network alphas
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
            raise LoraError(f"{where}: unexpected key {key!r} (not a LoRA in diffusers format)")
        component, name, kind = match.groups()
        has_text_encoder |= component.startswith("text_encoder")
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
    loaded = sum(1 for component in ("unet", "transformer", "text_encoder", "text_encoder_2") if getattr(pipe, component, None) is not None
                 for name, _ in getattr(pipe, component).named_parameters() if re.search(r"\.lora_[AB]\.default\.", name))
    if loaded != expected:
        raise LoraError(f"LoRA {path!r}: diffusers loaded {loaded} of its {expected} tensors (the file mixes key "
                        f"namings, e.g. lora.down/lora.up with lora_A/lora_B): write it in one naming (peft's lora_A/lora_B)")
    return has_text_encoder


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]
