"""The on-disk format: safetensors headers, file names, the index, size strings.

Nothing else in the package builds file names or encodes/decodes JSON headers.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

import torch

from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
# save_pretrained's files that a checkpoint of ours may carry beside the weights
OWN_EXTRA_FILES = ("config.json", "generation_config.json")
SINGLE_NAME = "model.safetensors"
# Legacy torch.save weights: read (weights-only), never written.
LEGACY_INDEX_NAME = "pytorch_model.bin.index.json"
LEGACY_SINGLE_NAME = "pytorch_model.bin"
LEGACY_SUFFIXES = (".bin", ".pt", ".pth")
# Key under the index's "metadata" that marks a checkpoint as ours and carries our extras.
META_KEY = "dist_saver"
FORMAT_VERSION = 1

# As safetensors itself: a larger header is damage or an attack, not a model.
MAX_HEADER_BYTES = 100_000_000

# The tensor data starts at a multiple of this, so O_DIRECT writes of the data are aligned.
# safetensors only needs 8; the header is padded with spaces, which every JSON parser skips.
DATA_ALIGN = 4096

_CODE_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16")):
    if hasattr(torch, _attr):
        _CODE_TO_DTYPE[_code] = getattr(torch, _attr)
_DTYPE_TO_CODE = {dt: code for code, dt in _CODE_TO_DTYPE.items()}

_FILE_RE = re.compile(r"^model-(\d{5,})-of-(\d{5,})\.safetensors$")


def dtype_code(dtype: torch.dtype) -> str:
    """safetensors' name for a torch dtype; raises for dtypes the format cannot hold."""
    try:
        return _DTYPE_TO_CODE[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors") from None


def torch_dtype(code: str) -> torch.dtype:
    try:
        return _CODE_TO_DTYPE[code]
    except KeyError:
        raise CheckpointError(f"unknown safetensors dtype {code!r}") from None


_ITEMSIZE = {code: dt.itemsize for code, dt in _CODE_TO_DTYPE.items()}


def itemsize(code: str) -> int:
    return _ITEMSIZE[code]


def shard_file_name(number: int, total: int) -> str:
    """The Hugging Face shard name, 1-based: model-00001-of-00004.safetensors."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def is_shard_file_name(name: str) -> bool:
    return _FILE_RE.match(name) is not None


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(size: int | str | None) -> int | None:
    """Bytes from an int or a string like "5GB" (10^9) or "512MiB" (2^20), as transformers does."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    m = _SIZE_RE.match(str(size))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '5GB', '512MiB'")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


class HeaderEntry(NamedTuple):  # a NamedTuple: plans build tens of thousands of these
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def encode_header(entries: Iterable[HeaderEntry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The file prefix (8-byte length + JSON), padded so the data starts at DATA_ALIGN."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    body = json.dumps(header, separators=(",", ":")).encode()
    total = -(-(8 + len(body)) // DATA_ALIGN) * DATA_ALIGN
    body += b" " * (total - 8 - len(body))
    return struct.pack("<Q", len(body)) + body


def read_header(path: str, fd: int | None = None) -> tuple[dict, int]:
    """(header dict, data start) of a safetensors file; reads through fd if given."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, 8, 0)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} is absurd (limit {MAX_HEADER_BYTES})")
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds file size {size}")
        body = os.pread(fd, n, 8)
    finally:
        if own:
            os.close(fd)
    try:
        header = json.loads(body)
    except ValueError as e:
        raise CheckpointError(f"{path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    return header, 8 + n


def index_document(weight_map: Mapping[str, str], total_size: int, extra: Mapping) -> dict:
    return {
        "metadata": {"total_size": total_size, META_KEY: {"version": FORMAT_VERSION, **extra}},
        "weight_map": dict(sorted(weight_map.items())),
    }


def write_durable(path: str, data: str | bytes) -> None:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def json_text(doc, indent: int = 0) -> str:
    """JSON indented like json.dumps(indent=2), but lists of plain values on one line each (an
    index lists thousands of [offset, length, rank, checksum] ranges)."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(doc, dict) and doc:
        items = (f"{inner}{json.dumps(str(k))}: {json_text(v, indent + 2)}" for k, v in doc.items())
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(doc, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in doc):
        return "[\n" + ",\n".join(inner + json_text(v, indent + 2) for v in doc) + f"\n{pad}]"
    return json.dumps(doc)


def write_json_atomic(path: str, doc: dict) -> None:
    """Write to a temp name, fsync, rename, fsync the directory: readers see all or nothing."""
    tmp = f"{path}.tmp.{os.getpid()}"
    write_durable(tmp, json_text(doc) + "\n")
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class CheckpointIndex:
    """Where each stored tensor lives, read from an index or a single model.safetensors."""

    directory: str
    weight_map: dict[str, str]  # stored name -> file name (relative)
    aliases: dict[str, str]  # alias name -> stored name
    ours: dict | None  # our metadata block, or None for checkpoints from other tools


def read_index(path: str) -> CheckpointIndex:
    """Locate the tensors of a checkpoint directory or single weights file.

    Looks for, in this order (as transformers does): model.safetensors.index.json,
    model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin.
    """
    if os.path.isfile(path) and path.endswith((".safetensors",) + LEGACY_SUFFIXES):
        return _single(os.path.dirname(path) or ".", os.path.basename(path))
    for name in (INDEX_NAME, SINGLE_NAME, LEGACY_INDEX_NAME, LEGACY_SINGLE_NAME):
        if os.path.isfile(os.path.join(path, name)):
            return _indexed(path, name) if name.endswith(".json") else _single(path, name)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    raise CheckpointError(f"{path}: no {INDEX_NAME}, {SINGLE_NAME}, {LEGACY_INDEX_NAME} or "
                          f"{LEGACY_SINGLE_NAME}: not a complete checkpoint")


def _indexed(directory: str, name: str) -> CheckpointIndex:
    index_path = os.path.join(directory, name)
    try:
        with open(index_path) as f:
            doc = json.load(f)
        weight_map = dict(doc["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index: {e!r}") from None
    ours = (doc.get("metadata") or {}).get(META_KEY) if name == INDEX_NAME else None
    aliases = dict((ours or {}).get("aliases", {}))
    for file in set(weight_map.values()):
        safe_member(directory, file)
    return CheckpointIndex(directory, weight_map, aliases, ours)


def _single(directory: str, name: str) -> CheckpointIndex:
    from .reader import open_weights  # the file itself lists its tensors

    with open_weights(os.path.join(directory, name)) as f:
        names = f.names()
    return CheckpointIndex(directory, {n: name for n in names}, {}, None)


def is_legacy_file(name: str) -> bool:
    return name.endswith(LEGACY_SUFFIXES)


def safe_member(directory: str, name: str) -> str:
    """The path of file `name` inside directory; refuses names that lead anywhere else.

    weight_map values come from a file we may not trust: '../x', absolute paths, nested paths
    and symlinks that leave the directory are refused before anything is opened.
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or os.path.isabs(name) or "\0" in name):
        raise CheckpointError(f"{directory}: the index names file {name!r}, which is not a plain file name")
    full = os.path.join(directory, name)
    real_dir = os.path.realpath(directory)
    if os.path.dirname(os.path.realpath(full)) != real_dir:
        raise CheckpointError(f"{full}: is a link that leads outside the checkpoint directory")
    return full


def is_plain_relpath(name) -> bool:
    """A relative path of plain names ('a.json', 'templates/x.jinja'): nothing hidden, no '..'."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or os.path.isabs(name):
        return False
    return all(part and not part.startswith(".") for part in name.split("/"))


def write_extra_files(directory: str, files) -> None:
    """Write (relative name, bytes) pairs under directory, durably (files and new subdirectories)."""
    made = set()
    for name, data in files:
        if not is_plain_relpath(name):
            raise ValueError(f"refusing to write {name!r}: not a plain relative path")
        path = os.path.join(directory, name)
        sub = os.path.dirname(path)
        if sub != directory and sub not in made:
            os.makedirs(sub, exist_ok=True)
            made.add(sub)
        write_durable(path, data)
    for sub in sorted(made, key=len, reverse=True):
        fsync_dir(sub)


def looks_like_our_checkpoint(directory: str) -> bool:
    """True if every entry is an index of ours, its temp files, a shard file name we write, or a
    plain file (or a directory of them) that our index lists as saved beside the weights."""
    ours = None
    if os.path.isfile(os.path.join(directory, INDEX_NAME)):
        try:
            ours = read_index(directory).ours
        except CheckpointError:
            return False
        if ours is None:
            return False
    listed = ours.get("extra_files", []) if isinstance(ours, dict) else []
    if not isinstance(listed, list) or not all(is_plain_relpath(n) for n in listed):
        return False  # damaged or hand-made: do not let it vouch for anything
    listed = set(listed)
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if os.path.islink(full):
            return False
        if os.path.isfile(full) and (name == INDEX_NAME or name.startswith(INDEX_NAME + ".tmp")
                                     or is_shard_file_name(name) or name in OWN_EXTRA_FILES or name in listed):
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
