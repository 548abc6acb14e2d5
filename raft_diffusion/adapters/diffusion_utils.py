"""Loading a Stable Diffusion pipeline and LoRA folders, with one-line errors, and RNG state that
``torch.load(weights_only=True)`` reads back: the plumbing under :mod:`raft_diffusion.adapters.diffusion`."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from raft_diffusion.assets import resolve

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


class ModelNotFoundError(FileNotFoundError):
    """The pipeline folder or hub id could not be loaded (one line: what was looked for, what to do)."""


class LoraError(ValueError):
    """A LoRA folder that is missing or does not fit the model."""


# ---------------------------------------------------------------------------------------------
# Loading


def scheduler_class(name: str):
    """The diffusers scheduler class for a short name (``ddim``, ``dpm++`` ...) or a class name."""
    import diffusers

    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(
            f"model.scheduler: unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or a diffusers class name"
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


def load_pipeline(model, dtype: torch.dtype = torch.float32):
    """``StableDiffusionPipeline`` for a ``ModelConfig``, on the CPU, with the sampler of ``model.scheduler``.

    ``model.pretrained`` is a local folder, a hub id (from the local cache only when offline) or
    ``demo:NAME``. Anything that cannot be loaded raises :class:`ModelNotFoundError` in one line.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    sampler_cls = scheduler_class(model.scheduler)  # refuse a bad name before loading anything
    name = resolve(model.pretrained)
    kwargs = dict(dtype=dtype, revision=model.revision, variant=model.variant)
    if not model.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if model.vae:
        kwargs["vae"] = AutoencoderKL.from_pretrained(_local_or_hub(resolve(model.vae), "model.vae"), dtype=dtype)
    name = _local_or_hub(name, "model.pretrained")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        if Path(name).is_dir():  # a real folder that fails to load: let the real error through
            raise
        raise ModelNotFoundError(
            f"model.pretrained={model.pretrained!r}: no such folder, and the hub id could not be loaded from the "
            f"Hugging Face hub or its local cache ({type(err).__name__}); download the pipeline where there is network "
            f"and pass model.pretrained=/path/to/folder"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = sampler_cls.from_config(pipe.scheduler.config)
    return pipe


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
    r"^(unet|text_encoder)\.(.+)\.(lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)\.weight$"
)


def read_lora(path: str) -> tuple[str, str, dict]:
    """(folder, weight file name, state dict with diffusers keys prefixed ``unet.`` / ``text_encoder.``)
    of an exported LoRA folder (or its ``.safetensors`` file)."""
    from diffusers import StableDiffusionPipeline

    local = Path(resolve(path)).expanduser()
    if not local.exists():
        raise LoraError(f"LoRA folder {path!r} not found")
    folder, weight_name = (local.parent, local.name) if local.is_file() else (local, LORA_WEIGHTS)
    if not (folder / weight_name).is_file():
        raise LoraError(f"{path!r} holds no {LORA_WEIGHTS} (not a LoRA exported in diffusers format)")
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=weight_name)
    return str(folder), weight_name, state_dict


def check_lora_fits(pipe, state_dict: dict, where: str) -> bool:
    """Refuse, in one line, a LoRA made for another model; returns whether it adapts the text encoder."""
    has_text_encoder = False
    for key, tensor in state_dict.items():
        if key.endswith(".alpha"):
            continue
        match = _LORA_KEY.match(key)
        if match is None:
            raise LoraError(f"{where}: unexpected key {key!r} (not a Stable Diffusion LoRA in diffusers format)")
        component, name, kind = match.groups()
        if component == "text_encoder":
            has_text_encoder = True
            name = name.removeprefix("text_model.")  # transformers 5 flattened CLIPTextModel
        try:
            module = getattr(pipe, component).get_submodule(name)
        except AttributeError:
            raise LoraError(f"{where} was made for another model: this {component} has no module {name!r}") from None
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


def load_lora(pipe, path: str) -> bool:
    """Load an exported LoRA folder into ``pipe`` as adapter ``default`` (checked first); returns
    whether it has text-encoder layers. Rank, alpha and targets come from the folder."""
    folder, weight_name, state_dict = read_lora(path)
    has_text_encoder = check_lora_fits(pipe, state_dict, f"LoRA {path!r}")
    # From the folder, not the state dict: the file's metadata carries lora_alpha.
    pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name="default")
    return has_text_encoder


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


# ---------------------------------------------------------------------------------------------
# RNG state, stored as tensors so that torch.load(weights_only=True) reads it back


def rng_state(train_generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "train_generator": train_generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gauss": float(np_state[4]),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_version": int(py_version),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict, train_generator: torch.Generator) -> None:
    train_generator.set_state(state["train_generator"])
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_cached_gauss"]))
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
