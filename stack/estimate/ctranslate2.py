"""CTranslate2 `model.bin` headers: each variable's shape and element size, without reading
the weights (faster-whisper's models are CTranslate2 models).

A model.bin of binary version 4 or later (every CTranslate2 converter since 2.0): uint32
version, the spec's name (uint16 length counting a closing NUL, then the bytes), uint32
spec revision, uint32 variable count, then per variable its name, uint8 rank, rank x uint32
dimensions, uint8 type, uint32 byte count and the bytes, in name order. Aliases follow
(unread). Every number is little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from stack.errors import SourceError

# CTranslate2's DataType: float32, int8, int16, int32, float16, bfloat16 (element bytes)
TYPE_BYTES = (4, 1, 2, 4, 2, 2)
_MIN_VERSION = 4
_MAX_VARIABLES = 1_000_000
_MAX_RANK = 8


@dataclass(frozen=True)
class Variable:
    dims: tuple[int, ...]
    element_bytes: int
    n_bytes: int


def read_ct2_header(path: Path) -> dict[str, Variable]:
    """Every variable of a CTranslate2 model.bin by name (data skipped, never read)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            return _variables(f, size)
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"cannot read the CTranslate2 model `{path}`: {exc}",
                          hint="check that the file is a whole model.bin (copy it again).") from exc


def _variables(f: BinaryIO, size: int) -> dict[str, Variable]:
    version = _u32(f)
    if version < _MIN_VERSION or version > 100:
        raise ValueError(f"binary version {version} is not one this reader knows (4 and later)")
    _string(f)  # the spec's name
    _u32(f)  # its revision
    count = _u32(f)
    if count > _MAX_VARIABLES:
        raise ValueError(f"{count} variables")
    found: dict[str, Variable] = {}
    for _ in range(count):
        name = _string(f)
        rank = _u8(f)
        if rank > _MAX_RANK:
            raise ValueError(f"variable `{name}` has rank {rank}")
        dims = tuple(_u32(f) for _ in range(rank))
        type_id = _u8(f)
        if type_id >= len(TYPE_BYTES):
            raise ValueError(f"variable `{name}` has an unknown type {type_id}")
        n_bytes = _u32(f)
        if f.seek(n_bytes, 1) > size:
            raise ValueError(f"the file ends inside variable `{name}` (truncated)")
        found[name] = Variable(dims, TYPE_BYTES[type_id], n_bytes)
    return found


def _u32(f: BinaryIO) -> int:
    return int(struct.unpack("<I", _exactly(f, 4))[0])


def _u8(f: BinaryIO) -> int:
    return _exactly(f, 1)[0]


def _string(f: BinaryIO) -> str:
    length = int(struct.unpack("<H", _exactly(f, 2))[0])
    return _exactly(f, length).rstrip(b"\0").decode()


def _exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the file ends inside the header (truncated)")
    return data
