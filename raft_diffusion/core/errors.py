"""The one base of every error a user causes (a config, a prompt file, a reward, a model folder, a
run folder): the command line prints it as one line and exits with code 2, never a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, reported in one line that says what to change."""


class DivergedError(UserError):
    """Fine-tuning met a non-finite loss or gradient; the update that would apply it was not made."""
