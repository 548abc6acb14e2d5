"""Progress bars that stay out of the way: tqdm on an interactive terminal, silent everywhere else.

A bar shows only on the main process, only when stderr is a terminal, and never after
``set_quiet(True)`` (``raft-diffusion train --quiet``). Logs, CI and pytest therefore see no bars.

    from raft_diffusion.core.progress import progress

    for batch in progress(batches, desc="sampling", unit="batch"):
        ...
    bar = progress(total=steps, desc="fine-tune", unit="step")
    for step in range(steps):
        ...
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update()
    bar.close()

The run's phases (loading, generating, scoring, fine-tuning, evaluating) each get one bar in the
same line (:func:`phase`); the adapters move it with :func:`advance`.

Print through :func:`write` while a bar may be showing, so the bar is redrawn below the text
instead of being torn by it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

from tqdm import tqdm

from raft_diffusion.core import dist

_QUIET = False
_PHASE: tqdm | None = None  # the bar of the phase under way, which advance() moves


def set_quiet(quiet: bool) -> None:
    """Turn every bar off (True) or back to the default (False)."""
    global _QUIET
    _QUIET = bool(quiet)


def enabled() -> bool:
    """Whether bars are drawn here: main process, stderr a terminal, not quiet."""
    isatty = getattr(sys.stderr, "isatty", None)
    return not _QUIET and dist.is_main() and bool(isatty and isatty())


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, leave: bool = False, **kwargs) -> tqdm:
    """A tqdm bar (disabled unless :func:`enabled`); iterate it, or call ``update()`` on it.

    ``leave=False`` (the default) removes the bar when it ends: inner bars (sampling batches,
    training steps) vanish and the stage lines remain. Other keywords go to tqdm (``unit``, ...).
    """
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=not enabled(), **kwargs)


def write(message: str) -> None:
    """Print a line to stdout without breaking the bars being drawn."""
    tqdm.write(message, file=sys.stdout)


@contextmanager
def phase(desc: str, total: int | None = None, **kwargs) -> Iterator[tqdm]:
    """One bar for a phase of the run (``stage 3/10 generate``), replaced by the next phase's in
    the same line. Work inside it reports with :func:`advance`; without a total it shows the time."""
    global _PHASE
    bar = progress(total=total, desc=desc, leave=False, **kwargs)
    previous, _PHASE = _PHASE, bar
    try:
        yield bar
    finally:
        bar.close()
        _PHASE = previous


def advance(n: int = 1) -> None:
    """Move the current phase's bar by ``n`` (nothing outside a phase)."""
    if _PHASE is not None:
        _PHASE.update(n)
