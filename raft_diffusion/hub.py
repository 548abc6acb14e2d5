"""Whether the Hugging Face hub can be reached, asked once per process.

Without network, huggingface_hub retries each request five times with back-off (about 25 s per
file) before it falls back to its cache or gives up. The loaders ask :func:`local_files_only`
first: when the hub does not answer a single quick request, they read the local cache only
(``local_files_only=True``), so that a cached model loads at once and a missing one fails at once.
``HF_HUB_OFFLINE=1`` skips the request.
"""

from __future__ import annotations

import functools

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
