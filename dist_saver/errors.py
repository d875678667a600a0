"""Exceptions raised by dist_saver. Messages name the tensor, the file and the rank."""


class DistSaverError(RuntimeError):
    """Base class for errors raised by dist_saver."""


class CheckpointError(DistSaverError):
    """A checkpoint on disk is missing, incomplete, damaged or does not match the target."""


class SaveError(DistSaverError):
    """A save failed; raised on every rank with what each failing rank reported."""


class PlanError(DistSaverError):
    """The ranks' tensors cannot be planned (e.g. the same name with different shapes)."""
