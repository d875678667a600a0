"""Checksums of written byte ranges: computed while writing, checked while reading and by verify().

A range's checksum is one digest per block: the range is cut at file offsets that are multiples of
BLOCK_BYTES (1 MiB), and each piece is hashed on its own. A reader that needs only part of a range
(a shard of a tensor saved whole, a checkpoint loaded at another world size) then reads at most the
two blocks around each edge of what it needs, instead of the whole range, which for a replicated
save is the owner's whole file. Recorded as "<algorithm>@<block bytes>:<hex><hex>...", the digests
in file order (xxh3_64: 16 hex digits each; crc32, without xxhash: 8). Checkpoints from before
(format 1) record one digest of the whole range, "<algorithm>:<hex>", and still verify.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency, but keep saving without it
    xxhash = None

BLOCK_BYTES = 1 << 20
_HEX_DIGITS = {"xxh3_64": 16, "crc32": 8}


def algorithm() -> str:
    """The algorithm new checksums use: xxh3_64, or crc32 without xxhash."""
    return "xxh3_64" if xxhash is not None else "crc32"


class Hasher:
    """Running checksum of a byte stream; digest() is "<algorithm>:<hex>"."""

    def __init__(self, algorithm_name: str | None = None):
        self.algorithm = algorithm_name or algorithm()
        if self.algorithm == "xxh3_64":
            if xxhash is None:
                raise RuntimeError("this checkpoint's checksums are xxh3_64: pip install xxhash to verify them")
            self._h = xxhash.xxh3_64()
        elif self.algorithm == "crc32":
            self._crc = 0
        else:
            raise ValueError(f"unknown checksum algorithm {self.algorithm!r}")

    def update(self, data) -> None:
        if self.algorithm == "crc32":
            self._crc = zlib.crc32(data, self._crc)
        else:
            self._h.update(data)

    def hexdigest(self) -> str:
        return f"{self._crc:08x}" if self.algorithm == "crc32" else self._h.hexdigest()

    def digest(self) -> str:
        return f"{self.algorithm}:{self.hexdigest()}"


class BlockHasher:
    """The checksum of the range [begin, end) of a file, fed in file order in pieces of any size:
    one digest per block (see the module docstring). digest() once all of it was fed."""

    def __init__(self, begin: int, end: int, algorithm_name: str | None = None, block: int = BLOCK_BYTES):
        self.begin, self.end, self.block = begin, end, block
        self.algorithm = algorithm_name or algorithm()
        self.pos = begin
        self._h = Hasher(self.algorithm)
        self._digests: list[str] = []

    def update(self, data, offset: int | None = None) -> None:
        """The next bytes of the range (offset: theirs in the file, checked when given)."""
        if offset is not None and offset != self.pos:
            raise ValueError(f"checksum of [{self.begin}, {self.end}): bytes at {offset} fed, {self.pos} expected")
        view = memoryview(data).cast("B")
        while view:
            cut = min(len(view), (self.pos // self.block + 1) * self.block - self.pos, self.end - self.pos)
            if cut <= 0:
                raise ValueError(f"checksum of [{self.begin}, {self.end}): more bytes fed than the range holds")
            self._h.update(view[:cut])
            self.pos += cut
            view = view[cut:]
            if self.pos % self.block == 0 or self.pos == self.end:
                self._digests.append(self._h.hexdigest())
                self._h = Hasher(self.algorithm)

    def digest(self) -> str:
        if self.pos != self.end:
            raise ValueError(f"checksum of [{self.begin}, {self.end}): only {self.pos - self.begin} bytes fed")
        return f"{self.algorithm}@{self.block}:{''.join(self._digests)}"


class Recorded(NamedTuple):
    """A recorded checksum, parsed: digests of consecutive blocks of `block` bytes at file offsets
    that are multiples of it (clipped to the range); block None: one digest of the whole range."""

    algorithm: str
    block: int | None
    digests: tuple[str, ...]

    def spans(self, begin: int, end: int) -> list[tuple[int, int]]:
        """The [start, stop) file span each digest covers, for the range [begin, end)."""
        if self.block is None:
            return [(begin, end)]
        return block_spans(begin, end, self.block)


def block_spans(begin: int, end: int, block: int = BLOCK_BYTES) -> list[tuple[int, int]]:
    """[begin, end) cut at the multiples of block."""
    out, pos = [], begin
    while pos < end:
        stop = min(end, (pos // block + 1) * block)
        out.append((pos, stop))
        pos = stop
    return out


def parse(text: str, begin: int, end: int) -> Recorded:
    """A range's recorded checksum; ValueError (the reason) if it is malformed or does not fit the
    range [begin, end), or RuntimeError if its algorithm needs xxhash, which is missing."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError("no checksum recorded (saved with checksums=False?)")
    name, hexes = text.split(":", 1)
    name, _, block_text = name.partition("@")
    if name not in _HEX_DIGITS:
        raise ValueError(f"unknown checksum algorithm {name!r}")
    if name == "xxh3_64" and xxhash is None:
        raise RuntimeError("this checkpoint's checksums are xxh3_64: pip install xxhash to verify them")
    block = None
    if block_text:
        if not block_text.isdigit() or int(block_text) <= 0:
            raise ValueError(f"block size {block_text!r} is not a positive integer")
        block = int(block_text)
    width = _HEX_DIGITS[name]
    count = 1 if block is None else len(block_spans(begin, end, block))
    if len(hexes) != width * count or any(c not in "0123456789abcdef" for c in hexes):
        raise ValueError(f"{len(hexes)} hex digits where {count} {name} digest(s) of {width} are due")
    return Recorded(name, block, tuple(hexes[i : i + width] for i in range(0, len(hexes), width)))
