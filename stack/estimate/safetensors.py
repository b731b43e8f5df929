"""Safetensors headers: exact bytes and elements per dtype, without reading the weights.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then
the data. `data_offsets` give each tensor's exact byte size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stack.errors import SourceError

# bits per element; fp4 packs two per byte
DTYPE_BITS: dict[str, int] = {
    "F64": 64, "I64": 64, "U64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16, "BF16": 16,
    "I16": 16, "U16": 16, "I8": 8, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
    "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class WeightTotals:
    """Bytes and elements of a set of tensors, by dtype."""

    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    elements_by_dtype: dict[str, int] = field(default_factory=dict)
    tensors: int = 0

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())

    @property
    def elements(self) -> int:
        return sum(self.elements_by_dtype.values())

    def add_header(self, header: dict[str, Any]) -> None:
        """Count the tensors of one parsed header."""
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            dtype = str(info.get("dtype"))
            begin, end = info.get("data_offsets", (0, 0))
            n = 1
            for d in info.get("shape", []):
                n *= int(d)
            self.bytes_by_dtype[dtype] = self.bytes_by_dtype.get(dtype, 0) + int(end) - int(begin)
            self.elements_by_dtype[dtype] = self.elements_by_dtype.get(dtype, 0) + n
            self.tensors += 1

    @property
    def main_dtype(self) -> str | None:
        if not self.bytes_by_dtype:
            return None
        return max(self.bytes_by_dtype, key=lambda d: self.bytes_by_dtype[d])


def parse_header_bytes(data: bytes, where: str) -> dict[str, Any]:
    """The JSON header from the first bytes of a safetensors file (8 + header length)."""
    if len(data) < 8:
        raise SourceError(f"`{where}` is too short to be a safetensors file",
                          hint="check that the download finished.")
    (length,) = struct.unpack("<Q", data[:8])
    if length > _MAX_HEADER or len(data) < 8 + length:
        raise SourceError(f"`{where}` has no complete safetensors header",
                          hint="check that the download finished.")
    try:
        header = json.loads(data[8:8 + length])
    except ValueError as exc:
        raise SourceError(f"`{where}` has a malformed safetensors header: {exc}",
                          hint="check that the file is a safetensors file.") from exc
    if not isinstance(header, dict):
        raise SourceError(f"`{where}` has a malformed safetensors header",
                          hint="check that the file is a safetensors file.")
    return header


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The header of one safetensors file, reading only its first 8 + N bytes."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (length,) = struct.unpack("<Q", head)
                head += f.read(min(length, _MAX_HEADER + 1))
    except OSError as exc:
        raise SourceError(f"cannot read `{path}`: {exc}", hint="check the file.") from exc
    return parse_header_bytes(head, str(path))


def read_safetensors(paths: list[Path]) -> WeightTotals:
    """Totals over the given safetensors files (the shards of one model)."""
    totals = WeightTotals()
    for path in paths:
        totals.add_header(read_safetensors_header(path))
    return totals
