"""The dist-saver command: a thin layer over the library.

    dist-saver inspect PATH [--json]   files, ranks, sizes, dtypes, tensors, aliases, completeness
    dist-saver verify PATH [--json]    recompute checksums; exit 1 naming the damaged file
    dist-saver convert-dcp SRC DST     a PyTorch DCP checkpoint into our layout
    dist-saver reshard SRC DST --max-shard-size 2GB   rewrite a checkpoint with another file split
    dist-saver convert-legacy SRC DST  pytorch_model.bin checkpoint (weights-only) into our layout
                                       (these three: under torchrun every rank rewrites its share in parallel)
    dist-saver push PATH REPO          upload a complete checkpoint to a Hugging Face Hub model repo

Exit codes: 0 fine, 1 the checkpoint is incomplete or damaged, 2 bad usage or not a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from . import format as fmt
from .errors import CheckpointError
from .reader import open_weights
from .verify import verify


def inspect_checkpoint(path: str) -> dict:
    """What a checkpoint holds, read from its index and file headers (no tensor data)."""
    index = fmt.read_index(path)
    ours = index.ours or {}
    recorded = ours.get("files") or {}
    files = []
    for name in sorted(set(index.weight_map.values())):
        entry = {"file": name, "rank": (recorded.get(name) or {}).get("rank"), "present": False}
        full = fmt.safe_member(index.directory, name)
        if os.path.isfile(full):
            with open_weights(full) as f:
                names = f.names()
                dtypes = Counter(str(f.info(n)[0]).removeprefix("torch.") if fmt.is_legacy_file(name)
                                 else fmt.dtype_code(f.info(n)[0]) for n in names)
            rec = recorded.get(name) or {}
            ranges = rec.get("ranges") if isinstance(rec.get("ranges"), list) else None
            entry.update(present=True, size=os.path.getsize(full), tensors=len(names), dtypes=dict(dtypes),
                         writers=sorted({r[2] for r in ranges if isinstance(r, list) and len(r) == 4})
                         if ranges else [], ranges=len(ranges) if ranges else None,
                         checksum=rec.get("checksum"))
        files.append(entry)
    return {
        "path": index.directory,
        "complete": all(f["present"] for f in files),
        "written_by": "dist_saver" if index.ours else "another tool",
        "world_size": ours.get("world_size"),
        "tensors": len(index.weight_map),
        "bytes": sum(f.get("size", 0) for f in files),
        "aliases": index.aliases,
        "files": files,
    }


def _ranks(ranks: list) -> str:
    return ",".join(map(str, ranks[:8])) + (f",... ({len(ranks)})" if len(ranks) > 8 else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dist-saver", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in (("inspect", "describe a checkpoint"), ("verify", "check every file's checksum")):
        p = sub.add_parser(name, help=text)
        p.add_argument("path")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (("convert-dcp", "convert a PyTorch DCP checkpoint into the HF layout"),
                       ("reshard", "rewrite a checkpoint with another max shard size / number of writers"),
                       ("convert-legacy", "convert a pytorch_model.bin checkpoint into the HF safetensors layout")):
        p = sub.add_parser(name, help=text)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--max-shard-size", default=None)
        p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("push", help="upload a complete checkpoint to a Hugging Face Hub model repo")
    p.add_argument("path")
    p.add_argument("repo", help="org/name")
    p.add_argument("--private", action="store_true", help="create the repo private if it is new")
    p.add_argument("--revision", default=None, help="branch to commit to")
    p.add_argument("--message", default=None, help="commit message")
    args = ap.parse_args(argv)
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
                print(f"{info['path']}: {info['tensors']} tensors, {info['bytes'] / 1e9:.3f} GB in "
                      f"{len(info['files'])} files, written by {info['written_by']}"
                      f"{'' if info['complete'] else ', INCOMPLETE'}")
                for f in info["files"]:
                    if not f["present"]:
                        print(f"  {f['file']}: MISSING")
                        continue
                    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(f["dtypes"].items()))
                    written = f" (written by ranks {_ranks(f['writers'])})" if f.get("writers") else ""
                    print(f"  {f['file']}: rank {f['rank']}{written}, {f['size']} bytes, {f['tensors']} tensors "
                          f"({dtypes})")
                for alias, target in sorted(info["aliases"].items()):
                    print(f"  alias {alias} -> {target}")
            return 0 if info["complete"] else 1
        checked = verify(args.path)
        print(json.dumps({"ok": True, "files": checked}, indent=2) if args.json
              else f"{args.path}: {len(checked)} files verified")
        return 0
    except CheckpointError as e:
        damaged = "does not match" in str(e) or "missing" in str(e)  # a checkpoint, but broken
        if args.json:
            print(json.dumps({"ok": False, "error": str(e)}))
        else:
            print(f"dist-saver {args.command}: {e}", file=sys.stderr)
        return 1 if damaged else 2


def _rewrite(args) -> int:
    import torch.distributed as dist

    from .convert import convert_dcp, convert_legacy, reshard
    from .errors import DistSaverError

    launched = "RANK" in os.environ and not dist.is_initialized()  # under torchrun
    if launched:
        dist.init_process_group("gloo")
    try:
        fn = {"convert-dcp": convert_dcp, "reshard": reshard, "convert-legacy": convert_legacy}[args.command]
        result = fn(args.src, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        if result.rank == 0:
            print(f"{args.dst}: {len(result.files)} files, {result.total_bytes / 1e9:.3f} GB from "
                  f"{result.world_size} rank(s) in {result.seconds:.2f}s")
        return 0
    except (DistSaverError, OSError, ValueError) as e:
        print(f"dist-saver {args.command}: {e}", file=sys.stderr)
        return 1
    finally:
        if launched:
            dist.destroy_process_group()


def _push(args) -> int:
    from .hub import push_to_hub

    try:
        info = push_to_hub(args.path, args.repo, private=args.private or None, revision=args.revision,
                           commit_message=args.message)
    except CheckpointError as e:
        print(f"dist-saver push: {e}", file=sys.stderr)
        return 1 if "missing" in str(e) else 2
    except ImportError as e:
        print(f"dist-saver push: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the Hub's errors (auth, network): a failed upload, not bad usage
        print(f"dist-saver push: upload to {args.repo} failed: {e}", file=sys.stderr)
        return 1
    print(f"{args.path}: pushed to {args.repo} ({getattr(info, 'commit_url', info)})")
    return 0


if __name__ == "__main__":  # last: python -m dist_saver.cli needs every function above defined
    sys.exit(main())
