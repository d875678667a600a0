"""Finding a checkpoint's tensors and opening its files: the index (ours or any Hugging Face one) or a
single weights file, above the readers (format.py parses and checks index documents; reader.py
and legacy.py read files).

Opening a shard of an index checks that the two belong together: a shard of ours carries the
checkpoint's id in its header (format.SHARD_CHECKPOINT_KEY), which our index records too, so a
shard under an index that lost our metadata block, or next to another save's index, is refused
as damaged instead of being read unchecked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import format as fmt
from .errors import CheckpointError
from .legacy import LegacyFile
from .reader import ShardFile, WeightsFile


@dataclass(frozen=True)
class CheckpointIndex:
    """Where each stored tensor lives, read from an index or a single weights file."""

    directory: str
    weight_map: dict[str, str]  # stored name -> file name (relative)
    aliases: dict[str, str]  # alias name -> stored name
    ours: dict | None  # our metadata block, or None for checkpoints from other tools
    name: str = ""  # the index file's name ("" for a single weights file)

    @property
    def checkpoint_id(self) -> str | None:
        return (self.ours or {}).get(fmt.CHECKPOINT_ID_KEY)

    def recorded(self, file: str) -> list | None:
        """The file's recorded ranges [[offset, length, rank, checksum], ...] (an old per-file
        checksum as one range), or None where nothing is recorded (other tools' checkpoints)."""
        files = (self.ours or {}).get("files")
        if not files:
            return None
        entry = files.get(file)
        where = f"{os.path.join(self.directory, self.name)}: field metadata.{fmt.META_KEY}.files"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} has no record of {file} (every file of the checkpoint has one)")
        ranges = entry.get("ranges")
        if ranges is None:  # written before per-range checksums: one for the whole file
            size = entry.get("size")
            if not isinstance(size, int) or not isinstance(entry.get("checksum"), str):
                raise CheckpointError(f"{where}[{file!r}] records neither ranges nor a size and checksum")
            ranges = [[0, size, entry.get("rank"), entry["checksum"]]]
        return ranges


def open_weights(path: str, recorded=None) -> WeightsFile:
    """A reader for one weights file: ShardFile for safetensors (checking what it reads against
    the recorded ranges, [[offset, length, rank, checksum], ...], if given), LegacyFile for
    torch.save'd ones (which carry no checksums)."""
    if fmt.is_legacy_file(path):
        return LegacyFile(path)
    return ShardFile(path, recorded)


def read_index(path: str) -> CheckpointIndex:
    """Locate the tensors of a checkpoint directory or single weights file.

    Looks for, in this order (as transformers does): model.safetensors.index.json,
    model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin.
    """
    if os.path.isfile(path) and fmt.is_weights_file(path):
        return _single(os.path.dirname(path) or ".", os.path.basename(path))
    for name in (fmt.INDEX_NAME, fmt.SINGLE_NAME, fmt.LEGACY_INDEX_NAME, fmt.LEGACY_SINGLE_NAME):
        if os.path.isfile(os.path.join(path, name)):
            fmt.safe_member(path, name)  # an index that is a link out of the directory, as a shard: refused
            return _indexed(path, name) if name.endswith(".json") else _single(path, name)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    raise CheckpointError(f"{path}: no {fmt.INDEX_NAME}, {fmt.SINGLE_NAME}, {fmt.LEGACY_INDEX_NAME} or "
                          f"{fmt.LEGACY_SINGLE_NAME}: not a complete checkpoint")


def _indexed(directory: str, name: str) -> CheckpointIndex:
    index_path = os.path.join(directory, name)
    with open(index_path, "rb") as f:
        raw = f.read()
    weight_map, ours = fmt.parse_index_document(index_path, raw, name in (fmt.INDEX_NAME, fmt.OPTIM_INDEX_NAME))
    return CheckpointIndex(directory, weight_map, dict((ours or {}).get("aliases", {})), ours, name)


def read_optimizer_index(directory: str) -> CheckpointIndex | None:
    """The optimizer part of a training checkpoint (optimizer.safetensors.index.json), or None."""
    if not os.path.isfile(os.path.join(directory, fmt.OPTIM_INDEX_NAME)):
        return None
    fmt.safe_member(directory, fmt.OPTIM_INDEX_NAME)
    return _indexed(directory, fmt.OPTIM_INDEX_NAME)


def _single(directory: str, name: str) -> CheckpointIndex:
    with open_weights(os.path.join(directory, name)) as f:  # the file itself lists its tensors
        names = f.names()
    return CheckpointIndex(directory, {n: name for n in names}, {}, None)


def open_shard(index: CheckpointIndex, file: str, verify: bool = True) -> WeightsFile:
    """Open one file of the index, checking what it reads against the recorded checksums (verify),
    and that it is this checkpoint's file (see the module docstring)."""
    path = os.path.join(index.directory, file)  # file names were checked when the index was read
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: shard file missing")
    f = open_weights(path, index.recorded(file) if verify else None)
    try:
        _check_mark(index, path, f.metadata)
    except BaseException:
        f.close()
        raise
    return f


def _check_mark(index: CheckpointIndex, path: str, metadata: dict) -> None:
    if not index.name:  # a single file: nothing to cross-check
        return
    mark = metadata.get(fmt.SHARD_CHECKPOINT_KEY)
    where = os.path.join(index.directory, index.name)
    if mark is not None and index.ours is None:
        raise CheckpointError(
            f"{path} was written by dist_saver (checkpoint {str(mark)[:40]}) but {where} has no "
            f"metadata.{fmt.META_KEY} block: the index was damaged or edited (its checks are gone); refusing it")
    if mark is not None and mark != index.checkpoint_id:
        raise CheckpointError(f"{path} belongs to checkpoint {str(mark)[:40]}, but {where} to "
                              f"{index.checkpoint_id}: files of two saves are mixed")
    if mark is None and index.checkpoint_id is not None:
        raise CheckpointError(f"{path} carries no checkpoint id, but {where} (checkpoint {index.checkpoint_id}) "
                              "says each of its files does: not this checkpoint's file")


def looks_like_our_checkpoint(directory: str) -> bool:
    """True if every entry is an index of ours, its temp files, a shard file name we write, or a
    plain file (or a directory of them) that our index lists as saved beside the weights."""
    ours = None
    if os.path.isfile(os.path.join(directory, fmt.INDEX_NAME)):
        try:
            ours = read_index(directory).ours
        except CheckpointError:
            return False
        if ours is None:
            return False
    listed = ours.get("extra_files", []) if isinstance(ours, dict) else []
    if not isinstance(listed, list) or not all(fmt.is_plain_relpath(n) for n in listed):
        return False  # damaged or hand-made: do not let it vouch for anything
    listed = set(listed)
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if os.path.islink(full):
            return False
        if os.path.isfile(full) and (name == fmt.INDEX_NAME or name.startswith(fmt.INDEX_NAME + ".tmp")
                                     or fmt.is_shard_file_name(name) or name in fmt.OWN_EXTRA_FILES
                                     or name in listed):
            continue
        if os.path.isdir(full) and _only_listed_files(directory, name, listed):
            continue
        return False
    return True


def _only_listed_files(directory: str, name: str, listed: set) -> bool:
    found = False
    for root, dirs, files in os.walk(os.path.join(directory, name)):
        for entry in dirs + files:
            full = os.path.join(root, entry)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if os.path.islink(full) or (entry in files and rel not in listed):
                return False
            found = found or entry in files
    return found
