"""Checkpoints at intervals for a training job that may crash and be restarted (by torchrun):
CheckpointManager saves every N steps into root/checkpoint-<step>, keeps the newest few, and
restores the newest complete one.

It adds no format of its own: each step directory is an ordinary dist_save checkpoint (a plain
Hugging Face model, plus the optimizer and train_state.json), the atomic publish is its commit,
and "complete" is what a load would accept. Older checkpoints are deleted only after a newer one
is published (durable), each renamed to a hidden name first, so a crash mid-deletion never leaves
a half-deleted checkpoint that looks whole.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings

from . import format as fmt
from .async_save import AsyncSave
from .comm import Comm, own_group
from .commit import Target
from .errors import CheckpointError, DistSaverWarning, SaveError
from .index import open_shard, read_index, read_optimizer_index
from .load import LoadResult, dist_load
from .save import dist_save

log = logging.getLogger("dist_saver")

# dist_save arguments the manager sets itself
_OWN = ("path", "overwrite", "async_save", "optimizer", "train_state")


class CheckpointManager:
    """Save a checkpoint every `save_every` steps, keep the newest `keep` (and every one whose step
    is a multiple of `keep_every`), and restore the newest complete one after a restart.

        ckpt = CheckpointManager("runs/exp1", save_every=500, keep=3)
        res = ckpt.restore(model, optimizer=opt)           # None on a fresh start
        start = res.train_state["step"] if res is not None else 0
        for step in range(start + 1, total + 1):
            train_one_step()
            ckpt.save(step, model, optimizer=opt, train_state={"step": step})
        ckpt.close()

    save() and restore() are collective (every rank calls them, as dist_save / dist_load; one
    process needs no process group); latest_step() and all_steps() are not.

    Args:
        root: the directory holding checkpoint-<step> directories (the names Hugging Face's Trainer
            uses: transformers.trainer_utils.get_last_checkpoint(root) finds the newest).
        save_every: save when step % save_every == 0 (or save(..., force=True)).
        keep: how many of the newest checkpoints to keep (at least 1).
        keep_every: also keep every checkpoint whose step is a multiple of this (None: none).
        async_save: save in the background (dist_save(async_save=True)): save() returns once this
            rank's share is copied to host memory; at most one save is pending, the next waits.
        **dist_save_kwargs: for every save (max_shard_size, dtype, timeout, process_group,
            checksums, direct_io, ...); process_group and timeout also serve restore().
    """

    def __init__(self, root: str | os.PathLike, save_every: int, keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True, **dist_save_kwargs):
        if not isinstance(save_every, int) or isinstance(save_every, bool) or save_every < 1:
            raise ValueError(f"save_every must be a positive integer, not {save_every!r}")
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep must be a positive integer, not {keep!r}")
        if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
            raise ValueError(f"keep_every must be a positive integer or None, not {keep_every!r}")
        taken = sorted(set(dist_save_kwargs) & set(_OWN))
        if taken:
            raise TypeError(f"CheckpointManager sets {taken} itself (pass optimizer= and train_state= to save())")
        self.root = os.path.abspath(os.fspath(root))
        self.save_every, self.keep, self.keep_every, self.async_save = save_every, keep, keep_every, async_save
        self.kwargs = dist_save_kwargs
        self._pending: tuple[int, AsyncSave] | None = None
        self._swept = False

    # -- where the checkpoints are ------------------------------------------------------------

    def path(self, step: int) -> str:
        """The directory of step's checkpoint: root/checkpoint-<step>."""
        return os.path.join(self.root, fmt.step_dir_name(step))

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints under root, oldest first: what restore() considers
        (each passes complete_or_why()). Not collective."""
        return sorted(s for s in self._steps() if complete_or_why(self.path(s)) is None)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None. Not collective."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _steps(self) -> list[int]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return [s for s in (fmt.step_of(n) for n in names) if s is not None and os.path.isdir(self.path(s))]

    # -- saving -------------------------------------------------------------------------------

    def save(self, step: int, model, *, optimizer=None, train_state=None, force: bool = False):
        """Collective: save model (and optimizer, train_state) as root/checkpoint-<step> when
        step % save_every == 0 or force; otherwise return None and write nothing.

        A pending async save is waited for first (its error, if it failed, is raised here). A
        directory of that name that is not a complete checkpoint (one restore() skipped) is moved
        aside to checkpoint-<step>.damaged, never deleted. Once the new checkpoint is published
        (at once for a sync save; for an async one when it is waited for: at the next save() or
        close()), rank 0 deletes the ones no longer kept (see the class).

        Returns:
            None (not a save step), the SaveResult, or with async_save the AsyncSave handle.
        Raises:
            as dist_save; the previous async save's error.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, not {step!r}")
        if not force and step % self.save_every:
            return None
        self.wait()
        path = self.path(step)
        if self._rank() == 0:  # before dist_save: its first step waits for rank 0
            self._sweep()
            self._move_aside_if_damaged(path)
        out = dist_save(model, path, optimizer=optimizer, train_state=train_state, async_save=self.async_save,
                        overwrite=True, **self.kwargs)
        if isinstance(out, AsyncSave):
            self._pending = (step, out)
        elif self._rank() == 0:
            self._rotate(step)
        return out

    def wait(self) -> None:
        """Wait for the pending async save, if any, and rotate once it is published (rank 0); raise
        its error if it failed. On the caller's thread, so close() returns with the rotation done."""
        pending, self._pending = self._pending, None
        if pending is not None:
            step, handle = pending
            handle.result()
            if self._rank() == 0:
                self._rotate(step)

    def close(self) -> None:
        """Wait for the pending save (raising its error). The manager can still be used after."""
        self.wait()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.close()
        else:  # do not mask the error that ends the block; still finish what is pending
            try:
                self.close()
            except Exception as e:  # noqa: BLE001
                log.error("the pending checkpoint save failed as well: %s", e)

    # -- restoring ------------------------------------------------------------------------------

    def restore(self, model, *, optimizer=None, step: int | None = None, verify: bool = True) -> LoadResult | None:
        """Collective: load the newest complete checkpoint (or `step`'s) into model and optimizer.

        Rank 0 chooses the candidates once for every rank: the complete checkpoints (see
        complete_or_why), newest first. A candidate that fails to load (a damaged block, found as
        it is read with verify, the default) is skipped with a DistSaverWarning naming it and why,
        and the next older one is loaded into the same model. Checks that fail before a byte is
        read (index, files, sizes, headers, shapes) leave the model untouched.

        Returns:
            dist_load's LoadResult (its train_state is what was saved), or None if root holds no
            checkpoint.
        Raises:
            CheckpointError: `step` was given and cannot be loaded; or no candidate loaded and a
                failed one had already overwritten part of the model's tensors (the model must
                not silently start from them).
            CollectiveError: a rank died, hung or never called it.
        """
        comm = Comm(own_group(self.kwargs.get("process_group"), self._timeout(), "restore"), self._timeout(),
                    op="restore")
        with comm.step(f"choosing the checkpoint to restore under {self.root}", result="shared",
                       cls=CheckpointError) as chosen:
            if comm.rank == 0:
                self._sweep()
                chosen.value = self._candidates(step)
        candidates, skipped = chosen.result
        if step is not None and not candidates:
            raise CheckpointError(f"{self.path(step)}: cannot be restored: {skipped[0][1] if skipped else 'not there'}")
        for s, why in skipped:
            warnings.warn(f"{self.path(s)}: skipped, not a complete checkpoint: {why}", DistSaverWarning, stacklevel=2)
        overwritten = []
        for s in candidates:
            try:
                return dist_load(model, self.path(s), optimizer=optimizer, verify=verify,
                                 process_group=self.kwargs.get("process_group"), timeout=self._timeout())
            except CheckpointError as e:
                if step is not None:
                    raise
                if e.stage.startswith("reading"):
                    overwritten.append(self.path(s))
                warnings.warn(f"{self.path(s)}: skipped, it failed to load: {e}", DistSaverWarning, stacklevel=2)
        if overwritten:
            raise CheckpointError(
                f"no checkpoint under {self.root} could be restored, and {overwritten[0]} failed while being read, "
                "after part of the model's tensors had been filled from it: the model is no longer as it was "
                "(see the warnings for each checkpoint's reason)")
        return None

    def _candidates(self, step: int | None) -> tuple[list[int], list[tuple[int, str]]]:
        """Rank 0: (steps to try, newest first; [(step, why)] of those that are not complete)."""
        steps = [step] if step is not None else sorted(self._steps(), reverse=True)
        ok, skipped = [], []
        for s in steps:
            why = complete_or_why(self.path(s))
            if why is None:
                ok.append(s)
            else:
                skipped.append((s, why))
        return ok, skipped

    # -- housekeeping (rank 0) ----------------------------------------------------------------

    def _rank(self) -> int:
        return Comm(self.kwargs.get("process_group")).rank

    def _timeout(self) -> float:
        return float(self.kwargs.get("timeout", 600.0))

    def _sweep(self) -> None:
        """Once, at the start: what a dead job left under root. Renamed-to-delete directories go;
        each checkpoint's staging and previous copies are recovered (as the next save into it would:
        Target.recover) under its lock, taken over only from a dead owner on this host."""
        if self._swept:
            return
        self._swept = True
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        targets = set()
        for name in names:
            found = fmt.sibling_of(name)
            if found is None or fmt.step_of(found[0]) is None:
                continue
            if found[1] == "deleting":
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            else:
                targets.add(found[0])
        for name in sorted(targets):
            target = Target(os.path.join(self.root, name))
            try:
                with target.locked():
                    target.recover()
            except SaveError as e:  # a live owner (another job on the same root?): leave it
                log.warning("%s: not swept: %s", target.path, e)

    def _move_aside_if_damaged(self, path: str) -> None:
        if not os.path.exists(path) or complete_or_why(path) is None:
            return
        n = 0
        while os.path.exists(os.path.join(self.root, fmt.damaged_dir_name(os.path.basename(path), n))):
            n += 1
        aside = os.path.join(self.root, fmt.damaged_dir_name(os.path.basename(path), n))
        os.rename(path, aside)
        warnings.warn(f"{path} was not a complete checkpoint ({complete_or_why(aside)}); moved to {aside} "
                      "before saving over it", DistSaverWarning, stacklevel=3)

    def _rotate(self, newest: int) -> None:
        """Rank 0, once `newest` is published: delete the complete checkpoints no longer kept.
        Checkpoints of later steps (from before a restart that resumed earlier) are left alone, as
        are incomplete ones. Never fails the training: problems are logged."""
        try:
            steps = [s for s in self.all_steps() if s <= newest]
            kept = set(steps[-self.keep:]) | {newest}
            if self.keep_every:
                kept |= {s for s in steps if s % self.keep_every == 0}
            for s in steps:
                if s not in kept:
                    self._delete(s)
        except Exception as e:  # noqa: BLE001  (a checkpoint left behind is better than a crash)
            log.warning("rotating the checkpoints under %s failed: %s", self.root, e)

    def _delete(self, step: int) -> None:
        path = self.path(step)
        target = Target(path)
        gone = os.path.join(self.root, fmt.deleting_dir_name(os.path.basename(path)))
        try:
            with target.locked():  # not while a save or an upload holds it
                os.rename(path, gone)
                fmt.fsync_dir(self.root)
        except (SaveError, OSError) as e:
            log.warning("%s: not deleted: %s", path, e)
            return
        shutil.rmtree(gone, ignore_errors=True)
        log.info("deleted %s (keeping the newest %d%s)", path, self.keep,
                 f" and every {self.keep_every}th step" if self.keep_every else "")


def complete_or_why(path: str) -> str | None:
    """None if path holds a complete checkpoint of ours: its indexes read and pass their digests,
    every file they name is there with its recorded size and a header that passes its checksum,
    and every file the index lists beside the weights (train_state.json, the optimizer index) is
    there. Otherwise why not. Cheap: no tensor bytes are read (a load checks those)."""
    try:
        index = read_index(path)
        if index.ours is None:
            return "not written by dist_saver (no metadata.dist_saver in its index)"
        for name in index.ours.get("extra_files", []):
            if not os.path.isfile(os.path.join(path, name)):
                return f"{name} is missing"
        indexes = [index]
        optimizer = read_optimizer_index(path)
        if optimizer is not None:
            indexes.append(optimizer)
        for idx in indexes:
            for file in sorted(set(idx.weight_map.values())):
                full = os.path.join(path, file)
                if not os.path.isfile(full):
                    return f"{file} is missing"
                with open_shard(idx, file, verify=True):  # size against the record, the header's checksum, the id
                    pass
    except CheckpointError as e:
        return str(e)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None

