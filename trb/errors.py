"""The one base class of every failure a user can fix: the CLI prints it as one `error:` line
(exit code 2, no traceback); anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A configuration, input or environment problem; the message names the setting to change."""


class RunStopped(UserError):
    """A run that started and then stopped (non-finite values, a full disk): not a refusal, so the
    run dir keeps what the run wrote."""


_STARTED = [False]


def started() -> None:
    """Mark that this process's run has begun writing its outputs: a failure from now on is not a
    refusal (the CLI then leaves the run dir as the run left it)."""
    _STARTED[0] = True


def has_started() -> bool:
    return _STARTED[0]


_NOTHING_DONE = [False]


def nothing_done() -> None:
    """Mark that this process's command found its work already done (a finished run re-run) and wrote
    nothing: the CLI then puts back what Hydra wrote into the run dir (.hydra/, the job log)."""
    _NOTHING_DONE[0] = True


def was_nothing_done() -> bool:
    return _NOTHING_DONE[0]
