"""The commit: check what the ranks wrote against the plan, publish index and files atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from typing import Sequence

from . import format as fmt
from .errors import SaveError
from .plan import Plan
from .writer import WrittenFile


def check_written(plan: Plan, written: Sequence[WrittenFile]) -> None:
    """Every planned file written once, by its rank, holding exactly its planned tensors."""
    by_name: dict[str, WrittenFile] = {}
    problems: list[str] = []
    for w in written:
        if w.name in by_name:
            problems.append(f"file {w.name} reported by ranks {by_name[w.name].rank} and {w.rank}")
        by_name[w.name] = w
    for f in plan.files:
        w = by_name.pop(f.name, None)
        if w is None:
            problems.append(f"file {f.name} (rank {f.rank}) was not written")
            continue
        if w.rank != f.rank:
            problems.append(f"file {f.name} was planned for rank {f.rank} but written by rank {w.rank}")
        planned = {t.name: t.end - t.begin for t in f.tensors}
        if w.tensors != planned:
            missing = sorted(set(planned) - set(w.tensors))
            extra = sorted(set(w.tensors) - set(planned))
            short = sorted(n for n in planned if n in w.tensors and w.tensors[n] != planned[n])
            problems.append(
                f"file {f.name} (rank {f.rank}): missing {missing[:5]}, unexpected {extra[:5]}, "
                f"wrong size {short[:5]}"
            )
    for name, w in by_name.items():
        problems.append(f"file {name} written by rank {w.rank} is not in the plan")
    if problems:
        raise SaveError("the written files do not match the plan; no index was published:\n  "
                        + "\n  ".join(problems[:20]))


def write_index(directory: str, plan: Plan, written: Sequence[WrittenFile], extra_files: Sequence[str] = ()) -> str:
    """Write model.safetensors.index.json (atomically) from what the ranks report they wrote.

    extra_files: the names saved beside the weights (config, tokenizer), recorded so that a later
    save with overwrite=True knows the directory holds nothing but ours.
    """
    check_written(plan, written)
    files = {w.name: {"rank": w.rank, "size": w.size, "checksum": w.checksum}
             for w in sorted(written, key=lambda w: w.name)}
    extra = {"world_size": plan.world_size, "files": files, "aliases": dict(sorted(plan.aliases.items())),
             "extra_files": sorted(extra_files)}
    doc = fmt.index_document(plan.weight_map(), plan.total_size, extra)
    path = os.path.join(directory, fmt.INDEX_NAME)
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
        self.staging = os.path.join(parent, f".{name}.dist_saver-staging")
        self.previous = os.path.join(parent, f".{name}.dist_saver-previous")
        self.lock = os.path.join(parent, f".{name}.dist_saver.lock")
        self.owner = None  # set when something outlives the save and releases the lock itself

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
        if not fmt.looks_like_our_checkpoint(self.path):
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
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._lock_owner()
                if owner and owner.get("host") == me["host"] and not _pid_alive(owner.get("pid")):
                    os.remove(self.lock)  # its owner died on this host: stale
                    continue
                raise SaveError(
                    f"another save into {self.path} is in progress (lock {self.lock} held by host "
                    f"{owner.get('host') if owner else '?'} pid {owner.get('pid') if owner else '?'}); "
                    "if that job is gone, remove the lock file"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
        raise SaveError(f"could not take the lock {self.lock}")

    def _lock_owner(self) -> dict | None:
        try:
            with open(self.lock) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        owner = self._lock_owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            os.remove(self.lock)


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
