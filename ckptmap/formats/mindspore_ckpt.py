"""MindSpore ``.ckpt`` files, streamed in both directions without mindspore or protobuf.

Wire format
===========
Verified byte for byte against ``mindspore.save_checkpoint`` / ``load_checkpoint`` of
mindspore 2.10.0 (``mindspore/train/serialization.py``, ``checkpoint.proto``). The schema is proto2::

    message Checkpoint  { message Value { required string tag = 1;
                                          oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
                          repeated Value value = 1; }
    message TensorProto { repeated int64 dims = 1;            // proto2, NOT packed
                          required string tensor_type = 2;
                          required bytes tensor_content = 3; }

A file is a plain concatenation of records, then an optional CRC trailer::

    record  := 0x0A varint(len(value)) value                  # one serialised Checkpoint with one Value
    value   := 0x0A varint(len(tag)) tag                      # tag = tensor name, UTF-8
               0x12 varint(len(tensor)) tensor
    tensor  := (0x08 varint(dim))*                            # one key per dim; none at all for a 0-d scalar
               0x12 varint(len(type)) type                    # ASCII tensor_type, table below
               0x1A varint(len(content)) content              # raw little-endian element bytes, C order
    trailer := b"crc_num" + crc.to_bytes(10, "big")           # 17 bytes, only with crc_check=True

(Concatenated records are themselves one valid ``Checkpoint`` message, which is how MindSpore parses
the file: a single ``ParseFromString`` of everything before the trailer.) Fields appear in field
number order; required fields are always present, even when empty. Varints are base-128, low
group first.

- ``tensor_type``: Float64 Float32 Float16 BFloat16 Int64 Int32 Int16 Int8 UInt8 Bool (MindSpore also
  knows UInt16/32/64 and Int4, which ckptmap does not; they are rejected). ``str`` marks a string
  value (``save_checkpoint({... "name": "text"})``): dims ``[0]`` (one ``0x08 0x00``), content the
  string as UTF-32-LE (numpy ``<U`` bytes; the empty string is four zero bytes); MindSpore's loader
  strips trailing NULs.
- Scalars (0-d): no dims at all. On load MindSpore also maps dims ``[0]`` to a scalar, so a 1-D
  empty tensor cannot be stored; ``save_checkpoint`` silently drops every zero-element tensor.
- Slicing: a tensor whose content exceeds 512 MiB is written as several consecutive records with
  the same tag, type and *full* dims, content cut at exact 512 MiB byte offsets (that is
  ``_write_parameter_bytes_data``, the path ``save_checkpoint`` takes for Tensor/Parameter data;
  its ``async_save`` path uses ``np.array_split`` along dim 0 instead). The loader joins the
  contents of consecutive records with equal tags.
- CRC (``save_checkpoint(..., crc_check=True)``): standard CRC-32 (zlib/``binascii.crc32``: reflected
  poly 0xEDB88320, init and xor-out 0xFFFFFFFF) of every byte before the trailer, stored as a
  10-byte big-endian integer (six leading zero bytes). ``load_checkpoint`` recognises the trailer
  by ``file[-17:-10] == b"crc_num"``, always strips it, and verifies it only with
  ``crc_check=True`` (mismatch -> ValueError; missing trailer -> warning). ``crc_check`` and
  ``enc_key`` are mutually exclusive. ``choice_func`` merely filters names (save: which parameters
  to write; load: which to return) and does not change the format of what is written.

This module
===========
:class:`CkptWriter` emits exactly these bytes -- for the same tensors in the same order its output
equals ``save_checkpoint``'s (``slice_bytes`` defaults to the same 512 MiB) -- writing each
tensor's content straight from the tensor's own buffer. Deliberate differences: a zero-element
tensor is written as one record with empty content (MindSpore drops it; its loader reads such a
record back with its shape) and a 1-D empty tensor is refused; a string is always one record.
:class:`CkptReader` maps the file, walks the record framing only, and hands out torch views of the
mapping. Tensor contents sit at arbitrary byte offsets, so those views may be unaligned.
"""

from __future__ import annotations

import copy
import math
import mmap
import os

import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import byte_io
from ckptmap.formats.base import FileRange, TensorSpec

DEFAULT_SLICE_BYTES = 512 * 1024 * 1024

_MS_TYPES = {
    "float64": "Float64", "float32": "Float32", "float16": "Float16", "bfloat16": "BFloat16",
    "int64": "Int64", "int32": "Int32", "int16": "Int16", "int8": "Int8", "uint8": "UInt8", "bool": "Bool",
    "str": "str",
}
_CANONICAL = {v: k for k, v in _MS_TYPES.items()}
_CRC_MAGIC = b"crc_num"
_TRAILER_LEN = len(_CRC_MAGIC) + 10
_CRC_CHUNK = 64 * 1024 * 1024


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(field: int, payload_len: int) -> bytes:
    """Key and length of a length-delimited field (the payload follows)."""
    return bytes([field << 3 | 2]) + _varint(payload_len)


def _normalise_entry(entry, path):
    try:
        name, dtype, shape = entry
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise CkptmapError(f"{path}: announced entry {entry!r} is not (name, dtype_name, shape)") from None
    if dtype not in _MS_TYPES:
        raise CkptmapError(f"{path}: announced tensor {name!r} has dtype {dtype!r}, which a MindSpore .ckpt "
                           f"cannot hold; use one of {', '.join(_MS_TYPES)}")
    return name, dtype, (() if dtype == "str" else shape)


_HEADERS: dict = {}   # (tag, dims, type, content length) -> record header bytes
_HEADERS_KEPT = 1 << 14


def _record_header(tag: bytes, dims: tuple, ms_type: bytes, content_len: int) -> bytes:
    """The bytes of one record before its content (ranks of one structure write the same records:
    each header is built once)."""
    key = (tag, dims, ms_type, content_len)
    head = _HEADERS.get(key)
    if head is None:
        tensor_head = b"".join(b"\x08" + _varint(d) for d in dims)
        tensor_head += _len_field(2, len(ms_type)) + ms_type + _len_field(3, content_len)
        tensor_len = len(tensor_head) + content_len
        value_head = _len_field(1, len(tag)) + tag + _len_field(2, tensor_len)
        head = _HEADERS[key] = _len_field(1, len(value_head) + tensor_len) + value_head + tensor_head
        if len(_HEADERS) > _HEADERS_KEPT:
            del _HEADERS[next(iter(_HEADERS))]
    return head


def image_layout(entries, *, slice_bytes=DEFAULT_SLICE_BYTES) -> tuple[bytes, list[int]] | None:
    """The file :class:`CkptWriter` writes for ``entries`` [(name, dtype, shape)] (no CRC trailer), with
    every tensor's content left zero, and the byte offset of each tensor's content in it — for a caller
    that fills the contents in memory and writes a small file at once (``crc_trailer`` for the CRC).
    None when the writer has to decide: a str, a shape (0,), a tensor of several records, a repeated name
    (the writer writes them, or refuses them with its message)."""
    parts, offsets, pos, names = [], [], 0, set()
    for entry in entries:
        name, dtype, shape = _normalise_entry(entry, "(image)")
        nbytes = math.prod(shape) * dtypes.itemsize(dtype) if dtype != "str" else 0
        if dtype == "str" or shape == (0,) or nbytes > slice_bytes or name in names or not isinstance(name, str):
            return None
        names.add(name)
        head = _record_header(name.encode("utf-8"), shape, _MS_TYPES[dtype].encode(), nbytes)
        parts += (head, bytes(nbytes))
        offsets.append(pos + len(head))
        pos += len(head) + nbytes
    return b"".join(parts), offsets


def crc_trailer(crc: int) -> bytes:
    """The CRC trailer of a file whose bytes before it have CRC-32 ``crc``."""
    return _CRC_MAGIC + crc.to_bytes(10, "big")


class CkptWriter:
    """Stream tensors into a MindSpore ``.ckpt`` file (see the module docstring for the bytes)."""

    def __init__(self, path, entries=None, metadata=None, *, slice_bytes=DEFAULT_SLICE_BYTES, crc=False,
                 fsync=False):
        self.path = os.fspath(path)
        self._fsync = fsync
        self._entries = None if entries is None else [_normalise_entry(e, self.path) for e in entries]
        if int(slice_bytes) < 1:
            raise CkptmapError(f"{self.path}: slice_bytes must be positive, got {slice_bytes}")
        self._slice_bytes = int(slice_bytes)
        self._crc = 0 if crc else None
        self._written: set[str] = set()
        self._count = 0
        self._f = open(self.path, "wb")

    # -- writing -------------------------------------------------------------------------------
    def _emit(self, data) -> None:
        self._f.write(data)
        if self._crc is not None:
            self._crc = byte_io.crc32(data, self._crc)

    def _record(self, tag: bytes, dims, ms_type: bytes, content) -> None:
        """One record = one serialised ``Checkpoint``; the header is built, the content streamed."""
        self._header(tag, dims, ms_type, len(content))
        self._emit(content)

    def _header(self, tag: bytes, dims, ms_type: bytes, content_len: int) -> None:
        self._emit(_record_header(tag, tuple(dims), ms_type, content_len))

    def _admit(self, name, dtype, shape) -> None:
        if self._f is None:
            raise CkptmapError(f"{self.path}: cannot write tensor {name!r}, the writer is already closed")
        if not isinstance(name, str):
            raise CkptmapError(f"{self.path}: tensor names must be str, got {name!r}")
        if name in self._written:
            raise CkptmapError(f"{self.path}: tensor {name!r} written twice; every name must be unique "
                               "(MindSpore would silently merge or overwrite them)")
        if self._entries is not None:
            if self._count >= len(self._entries):
                raise CkptmapError(f"{self.path}: tensor {name!r} was not announced; the writer was given "
                                   f"{len(self._entries)} entries and all of them are written already")
            expected = self._entries[self._count]
            if expected != (name, dtype, shape):
                raise CkptmapError(f"{self.path}: write #{self._count} does not follow the announced entries: "
                                   f"expected {expected}, got {(name, dtype, shape)}; write tensors in the "
                                   "announced order with the announced dtype and shape")
        self._written.add(name)
        self._count += 1

    def write(self, name: str, data, dtype: str | None = None) -> None:
        """Write ``data`` (a numpy array of the dtype's storage type, or a torch tensor) as tensor
        ``name``; ``dtype`` defaults to the announced entry's (bfloat16 travels as uint16)."""
        if isinstance(data, str):
            raise CkptmapError(f"{self.path}: {name!r} is a str; use write_string for str values")
        if dtype is None and self._entries is not None and self._count < len(self._entries):
            dtype = self._entries[self._count][1]
        try:
            dtype, array = dtypes.as_array(data, dtype)
        except CkptmapError as e:
            raise CkptmapError(f"{self.path}: tensor {name!r}: {e}") from None
        shape = tuple(array.shape)
        if shape == (0,):
            raise CkptmapError(f"{self.path}: tensor {name!r} has shape (0,), which a MindSpore .ckpt cannot hold "
                               "(dims [0] reads back as a scalar, and save_checkpoint drops empty tensors); "
                               "leave it out or give it another shape")
        self._admit(name, dtype, shape)
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        content = memoryview(flat)  # the array's own bytes, no copy when it is contiguous
        step = self._step(name, dtype)
        tag, ms_type = name.encode("utf-8"), _MS_TYPES[dtype].encode()
        for start in range(0, max(len(content), 1), step):  # an empty tensor still gets one record
            self._record(tag, shape, ms_type, content[start:start + step])

    def _step(self, name, dtype) -> int:
        size = dtypes.itemsize(dtype)
        step = self._slice_bytes // size * size
        if step == 0:
            raise CkptmapError(f"{self.path}: slice_bytes={self._slice_bytes} is smaller than one element of "
                               f"tensor {name!r} ({dtype}); use a slice size of at least 8 bytes")
        return step

    def _admit_streamed(self, name, dtype, shape) -> tuple[int, int]:
        """Checks of write() for content that is not an array: (content bytes, record step)."""
        shape = tuple(int(d) for d in shape)
        if dtype not in _MS_TYPES or dtype == "str":
            raise CkptmapError(f"{self.path}: tensor {name!r} has dtype {dtype!r}, which a MindSpore .ckpt "
                               f"cannot hold as a tensor")
        if shape == (0,):
            raise CkptmapError(f"{self.path}: tensor {name!r} has shape (0,), which a MindSpore .ckpt cannot hold")
        step = self._step(name, dtype)
        self._admit(name, dtype, shape)
        return math.prod(shape) * dtypes.itemsize(dtype), step

    def write_range(self, name: str, dtype: str, shape, source) -> None:
        """Write tensor ``name`` whose content is the bytes ``source`` of another file (a FileRange),
        or the concatenation of several such runs (a sequence of FileRanges, in order), C order,
        little-endian, exactly ``dtype`` x ``shape``: copied by the kernel, never read by Python —
        unless this file gets a CRC trailer, whose CRC needs the bytes (then read through a small buffer)."""
        nbytes, step = self._admit_streamed(name, dtype, shape)
        runs = byte_io.file_runs(source, nbytes, f"{self.path}: tensor {name!r} ({dtype} {list(shape)})")
        tag, ms_type = name.encode("utf-8"), _MS_TYPES[dtype].encode()
        for start in range(0, max(nbytes, 1), step):
            n = min(step, nbytes - start)
            self._header(tag, shape, ms_type, n)
            if not n:
                continue
            if nbytes <= byte_io.SMALL_RUN:   # small: read into the write buffer (one pread per run)
                for part in byte_io.sliced(runs, start, n):
                    self._emit(byte_io.read_small(part))
                continue
            self._f.flush()   # written at the descriptor's position, after what is buffered
            for part in byte_io.sliced(runs, start, n):
                if self._crc is None:
                    byte_io.copy_range(part, self._f.fileno())   # by the kernel
                else:   # through one small buffer, CRC'd while in the CPU cache
                    self._crc = byte_io.copy_range_crc(part, self._f.fileno(), self._crc)

    def write_chunks(self, name: str, dtype: str, shape, chunks) -> None:
        """Write tensor ``name`` from ``chunks``, bytes-like pieces whose concatenation is its content
        (C order, little-endian ``dtype`` x ``shape``), each written before the next is asked for:
        a converted tensor streams through one reused buffer instead of a whole array."""
        nbytes, step = self._admit_streamed(name, dtype, shape)
        tag, ms_type = name.encode("utf-8"), _MS_TYPES[dtype].encode()
        it = iter(chunks)
        pending = memoryview(b"")
        done = 0
        for start in range(0, max(nbytes, 1), step):
            n = min(step, nbytes - start)
            self._header(tag, shape, ms_type, n)
            while n:
                if not pending:
                    try:
                        pending = memoryview(next(it)).cast("B")
                    except StopIteration:
                        raise CkptmapError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) needs {nbytes} "
                                           f"bytes but its data ended after {done}") from None
                take = pending[:n]
                self._emit(take)
                pending, n, done = pending[len(take):], n - len(take), done + len(take)
        if pending or next(it, None) is not None:
            raise CkptmapError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) needs {nbytes} bytes but its "
                               f"data holds more")

    def write_string(self, name: str, value: str) -> None:
        if not isinstance(value, str):
            raise CkptmapError(f"{self.path}: value of {name!r} is a {type(value).__name__}, not a str")
        self._admit(name, "str", ())
        try:
            content = value.encode("utf-32-le") or b"\0\0\0\0"  # numpy's '<U' bytes; '' is '<U1'
        except UnicodeEncodeError as e:
            raise CkptmapError(f"{self.path}: string {name!r} cannot be stored: {e}") from None
        self._record(name.encode("utf-8"), (0,), b"str", content)

    # -- finishing ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._f is None:
            return
        if self._entries is not None and self._count < len(self._entries):
            self._abort()
            missing = [e[0] for e in self._entries[self._count:]]
            raise CkptmapError(f"{self.path}: closed after {self._count} of {len(self._entries)} announced tensors; "
                               f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}. The file is incomplete; "
                               "write every announced tensor before closing")
        f, self._f = self._f, None
        try:
            if self._crc is not None:
                f.write(crc_trailer(self._crc))
            f.flush()
            if self._fsync:  # durability against power loss costs a full write-back; the caller decides
                os.fsync(f.fileno())
        finally:
            f.close()

    def _abort(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._abort()


class _Entry:
    __slots__ = ("ms_type", "dims", "slices")

    def __init__(self, ms_type, dims):
        self.ms_type, self.dims, self.slices = ms_type, dims, []


# Scanned layouts by file size: a .ckpt whose bytes outside its tensors' contents (and its CRC value) are
# those of one of the last few scanned of its size holds the same records — names, types, shapes, content
# offsets: what a scan reads is only those bytes —, so they are taken from it, not parsed again (the ranks
# of a pipeline stage: ~0.8 ms of Python varint parsing a file at 16,384 ranks). A file whose bytes differ
# from a shape's only inside tensor names (another expert rank's or stage's files: ``experts.17`` and
# ``experts.18``; names of one length, so every offset is the same) takes those records under its own names.
_SHAPES: dict = {}   # file size -> [_ScanShape], the most recently used first
_SHAPES_KEPT = 64
_SHAPES_PER_SIZE = 4   # layouts of one size (stages whose names differ in digits only) compared before a scan


class _ScanShape:
    def __init__(self, reader: "CkptReader", size: int, end: int, names: list):
        """``names``: each record's name bytes [start, end) and the tensor it is a slice of, in file order."""
        self.entries, self.has_crc, self.end = reader._entries, reader.has_crc, end
        self.specs = None   # {name: TensorSpec} once a reader of this layout was asked (CkptReader.specs)
        self.name_starts = np.array([a for a, _, _ in names], dtype=np.intp)
        self.name_ends = np.array([b for _, b, _ in names], dtype=np.intp)
        self.name_tags = [tag for _, _, tag in names]
        holes = sorted((o, o + n) for entry in self.entries.values() for o, n in entry.slices)
        if reader.has_crc:
            holes.append((end + len(_CRC_MAGIC), end + _TRAILER_LEN))   # the CRC-32 value
        pieces, pos = [], 0
        for start, stop in holes:
            if start > pos:
                pieces.append(np.arange(pos, start, dtype=np.intp))
            pos = max(pos, stop)
        if pos < size:
            pieces.append(np.arange(pos, size, dtype=np.intp))
        self.index = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.intp)
        self.fixed = self._gather(reader._mm)

    def _gather(self, mm) -> bytes:
        return np.frombuffer(mm, dtype=np.uint8)[self.index].tobytes()   # the view is dropped at once

    def read(self, reader: "CkptReader") -> "_ScanShape | None":
        """Give ``reader`` these records if its bytes outside the contents are this shape's (self), or
        differ from them only inside the names of tensors of one record each (a shape of those names)."""
        fixed = self._gather(reader._mm)
        shape = self
        if fixed != self.fixed:
            entries = self._renamed(reader, fixed)
            if entries is None:
                return None
            shape = copy.copy(self)
            shape.fixed, shape.entries, shape.specs = fixed, entries, None
            shape.name_tags = [tag for tag, entry in entries.items() for _ in entry.slices]
        reader._entries, reader.has_crc = shape.entries, shape.has_crc   # shared, never changed after a scan
        reader._shape = shape
        return shape

    def _renamed(self, reader: "CkptReader", fixed: bytes) -> dict | None:
        differ = self.index[np.flatnonzero(np.frombuffer(fixed, np.uint8) != np.frombuffer(self.fixed, np.uint8))]
        record = np.searchsorted(self.name_starts, differ, side="right") - 1
        if (record < 0).any() or (differ >= self.name_ends[np.maximum(record, 0)]).any():
            return None
        renames = {}
        for i in set(record.tolist()):
            tag = self.name_tags[i]
            if len(self.entries[tag].slices) != 1:
                return None   # one name in several records: let the scan check they agree
            try:
                renames[tag] = bytes(reader._mm[self.name_starts[i]:self.name_ends[i]]).decode("utf-8")
            except UnicodeDecodeError:
                return None   # the scan names the fault
        entries = {renames.get(tag, tag): entry for tag, entry in self.entries.items()}
        return entries if len(entries) == len(self.entries) else None   # a name given twice: the scan refuses it


class CkptReader:
    """Read a MindSpore ``.ckpt`` file through a private (copy-on-write) memory map."""

    def __init__(self, path, *, verify_crc=True):
        self.path = os.fspath(path)
        self._entries: dict[str, _Entry] = {}
        self._shape: _ScanShape | None = None   # the layout the records are shared with
        self._mm = None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise CkptmapError(f"cannot open MindSpore checkpoint {self.path}: {e}") from None
        self.has_crc = False
        try:
            shapes = _SHAPES.get(size, ()) if self._mm is not None else ()
            found = next(((s, got) for s in shapes if (got := s.read(self)) is not None), None)
            if found is not None:
                end = found[1].end
                if found[1] is not shapes[0]:   # the most recent first: files come stage by stage
                    shapes.remove(found[0])   # (renamed: the shape of the new names takes its place)
                    shapes.insert(0, found[1])
            else:
                names: list = []
                end = self._scan(size, names)
                if self._mm is not None and len(self._entries) > 1:
                    self._shape = _ScanShape(self, size, end, names)
                    _SHAPES.setdefault(size, []).insert(0, self._shape)
                    del _SHAPES[size][_SHAPES_PER_SIZE:]
                    if len(_SHAPES) > _SHAPES_KEPT:
                        del _SHAPES[next(iter(_SHAPES))]
            if self.has_crc and verify_crc:
                self._verify_crc(end)
        except BaseException:
            self.close()
            raise

    # -- framing --------------------------------------------------------------------------------
    def _corrupt(self, offset, what):
        return CkptmapError(f"{self.path}: not a valid MindSpore .ckpt at byte offset {offset}: {what}. The file is "
                            "truncated, corrupt or not a (plain, unencrypted) .ckpt; re-create or re-copy it")

    def _varint(self, pos, end):
        result = shift = 0
        start = pos
        while True:
            if pos >= end or shift > 63:
                raise self._corrupt(start, "unterminated varint")
            b = self._mm[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result, pos

    def _fields(self, pos, end):
        """Yield (field, wire_type, value, offset) for a message in [pos, end); LEN values are (offset, length)."""
        while pos < end:
            at = pos
            key, pos = self._varint(pos, end)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = self._varint(pos, end)
            elif wire == 2:
                n, pos = self._varint(pos, end)
                if pos + n > end:
                    raise self._corrupt(at, f"field {field} declares {n} bytes but only {end - pos} remain")
                value, pos = (pos, n), pos + n
            elif wire in (1, 5):
                value, pos = None, pos + (8 if wire == 1 else 4)
                if pos > end:
                    raise self._corrupt(at, f"field {field} runs past the end of its message")
            else:
                raise self._corrupt(at, f"unexpected protobuf wire type {wire} (key byte 0x{key:02x})")
            yield field, wire, value, at

    def _scan(self, size, names: list) -> int:
        """Index every record; return the end of the protobuf content (start of the trailer). ``names`` gets
        each record's (first, end byte of its name, its tensor)."""
        pos, last = 0, None
        while pos < size:
            if size - pos == _TRAILER_LEN and self._mm[pos:pos + len(_CRC_MAGIC)] == _CRC_MAGIC:
                self.has_crc = True
                return pos
            if self._mm[pos] != 0x0A:
                raise self._corrupt(pos, f"expected a record (byte 0x0a), found 0x{self._mm[pos]:02x}")
            n, start = self._varint(pos + 1, size)
            if start + n > size:
                raise self._corrupt(pos, f"record declares {n} bytes but only {size - start} remain")
            tag, ms_type, dims, content, name = self._parse_value(start, start + n)
            names.append(name + (tag,))
            entry = self._entries.get(tag)
            if entry is None:
                entry = self._entries[tag] = _Entry(ms_type, dims)
            elif tag != last:
                raise self._corrupt(pos, f"tensor {tag!r} appears again after other tensors")
            elif (ms_type, dims) != (entry.ms_type, entry.dims):
                raise self._corrupt(pos, f"slice of {tag!r} has {ms_type} {dims}, earlier slices {entry.ms_type} "
                                         f"{entry.dims}")
            entry.slices.append(content)
            last, pos = tag, start + n
        for tag, entry in self._entries.items():
            self._check_entry(tag, entry)
        return size

    def _parse_value(self, pos, end):
        tag = tensor = None
        for field, wire, value, at in self._fields(pos, end):
            if field == 1 and wire == 2:
                name = (value[0], value[0] + value[1])
                try:
                    tag = bytes(self._mm[value[0]:value[0] + value[1]]).decode("utf-8")
                except UnicodeDecodeError:
                    raise self._corrupt(at, "tensor name is not UTF-8") from None
            elif field == 2 and wire == 2:
                tensor = value
            elif field == 3:
                raise CkptmapError(f"{self.path}: record at byte offset {at} holds a MindSpore MapParameter "
                                   f"(maptensor{' ' + repr(tag) if tag else ''}), which ckptmap does not support")
        if tag is None or tensor is None:
            raise self._corrupt(pos, "record without a tag or a tensor")
        dims, ms_type, content = [], None, None
        for field, wire, value, at in self._fields(tensor[0], tensor[0] + tensor[1]):
            if field == 1 and wire == 0:
                dims.append(value)
            elif field == 1 and wire == 2:  # packed dims: not what MindSpore writes, but valid protobuf
                p, e = value[0], value[0] + value[1]
                while p < e:
                    d, p = self._varint(p, e)
                    dims.append(d)
            elif field == 2 and wire == 2:
                ms_type = bytes(self._mm[value[0]:value[0] + value[1]]).decode("ascii", "replace")
            elif field == 3 and wire == 2:
                content = value
        if ms_type is None or content is None:
            raise self._corrupt(tensor[0], f"tensor {tag!r} lacks tensor_type or tensor_content")
        if any(d >= 1 << 63 for d in dims):
            raise self._corrupt(tensor[0], f"tensor {tag!r} has a negative dimension")
        return tag, ms_type, tuple(dims), content, name

    def _check_entry(self, tag, entry):
        canonical = _CANONICAL.get(entry.ms_type)
        if canonical is None:
            raise CkptmapError(f"{self.path}: tensor {tag!r} has tensor_type {entry.ms_type!r}; ckptmap reads only "
                               f"{', '.join(_MS_TYPES.values())}. Convert or drop that tensor with MindSpore first")
        if canonical == "str":
            return
        shape = () if entry.dims in ((), (0,)) else entry.dims  # MindSpore's loader maps dims [0] to a scalar
        expected = math.prod(shape) * dtypes.itemsize(canonical)
        found = sum(n for _, n in entry.slices)
        if found != expected:
            raise self._corrupt(entry.slices[0][0], f"tensor {tag!r} ({entry.ms_type} {list(shape)}) needs "
                                                    f"{expected} content bytes, its records hold {found}")

    def _verify_crc(self, end):
        crc = 0
        with memoryview(self._mm) as whole:
            for start in range(0, end, _CRC_CHUNK):
                with whole[start:min(end, start + _CRC_CHUNK)] as chunk:
                    crc = byte_io.crc32(chunk, crc)
        stored = int.from_bytes(self._mm[end + len(_CRC_MAGIC):end + _TRAILER_LEN], "big")
        if crc != stored:
            raise CkptmapError(f"{self.path}: CRC-32 mismatch: the trailer at byte offset {end} says {stored:#010x}, "
                               f"the content before it hashes to {crc:#010x}. The file is corrupt; re-create or "
                               "re-copy it")

    # -- access ---------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def _entry(self, name) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CkptmapError(f"{self.path}: no tensor named {name!r} (the file holds {len(self._entries)} "
                               "tensors; list them with keys())") from None

    def spec(self, name) -> TensorSpec:
        entry = self._entry(name)
        dtype = _CANONICAL[entry.ms_type]
        return TensorSpec(dtype, () if dtype == "str" or entry.dims == (0,) else entry.dims)

    def specs(self) -> dict:
        """{name: spec()} of every tensor, in file order. Files read from one scanned layout share the dict
        (so a caller can tell them alike by identity); it is never to be changed."""
        shape = self._shape
        if shape is not None and shape.specs is not None:
            return shape.specs
        specs = {name: self.spec(name) for name in self._entries}
        if shape is not None:
            shape.specs = specs
        return specs

    def content_bytes(self, names) -> bytes:
        """The content bytes of the tensors ``names``, one after the other: two files with equal specs()
        hold equal values under those names exactly when these are equal."""
        mm = self._mm
        return b"".join(mm[o:o + n] for name in names for o, n in self._entry(name).slices)

    def string(self, name) -> str:
        entry = self._entry(name)
        if _CANONICAL[entry.ms_type] != "str":
            raise CkptmapError(f"{self.path}: {name!r} is a tensor, not a string")
        raw = b"".join(self._mm[o:o + n] for o, n in entry.slices)
        try:
            return raw.decode("utf-32-le").rstrip("\0")
        except UnicodeDecodeError as e:
            raise CkptmapError(f"{self.path}: string {name!r} is not valid UTF-32: {e}") from None

    def array(self, name) -> np.ndarray:
        """The tensor's values as a numpy array of its storage dtype: a view of the file mapping
        (possibly unaligned) when it is one record, a copy when MindSpore sliced it."""
        entry = self._entry(name)
        dtype_name, shape = self.spec(name)
        if dtype_name == "str":
            raise CkptmapError(f"{self.path}: {name!r} is a string; read it with string()")
        st = dtypes.storage(dtype_name)
        numel = math.prod(shape)
        if numel == 0:
            return np.empty(shape, dtype=st)
        if len(entry.slices) == 1:
            return np.frombuffer(self._mm, dtype=st, count=numel, offset=entry.slices[0][0]).reshape(shape)
        out = np.empty(numel * st.itemsize, dtype=np.uint8)
        pos = 0
        for offset, n in entry.slices:
            out[pos:pos + n] = np.frombuffer(self._mm, dtype=np.uint8, count=n, offset=offset)
            pos += n
        return out.view(st).reshape(shape)

    def byte_range(self, name) -> FileRange | None:
        entry = self._entry(name)
        if len(entry.slices) != 1 or _CANONICAL[entry.ms_type] == "str":
            return None
        offset, n = entry.slices[0]
        return FileRange(self.path, offset, n)

    def get(self, name):
        """A string value, or the tensor as an array (see array())."""
        return self.string(name) if self.spec(name).dtype == "str" else self.array(name)

    def close(self) -> None:
        # Only drop our reference: arrays handed out keep the map alive through their buffer export;
        # the file is unmapped when the last of them is freed, or right here if there are none.
        self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


def load(path) -> dict:
    """Every tensor and string of a ``.ckpt`` file, in file order (tensors as numpy arrays viewing the
    file mapping, bfloat16 as uint16: ``spec()`` says which)."""
    with CkptReader(path) as reader:
        return {name: reader.get(name) for name in reader.keys()}
