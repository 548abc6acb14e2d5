"""The diffusion adapter: model families (:mod:`.families`), training objectives (:mod:`.objectives`),
its config section (:mod:`.settings`), loading (:mod:`.loading`) and the adapter (:mod:`.adapter`)."""

from raft_diffusion.adapters.diffusion.adapter import DiffusionAdapter
from raft_diffusion.adapters.diffusion.families import Family, register_family
from raft_diffusion.adapters.diffusion.loading import LoraError, ModelNotFoundError, UnsupportedModelError, load_lora, load_pipeline
from raft_diffusion.adapters.diffusion.settings import DiffusionSettings

__all__ = ["DiffusionAdapter", "DiffusionSettings", "Family", "LoraError", "ModelNotFoundError", "UnsupportedModelError",
           "load_lora", "load_pipeline", "register_family"]
