"""The few collective operations the loop needs, on plain ``torch.distributed``.

Under ``accelerate launch`` the process group already exists; a single process needs none.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if _active() else 0


def world_size() -> int:
    return tdist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        tdist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """The main process's ``obj`` on every process."""
    if not _active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int) -> range:
    """The contiguous share of ``n`` items that this process handles."""
    size, r = world_size(), rank()
    per, extra = divmod(n, size)
    start = r * per + min(r, extra)
    return range(start, start + per + (1 if r < extra else 0))


def concat_gathered(tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat(gather_objects(tensor.cpu()))
