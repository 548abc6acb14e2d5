"""The installed dependencies against the floors raft-diffusion declares (its ``Requires-Dist``
metadata, that is pyproject.toml's ``dependencies``).

pip enforces the floors only when it resolves; an environment installed with ``--no-deps`` or
changed afterwards can hold older releases, which fail late and obscurely, or not at all (an older
diffusers drops a ``from_pretrained`` keyword it does not know with a mere warning).
"""

from __future__ import annotations

import functools
from importlib import metadata

from raft_diffusion.core.errors import UserError

DISTRIBUTION = "raft-diffusion"


class DependencyError(UserError, RuntimeError):
    """An installed dependency is missing or older than the floor raft-diffusion declares for it."""


@functools.cache
def check() -> None:
    """Raise :class:`DependencyError` (one line, naming each package and the version needed) when an
    installed dependency does not meet its declared floor. Reads package metadata only; the result is
    cached, so it runs once per process."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.version import InvalidVersion, Version
    except ImportError:
        raise DependencyError(f"packaging is not installed; {DISTRIBUTION} needs it: pip install packaging") from None
    problems, needed = [], []
    for line in _declared():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if not req.specifier or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue  # no floor, an optional extra's, or another platform's
        installed = _installed(req.name)
        try:
            # prereleases: a development build of a new enough release (0.40.0.dev0) meets ">=0.36"
            if installed is not None and req.specifier.contains(Version(installed), prereleases=True):
                continue
        except InvalidVersion:
            continue  # a version string that cannot be compared: trust it
        problems.append(f"{req.name} {installed} is installed" if installed else f"{req.name} is not installed")
        needed.append(f"{req.name}{req.specifier}")
    if problems:
        raise DependencyError(f"{'; '.join(problems)}; {DISTRIBUTION} needs {', '.join(needed)}: "
                              f"pip install {' '.join(repr(n) for n in needed)}")


def _declared() -> list[str]:
    """raft-diffusion's ``Requires-Dist`` lines; none without its metadata (a bare checkout on ``sys.path``)."""
    try:
        return metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
