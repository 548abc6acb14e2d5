"""Packaged demo models. A path written ``demo:NAME`` in a config means ``assets/demo/NAME``."""

from __future__ import annotations

from pathlib import Path

from raft_diffusion.core.errors import UserError

DEMO_DIR = Path(__file__).resolve().parent / "demo"
PREFIX = "demo:"


class MissingAssetError(UserError, FileNotFoundError):
    pass


def resolve(path_or_id: str) -> str:
    """Map ``demo:NAME`` to the packaged asset; anything else is returned unchanged."""
    if not isinstance(path_or_id, str) or not path_or_id.startswith(PREFIX):
        return path_or_id
    name = path_or_id[len(PREFIX):].strip("/")
    path = DEMO_DIR / name
    if not path.exists():
        known = ", ".join(sorted(PREFIX + p.name for p in DEMO_DIR.iterdir() if p.name != "manifest.json"))
        raise MissingAssetError(
            f"demo asset {path_or_id!r} is not packaged ({path} missing); the demo assets are {known}. "
            "An installation without them is incomplete: reinstall raft-diffusion (from a source checkout, "
            "`make assets` rebuilds them)"
        )
    return str(path)
