"""safetensors files, written as a stream (the library's ``save_file`` needs every tensor in memory).

Layout (https://github.com/huggingface/safetensors)::

    u64 little-endian N | N bytes of JSON header, padded with spaces | data
    header = {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...], "data_offsets": [b, e]}, ...}

``data_offsets`` are relative to the start of the data, which begins at ``8 + N``. What
``safetensors.torch.save_file`` (safetensors 0.8.0, checked byte for byte) does and this writer copies:

- tensors are laid out sorted by dtype, widest first -- I64, F64, F32, I32, BF16, F16, I16, I8, U8, BOOL
  (the order of the library's ``Dtype`` enum, descending) -- then by name (code point = UTF-8 byte
  order); the header lists them in that same order, contiguous, no padding between tensors;
- the header is compact JSON (``,`` and ``:`` with no spaces, non-ASCII written raw as UTF-8, ``"``
  ``\\`` and control characters escaped, the latter as ``\\n``/``\\t``/... or lower-case ``\\u00xx``);
  ``__metadata__`` comes first, and is absent when no metadata is given (present, possibly ``{}``,
  when a dict is given). The library keeps metadata in a Rust HashMap, so with two or more keys
  its key order is *random per process*; this writer keeps the caller's order, which reproduces
  any given file when its metadata is passed in the order :meth:`SafetensorsReader.metadata`
  returns it (file order);
- the header is padded with spaces so that N is a multiple of 8 (so the data starts 8-aligned).

:class:`SafetensorsWriter` therefore needs every (name, dtype, shape) up front. It writes the header
at once, then writes each tensor's bytes, straight from the tensor's buffer, at the tensor's
library-order offset with ``os.pwrite`` -- so ``write()`` takes the tensors in the caller's announced
order while the bytes come out in library order. MindSpore writes metadata ``{"format": "ms"}``.
:class:`SafetensorsReader` parses the header itself and returns numpy views of a private
(copy-on-write) memory map.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct

import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import byte_io
from ckptmap.formats.base import FileRange, TensorSpec

_ST_TYPES = {
    "int64": "I64", "float64": "F64", "float32": "F32", "int32": "I32", "bfloat16": "BF16",
    "float16": "F16", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # in the library's layout order (widest first)
_CANONICAL = {v: k for k, v in _ST_TYPES.items()}
_RANK = {name: i for i, name in enumerate(_ST_TYPES)}
_MAX_HEADER = 100_000_000  # the library's own limit


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class SafetensorsWriter:
    """Write a safetensors file byte-identical to ``safetensors.torch.save_file`` without holding the tensors."""

    def __init__(self, path, entries, metadata=None, *, fsync=False, **_ignored):
        self.path = os.fspath(path)
        self._fsync = fsync
        self._order = []
        for entry in entries:
            try:
                name, dtype, shape = entry
                shape = tuple(int(d) for d in shape)
            except (TypeError, ValueError):
                raise CkptmapError(f"{self.path}: announced entry {entry!r} is not (name, dtype_name, shape)") from None
            if not isinstance(name, str) or dtype not in _ST_TYPES:
                raise CkptmapError(f"{self.path}: announced tensor {name!r} has dtype {dtype!r}; safetensors "
                                   f"entries need a str name and one of {', '.join(_ST_TYPES)}")
            self._order.append((name, dtype, shape))
        if len({e[0] for e in self._order}) != len(self._order):
            raise CkptmapError(f"{self.path}: the announced entries repeat a tensor name; names must be unique")
        if metadata is not None and not (isinstance(metadata, dict) and
                                         all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise CkptmapError(f"{self.path}: safetensors metadata must map str to str, got {metadata!r}")

        header = {} if metadata is None else {"__metadata__": dict(metadata)}
        self._offsets = {}
        pos = 0
        for name, dtype, shape in sorted(self._order, key=lambda e: (_RANK[e[1]], e[0])):
            end = pos + math.prod(shape) * dtypes.itemsize(dtype)
            header[name] = {"dtype": _ST_TYPES[dtype], "shape": list(shape), "data_offsets": [pos, end]}
            self._offsets[name] = pos
            pos = end
        try:
            text = _dumps(header).encode("utf-8")
        except UnicodeEncodeError as e:
            raise CkptmapError(f"{self.path}: a tensor name or metadata string is not valid Unicode: {e}") from None
        text += b" " * (-len(text) % 8)
        self._data_start = 8 + len(text)
        self._size = self._data_start + pos
        self._count = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            self._pwrite(struct.pack("<Q", len(text)) + text, 0)
        except BaseException:
            self._abort()
            raise

    def _pwrite(self, data, offset) -> None:
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name, data, dtype: str | None = None) -> None:
        """``data``: a numpy array of the announced dtype's storage type (bfloat16 as uint16), or a
        torch tensor."""
        expected = self._next_announced(name)
        if name != expected[0]:
            raise CkptmapError(f"{self.path}: write #{self._count} is {name!r} but the announced entries say "
                               f"{expected[0]!r} comes next; write tensors in the announced order")
        try:
            dtype, array = dtypes.as_array(data, dtype or expected[1])
        except CkptmapError as e:
            raise CkptmapError(f"{self.path}: tensor {name!r} does not match its announced entry {expected}: "
                               f"{e}") from None
        found = (name, dtype, tuple(array.shape))
        if found != expected:
            raise CkptmapError(f"{self.path}: write #{self._count} does not follow the announced entries: expected "
                               f"{expected}, got {found}; write tensors in the announced order with the announced "
                               "dtype and shape")
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._pwrite(flat, self._data_start + self._offsets[name])  # the array's own bytes
        self._count += 1

    def _next_announced(self, name) -> tuple:
        """The announced entry the next write must match (the writer open, entries left)."""
        if self._fd is None:
            raise CkptmapError(f"{self.path}: cannot write tensor {name!r}, the writer is already closed")
        if self._count >= len(self._order):
            raise CkptmapError(f"{self.path}: tensor {name!r} was not announced; all {len(self._order)} announced "
                               "tensors are written already")
        return self._order[self._count]

    def _admit_streamed(self, name, dtype, shape) -> int:
        """write()'s checks for content that is not an array; returns the content's byte count."""
        expected = self._next_announced(name)
        found = (name, dtype, tuple(int(d) for d in shape))
        if found != expected:
            raise CkptmapError(f"{self.path}: write #{self._count} does not follow the announced entries: expected "
                               f"{expected}, got {found}; write tensors in the announced order with the announced "
                               "dtype and shape")
        return math.prod(expected[2]) * dtypes.itemsize(dtype)

    def write_range(self, name: str, dtype: str, shape, source) -> None:
        """Tensor ``name`` whose content is the bytes ``source`` (a FileRange, or consecutive runs) of other files:
        copied by the kernel to the tensor's place, never read by Python."""
        nbytes = self._admit_streamed(name, dtype, shape)
        found = byte_io.ranges_nbytes(source)
        if found != nbytes:
            raise CkptmapError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) needs {nbytes} bytes but the "
                               f"source range of {byte_io.ranges_of(source)[0].path} holds {found}")
        at = self._data_start + self._offsets[name]
        for part in byte_io.ranges_of(source):   # one run, or consecutive runs of several files
            if part.nbytes:
                byte_io.copy_range(part, self._fd, at)
            at += part.nbytes
        self._count += 1

    def write_chunks(self, name: str, dtype: str, shape, chunks) -> None:
        """Tensor ``name`` from bytes-like ``chunks`` whose concatenation is its content, each
        written to its place before the next is asked for."""
        nbytes = self._admit_streamed(name, dtype, shape)
        at, end = self._data_start + self._offsets[name], self._data_start + self._offsets[name] + nbytes
        for chunk in chunks:
            n = memoryview(chunk).nbytes
            if at + n > end:
                raise CkptmapError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) needs {nbytes} bytes but its "
                                   f"data holds more")
            byte_io.pwrite_all(self._fd, chunk, at)
            at += n
        if at != end:
            raise CkptmapError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) needs {nbytes} bytes but its "
                               f"data ended after {nbytes - (end - at)}")
        self._count += 1

    def close(self) -> None:
        if self._fd is None:
            return
        if self._count < len(self._order):
            missing = [e[0] for e in self._order[self._count:]]
            self._abort()
            raise CkptmapError(f"{self.path}: closed after {self._count} of {len(self._order)} announced tensors; "
                               f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}. The file is incomplete; "
                               "write every announced tensor before closing")
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, self._size)  # a no-op unless the last tensors are empty
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _abort(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._abort()


class SafetensorsReader:
    """Read a safetensors file through a private (copy-on-write) memory map; tensors are views of it."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._mm = None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise self._bad(f"the file has {size} bytes, fewer than the 8-byte header length")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise CkptmapError(f"cannot open safetensors file {self.path}: {e}") from None
        try:
            self._parse(size)
        except BaseException:
            self.close()
            raise

    def _bad(self, what):
        return CkptmapError(f"{self.path}: not a valid safetensors file: {what}. The file is truncated, corrupt or "
                            "not safetensors; re-create or re-copy it")

    def _parse(self, size):
        (n,) = struct.unpack("<Q", self._mm[:8])
        if n > min(size - 8, _MAX_HEADER):
            raise self._bad(f"the header claims {n} bytes but the file has {size} bytes")

        def no_duplicates(pairs):
            obj = dict(pairs)
            if len(obj) != len(pairs):
                raise self._bad("the header JSON repeats a key")
            return obj

        try:
            header = json.loads(self._mm[8:8 + n].decode("utf-8"), object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._bad(f"the {n}-byte header is not UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._bad("the header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise self._bad("__metadata__ is not an object of strings")
        self._metadata = dict(meta or {})
        self._data_start = 8 + n
        self._entries = {}
        spans = []
        for name, info in header.items():
            try:
                dtype = _CANONICAL[info["dtype"]]
                shape = tuple(info["shape"])
                begin, end = info["data_offsets"]
                ok = all(type(d) is int and d >= 0 for d in (*shape, begin, end))
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise self._bad(f"tensor {name!r} has a malformed or unsupported entry {info!r} (ckptmap reads "
                                f"dtypes {', '.join(_CANONICAL)})")
            if end - begin != math.prod(shape) * dtypes.itemsize(dtype):
                raise self._bad(f"tensor {name!r} ({info['dtype']} {list(shape)}) spans {end - begin} bytes "
                                f"[{begin}, {end}), expected {math.prod(shape) * dtypes.itemsize(dtype)}")
            self._entries[name] = (dtype, shape, begin)
            spans.append((begin, end, name))
        pos = 0  # like the library: the tensors must tile the data area exactly
        for begin, end, name in sorted(spans):
            if begin != pos:
                raise self._bad(f"tensor {name!r} starts at data offset {begin}, expected {pos} (gap or overlap)")
            pos = end
        if self._data_start + pos != size:
            raise self._bad(f"the tensors end at byte {self._data_start + pos} but the file has {size} bytes")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def metadata(self) -> dict:
        return dict(self._metadata)

    def spec(self, name) -> TensorSpec:
        try:
            dtype, shape, _ = self._entries[name]
        except KeyError:
            raise CkptmapError(f"{self.path}: no tensor named {name!r} (the file holds {len(self._entries)} "
                               "tensors; list them with keys())") from None
        return TensorSpec(dtype, shape)

    def array(self, name) -> np.ndarray:
        dtype_name, shape = self.spec(name)
        st, numel = dtypes.storage(dtype_name), math.prod(shape)
        if numel == 0:
            return np.empty(shape, dtype=st)
        offset = self._data_start + self._entries[name][2]
        return np.frombuffer(self._mm, dtype=st, count=numel, offset=offset).reshape(shape)

    get = array

    def byte_range(self, name) -> FileRange:
        dtype_name, shape = self.spec(name)
        return FileRange(self.path, self._data_start + self._entries[name][2],
                         math.prod(shape) * dtypes.itemsize(dtype_name))

    def close(self) -> None:
        # Only drop our reference: arrays handed out keep the map alive through their buffer export;
        # the file is unmapped when the last of them is freed, or right here if there are none.
        self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


def load(path) -> dict:
    """Every tensor of a safetensors file, in header order, as numpy arrays viewing the file mapping
    (bfloat16 as uint16: ``spec()`` says which)."""
    with SafetensorsReader(path) as reader:
        return {name: reader.array(name) for name in reader.keys()}
