"""Data: a payload attached to a state by reference, with checksum-based dirty tracking."""

from __future__ import annotations

from dataclasses import dataclass, field

import xxhash

CHECKSUM = "checksum/xxhash64"
BINARY = "binary"
REF_PREFIX = "flowstate.data."


@dataclass(slots=True)
class Data:
    """A blob with annotations. ``rev`` is assigned by the store on each store (0 = never)."""

    blob: bytes = b""
    annotations: dict[str, str] = field(default_factory=dict)
    rev: int = 0

    def copy(self) -> Data:
        return Data(self.blob, dict(self.annotations), self.rev)

    @property
    def binary(self) -> bool:
        return self.annotations.get(BINARY) == "true"

    @binary.setter
    def binary(self, value: bool) -> None:
        if value:
            self.annotations[BINARY] = "true"
        else:
            self.annotations.pop(BINARY, None)

    def dirty(self) -> bool:
        """Whether ``store_data`` must write this data.

        Never stored, or a checksum that is not the blob's. A stored data without a checksum
        counts as dirty (the Go original silently never stores it again).
        """
        if self.rev == 0:
            return True
        stored = self.annotations.get(CHECKSUM, "")
        if not stored:
            return True
        try:
            value = int(stored)
        except ValueError:
            return True
        return not 0 <= value < 1 << 64 or value != xxhash.xxh64_intdigest(self.blob)


def checksum(blob: bytes) -> str:
    """XXH64 (seed 0) of ``blob`` as an unsigned decimal string."""
    return str(xxhash.xxh64_intdigest(blob))


def ref_annotation(alias: str) -> str:
    """The state annotation that references the data stored under ``alias``."""
    return REF_PREFIX + alias
