"""verify(): recompute every file's checksum and compare with the one recorded at save time."""

from __future__ import annotations

import os
from typing import Iterable

from . import format as fmt
from .checksum import file_checksum
from .errors import CheckpointError


def verify(path: str | os.PathLike, files: Iterable[str] | None = None) -> dict[str, str]:
    """Check the checkpoint's files (default all) against their recorded checksums.

    Returns {file: checksum}; raises CheckpointError naming the first file that differs, is
    missing, or has no recorded checksum (a checkpoint not written by dist_saver).
    """
    index = fmt.read_index(os.fspath(path))
    recorded = (index.ours or {}).get("files") or {}
    if not recorded:
        raise CheckpointError(f"{index.directory}: no checksums recorded (not written by dist_saver)")
    out = {}
    for name in sorted(files if files is not None else set(index.weight_map.values())):
        expected = (recorded.get(name) or {}).get("checksum")
        if not expected:
            raise CheckpointError(f"{index.directory}/{name}: no checksum recorded for this file")
        full = fmt.safe_member(index.directory, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: shard file missing")
        actual = file_checksum(full, expected.split(":", 1)[0])
        if actual != expected:
            raise CheckpointError(f"{full}: checksum {actual} does not match the recorded {expected}; "
                                  "the file is damaged")
        out[name] = actual
    return out
