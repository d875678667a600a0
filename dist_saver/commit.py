"""The commit: check every byte range the ranks wrote against the plan, publish index and files atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

from . import format as fmt
from .errors import SaveError
from .index import looks_like_our_checkpoint
from .plan import Plan
from .writer import WrittenRange


@dataclass
class WrittenFile:
    """One file of a finished save: its owner, size, tensors, and the ranges each rank wrote."""

    name: str
    rank: int  # the owner: created it and wrote its header
    size: int  # bytes of the whole file
    tensors: dict[str, int] = field(default_factory=dict)  # name -> data bytes
    ranges: list[WrittenRange] = field(default_factory=list)  # in file order, tiling [0, size)

    @property
    def direct_io(self) -> bool:
        return any(r.direct_io for r in self.ranges)

    @property
    def writers(self) -> list[int]:
        return sorted({r.rank for r in self.ranges})


def planned_ranges(plan: Plan) -> dict[tuple[str, int, int], int]:
    """(file, begin, end) in file offsets -> the rank that must write it: headers and extents."""
    out = {}
    for f in plan.files:
        start = f.data_start
        out[(f.name, 0, start)] = f.rank
        for e in f.extents:
            out[(f.name, start + e.begin, start + e.end)] = e.rank
    return out


def check_written(plan: Plan, written: Sequence[WrittenRange]) -> None:
    """Every planned byte range written exactly once, by its planned rank, else SaveError."""
    expected = planned_ranges(plan)
    seen: dict[tuple[str, int, int], int] = {}
    problems: list[str] = []
    for w in written:
        key = (w.file, w.begin, w.end)
        if key in seen:
            problems.append(f"{w.file} bytes [{w.begin}, {w.end}) reported by ranks {seen[key]} and {w.rank}")
            continue
        seen[key] = w.rank
        want = expected.pop(key, None)
        if want is None:
            problems.append(f"{w.file} bytes [{w.begin}, {w.end}) written by rank {w.rank} are not in the plan")
        elif want != w.rank:
            problems.append(f"{w.file} bytes [{w.begin}, {w.end}) were planned for rank {want} but written "
                            f"by rank {w.rank}")
    for (file, begin, end), rank in expected.items():
        problems.append(f"{file} bytes [{begin}, {end}) (rank {rank}) were not written")
    if problems:
        raise SaveError("the written files do not match the plan; no index was published:\n  "
                        + "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""))


def written_files(plan: Plan, written: Sequence[WrittenRange]) -> list[WrittenFile]:
    """The plan's files with the ranges reported for each."""
    by_file: dict[str, list[WrittenRange]] = {}
    for w in written:
        by_file.setdefault(w.file, []).append(w)
    return [WrittenFile(f.name, f.rank, f.size, {t.name: t.end - t.begin for t in f.tensors},
                        sorted(by_file.get(f.name, []), key=lambda w: w.begin)) for f in plan.files]


def write_index(directory: str, plan: Plan, files: Sequence[WrittenFile], checkpoint_id: str,
                extra_files: Sequence[str] = (), name: str = fmt.INDEX_NAME, metadata: dict | None = None) -> str:
    """Write one of our indexes (atomically) from what the ranks report they wrote: by default
    model.safetensors.index.json of the plan's files (optimizer.safetensors.index.json for a
    training checkpoint's optimizer files, with its param_groups in metadata).

    Each file lists its ranges as [offset, length, rank, checksum] (checksum "" when disabled).
    checkpoint_id: the save's, which every shard file's header carries too (FilePlan.header_for);
    recorded with the version written (fmt.WRITTEN_VERSION).
    extra_files: the names saved beside the weights (config, tokenizer, the training state),
    recorded so that a later save with overwrite=True knows the directory holds nothing but ours.
    """
    names = {f.name for f in plan.files}
    entries = {f.name: {"rank": f.rank, "size": f.size,
                        "ranges": [[r.begin, r.end - r.begin, r.rank, r.checksum] for r in f.ranges]}
               for f in sorted(files, key=lambda f: f.name) if f.name in names}
    extra = {"version": fmt.WRITTEN_VERSION, fmt.CHECKPOINT_ID_KEY: checkpoint_id,
             "world_size": plan.world_size, "files": entries, "aliases": dict(sorted(plan.aliases.items())),
             "extra_files": sorted(extra_files), **(metadata or {})}
    doc = fmt.index_document(plan.weight_map(), plan.total_size, extra)
    path = os.path.join(directory, name)
    fmt.write_json_atomic(path, doc)
    return path


class Target:
    """The checkpoint directory and its siblings: staging area, previous copy, lock.

    A save writes everything into the staging directory, then publishes it with renames of
    whole directories, so `path` holds either the previous complete checkpoint or the new one.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        parent, name = os.path.split(self.path)
        self.parent = parent
        self.staging = os.path.join(parent, fmt.staging_dir_name(name))
        self.previous = os.path.join(parent, fmt.previous_dir_name(name))
        self.lock = os.path.join(parent, fmt.lock_file_name(name))
        self.owner = None  # set when something outlives the save and releases the lock itself
        self.published = False  # the staging directory was renamed to path (by this process)

    def recover(self) -> None:
        """Finish or undo a publish that a crash interrupted; drop a crashed save's staging."""
        if os.path.isdir(self.previous):
            if not os.path.exists(self.path):  # died between the two renames: put the old one back
                os.rename(self.previous, self.path)
            else:
                shutil.rmtree(self.previous)
        if os.path.exists(self.staging):
            shutil.rmtree(self.staging)

    def begin(self, overwrite: bool) -> str:
        """On rank 0: lock, check the target, make a fresh staging directory; return it."""
        os.makedirs(self.parent, exist_ok=True)
        self._take_lock()
        try:
            self.recover()
            if os.path.exists(self.path):
                self._check_replaceable(overwrite)
            os.mkdir(self.staging)
            fmt.fsync_dir(self.parent)
        except BaseException:
            self.release()
            raise
        return self.staging

    def _check_replaceable(self, overwrite: bool) -> None:
        if not os.path.isdir(self.path):
            raise SaveError(f"{self.path} exists and is not a directory")
        entries = os.listdir(self.path)
        if not entries:
            return
        if not looks_like_our_checkpoint(self.path):
            foreign = [e for e in sorted(entries) if not fmt.is_shard_file_name(e)][:5]
            raise SaveError(
                f"{self.path} is not empty and was not written by dist_saver (found e.g. {foreign}); "
                "choose an empty or new directory"
            )
        if not overwrite:
            raise SaveError(f"{self.path} already holds a checkpoint; pass overwrite=True to replace it")

    def publish(self) -> None:
        """Rank 0, after the index is in staging: swap the directories, old one removed last."""
        fmt.fsync_dir(self.staging)
        had_old = os.path.exists(self.path)
        if had_old:
            os.rename(self.path, self.previous)
        os.rename(self.staging, self.path)
        self.published = True  # from here the checkpoint is visible, whatever fails next
        fmt.fsync_dir(self.parent)
        if had_old:
            shutil.rmtree(self.previous, ignore_errors=True)

    def abort(self) -> None:
        """Rank 0, after a failed save: drop the staging area; the old checkpoint is untouched."""
        shutil.rmtree(self.staging, ignore_errors=True)

    @contextlib.contextmanager
    def locked(self):
        """Hold the lock (e.g. while uploading the directory), then release it."""
        self._take_lock()
        try:
            yield self
        finally:
            self.release()

    def _take_lock(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(3):
            self._drop_dead_claims(me["host"])
            try:
                self._create_lock(me)
                return
            except FileExistsError:
                owner = self._lock_owner()
                if owner and owner.get("host") == me["host"] and not _pid_alive(owner.get("pid")):
                    os.remove(self.lock)  # its owner died on this host: stale
                    continue
                if owner is None and self._lock_age() > _UNREADABLE_LOCK_STALE_S:
                    os.remove(self.lock)  # an empty lock of a creator that died before writing it
                    continue
                raise SaveError(
                    f"another save into {self.path} is in progress (lock {self.lock} held by host "
                    f"{owner.get('host') if owner else '?'} pid {owner.get('pid') if owner else '?'}); "
                    "if that job is gone, remove the lock file"
                ) from None
            except FileNotFoundError:  # our claim was swept as stale between write and link: again
                continue
        raise SaveError(f"could not take the lock {self.lock}")

    def _create_lock(self, me: dict) -> None:
        """The lock appears with its owner's record in it: written to a claim file first, then
        hard-linked to the lock name (atomic, fails if the lock exists). Where the filesystem has
        no hard links, an exclusive create followed by the write."""
        claim = os.path.join(self.parent, fmt.lock_claim_name(os.path.basename(self.path), uuid.uuid4().hex))
        with open(claim, "w") as f:
            json.dump(me, f)
        try:
            os.link(claim, self.lock)
        except (FileExistsError, FileNotFoundError):
            raise
        except OSError:  # no hard links here (some network and FUSE filesystems)
            fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(claim)

    def _drop_dead_claims(self, host: str) -> None:
        """Claims a killed process left (the lock itself is a separate link, so removing a claim
        never releases a lock; a live claimant whose claim goes retries)."""
        name = os.path.basename(self.path)
        try:
            entries = os.listdir(self.parent)
        except FileNotFoundError:
            return
        for entry in entries:
            found = fmt.sibling_of(entry)
            if found is None or found[0] != name or not found[1].startswith("claim-"):
                continue
            path = os.path.join(self.parent, entry)
            owner = _read_json(path)
            if owner is None or (owner.get("host") == host and not _pid_alive(owner.get("pid"))):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)

    def _lock_age(self) -> float:
        try:
            return time.time() - os.stat(self.lock).st_mtime
        except FileNotFoundError:
            return 0.0

    def _lock_owner(self) -> dict | None:
        return _read_json(self.lock)

    def release(self) -> None:
        owner = self._lock_owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            os.remove(self.lock)


# An unreadable lock older than this was left by a creator that died between creating and writing
# it (only possible where the filesystem has no hard links): writing it takes microseconds.
_UNREADABLE_LOCK_STALE_S = 60.0


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
