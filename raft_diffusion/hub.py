"""Loading from the Hugging Face hub without waiting on it: whether it can be reached (asked once
per process), and ``from_pretrained`` with one-line errors for models, tokenizers and reward models.

Without network, huggingface_hub retries each request five times with back-off (about 25 s per
file) before it falls back to its cache or gives up. The loaders ask :func:`local_files_only`
first: when the hub does not answer a single quick request, they read the local cache only
(``local_files_only=True``), so that a cached model loads at once and a missing one fails at once.
``HF_HUB_OFFLINE=1`` skips the request.
"""

from __future__ import annotations

import functools
from pathlib import Path

from raft_diffusion.assets import resolve
from raft_diffusion.core.errors import UserError

PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable() -> bool:
    """True when ``HF_ENDPOINT`` (default https://huggingface.co) answers an HTTP request, of any status."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception:  # no answer at all: DNS, refused connection, timeout, proxy or TLS failure
        return False
    return True


def local_files_only() -> bool:
    """What to pass as ``local_files_only`` to a hub loader."""
    return not hub_reachable()


def no_hub_reason() -> str:
    """Why only the local cache was searched, for error messages."""
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model or tokenizer could not be found locally and could not be downloaded."""


def load_pretrained(cls, name: str, key: str, **kwargs):
    """``cls.from_pretrained(name)`` with ``demo:NAME`` resolved and a one-line error when missing.

    ``key`` names the config entry that holds ``name``, so the message says what to change. A hub
    id is read from the local cache only when the hub cannot be reached (no retries).
    """
    path = resolve(name)
    local = Path(path).expanduser()
    if local.is_dir():
        return cls.from_pretrained(str(local), **kwargs)
    if local.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1:
        raise ModelNotFoundError(f"{key}: folder {path} does not exist")
    try:
        return cls.from_pretrained(path, local_files_only=local_files_only(), **kwargs)
    except OSError:
        why = f"is not in the Hugging Face cache ({no_hub_reason()})" if not hub_reachable() else (
            "could not be loaded from the Hugging Face hub")
        raise ModelNotFoundError(
            f"{key}: {path!r} is not a local folder and {why}; download it where there is network "
            f"(`hf download {path} --local-dir /path/to/folder`) and set {key}=/path/to/folder"
        ) from None
