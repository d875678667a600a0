"""Uploading a published checkpoint directory to the Hugging Face Hub (huggingface_hub, optional).

Only the checkpoint's own files go up: the index, every file it names, and the files saved beside
them (config, tokenizer, processor). Hidden entries (our staging, lock and previous copies are
hidden siblings, never inside) and anything else are left out. Untested against the live Hub:
the tests replace huggingface_hub's HfApi in-process.
"""

from __future__ import annotations

import concurrent.futures
import glob
import logging
import os
import threading

from . import format as fmt
from .errors import CheckpointError
from .index import read_index, read_optimizer_index

log = logging.getLogger("dist_saver")

# Weight files in the repo that our upload replaces: a stale model.safetensors (or old shards)
# would shadow or confuse the new index, so the same commit deletes those it does not upload.
STALE_PATTERNS = [fmt.SINGLE_NAME, fmt.shard_file_pattern(), fmt.LEGACY_SINGLE_NAME,
                  fmt.LEGACY_INDEX_NAME, fmt.LEGACY_SHARD_PATTERN]


def checkpoint_files(path: str, training: bool = False) -> list[str]:
    """The files of the complete checkpoint at path that an upload takes, sorted: a model repo's
    (weights, index, config, tokenizer...), and with training=True also a training checkpoint's
    optimizer files and train_state.json."""
    index = read_index(path)
    weights = set(index.weight_map.values())
    optimizer = read_optimizer_index(index.directory)
    if training and optimizer is not None:
        weights |= set(optimizer.weight_map.values())
    for name in weights:
        if not os.path.isfile(fmt.safe_member(index.directory, name)):
            raise CheckpointError(f"{index.directory}/{name}: shard file missing; not uploading an "
                                  "incomplete checkpoint")
    others = set()
    for root, dirs, files in os.walk(index.directory):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(root, d))]
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, index.directory).replace(os.sep, "/")
            if fmt.is_plain_relpath(rel) and os.path.isfile(full) and not os.path.islink(full):
                others.add(rel)
    # Weight files the index does not name are leftovers (another tool's, an older split).
    others = {n for n in others if not fmt.is_weights_file(n) or n in weights}
    if not training:  # resuming state is not part of a model repo
        others -= {fmt.OPTIM_INDEX_NAME, fmt.TRAIN_STATE_NAME}
    return sorted(weights | others)


def push_to_hub(path: str | os.PathLike, repo_id: str, *, token: str | None = None,
                private: bool | None = None, revision: str | None = None,
                commit_message: str | None = None, include_training_state: bool = False):
    """Upload the checkpoint directory at path to the Hub model repo repo_id in one commit.

    Not collective: call it on one process. Takes the files checkpoint_files() lists (the index,
    every file it names, config/tokenizer/processor files beside them); weight files from an
    earlier upload that this one does not carry are deleted in the same commit. The checkpoint's
    lock is held meanwhile, so no save replaces the directory mid-upload.

    Args:
        path: a complete checkpoint directory (one holding model.safetensors.index.json).
        repo_id: the model repo, "org/name"; created (exist_ok) if missing.
        token: a Hub token; None uses huggingface_hub's own (HF_TOKEN, the cached login).
        private: visibility of a repo this call creates (None: the Hub's default).
        revision: the branch to commit to (None: the default branch).
        commit_message: None gives "Upload checkpoint (<n> files) with dist_saver".
        include_training_state: also upload a training checkpoint's optimizer files,
            optimizer.safetensors.index.json and train_state.json (left behind by default).

    Returns:
        huggingface_hub's CommitInfo of the commit.

    Raises:
        ImportError: huggingface_hub is not installed.
        CheckpointError: path is not a complete checkpoint (no index, a shard file missing).
        SaveError: a save into path holds its lock.
        huggingface_hub's errors (HfHubHTTPError...) from creating the repo or uploading.
    """
    from .commit import Target

    api = hf_api(token)
    path = os.path.abspath(os.fspath(path))
    with Target(path).locked():  # no save replaces the directory while it is uploaded
        return upload(api, path, repo_id, private=private, revision=revision, commit_message=commit_message,
                      training=include_training_state)


def hf_api(token: str | None = None):
    """huggingface_hub's HfApi; an ImportError saying how to install it if it is missing."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("push_to_hub needs huggingface_hub: pip install 'dist-saver[hf]'") from None
    return HfApi(token=token)


def upload(api, path: str, repo_id: str, *, private=None, revision=None, commit_message=None, training=False):
    """The upload itself; the caller holds the checkpoint's lock (dist_save does already)."""
    files = checkpoint_files(path, training)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    log.info("pushing %s (%d files) to %s", path, len(files), repo_id)
    return api.upload_folder(
        repo_id=repo_id, repo_type="model", folder_path=path, revision=revision,
        allow_patterns=[glob.escape(f) for f in files],  # these files exactly
        delete_patterns=STALE_PATTERNS,
        commit_message=commit_message or f"Upload checkpoint ({len(files)} files) with dist_saver",
    )


class Upload(concurrent.futures.Future):
    """A push running in a thread of its own on rank 0, so neither this rank nor the others wait
    for the Hub: a Future of the CommitInfo, whose exception is a SaveError naming the saved
    checkpoint; wait() is result() with a message naming the upload on a timeout. The
    checkpoint's lock is held until the upload ends, and released before the future is done. A
    non-daemon thread: the interpreter does not exit mid-upload."""

    _running: dict = {}  # absolute path -> Upload

    def __init__(self, path: str, repo_id: str, target):
        super().__init__()
        self.path, self.repo_id, self.target = path, repo_id, target
        self._thread = threading.Thread(target=self._run, name="dist_saver-upload", daemon=False)

    @classmethod
    def start(cls, path: str, repo_id: str, target) -> "Upload":
        """target: the save's commit.Target, whose lock this upload now owns and releases."""
        up = cls(path, repo_id, target)
        up.set_running_or_notify_cancel()  # running from here: cancel() can no longer stop it
        cls._running[path] = up
        up._thread.start()
        target.owner = up
        return up

    def _run(self) -> None:
        result, error = None, None
        try:
            try:
                result = upload(hf_api(), self.path, self.repo_id)
            except BaseException as e:
                error = _upload_error(self.path, self.repo_id, e)
                log.error("%s", error)
            finally:  # before the future completes: whoever waited may save into path at once
                self.target.release()
                Upload._running.pop(self.path, None)
        finally:  # completed even if releasing the lock failed: nobody waits forever
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(result)

    def wait(self, timeout: float | None = None):
        """The CommitInfo; raises the upload's SaveError, or TimeoutError if it still runs."""
        try:
            return self.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the upload of {self.path} to {self.repo_id} is still running") from None

    @classmethod
    def wait_for(cls, path: str) -> None:
        """Before a save into path: let an upload of the previous checkpoint there finish (its
        error, if any, was logged and belongs to its own handle)."""
        up = cls._running.get(path)
        if up is not None:
            concurrent.futures.wait([up])


def _upload_error(path: str, repo_id: str, e: BaseException) -> Exception:
    from .comm import describe_error
    from .errors import SaveError

    error = SaveError(f"{path} is saved and complete, but pushing it to {repo_id} failed on rank 0: "
                      f"{describe_error(e)}")
    error.__cause__ = e
    return error
