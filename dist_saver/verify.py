"""verify(): recompute the checksums recorded at save time and compare.

A file written in place by several ranks records one checksum per written range
([offset, length, rank, checksum], tiling the file), each a digest per 1 MiB block (checksum.py);
checkpoints from before record one digest per range, or per file, and still verify. Loads check
the blocks they read as they read them (reader.py); verify() reads every block of every file. The
index itself is checked as it is read (its digest, where recorded: see format.index_digest);
verify() also checks that each file holds exactly the tensors the index maps to it.
"""

from __future__ import annotations

import os
from typing import Iterable

from .errors import CheckpointError
from .index import CheckpointIndex, open_shard, read_index, read_optimizer_index


def verify(path: str | os.PathLike, files: Iterable[str] | None = None) -> dict[str, str]:
    """Check the checkpoint's files against the checksums recorded at save time, on one process.

    Args:
        path: the checkpoint directory (written by dist_saver). A training checkpoint's
            optimizer files are checked too.
        files: only these file names (model or optimizer files); default all.

    Returns:
        {file name: "<algorithm>: N ranges"} for every file checked.

    Raises:
        CheckpointError: naming the first file (and the byte range, and the rank that wrote it)
            that differs, is missing, or has no recorded checksum (a checkpoint not written by
            dist_saver, or saved with checksums=False); an index that fails its digest or maps
            other tensors to a file than the file holds; or a name in files that no index has.
    """
    index = read_index(os.fspath(path))
    if not (index.ours or {}).get("files"):
        raise CheckpointError(f"{index.directory}: no checksums recorded (not written by dist_saver)")
    indexes = [index]
    optimizer = read_optimizer_index(index.directory)  # a training checkpoint's optimizer part
    if optimizer is not None:
        indexes.append(optimizer)
    out = {}
    for idx in indexes:
        mapped: dict[str, set] = {}  # file -> the tensors the index maps to it
        for tensor, file in idx.weight_map.items():
            mapped.setdefault(file, set()).add(tensor)
        for name in sorted(mapped if files is None else set(mapped) & set(files)):
            out[name] = _check_file(idx, name, mapped[name])
    unknown = sorted(set(files or ()) - set(out))
    if unknown:
        raise CheckpointError(f"{index.directory}: no file {unknown[0]!r} in the checkpoint's indexes")
    return out


def _check_file(index: CheckpointIndex, name: str, mapped: set) -> str:
    ranges = index.recorded(name) or []
    full = os.path.join(index.directory, name)
    for b, n, _, c in ranges:
        if not isinstance(c, str) or ":" not in c:
            raise CheckpointError(f"{full}: no checksum recorded for bytes [{b}, {b + n}) (saved with "
                                  "checksums=False?)")
    with open_shard(index, name, verify=True) as f:
        f.verify()
        held = set(f.names())
    # Our files hold exactly the tensors the index maps to them: an index that lost or gained
    # an entry (one from before the index digest) disagrees with the checksummed headers.
    if held != mapped:
        raise CheckpointError(f"{full}: holds tensors {sorted(held - mapped)[:5]} that the index's weight_map does "
                              f"not map to it, and lacks {sorted(mapped - held)[:5]} that it does")
    algorithm = ranges[0][3].split(":", 1)[0].split("@", 1)[0]
    return f"{algorithm}: {len(ranges)} range{'s' if len(ranges) > 1 else ''}"
