"""verify(): recompute the checksums recorded at save time and compare.

A file written in place by several ranks records one checksum per written range
([offset, length, rank, checksum], tiling the file); checkpoints from before that record one per
file, and still verify. A partial check (a rank's dist_load(verify=True)) reads only the ranges
covering the bytes it needs. The index itself is checked as it is read (its digest, where
recorded: see format.index_digest); verify() also checks that each file holds exactly the
tensors the index maps to it.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from . import format as fmt
from .checksum import Hasher
from .errors import CheckpointError
from .reader import open_weights

_BLOCK = 16 << 20


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
    index = fmt.read_index(os.fspath(path))
    if not (index.ours or {}).get("files"):
        raise CheckpointError(f"{index.directory}: no checksums recorded (not written by dist_saver)")
    indexes = [index]
    optimizer = fmt.read_optimizer_index(index.directory)  # a training checkpoint's optimizer part
    if optimizer is not None:
        indexes.append(optimizer)
    out = {}
    for idx in indexes:
        mine = set(idx.weight_map.values())
        for name in sorted(mine if files is None else mine & set(files)):
            full, ranges = recorded_ranges(idx, name)
            _check(full, ranges)
            _check_names(idx, name, full)
            out[name] = f"{ranges[0][3].split(':', 1)[0]}: {len(ranges)} range{'s' if len(ranges) > 1 else ''}"
    unknown = sorted(set(files or ()) - set(out))
    if unknown:
        raise CheckpointError(f"{index.directory}: no file {unknown[0]!r} in the checkpoint's indexes")
    return out


def _check_names(index: fmt.CheckpointIndex, name: str, full: str) -> None:
    """Our files hold exactly the tensors the index maps to them: an index that lost or gained
    an entry (one from before the index digest) disagrees with the checksummed headers."""
    with open_weights(full) as f:
        held = set(f.names())
    mapped = {t for t, file in index.weight_map.items() if file == name}
    if held != mapped:
        raise CheckpointError(f"{full}: holds tensors {sorted(held - mapped)[:5]} that the index's weight_map does "
                              f"not map to it, and lacks {sorted(mapped - held)[:5]} that it does")


def verify_spans(index: fmt.CheckpointIndex, name: str, spans: Sequence[tuple[int, int]]) -> int:
    """Check only the recorded ranges of file `name` that overlap the byte spans [begin, end);
    returns the bytes checked."""
    full, ranges = recorded_ranges(index, name)
    spans = sorted(spans)
    chosen = [r for r in ranges if any(b < r[0] + r[1] and e > r[0] for b, e in spans)]
    _check(full, chosen)
    return sum(r[1] for r in chosen)


def recorded_ranges(index: fmt.CheckpointIndex, name: str) -> tuple[str, list[tuple[int, int, object, str]]]:
    """(path, [(offset, length, rank, checksum)]) of one file, checked to tile it exactly."""
    full = fmt.safe_member(index.directory, name)
    if not os.path.isfile(full):
        raise CheckpointError(f"{full}: shard file missing")
    size = os.path.getsize(full)
    entry = ((index.ours or {}).get("files") or {}).get(name)
    field = f"metadata.{fmt.META_KEY}.files[{name!r}]"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{full}: no checksum recorded for this file (no field {field} in the index)")
    raw = entry.get("ranges")
    if raw is None:  # written before per-range checksums: one for the whole file
        raw = [[0, size, entry.get("rank"), entry.get("checksum")]]
    try:
        ranges = [(int(b), int(n), rank, c) for b, n, rank, c in raw]
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{full}: the index's recorded ranges ({field}) are malformed: {e!r}") from None
    ranges.sort(key=lambda r: r[0])
    pos = 0
    for b, n, _, c in ranges:
        if b != pos or n <= 0:
            raise CheckpointError(f"{full}: the index's recorded ranges ({field}.ranges) do not tile the file "
                                  f"(gap or overlap at byte {pos})")
        if not isinstance(c, str) or ":" not in c:
            raise CheckpointError(f"{full}: no checksum recorded for bytes [{b}, {b + n}) (saved with "
                                  "checksums=False?)")
        pos = b + n
    if pos != size:
        raise CheckpointError(f"{full}: the file has {size} bytes but its recorded ranges cover {pos}; "
                              "the file is damaged")
    return full, ranges


def _check(full: str, ranges: Sequence[tuple[int, int, object, str]]) -> None:
    fd = os.open(full, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for begin, length, rank, expected in ranges:
            try:
                h = Hasher(expected.split(":", 1)[0])
            except (ValueError, RuntimeError) as e:
                raise CheckpointError(f"{full}: the checksum the index records for bytes [{begin}, {begin + length}) "
                                      f"(field metadata.{fmt.META_KEY}.files[{os.path.basename(full)!r}]): {e}") from None
            pos, end = begin, begin + length
            while pos < end:
                data = os.pread(fd, min(_BLOCK, end - pos), pos)
                if not data:
                    break
                h.update(data)
                pos += len(data)
            actual = h.digest()
            if actual != expected:
                raise CheckpointError(
                    f"{full}: checksum {actual} of bytes [{begin}, {end}) (written by rank {rank}) does not "
                    f"match the recorded {expected}; the file is damaged")
    finally:
        os.close(fd)
