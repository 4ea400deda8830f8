"""The one base class of every failure a user can fix: the CLI prints it as one `error:` line
(exit code 2, no traceback); anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A configuration, input or environment problem; the message names the setting to change."""


class RunStopped(UserError):
    """A run that started and then stopped (non-finite values, a full disk): not a refusal, so the
    run dir keeps what the run wrote."""
