"""GGUF header reading: key/values, tensor infos, parameter count and file type, without touching tensor data.

gguf.GGUFReader builds a numpy view per array element, which takes over ten seconds for a 150k-token
vocabulary; this reader walks the header of a memory map with struct and skips large arrays by their length
prefixes, so /api/show and create stay fast on multi-gigabyte files.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_MAX_ARRAY = 1024  # Ollama's non-verbose limit: longer arrays show as null in model_info

# GGUF metadata value types
(_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64,
 _FLOAT64) = range(13)
_SCALARS: dict[int, str] = {
    _UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I", _INT32: "i", _FLOAT32: "f",
    _BOOL: "?", _UINT64: "Q", _INT64: "q", _FLOAT64: "d",
}
_NP_TYPES: dict[int, str] = {
    _UINT8: "u1", _INT8: "i1", _UINT16: "u2", _INT16: "i2", _UINT32: "u4", _INT32: "i4", _FLOAT32: "f4",
    _BOOL: "?", _UINT64: "u8", _INT64: "i8", _FLOAT64: "f8",
}

# llama.cpp's llama_ftype numbering, named the way Ollama's FileType.String() prints it.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4", 39: "NVFP4",
}
# Tensor type → file type, to name files that lack general.file_type.
_TENSOR_TO_FILE_TYPE: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 3, 6: 8, 7: 9, 8: 7, 10: 10, 11: 12, 12: 15,
                                        13: 17, 14: 18, 30: 32}


class GGUFError(ValueError):
    """Not a GGUF file, or a truncated or corrupt header."""


def file_type_name(file_type: int | None) -> str:
    if file_type is None:
        return "unknown"
    return FILE_TYPE_NAMES.get(file_type, "unknown")


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 7615616512 → "7.6B", 26_500_000 → "26.5M", 1234 → "1K"."""
    for unit, scale in (("T", 1_000_000_000_000), ("B", 1_000_000_000), ("M", 1_000_000)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"
    if n >= 1000:
        return f"{n // 1000}K"
    return str(n)


def _f32(x: float) -> float:
    # Go marshals float32 with its shortest float32 form (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(x)))


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.type).name
        except ValueError:
            return str(self.type)


@dataclass
class GGUFMeta:
    version: int
    kv: dict[str, Any]
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        arch = self.kv.get("general.architecture")
        return arch if isinstance(arch, str) else ""

    @property
    def parameter_count(self) -> int:
        """Computed from tensor shapes, as Ollama does (it overwrites general.parameter_count with this)."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def file_type(self) -> int | None:
        ft = self.kv.get("general.file_type")
        if isinstance(ft, int) and not isinstance(ft, bool):
            return ft
        # Fall back to the type holding most weight elements among the matrices (1-d tensors stay F32).
        counts: dict[int, int] = {}
        for t in self.tensors:
            if len(t.shape) >= 2:
                counts[t.type] = counts.get(t.type, 0) + t.n_elements
        if not counts:
            return None
        return _TENSOR_TO_FILE_TYPE.get(max(counts, key=lambda k: counts[k]))

    @property
    def file_type_name(self) -> str:
        return file_type_name(self.file_type)

    def arch_value(self, key: str) -> Any:
        return self.kv.get(f"{self.architecture}.{key}")

    @property
    def context_length(self) -> int | None:
        v = self.arch_value("context_length")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    @property
    def embedding_length(self) -> int | None:
        v = self.arch_value("embedding_length")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def model_info(self) -> dict[str, Any]:
        """/api/show's model_info: the KV map minus general.name and the chat template, plus the count."""
        info = {k: v for k, v in self.kv.items() if k not in ("general.name", "tokenizer.chat_template")}
        info["general.parameter_count"] = self.parameter_count
        return info

    def tensor_list(self) -> list[dict[str, Any]]:
        """/api/show's verbose `tensors`: name, type name and shape."""
        return [{"name": t.name, "type": t.type_name, "shape": list(t.shape)} for t in self.tensors]


@functools.cache
def _struct(fmt: str) -> struct.Struct:
    return struct.Struct(fmt)


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, endian: str) -> None:
        self.buf = buf
        self.pos = 0
        self.endian = endian
        self.size = len(buf)

    def take(self, fmt: str) -> Any:
        st = _struct(self.endian + fmt)
        if self.pos + st.size > self.size:
            raise GGUFError("truncated GGUF header")
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > self.size:
            raise GGUFError("truncated GGUF string")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_strings(self, count: int) -> None:
        # The hot loop for 100k+ token vocabularies: bound locals, bounds checked once at the end.
        unpack = _struct(self.endian + "Q").unpack_from
        buf, pos = self.buf, self.pos
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8 + n
        if pos > self.size:
            raise GGUFError("truncated GGUF string array")
        self.pos = pos

    def value(self, vtype: int, keep_arrays: int) -> tuple[Any, int | None]:
        """(value, array length or None); arrays longer than keep_arrays (if >= 0) come back as None."""
        if vtype == _STRING:
            return self.string(), None
        if vtype == _ARRAY:
            etype = self.take("I")
            n = self.take("Q")
            keep = keep_arrays < 0 or n <= keep_arrays
            if etype in _SCALARS:
                width = struct.calcsize(_SCALARS[etype])
                if self.pos + n * width > self.size:
                    raise GGUFError("truncated GGUF array")
                out: Any = None
                if keep:
                    dt = np.dtype(_NP_TYPES[etype]).newbyteorder(self.endian)
                    arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                    out = [_f32(x) for x in arr] if etype == _FLOAT32 else arr.tolist()
                self.pos += n * width
                return out, n
            if etype == _STRING:
                if keep:
                    return [self.string() for _ in range(n)], n
                self.skip_strings(n)
                return None, n
            if etype == _ARRAY:
                items = [self.value(_ARRAY, keep_arrays)[0] for _ in range(n)]
                return (items if keep else None), n
            raise GGUFError(f"unknown GGUF array element type {etype}")
        if vtype in _SCALARS:
            v = self.take(_SCALARS[vtype])
            return (_f32(v) if vtype == _FLOAT32 else v), None
        raise GGUFError(f"unknown GGUF value type {vtype}")


def is_gguf(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(
    path: str | os.PathLike[str], *, verbose: bool = False, max_array: int = DEFAULT_MAX_ARRAY,
    tensors: bool = True,
) -> GGUFMeta:
    """Parse a GGUF header. Arrays longer than max_array are None unless verbose (Ollama's show semantics)."""
    keep_arrays = -1 if verbose else max_array
    p = Path(path)
    try:
        with open(p, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise GGUFError(f"{p.name}: not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, p.name, keep_arrays, tensors)
    except (struct.error, OverflowError, MemoryError) as e:
        raise GGUFError(f"{p.name}: corrupt GGUF header ({e})") from None


def _parse(mm: mmap.mmap, label: str, keep_arrays: int, want_tensors: bool) -> GGUFMeta:
    if mm[:4] != GGUF_MAGIC:
        raise GGUFError(f"{label}: not a GGUF file")
    (version,) = struct.unpack_from("<I", mm, 4)
    endian = "<"
    if version & 0xFFFF == 0:  # written on the other byte order
        endian = ">"
        (version,) = struct.unpack_from(">I", mm, 4)
    if version not in (2, 3):
        raise GGUFError(f"{label}: unsupported GGUF version {version}")
    cur = _Cursor(mm, endian)
    cur.pos = 8
    n_tensors = cur.take("Q")
    n_kv = cur.take("Q")
    if n_kv > cur.size or n_tensors > cur.size:
        raise GGUFError(f"{label}: corrupt GGUF header counts")
    kv: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.take("I")
        value, n = cur.value(vtype, keep_arrays)
        kv[key] = value
        if n is not None:
            lengths[key] = n
    infos: list[TensorInfo] = []
    if want_tensors:
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("I")
            if n_dims > 8:
                raise GGUFError(f"{label}: tensor {name!r} has {n_dims} dimensions")
            shape = tuple(cur.take("Q") for _ in range(n_dims))
            ttype = cur.take("I")
            offset = cur.take("Q")
            infos.append(TensorInfo(name, shape, ttype, offset))
    return GGUFMeta(version=version, kv=kv, array_lengths=lengths, tensors=infos)
