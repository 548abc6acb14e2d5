"""The model families the diffusion adapter runs, by the pipeline class a folder's model_index.json names.

A new family is one module with a :class:`Family` subclass, added with :func:`register_family`
(before the adapter loads a folder of its pipeline class); nothing else changes.
"""

from __future__ import annotations

from raft_diffusion.adapters.diffusion.families.base import Family
from raft_diffusion.adapters.diffusion.families.flux import FluxFamily
from raft_diffusion.adapters.diffusion.families.sd import StableDiffusionFamily
from raft_diffusion.adapters.diffusion.families.sd3 import StableDiffusion3Family
from raft_diffusion.adapters.diffusion.families.sdxl import StableDiffusionXLFamily

FAMILIES: list[type[Family]] = [StableDiffusionFamily, StableDiffusionXLFamily, StableDiffusion3Family, FluxFamily]


def register_family(family: type[Family]) -> type[Family]:
    """Run folders of ``family.pipelines`` with ``family`` (it wins over a built-in one); usable as a decorator."""
    FAMILIES.insert(0, family)
    return family


def family_for(pipeline_class: str) -> type[Family] | None:
    return next((f for f in FAMILIES if pipeline_class in f.pipelines), None)


def supported_pipelines() -> list[str]:
    return list(dict.fromkeys(p for f in reversed(FAMILIES) for p in f.pipelines))
