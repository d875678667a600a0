"""The on-disk format: safetensors headers, file names, the index's content, size strings.

Every file name the package writes, looks for or matches is built here (the shards, the indexes,
the upload's patterns, a save's hidden sibling directories and lock), and nothing else in the
package encodes or decodes safetensors headers or index documents. Finding a checkpoint's files
and opening them is index.py's (above the readers); nothing here opens a weights file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import reprlib
import struct
from typing import Iterable, Mapping, NamedTuple

import torch

from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
# A training checkpoint's parts beside the model (dist_save(..., optimizer=, train_state=)).
OPTIM_INDEX_NAME = "optimizer.safetensors.index.json"
TRAIN_STATE_NAME = "train_state.json"
# save_pretrained's files that a checkpoint of ours may carry beside the weights
OWN_EXTRA_FILES = ("config.json", "generation_config.json")
SAFETENSORS_SUFFIX = ".safetensors"
SINGLE_NAME = "model" + SAFETENSORS_SUFFIX
# Legacy torch.save weights: read (weights-only), never written.
LEGACY_INDEX_NAME = "pytorch_model.bin.index.json"
LEGACY_SINGLE_NAME = "pytorch_model.bin"
LEGACY_SUFFIXES = (".bin", ".pt", ".pth")
# transformers' names for the shards of a sharded pytorch_model.bin
LEGACY_SHARD_PATTERN = "pytorch_model-*-of-*.bin"
# Key under the index's "metadata" that marks a checkpoint as ours and carries our extras.
META_KEY = "dist_saver"
# The major format version: readers refuse a newer major; "1.x" (a string) is a compatible
# addition that this reader may load.
FORMAT_VERSION = 1
# What writers record: 1.1 adds block checksums (checksum.py) and the shard files' marker below.
WRITTEN_VERSION = "1.1"
# Every shard file of ours carries in its header's __metadata__ (which plain safetensors readers
# ignore) the format version and the checkpoint's id, which the index records too (CHECKPOINT_ID_KEY
# in our metadata block): a shard of ours under an index that lost our block, or that belongs to
# another save, is refused as damaged instead of being read as a foreign checkpoint.
SHARD_VERSION_KEY = "dist_saver"
SHARD_CHECKPOINT_KEY = "dist_saver_checkpoint"
CHECKPOINT_ID_KEY = "checkpoint"
CHECKPOINT_ID_CHARS = 32  # uuid4().hex: every header's length is known before the id is
# Key in our metadata block: sha256 of the index's own content (see index_digest).
DIGEST_KEY = "index_digest"

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

_FILE_RE = re.compile(r"^(model|optimizer)-(\d{5,})-of-(\d{5,})\.safetensors$")


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


def shard_file_name(number: int, total: int, prefix: str = "model") -> str:
    """The Hugging Face shard name, 1-based: model-00001-of-00004.safetensors (optimizer-... for a
    training checkpoint's optimizer state)."""
    return f"{prefix}-{number:05d}-of-{total:05d}.safetensors"


def is_shard_file_name(name: str) -> bool:
    return _FILE_RE.match(name) is not None


def shard_file_pattern(prefix: str = "model") -> str:
    """The glob that matches every shard_file_name(..., prefix): model-*-of-*.safetensors."""
    return f"{prefix}-*-of-*{SAFETENSORS_SUFFIX}"


def is_weights_file(name: str) -> bool:
    """A safetensors or legacy torch.save weights file, by its name."""
    return name.endswith(SAFETENSORS_SUFFIX) or is_legacy_file(name)


# A save into directory `name` keeps its state in hidden siblings (in the same parent, so that
# publishing is a rename): never inside the checkpoint, so an upload or a reader never sees them.
def staging_dir_name(name: str) -> str:
    """The sibling a save writes into before publishing it."""
    return f".{name}.dist_saver-staging"


def previous_dir_name(name: str) -> str:
    """The sibling the replaced checkpoint is renamed to while a save publishes."""
    return f".{name}.dist_saver-previous"


def lock_file_name(name: str) -> str:
    """The sibling lock file held by a save (and an upload) of the directory."""
    return f".{name}.dist_saver.lock"


def lock_claim_name(name: str, token: str) -> str:
    """A file holding a would-be lock owner's record, hard-linked to the lock name to take it: the
    lock then never exists without its owner's record (a kill between create and write left an
    empty lock that no one could tell from a live one)."""
    return f".{name}.dist_saver-claim-{token}"


def deleting_dir_name(name: str) -> str:
    """The sibling a checkpoint is renamed to before it is deleted (rotation): a crash in the
    middle of the deletion leaves a hidden directory, never a half-deleted checkpoint."""
    return f".{name}.dist_saver-deleting"


_SIBLING_RE = re.compile(r"^\.(.+)\.dist_saver(-staging|-previous|-deleting|\.lock|-claim-[0-9a-f]+)$")


def sibling_of(name: str) -> tuple[str, str] | None:
    """(the checkpoint directory's name, "staging" | "previous" | "deleting" | "lock" | "claim-<token>") of one of our
    hidden siblings, or None."""
    m = _SIBLING_RE.match(name)
    return (m.group(1), m.group(2).lstrip("-.")) if m else None


# CheckpointManager's directories, as Hugging Face's Trainer names them (its get_last_checkpoint
# finds the newest): root/checkpoint-<step>.
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"checkpoint-{step}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint-<step> directory name, or None for any other name."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def damaged_dir_name(name: str, n: int = 0) -> str:
    """Where CheckpointManager moves a damaged checkpoint-<step> it would save over (kept, not
    deleted; a name no reader takes for a checkpoint)."""
    return f"{name}.damaged" + (f"-{n}" if n else "")


def nbytes(shape: Iterable[int], dtype: torch.dtype | str | int) -> int:
    """Bytes of a tensor or box of this shape; dtype: a torch dtype, a safetensors code ("BF16")
    or an item size in bytes."""
    if isinstance(dtype, torch.dtype):
        item = dtype.itemsize
    elif isinstance(dtype, str):
        item = _ITEMSIZE[dtype]
    else:
        item = dtype
    return item * math.prod(shape)


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


# What json.dumps writes for a str (ensure_ascii: the C encoder's quoting and escaping).
_json_str = json.encoder.encode_basestring_ascii


def _plain_json_text(text: str) -> bool:
    """text holds none of the characters json.dumps (ensure_ascii) escapes (all but ASCII space
    to tilde, less quote and backslash): written as it is, in quotes, it is its JSON."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def encode_header(entries: Iterable[HeaderEntry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The file prefix (8-byte length + JSON), padded so the data starts at DATA_ALIGN.

    The JSON is json.dumps(header, separators=(",", ":")) of {"__metadata__": ..., name: {"dtype",
    "shape", "data_offsets"}, ...}, byte for byte, built as text (10^5 tensors: a tenth of the time)."""
    entries = entries if isinstance(entries, (list, tuple)) else list(entries)
    meta = {"format": "pt", **(metadata or {})}
    names = [e.name for e in entries]
    if "__metadata__" in names or len(set(names)) != len(names) or not all(type(n) is str for n in names):
        return _encode_header_dict(entries, meta)  # what the dict would make of them
    escape = not _plain_json_text("".join(names))  # else each name is written as it is
    line = ',%s:%s%d,%d]}' if escape else ',"%s":%s%d,%d]}'
    texts: dict = {}  # dtype -> shape -> the entry's JSON up to its offsets
    parts = ['{"__metadata__":', json.dumps(meta, separators=(",", ":"))]
    append = parts.append
    for name, dtype, shape, begin, end in entries:
        by_shape = texts.get(dtype)
        if by_shape is None:
            by_shape = texts[dtype] = {}
        text = by_shape.get(shape)
        if text is None:
            dims = ",".join([str(int(d)) for d in shape])
            text = by_shape[shape] = f'{{"dtype":{_json_str(dtype)},"shape":[{dims}],"data_offsets":['
        append(line % (_json_str(name) if escape else name, text, begin, end))
    append("}")
    return _framed("".join(parts).encode())


def _encode_header_dict(entries: Iterable[HeaderEntry], meta: dict) -> bytes:
    header: dict = {"__metadata__": meta}
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    return _framed(json.dumps(header, separators=(",", ":")).encode())


def _framed(body: bytes) -> bytes:
    """8-byte length, the JSON, spaces up to DATA_ALIGN."""
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
    header = parse_json(path, body, "header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    return header, 8 + n


def parse_json(path: str, data: bytes | str, what: str):
    """json.loads of a file we may not trust: invalid JSON, or JSON nested too deeply for the
    parser (a RecursionError), is a CheckpointError naming the file."""
    try:
        return json.loads(data)
    except RecursionError:
        raise CheckpointError(f"{path}: {what} is JSON nested too deeply to read") from None
    except ValueError as e:  # UnicodeDecodeError and integers of over 4300 digits included
        raise CheckpointError(f"{path}: {what} is not valid JSON: {e}") from None


def index_digest(weight_map: Mapping, ours: Mapping) -> str:
    """sha256 of the canonical JSON of the weight map and our metadata block (less the digest):
    an index whose entries, aliases or file records were edited or damaged is refused instead of
    loading a wrong or short state dict."""
    body = {"weight_map": weight_map, META_KEY: {k: v for k, v in ours.items() if k != DIGEST_KEY}}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def index_document(weight_map: Mapping[str, str], total_size: int, extra: Mapping) -> dict:
    """Our index: weight_map and total_size as Hugging Face has them, our block (version, extra,
    and the digest of both) under metadata.dist_saver."""
    weight_map = dict(sorted(weight_map.items()))
    ours = {"version": FORMAT_VERSION, **extra}
    ours[DIGEST_KEY] = index_digest(weight_map, ours)
    return {"metadata": {"total_size": total_size, META_KEY: ours}, "weight_map": weight_map}


def write_durable(path: str, data: str | bytes) -> None:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def json_text(doc, indent: int = 0) -> str:
    """JSON indented like json.dumps(indent=2), but lists of plain values on one line each (an
    index lists thousands of [offset, length, rank, checksum] ranges): one entry per line.

    Strings and integers are written here (as json.dumps writes them), the rest by json.dumps: a
    weight map of 10^5 entries costs no json.dumps call per entry."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(doc, dict) and doc:
        if (all(k.__class__ is str for k in doc) and all(v.__class__ is str for v in doc.values())
                and _plain_json_text("".join(doc)) and _plain_json_text("".join(doc.values()))):
            # names -> names (a weight map): nothing to escape, every line written as it is
            return "{\n" + ",\n".join([f'{inner}"{k}": "{v}"' for k, v in doc.items()]) + f"\n{pad}}}"
        lines = []
        append = lines.append
        for k, v in doc.items():
            t = v.__class__
            if t is str:
                text = _json_str(v)
            elif t is int:
                text = int.__repr__(v)
            else:
                text = json_text(v, indent + 2)
            append(f"{inner}{_json_str(k if k.__class__ is str else str(k))}: {text}")
        return "{\n" + ",\n".join(lines) + f"\n{pad}}}"
    if isinstance(doc, (list, tuple)):
        if any(isinstance(v, (dict, list, tuple)) for v in doc):
            return "[\n" + ",\n".join(inner + json_text(v, indent + 2) for v in doc) + f"\n{pad}]"
        return _json_line(doc)
    return json.dumps(doc)


def _json_line(values) -> str:
    """json.dumps of a list of plain values (no dicts or lists in it)."""
    parts = []
    for v in values:
        t = v.__class__
        if t is str:
            parts.append(_json_str(v))
        elif t is int:
            parts.append(int.__repr__(v))
        else:
            return json.dumps(values)
    return "[" + ", ".join(parts) + "]"


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


def parse_index_document(index_path: str, raw: bytes, ours_expected: bool) -> tuple[dict[str, str], dict | None]:
    """(weight_map, our metadata block or None) of an index file's bytes, every field we read
    checked: CheckpointError naming the file and field otherwise. File names are checked to be
    plain names in the directory once per distinct file (safe_member), not once per tensor.
    ours_expected: the index is one of our names (model/optimizer.safetensors.index.json), where
    our block may ride; a legacy .bin index never carries it."""
    doc = parse_json(index_path, raw, "the index")
    if not isinstance(doc, dict):
        raise CheckpointError(f"{index_path}: not a valid index: {_kind(doc)}, not a JSON object")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: not a valid index: field weight_map is {_kind(weight_map)}, "
                              "not an object")
    try:
        files = set(weight_map.values())  # a few distinct names
    except TypeError:  # an unhashable value (a list, an object): named below
        files = None
    if files is None or any(file.__class__ is not str for file in files):
        for tensor, file in weight_map.items():  # the first entry that is not a name
            if file.__class__ is not str:
                raise CheckpointError(f"{index_path}: field weight_map[{tensor!r}] is {_kind(file)}, not a file name")
    directory = os.path.dirname(index_path) or "."
    for file in files:
        safe_member(directory, file)
    ours = None
    if ours_expected:
        metadata = doc.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise CheckpointError(f"{index_path}: field metadata is {_kind(metadata)}, not an object")
        ours = (metadata or {}).get(META_KEY)
        if ours is not None:
            _check_ours(index_path, ours, weight_map)
    return weight_map, ours


def _kind(value) -> str:
    """How a malformed field is described in an error: its JSON-ish type and the start of it."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({short_repr(value)})"


def short_repr(value) -> str:
    """repr for error messages about untrusted values: bounded in length and depth (a plain
    repr of JSON nested 900 deep can itself raise RecursionError)."""
    return reprlib.repr(value)[:80]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _major_version(version) -> int | None:
    """The major of a format version: 1, or "1.2" (a compatible later addition)."""
    if _is_int(version):
        return version
    if isinstance(version, str) and re.fullmatch(r"\d{1,9}(\.\d{1,9})*", version):
        return int(version.split(".")[0])
    return None


def _check_ours(index_path: str, ours, weight_map: dict) -> None:
    """Our metadata block, field by field: the version first (a newer major is refused, whatever
    else changed), then the digest (where recorded), then the type of every field we read."""
    where = f"{index_path}: field metadata.{META_KEY}"
    if not isinstance(ours, dict):
        raise CheckpointError(f"{where} is {_kind(ours)}, not an object")
    major = _major_version(ours.get("version"))
    if major is None:
        raise CheckpointError(f"{where}.version is {_kind(ours.get('version'))}, not a format version")
    if major > FORMAT_VERSION:
        raise CheckpointError(f"{index_path}: written in format version {ours['version']} by a newer dist_saver; "
                              f"this one reads format version {FORMAT_VERSION}: upgrade dist_saver to load it")
    if DIGEST_KEY in ours:  # indexes from before the digest (and other tools') carry none
        recorded = ours[DIGEST_KEY]
        try:
            actual = index_digest(weight_map, ours)
        except (RecursionError, ValueError):
            actual = None
        if recorded != actual:
            raise CheckpointError(f"{where}.{DIGEST_KEY}: the index's content hashes to {actual}, not to the "
                                  f"recorded {str(recorded)[:80]!r}: the index was edited or damaged")
    aliases = ours.get("aliases", {})
    if not isinstance(aliases, dict):
        raise CheckpointError(f"{where}.aliases is {_kind(aliases)}, not an object")
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in weight_map or alias in weight_map:
            raise CheckpointError(f"{where}.aliases[{alias!r}] is {_kind(target)}: an alias must name a tensor "
                                  "of weight_map and not be one itself")
    files = ours.get("files", {})
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}.files is {_kind(files)}, not an object")
    for file, entry in files.items():
        _check_file_record(f"{where}.files[{file!r}]", entry)
    if not _is_int(ours.get("world_size", 1)):
        raise CheckpointError(f"{where}.world_size is {_kind(ours.get('world_size'))}, not an integer")
    if not isinstance(ours.get(CHECKPOINT_ID_KEY, ""), str):
        raise CheckpointError(f"{where}.{CHECKPOINT_ID_KEY} is {_kind(ours.get(CHECKPOINT_ID_KEY))}, not a string")


def _check_file_record(where: str, entry) -> None:
    """{"rank", "size", "ranges": [[offset, length, rank, checksum], ...]}, or from before
    per-range checksums {"rank", "size", "checksum"}; whether the ranges tile the file and the
    checksums match is verify's business."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} is {_kind(entry)}, not an object")
    for key in ("rank", "size"):
        if key in entry and not _is_int(entry[key]):
            raise CheckpointError(f"{where}.{key} is {_kind(entry[key])}, not an integer")
    if "checksum" in entry and not isinstance(entry["checksum"], str):
        raise CheckpointError(f"{where}.checksum is {_kind(entry['checksum'])}, not a string")
    ranges = entry.get("ranges", [])
    if not isinstance(ranges, list):
        raise CheckpointError(f"{where}.ranges is {_kind(ranges)}, not a list")
    for i, r in enumerate(ranges):
        if not (isinstance(r, list) and len(r) == 4 and all(_is_int(x) for x in r[:3]) and isinstance(r[3], str)):
            raise CheckpointError(f"{where}.ranges[{i}] is {_kind(r)}, not [offset, length, rank, checksum]")


def is_legacy_file(name: str) -> bool:
    return name.endswith(LEGACY_SUFFIXES)


def safe_member(directory: str, name: str) -> str:
    """The path of file `name` inside directory; refuses names that lead anywhere else.

    weight_map values come from a file we may not trust: '../x', absolute paths, nested paths
    and symlinks that leave the directory are refused before anything is opened.
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or os.path.isabs(name) or "\0" in name or not _encodable(name)):
        raise CheckpointError(f"{directory}: the index names file {short_repr(name)}, which is not a plain file name")
    full = os.path.join(directory, name)
    real_dir = os.path.realpath(directory)
    if os.path.dirname(os.path.realpath(full)) != real_dir:
        raise CheckpointError(f"{full}: is a link that leads outside the checkpoint directory")
    return full


def _encodable(name: str) -> bool:
    """A name the OS can take: JSON may carry lone surrogates that os functions refuse with
    UnicodeEncodeError."""
    try:
        os.fsencode(name)
    except UnicodeError:
        return False
    return True


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
