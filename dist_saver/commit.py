"""The commit: check what the ranks wrote against the plan, then publish the index, last."""

from __future__ import annotations

import os
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


def publish_index(directory: str, plan: Plan, written: Sequence[WrittenFile]) -> str:
    """Write model.safetensors.index.json atomically; its presence marks a complete checkpoint."""
    check_written(plan, written)
    files = {w.name: {"rank": w.rank, "size": w.size} for w in sorted(written, key=lambda w: w.name)}
    extra = {"world_size": plan.world_size, "files": files, "aliases": dict(sorted(plan.aliases.items()))}
    doc = fmt.index_document(plan.weight_map(), plan.total_size, extra)
    path = os.path.join(directory, fmt.INDEX_NAME)
    fmt.write_json_atomic(path, doc)
    return path


def prepare_directory(directory: str) -> list[str]:
    """Make the target ready on rank 0; return the old shard files to remove after publishing.

    Refuses a non-empty directory that is not a dist_saver checkpoint. An old checkpoint of ours
    loses its index first, so it is never taken as complete while files are being replaced.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SaveError(f"{directory} exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    entries = os.listdir(directory)
    if entries and not fmt.looks_like_our_checkpoint(directory):
        foreign = [e for e in sorted(entries) if not fmt.is_shard_file_name(e)][:5]
        raise SaveError(
            f"{directory} is not empty and was not written by dist_saver (found e.g. {foreign}); "
            "choose an empty or new directory"
        )
    index = os.path.join(directory, fmt.INDEX_NAME)
    if os.path.exists(index):
        os.remove(index)
        fmt.fsync_dir(directory)
    return [e for e in entries if fmt.is_shard_file_name(e)]


def remove_stale(directory: str, old_files: Sequence[str], plan: Plan) -> None:
    keep = {f.name for f in plan.files}
    for name in old_files:
        if name not in keep:
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                pass
