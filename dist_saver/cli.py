"""The dist-saver command: a thin layer over the library.

    dist-saver inspect DIR [--json]    files, ranks, sizes, dtypes, tensors, aliases, completeness
    dist-saver verify DIR [--json]     recompute checksums; exit 1 naming the damaged file
    dist-saver convert-dcp SRC DST     a PyTorch DCP checkpoint into our layout
    dist-saver reshard SRC DST --max-shard-size 2GB   rewrite a checkpoint with another file split
    dist-saver convert-legacy SRC DST  pytorch_model.bin checkpoint (weights-only) into our layout
                                       (these three: under torchrun every rank rewrites its share in parallel)
    dist-saver push DIR REPO           upload a complete checkpoint to a Hugging Face Hub model repo

Exit codes: 0 fine, 1 the checkpoint is incomplete, damaged or unreadable (or a rewrite or upload
failed), 2 bad usage or not a checkpoint. Sizes are in decimal units (1 GB = 10^9 bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter

from . import __version__
from . import format as fmt
from .errors import CheckpointError
from .index import CheckpointIndex, open_weights, read_index, read_optimizer_index
from .verify import verify

OK, DAMAGED, USAGE = 0, 1, 2
EXIT_CODES = ("exit codes: 0 fine, 1 the checkpoint is incomplete, damaged or unreadable, "
              "2 bad usage or not a checkpoint")
REWRITE_EXIT_CODES = "exit codes: 0 written, 1 the rewrite failed (nothing is published), 2 bad usage"
PUSH_EXIT_CODES = ("exit codes: 0 pushed, 1 the checkpoint is incomplete or the upload failed, "
                   "2 bad usage or not a checkpoint")
_INDEX_NAMES = (fmt.INDEX_NAME, fmt.LEGACY_INDEX_NAME)


class UsageError(Exception):
    """The command was given something it cannot work on: exit 2."""


def human_size(n: int) -> str:
    """Bytes in decimal units (as SaveResult.gb_per_s and the log lines): '96 B', '4.19 MB', '7.92 GB'."""
    if n < 1000:
        return f"{n} B"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12)):
        if n < scale * 1000 or unit == "TB":
            return f"{n / scale:.{max(0, 2 - int(math.log10(n / scale)))}f} {unit}"
    raise AssertionError  # unreachable


def locate(path: str, command: str) -> CheckpointIndex:
    """The checkpoint at path, or UsageError: nothing there, one file of a checkpoint (the
    directory is needed), or no index or weights file we can read (refused or unparsable)."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        directory, name = os.path.split(os.path.abspath(path))
        owner = _checkpoint_holding(directory, name)
        if owner is not None or fmt.is_shard_file_name(name):
            where = f"the checkpoint in {directory}" if owner is not None else "a sharded checkpoint"
            raise UsageError(f"{path} is one file of {where}; give the checkpoint directory: "
                             f"dist-saver {command} {directory if owner is not None else 'DIR'}")
    try:
        return read_index(path)
    except CheckpointError as e:  # e.g. no index, an unparsable one, a pickle that runs code
        raise UsageError(f"not a checkpoint: {e}") from None


def _checkpoint_holding(directory: str, name: str) -> str | None:
    """The index beside a weights file that lists it, if any."""
    for index_name in _INDEX_NAMES:
        full = os.path.join(directory, index_name)
        if os.path.isfile(full):
            try:
                with open(full) as f:
                    if name in set((json.load(f).get("weight_map") or {}).values()):
                        return full
            except (OSError, ValueError, AttributeError, TypeError):
                pass
    return None


def inspect_checkpoint(path: str) -> dict:
    """What a checkpoint holds, read from its index and file headers (no tensor data); a training
    checkpoint's optimizer part and train state under "optimizer" and "train_state"."""
    index = locate(path, "inspect")
    ours = index.ours or {}
    files = _file_entries(index)
    info = {
        "path": index.directory,
        "complete": all(f["present"] for f in files),
        "written_by": "dist_saver" if index.ours else "another tool",
        "world_size": ours.get("world_size"),
        "tensors": len(index.weight_map),
        # tensor data only (SaveResult.total_bytes, the index's total_size) and the files on disk
        # (headers, padded to 4096 bytes in ours, included), of the files present
        "tensor_bytes": sum(f.get("tensor_bytes", 0) for f in files),
        "file_bytes": sum(f.get("size", 0) for f in files),
        "aliases": index.aliases,
        "files": files,
    }
    optimizer = read_optimizer_index(index.directory)
    if optimizer is not None:
        opt_files = _file_entries(optimizer)
        groups = ((optimizer.ours or {}).get("optimizer") or {}).get("param_groups") or []
        info["optimizer"] = {
            "complete": all(f["present"] for f in opt_files), "tensors": len(optimizer.weight_map),
            "parameters": sum(len(g.get("params", [])) for g in groups if isinstance(g, dict)),
            "param_groups": len(groups), "tensor_bytes": sum(f.get("tensor_bytes", 0) for f in opt_files),
            "file_bytes": sum(f.get("size", 0) for f in opt_files), "files": opt_files}
        info["complete"] = info["complete"] and info["optimizer"]["complete"]
    train = os.path.join(index.directory, fmt.TRAIN_STATE_NAME)
    if os.path.isfile(train):
        with open(train, "rb") as f:
            doc = fmt.parse_json(train, f.read(), "the train state")
        state = doc.get("train_state") if isinstance(doc, dict) else None
        info["train_state"] = {"keys": sorted(state) if isinstance(state, dict) else None,
                               "world_size": doc.get("world_size") if isinstance(doc, dict) else None}
    return info


def _file_entries(index: CheckpointIndex) -> list[dict]:
    recorded = (index.ours or {}).get("files") or {}
    files = []
    for name in sorted(set(index.weight_map.values())):
        entry = {"file": name, "rank": (recorded.get(name) or {}).get("rank"), "present": False}
        full = fmt.safe_member(index.directory, name)
        if os.path.isfile(full):
            with open_weights(full) as f:
                infos = [f.info(n) for n in f.names()]
            legacy = fmt.is_legacy_file(name)
            dtypes = Counter(str(i[0]).removeprefix("torch.") if legacy else fmt.dtype_code(i[0]) for i in infos)
            rec = recorded.get(name) or {}
            ranges = rec.get("ranges") if isinstance(rec.get("ranges"), list) else None
            entry.update(present=True, size=os.path.getsize(full), tensors=len(infos),
                         tensor_bytes=sum(fmt.nbytes(i[1], i[0]) for i in infos), dtypes=dict(dtypes),
                         writers=sorted({r[2] for r in ranges if isinstance(r, list) and len(r) == 4})
                         if ranges else [], ranges=len(ranges) if ranges else None,
                         checksum=rec.get("checksum"))
        files.append(entry)
    return files


def _ranks(ranks: list) -> str:
    return ",".join(map(str, ranks[:8])) + (f",... ({len(ranks)})" if len(ranks) > 8 else "")


def _print_inspect(info: dict) -> None:
    print(f"{info['path']}: {info['tensors']} tensors, {human_size(info['tensor_bytes'])} of tensor data in "
          f"{len(info['files'])} files ({human_size(info['file_bytes'])} on disk), written by {info['written_by']}"
          f"{'' if info['complete'] else ', INCOMPLETE'}")
    _print_files(info["files"])
    for alias, target in sorted(info["aliases"].items()):
        print(f"  alias {alias} -> {target}")
    opt = info.get("optimizer")
    if opt is not None:
        print(f"optimizer: {opt['tensors']} state tensors for {opt['parameters']} parameters in "
              f"{opt['param_groups']} param group(s), {human_size(opt['tensor_bytes'])} in {len(opt['files'])} files"
              f"{'' if opt['complete'] else ', INCOMPLETE'}")
        _print_files(opt["files"])
    train = info.get("train_state")
    if train is not None:
        print(f"train state: keys {train['keys']}, saved by {train['world_size']} rank(s)")


def _print_files(files: list[dict]) -> None:
    for f in files:
        if not f["present"]:
            print(f"  {f['file']}: MISSING")
            continue
        dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(f["dtypes"].items()))
        owner = f"rank {f['rank']}" + (f" (written by ranks {_ranks(f['writers'])})" if f.get("writers") else "")
        print(f"  {f['file']}: {owner + ', ' if f['rank'] is not None else ''}{human_size(f['size'])}, "
              f"{f['tensors']} tensor{'' if f['tensors'] == 1 else 's'} ({dtypes})")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dist-saver", description=__doc__.split("\n\n")[0], epilog=EXIT_CODES)
    ap.add_argument("--version", action="version", version=f"dist-saver {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in (("inspect", ("describe a checkpoint: files, the ranks that wrote them, sizes, dtypes, "
                                    "tensors, aliases, completeness (no tensor data is read)")),
                       ("verify", ("recompute the checksum of every byte range each rank wrote; names the "
                                   "damaged file"))):
        p = sub.add_parser(name, help=text.split(":")[0].split(";")[0], description=text, epilog=EXIT_CODES)
        p.add_argument("path", metavar="CHECKPOINT_DIR",
                       help="the checkpoint directory (the one holding model.safetensors.index.json)")
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    for name, text, src in (
            ("convert-dcp", "convert a PyTorch DCP checkpoint into the HF layout", "the DCP checkpoint directory"),
            ("reshard", "rewrite a checkpoint with another max shard size / number of writers",
             "the checkpoint directory to rewrite (ours or any Hugging Face one)"),
            ("convert-legacy", "convert a pytorch_model.bin checkpoint into the HF safetensors layout",
             "the directory holding pytorch_model.bin (or its index), or one .bin file")):
        p = sub.add_parser(name, help=text, description=text + "; under torchrun every rank writes its share",
                           epilog=REWRITE_EXIT_CODES)
        p.add_argument("src", metavar="SRC", help=src)
        p.add_argument("dst", metavar="DST", help="the new checkpoint directory (published atomically)")
        p.add_argument("--max-shard-size", default=None, help="e.g. 5GB (10^9) or 512MiB (2^20); default: one "
                                                              "file per rank")
        p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at DST")
    text = "upload a complete checkpoint to a Hugging Face Hub model repo"
    p = sub.add_parser("push", help=text, description=text + " (one commit)", epilog=PUSH_EXIT_CODES)
    p.add_argument("path", metavar="CHECKPOINT_DIR", help="the checkpoint directory")
    p.add_argument("repo", metavar="REPO", help="the Hub repo id, org/name")
    p.add_argument("--private", action="store_true", help="create the repo private if it is new")
    p.add_argument("--revision", default=None, help="branch to commit to")
    p.add_argument("--message", default=None, help="commit message")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the dist-saver command.

    Args:
        argv: the arguments after the program name (None: sys.argv[1:]).

    Returns: the exit code, chosen by the type of error only (never its text): 0 fine; 1
    (DAMAGED) a CheckpointError or OSError on a checkpoint that was found, or a failed rewrite
    (DistSaverError, OSError, ValueError) or upload; 2 (USAGE) a UsageError (nothing there, not
    a checkpoint, a file of one) or a bad argument.

    Raises: SystemExit from argparse for bad usage, --help and --version.
    """
    args = _parser().parse_args(argv)
    if args.command in ("convert-dcp", "reshard", "convert-legacy"):
        return _rewrite(args)
    if args.command == "push":
        return _push(args)
    try:
        if args.command == "inspect":
            info = inspect_checkpoint(args.path)
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_inspect(info)
            return OK if info["complete"] else DAMAGED
        index = locate(args.path, "verify")
        if not (index.ours or {}).get("files"):
            raise UsageError(f"{args.path}: no checksums recorded: not written by dist_saver, or saved with "
                             "checksums=False (dist-saver inspect shows what it holds)")
        checked = verify(args.path)
        print(json.dumps({"ok": True, "files": checked}, indent=2) if args.json
              else f"{args.path}: {len(checked)} files verified")
        return OK
    except UsageError as e:
        return _fail(args, e, USAGE)
    except (CheckpointError, OSError) as e:  # found a checkpoint, but it is broken or unreadable
        return _fail(args, e, DAMAGED)


def _fail(args, error: BaseException, code: int) -> int:
    if args.json:
        print(json.dumps({"ok": False, "error": str(error), "exit_code": code}))
    else:
        print(f"dist-saver {args.command}: {error}", file=sys.stderr)
    return code


def _rewrite(args) -> int:
    import torch.distributed as dist

    from .convert import convert_dcp, convert_legacy, reshard
    from .errors import DistSaverError

    try:  # usage errors first, before any process group exists
        if not os.path.exists(args.src):
            raise UsageError(f"{args.src}: no such file or directory")
        fmt.parse_size(args.max_shard_size)
    except (UsageError, ValueError) as e:
        print(f"dist-saver {args.command}: {e}", file=sys.stderr)
        return USAGE
    launched = "RANK" in os.environ and not dist.is_initialized()  # under torchrun
    if launched:
        dist.init_process_group("gloo")
    try:
        fn = {"convert-dcp": convert_dcp, "reshard": reshard, "convert-legacy": convert_legacy}[args.command]
        result = fn(args.src, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        if result.rank == 0:
            print(f"{args.dst}: {len(result.files)} files, {human_size(result.total_bytes)} of tensor data from "
                  f"{result.world_size} rank(s) in {result.seconds:.2f}s")
        return OK
    except (DistSaverError, OSError, ValueError) as e:
        print(f"dist-saver {args.command}: {e}", file=sys.stderr)
        return DAMAGED
    finally:
        if launched:
            dist.destroy_process_group()


def _push(args) -> int:
    from .hub import push_to_hub

    try:
        locate(args.path, "push")
        info = push_to_hub(args.path, args.repo, private=args.private or None, revision=args.revision,
                           commit_message=args.message)
    except (UsageError, ImportError) as e:  # not a checkpoint; huggingface_hub not installed
        print(f"dist-saver push: {e}", file=sys.stderr)
        return USAGE
    except CheckpointError as e:  # a checkpoint, but incomplete or damaged: nothing was uploaded
        print(f"dist-saver push: {e}", file=sys.stderr)
        return DAMAGED
    except Exception as e:  # the Hub's errors (auth, network): a failed upload, not bad usage
        print(f"dist-saver push: upload to {args.repo} failed: {e}", file=sys.stderr)
        return DAMAGED
    print(f"{args.path}: pushed to {args.repo} ({getattr(info, 'commit_url', info)})")
    return OK


if __name__ == "__main__":  # last: python -m dist_saver.cli needs every function above defined
    sys.exit(main())
