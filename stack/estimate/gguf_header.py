"""GGUF headers: key/values and tensor infos, read without touching the tensor data.

The format and its constants come from the `gguf` package (value types, quantization
block sizes). `gguf.GGUFReader` builds a numpy view of every key and tensor and takes
about 10 s on a 262k-token vocabulary, so the header is walked here sequentially instead;
the test suite checks this reader against `GGUFReader` on the real Gemma file.
Only the header is read, so a partial copy (the first megabytes) is enough.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from stack.errors import SourceError

_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
# arrays longer than this keep only their length (token lists, scores, merges)
_ARRAY_KEEP = 4096


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GgufHeader:
    """The key/values (long arrays as their length) and tensors of one GGUF file."""

    version: int
    fields: dict[str, object]
    array_lengths: dict[str, int]
    tensors: tuple[TensorInfo, ...]

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)


_U64 = struct.Struct("<Q")
_CHUNK = 1 << 20


class _Reader:
    """The header walked over a buffer refilled from the file a chunk at a time (a token
    list is hundreds of thousands of strings: one `read` and `seek` each took 100 ms on
    Gemma 3's 262k tokens, a walk over the buffer about a third of that)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.buf = b""
        self.pos = 0

    def _fill(self, n: int) -> None:
        """Make `n` bytes available at `pos` (which may lie past the buffer: a skip)."""
        if self.pos >= len(self.buf):
            self.f.seek(self.pos - len(self.buf), 1)
            rest = b""
        else:
            rest = self.buf[self.pos:]
        self.buf = rest + self.f.read(max(n - len(rest), _CHUNK))
        self.pos = 0
        if len(self.buf) < n:
            raise EOFError("GGUF header ends early")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            self._fill(n)
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return int(self.unpack("<I"))

    def u64(self) -> int:
        return int(self.unpack("<Q"))

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
        for _ in range(count):
            if pos + 8 > len(buf):
                self.pos = pos
                self._fill(8)
                buf, pos = self.buf, self.pos
            pos += 8 + unpack(buf, pos)[0]
        self.pos = pos

    def value(self, vtype: int) -> object:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        raise ValueError(f"unknown GGUF value type {vtype}")

    def array(self) -> tuple[list[object] | None, int]:
        vtype, count = self.u32(), self.u64()
        if count > _ARRAY_KEEP:
            if vtype == GGUFValueType.STRING:
                self.skip_strings(count)
            elif vtype in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[vtype]) * count
            else:
                raise ValueError("nested GGUF arrays are not supported")
            return None, count
        if vtype == GGUFValueType.ARRAY:
            return [self.array()[0] for _ in range(count)], count
        return [self.value(vtype) for _ in range(count)], count


def _tensor(r: _Reader) -> TensorInfo:
    name = r.string()
    dims = tuple(r.u64() for _ in range(r.u32()))
    qtype = GGMLQuantizationType(r.u32())
    r.u64()  # offset in the data section
    n = 1
    for d in dims:
        n *= d
    block, size = GGML_QUANT_SIZES[qtype]
    return TensorInfo(name, dims, qtype.name, n, n // block * size)


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse the header of the GGUF file at `path`; SourceError when it is not GGUF."""
    try:
        with path.open("rb") as raw:
            r = _Reader(raw)
            if r.take(4) != b"GGUF":
                raise SourceError(f"`{path}` is not a GGUF file (bad magic)",
                                  hint="check that the download finished.")
            version = r.u32()
            n_tensors, n_kv = r.u64(), r.u64()
            fields: dict[str, object] = {}
            lengths: dict[str, int] = {}
            for _ in range(n_kv):
                key, vtype = r.string(), r.u32()
                if vtype == GGUFValueType.ARRAY:
                    value, lengths[key] = r.array()
                    if value is not None:
                        fields[key] = value
                else:
                    fields[key] = r.value(vtype)
            tensors = tuple(_tensor(r) for _ in range(n_tensors))
    except (EOFError, ValueError, OSError) as exc:
        raise SourceError(f"cannot read the GGUF header of `{path}`: {exc}",
                          hint="check that the file is a complete GGUF file.") from exc
    return GgufHeader(version, fields, lengths, tensors)
