"""Checksums of written byte ranges, computed while writing and checked by verify(): xxh3-64, or
crc32 without xxhash."""

from __future__ import annotations

import zlib

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency, but keep saving without it
    xxhash = None


class Hasher:
    """Running checksum of a byte stream; digest() is "<algorithm>:<hex>"."""

    def __init__(self, algorithm: str | None = None):
        self.algorithm = algorithm or ("xxh3_64" if xxhash is not None else "crc32")
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

    def digest(self) -> str:
        value = f"{self._crc:08x}" if self.algorithm == "crc32" else self._h.hexdigest()
        return f"{self.algorithm}:{value}"


DEFAULT_ALGORITHM = Hasher().algorithm
