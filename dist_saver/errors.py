"""Exceptions raised by dist_saver. Messages name the tensor, the file and the rank.

Errors agreed on by several ranks (a save or load step that failed somewhere) also say so as data:
`failures` (rank -> that rank's message) and `stage` (what was being done), so a caller can act on
them without parsing the message.
"""

from __future__ import annotations


class DistSaverError(RuntimeError):
    """Base class for errors raised by dist_saver.

    Args:
        *args: the message (as for any exception).
        failures: group rank -> that rank's own error message ("TypeError: ..."), for an error
            agreed on by several ranks; empty when the error is this rank's alone.
        stage: what was being done when it failed, e.g. "writing /ckpt/step-100"; "" if unknown.

    Attributes:
        failures (dict[int, str]): as given; a CollectiveError holds this rank's own error, if it
            had one, since the ranks that died or hung cannot report theirs.
        stage (str): as given.
    """

    def __init__(self, *args, failures: dict[int, str] | None = None, stage: str = ""):
        super().__init__(*args)
        self.failures: dict[int, str] = dict(failures or {})
        self.stage = stage


class CheckpointError(DistSaverError):
    """A checkpoint on disk is missing, incomplete, damaged or does not match the target.

    Raised by loads, verify() and the converters; a multi-rank load raises it on every rank with
    `failures` and `stage` set (see DistSaverError).
    """


class SaveError(DistSaverError):
    """A save failed; raised on every rank with what each failing rank reported.

    The message lists "rank N: <error>" per failing rank; the same as data in `failures`, and the
    step that failed (e.g. "creating the files of /ckpt") in `stage` (see DistSaverError).
    """


class CollectiveError(DistSaverError):
    """A collective of a save or load broke: another rank died, hung past the timeout, or never
    called dist_save / dist_load.

    Raised on the ranks that saw it (the others may be dead), at 1 rank as at N; not a SaveError
    or CheckpointError, since nothing is known to be wrong with the checkpoint or the tensors.
    `stage` names the step whose collective broke; `failures` holds this rank's own error if it
    had one, or the ranks that never joined.
    """


class PlanError(DistSaverError):
    """The ranks' tensors cannot be planned (e.g. the same name with different shapes).

    Raised on every rank alike (the plan is computed from the same data everywhere).
    """


class DistSaverWarning(UserWarning):
    """Something was saved, but not quite as the caller may expect (e.g. overlapping tensors)."""
