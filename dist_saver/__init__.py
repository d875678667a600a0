"""dist_saver: save PyTorch weights from every rank in parallel into the Hugging Face safetensors
layout, and load them back per rank."""

from .convert import convert_dcp, convert_legacy, reshard
from .errors import CheckpointError, CollectiveError, DistSaverError, DistSaverWarning, PlanError, SaveError
from .load import LoadResult, dist_load, load_state_dict
from .manager import CheckpointManager
from .hub import push_to_hub
from .save import SaveResult, dist_save
from .verify import verify

__all__ = [
    "dist_save",
    "dist_load",
    "load_state_dict",
    "verify",
    "convert_dcp",
    "reshard",
    "convert_legacy",
    "push_to_hub",
    "CheckpointManager",
    "SaveResult",
    "LoadResult",
    "DistSaverError",
    "CheckpointError",
    "SaveError",
    "CollectiveError",
    "DistSaverWarning",
    "PlanError",
]
__version__ = "0.1.0"
