"""A GGUF file read in place: metadata parsed with `struct` (gguf's GGUFReader builds a numpy array for every
token and merge of a 150k vocabulary: seconds at each start), tensors as views of one private, read-only-used
mapping of the file (no copy; a page is resident only while something reads it).

It exposes what the loader reads of GGUFReader: `fields[key].contents()`, `len(fields[key].data)` (an array's
length), `tensors[i].name / .tensor_type / .shape / .data / .n_bytes` with GGUFReader's data shapes."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}
# tensor types GGUFReader exposes with their own numpy dtype (everything else: uint8 bytes per row)
_PLAIN_TENSORS = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}


class GgufFormatError(ValueError):
    pass


@dataclass
class Field:
    """One metadata value: parsed on first use (only a few of the file's keys are ever read)."""

    _buf: memoryview
    _type: int
    _offset: int
    count: int  # items of an array, 1 for a scalar
    _end: int  # the offset after the value

    @property
    def data(self) -> range:
        """One entry per item (GGUFReader's field.data: its length is the array's)."""
        return range(self.count)

    def contents(self) -> Any:
        if self._type != _ARRAY:
            return _read_value(self._buf, self._type, self._offset)[0]
        item_type, count = struct.unpack_from("<IQ", self._buf, self._offset)
        offset = self._offset + 12
        if item_type in _NUMPY:
            return np.frombuffer(self._buf, _NUMPY[item_type], count, offset).tolist()
        items = []
        for _ in range(count):
            value, offset = _read_value(self._buf, item_type, offset)
            items.append(value)
        return items

    def index_of(self, text: str) -> int | None:
        """Where `text` is in an array of strings, or None. The array's bytes are searched first: decoding a
        vocabulary's 150k strings takes 0.2 s, and the answer is usually that the text is not there."""
        encoded = text.encode()
        if bytes(self._buf[self._offset:self._end]).find(struct.pack("<Q", len(encoded)) + encoded) < 0:
            return None
        items = self.contents()
        return items.index(text) if text in items else None  # the bytes may have matched across two strings


@dataclass
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # dims innermost first, as GGUF lists them
    n_bytes: int
    data: np.ndarray  # a view of the mapping: GGUFReader's dtype and shape


def _read_string(buf: memoryview, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, offset)
    start = offset + 8
    return bytes(buf[start:start + length]).decode("utf-8", errors="replace"), start + length


def _read_value(buf: memoryview, value_type: int, offset: int) -> tuple[Any, int]:
    if value_type == _STRING:
        return _read_string(buf, offset)
    fmt = _SCALARS.get(value_type)
    if fmt is None:
        raise GgufFormatError(f"unknown GGUF value type {value_type}")
    return struct.unpack_from(fmt, buf, offset)[0], offset + struct.calcsize(fmt)


def _skip_value(buf: memoryview, value_type: int, offset: int) -> tuple[int, int]:
    """(offset after the value, item count)."""
    if value_type == _STRING:
        return offset + 8 + struct.unpack_from("<Q", buf, offset)[0], 1
    if value_type == _ARRAY:
        item_type, count = struct.unpack_from("<IQ", buf, offset)
        offset += 12
        if item_type in _SCALARS:
            return offset + count * struct.calcsize(_SCALARS[item_type]), count
        if item_type != _STRING:
            for _ in range(count):
                offset, _ = _skip_value(buf, item_type, offset)
            return offset, count
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):  # strings: walk their lengths (~0.1 s for a 150k vocabulary)
            offset += 8 + unpack(buf, offset)[0]
        return offset, count
    if value_type not in _SCALARS:
        raise GgufFormatError(f"unknown GGUF value type {value_type}")
    return offset + struct.calcsize(_SCALARS[value_type]), 1


class GgufFile:
    """The parsed header of `path` over a copy-on-write mapping (never written: views are writable for torch,
    and pages stay shared with the page cache)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        buf = memoryview(self._map)
        magic, version = struct.unpack_from("<4sI", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise GgufFormatError(f"{self.path} is not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_tensors, n_fields = struct.unpack_from("<QQ", buf, 8)
        offset = 24
        self.fields: dict[str, Field] = {}
        for _ in range(n_fields):
            key, offset = _read_string(buf, offset)
            (value_type,) = struct.unpack_from("<I", buf, offset)
            offset += 4
            end, count = _skip_value(buf, value_type, offset)
            self.fields[key] = Field(buf, value_type, offset, count, end)
            offset = end
        infos = []
        for _ in range(n_tensors):
            name, offset = _read_string(buf, offset)
            (n_dims,) = struct.unpack_from("<I", buf, offset)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, offset + 4)
            type_code, data_offset = struct.unpack_from("<IQ", buf, offset + 4 + 8 * n_dims)
            offset += 4 + 8 * n_dims + 12
            infos.append((name, dims, GGMLQuantizationType(type_code), data_offset))
        alignment = int(self.fields["general.alignment"].contents()) if "general.alignment" in self.fields else 32
        self.data_offset = -(-offset // alignment) * alignment
        self.tensors = [self._tensor(buf, *info) for info in infos]

    def _tensor(self, buf: memoryview, name: str, dims: tuple[int, ...], qtype: GGMLQuantizationType,
                offset: int) -> Tensor:
        block_weights, block_bytes = GGML_QUANT_SIZES[qtype]
        np_dims = tuple(reversed(dims))
        n_elems = int(np.prod(dims, dtype=np.int64))
        n_bytes = n_elems // block_weights * block_bytes
        start = self.data_offset + offset
        if start + n_bytes > len(buf):
            raise GgufFormatError(f"{self.path}: tensor {name} runs past the end of the file")
        plain = _PLAIN_TENSORS.get(qtype.name)
        if plain is not None:
            data = np.frombuffer(buf, plain, n_elems, start).reshape(np_dims)
        else:
            data = np.frombuffer(buf, np.uint8, n_bytes, start).reshape(
                *np_dims[:-1], np_dims[-1] // block_weights * block_bytes)
        return Tensor(name, qtype, np.array(dims, dtype=np.uint64), n_bytes, data)

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident set (they stay in the page cache): after
        loading, only what is still read (embedding rows, exact lm_head rows) comes back, page by page."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
