"""Exceptions raised by dist_saver. Messages name the tensor, the file and the rank."""


class DistSaverError(RuntimeError):
    """Base class for errors raised by dist_saver."""


class CheckpointError(DistSaverError):
    """A checkpoint on disk is missing, incomplete, damaged or does not match the target."""


class SaveError(DistSaverError):
    """A save failed; raised on every rank with what each failing rank reported."""


class CollectiveError(SaveError):
    """A collective of the save broke: another rank died, hung past the timeout, or never joined.

    Raised on the ranks that saw it (the others may be dead); a SaveError, so existing handlers
    still catch it.
    """


class PlanError(DistSaverError):
    """The ranks' tensors cannot be planned (e.g. the same name with different shapes)."""


class DistSaverWarning(UserWarning):
    """Something was saved, but not quite as the caller may expect (e.g. overlapping tensors)."""
