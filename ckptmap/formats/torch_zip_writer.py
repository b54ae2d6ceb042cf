"""PyTorch's zip checkpoint format, written: the bytes ``torch.save`` writes, without torch.

:func:`save_streaming` writes an object graph holding :class:`TensorRef` values (tensors that live in
some file) and :class:`HeldTensor` values (tensors in memory) with the bytes ``torch.save`` would
write for the equivalent real tensors, taking each referenced storage's bytes from a ``fill(key)``
iterable chunk by chunk (a 30 GB ``distrib_optim.pt`` never sits in memory). It pickles like torch
(protocol 2, ``_rebuild_tensor_v2`` reductions, persistent ids) with a pure-Python pickler that writes
stand-ins and torch globals (``safe_unpickler.GlobalMarker``) as the GLOBALs they were read from, and
re-implements torch's zip writer (miniz) record for record: 64-byte aligned data, data descriptors,
zip64 above 4 GiB and the ``.data/serialization_id`` (see the notes above :func:`save_streaming`).
``save_streaming`` of ``TorchZipFile(f).root`` with the file's own storage bytes reproduces every
Megatron fixture byte for byte; :func:`save` is the same for graphs whose tensors are all in memory
(or real torch tensors, when the caller has torch). One identity a loaded graph cannot carry: if the
training process pickled the interned string ``'storage'`` itself before its first tensor, torch's
persistent ids referenced it by memo; a re-save writes it out again (Megatron checkpoints hold no
such string). Files are written through ``ckptmap.atomic`` under a temporary name and renamed.

``save_streaming(..., dialect="msadapter")`` writes the MSAdapter dialect instead (MindSpeed-Core-MS's
shim ``torch.save``; ``formats/msadapter.py``): the same pickler base with the shim's tensor
reductions (``_MSAdapterPickler``) and Python zipfile's container (``_PyZipWriter``); re-writing what
``torch_zip_reader`` read from a shim file gives the shim's bytes (its timestamp given).
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import io
import itertools
import operator
import os
import pickle
import struct
import sys
import threading
from pathlib import Path

import attrs

from ckptmap import atomic, dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import byte_io, msadapter
from ckptmap.formats.base import FileRange, Hole
from ckptmap.formats.safe_unpickler import (STORAGE_TYPE_OF, TENSOR_TYPE_MARKERS, GlobalMarker, StandInClass,
                                            torch_global)
from ckptmap.formats.torch_serialization_id import hash_combine, name_hash_digits
from ckptmap.formats.torch_zip_reader import HeldTensor, TensorRef, _ref_problem, _Storage
from ckptmap.formats.torch_zip_reader import contiguous_stride as _contiguous

__all__ = ["save", "save_streaming", "archive_name", "DEFAULT_DATE_TIME"]

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
DEFAULT_PROTOCOL = 2        # torch.serialization.DEFAULT_PROTOCOL
DEFAULT_ALIGNMENT = 64      # torch's storage alignment default


def _global(module: str, name: str):
    """torch's own object when the caller has torch loaded (so that a graph mixing real tensors with
    TensorRefs memo-shares one GLOBAL, as torch.save would), else ckptmap's inert marker of it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        obj = sys.modules.get(module)
        if obj is not None and hasattr(obj, name):
            return getattr(obj, name)
    return torch_global(module, name)


def _torch_options() -> tuple[int, bool]:
    """(storage alignment, compute crc32): torch's current save options when the caller has torch
    imported (and may have changed them), else torch's defaults."""
    torch = sys.modules.get("torch")
    if torch is None:
        return DEFAULT_ALIGNMENT, True
    return int(torch.serialization._get_storage_alignment()), bool(torch.serialization.get_crc32_options())


# -------------------------------------------------------------------------------------------------
# Pickling


class _Pickler(pickle._Pickler):
    """Pure-Python pickler that writes stand-in classes as their original GLOBAL without importing.
    The reference implementation of ckptmap's pickling; :class:`_CPickler` writes the same bytes
    faster for the graphs it can take. A format adds its own reductions in ``_reduce_special``."""

    def reducer_override(self, obj):
        rv = self._reduce_special(obj)
        if rv is NotImplemented and isinstance(obj, _Storage):
            raise CkptmapError("cannot save an internal storage reference; save tensors instead")
        return rv

    def _reduce_special(self, obj):
        return NotImplemented

    def save_global(self, obj, name=None):
        if isinstance(obj, StandInClass):
            self._write_global(obj, obj.__module__, obj.__qualname__)
        elif isinstance(obj, GlobalMarker):
            self._write_global(obj, obj.module, obj.qualname)
        else:
            super().save_global(obj, name)

    def _write_global(self, obj, module, qualname):
        if "\n" in module or "\n" in qualname:
            raise pickle.PicklingError(f"global name {module!r}.{qualname!r} contains a newline")
        parent, _, last = qualname.rpartition(".")
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        elif parent:  # what pickle does for nested classes below protocol 4
            self.save_reduce(getattr, (StandInClass.make(module, parent), last))
        else:
            if self.proto < 3 and self.fix_imports:
                module, qualname = _protocol2_name(module, qualname)
            enc = "utf-8" if self.proto >= 3 else "ascii"
            try:
                line = (pickle.GLOBAL + bytes(module, enc) + b"\n" + bytes(qualname, enc) + b"\n")
            except UnicodeEncodeError:
                raise pickle.PicklingError(f"cannot pickle global {module}.{qualname} with protocol "
                                           f"{self.proto}") from None
            self.write(line)
        self.memoize(obj)


def _protocol2_name(module: str, qualname: str) -> tuple[str, str]:
    """The (module, name) pickle writes below protocol 3 with fix_imports (Python 2 names)."""
    if (module, qualname) in _compat_pickle.REVERSE_NAME_MAPPING:
        return _compat_pickle.REVERSE_NAME_MAPPING[(module, qualname)]
    return _compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module), qualname


# The C pickler (pickle.Pickler) writes the same opcodes as the pure-Python one, ~50x faster, but its
# save_global imports the module named by an object's __module__ and requires the object itself
# there: it cannot write ckptmap's stand-ins (their modules, e.g. megatron.core.enums, are never
# imported) nor the GlobalMarkers of torch's globals. Aliases get around that without touching
# sys.modules: each (module, qualname) gets an importable alias name in a ckptmap module, and
# _compat_pickle.REVERSE_NAME_MAPPING[(that module, alias)] = (module, qualname) makes protocol 2
# write the original GLOBAL (the C pickler applies that table to every global it writes below
# protocol 3). A GlobalMarker is its own alias (an attribute of the module its __module__ names), so
# the memo is keyed by the marker as in the pure-Python pickler; a stand-in class maps 1:1 onto an
# alias class, which takes its place in the stand-ins' reductions (so it is memoized where the
# stand-in class would be). The mapping only ever renames these private names. Graphs the aliases
# cannot express byte for byte -- a stand-in class as a plain value, a nested class (getattr
# reduction), NEWOBJ of a stand-in (the C pickler checks obj.__class__), non-ASCII or multi-line
# names -- raise _NeedsPurePython and are pickled again by the pure-Python pickler.

class _NeedsPurePython(Exception):
    """The C pickler cannot write this graph as the pure-Python one does; pickle it with that."""


_ALIAS_LOCK = threading.Lock()
_ALIAS_NUMBERS = itertools.count()
_CLASS_ALIASES: dict = {}   # StandInClass -> alias class (a plain class, attribute of this module)
_MARKER_ALIASES: dict = {}  # GlobalMarker -> its alias name (the marker is that attribute of its module)


def _made_once(cache: dict, key, make):
    """``cache[key]``, made by ``make()`` the first time, under the lock (threads may pickle at once)."""
    value = cache.get(key)
    if value is None:
        with _ALIAS_LOCK:
            value = cache.get(key)
            if value is None:
                value = cache[key] = make()
    return value


def _marker_alias(marker: GlobalMarker) -> str:
    return _made_once(_MARKER_ALIASES, marker, lambda: _new_alias(
        sys.modules[type(marker).__module__], lambda name: marker, marker.module, marker.qualname))


def _class_alias(cls: StandInClass) -> type:
    def make():
        name = _new_alias(sys.modules[__name__], lambda name: type(name, (), {
            "__module__": __name__, "__qualname__": name, "__slots__": ()}), cls.__module__, cls.__qualname__)
        return getattr(sys.modules[__name__], name)
    return _made_once(_CLASS_ALIASES, cls, make)


def _new_alias(holder, make, module: str, qualname: str) -> str:
    """A new attribute ``holder.<alias>`` = ``make(alias)`` that protocol 2 writes as the GLOBAL
    module.qualname (called under _ALIAS_LOCK)."""
    target = _protocol2_name(module, qualname)
    if "." in qualname or qualname in ("__newobj__", "__newobj_ex__") \
            or any("\n" in n or not n.isascii() for n in target):
        raise _NeedsPurePython  # a getattr / NEWOBJ reduction, or the pure-Python pickler's own error
    alias = f"_ckptmap_alias_{next(_ALIAS_NUMBERS)}"
    setattr(holder, alias, make(alias))
    _compat_pickle.REVERSE_NAME_MAPPING[(holder.__name__, alias)] = target
    return alias


class _CPickler(pickle.Pickler):
    """The C pickler with ckptmap's globals written through aliases (notes above); a format adds
    its own reductions in ``_reduce_special``, as for :class:`_Pickler`."""

    def reducer_override(self, obj):
        rv = self._reduce_special(obj)
        if rv is not NotImplemented:
            return rv
        t = type(obj)
        if t is GlobalMarker:
            return _marker_alias(obj)   # a string: save_global(obj, alias), memoized as obj
        if type(t) is StandInClass:     # a stand-in instance: StandIn.__reduce_ex__ with the alias class
            kind = obj._kind
            if kind == "reduce" and not obj._kwargs:
                func, args = _class_alias(t), obj._args
            elif kind == "reconstructor":
                func, args = copyreg._reconstructor, (_class_alias(t),) + obj._args
            else:   # NEWOBJ checks obj.__class__ is args[0]; keyword arguments: the pure pickler's error
                raise _NeedsPurePython
            return (func, args, obj.state, iter(obj._listitems) if obj._listitems else None,
                    iter(obj._dictitems) if obj._dictitems else None)
        if t is StandInClass:   # a stand-in class as a value: memoized as itself, not as an alias
            raise _NeedsPurePython
        if t is _Storage:
            raise CkptmapError("cannot save an internal storage reference; save tensors instead")
        return NotImplemented

    def _reduce_special(self, obj):
        return NotImplemented


def _pickled(fast, slow, obj, path, *args):
    """(data.pkl bytes, the pickler that wrote them): the C pickler ``fast`` when it can write ``obj``
    (the same bytes), else the pure-Python ``slow``."""
    buf = io.BytesIO()
    pickler = fast(buf, path, *args)
    try:
        _dump(pickler, obj, path)
    except _NeedsPurePython:
        buf = io.BytesIO()
        pickler = slow(buf, path, *args)
        _dump(pickler, obj, path)
    return buf.getvalue(), pickler


# -------------------------------------------------------------------------------------------------
# Streaming writer: torch.save's exact bytes, storages supplied chunk by chunk
#
# torch.save = pickle data.pkl (protocol 2) with persistent ids for storages, then
# torch._C.PyTorchFileWriter (caffe2/serialize/inline_container.cc over miniz, opened with
# MZ_ZIP_FLAG_WRITE_ZIP64) writes, in this order, the records
#     data.pkl, .format_version ("1"), .storage_alignment ("64"), byteorder ("little"),
#     data/0, data/1, ... (first-encounter order while pickling), version ("3\n"),
#     .data/serialization_id
# each under "<archive name>/". Every record is stored (method 0) as:
#   local header   PK\3\4, version needed 0, flags 0x0808 (data descriptor + UTF-8), time/date 0,
#                  CRC and both sizes 0 (they follow in the data descriptor);
#                  extra field = [zip64 extra: id 1, (size, 0) if size >= 0xFFFFFFFF,
#                  (header offset) if offset >= 0xFFFFFFFF] + "FB" <u16 n> + "Z" * n, where n pads
#                  the data start to a multiple of the storage alignment (64)
#   data
#   descriptor     PK\7\8, CRC32, sizes as 2 x u32 -- or 2 x u64 when the record has a zip64 extra;
#                  an empty record (an empty storage) has none, and flags 0x0800
# then the central directory (one PK\1\2 entry per record: versions 0, the record's flags, CRC,
# sizes and offset capped at 0xFFFFFFFF with the zip64 extra -- (size, size) here -- and no "FB"
# padding, no comment, attributes 0), always a zip64 end-of-central-directory record (made by
# 0x031E, needed 45) and its locator, and the classic end record (counts capped at 0xFFFF, size
# and offset capped at 0xFFFFFFFF).
#
# .data/serialization_id is deterministic: 20 decimal digits (zero-padded) of a hash of the record
# *names* followed by 20 digits of c10::hash_combine over the CRC32 of every non-empty record in
# write order (crc 0 when torch's compute_crc32 option is off), starting from 0, where
# hash_combine(seed, v) = seed ^ (v + 0x9e3779b9 + (seed << 6) + (seed >> 2)) mod 2**64. The name part
# is hash_combine over std::hash<std::string>(name) in the iteration order of the writer's
# std::unordered_set of written names -- a function of the names and their insertion order only
# (not of the archive name or the data). Rather than re-implement libstdc++'s hash table, it is taken
# from torch's own writer fed the same record names with empty contents (a few bytes per record,
# written to a sink).

_MAX32 = 0xFFFFFFFF
_ZIP_FLAGS = 0x0808  # data descriptor follows + UTF-8 names
_ZIP_FLAGS_EMPTY = 0x0800  # an empty record has no data descriptor
_CENTRAL_HEADER = struct.Struct("<4s6H3L5H2L")
_DESCRIPTOR32 = struct.Struct("<4s3L")
_DESCRIPTOR64 = struct.Struct("<4sL2Q")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_EOCD = struct.Struct("<4s4H2LH")
_FILE_FORMAT_VERSION = b"3\n"  # caffe2 kMinProducedFileFormatVersion, what torch.save writes
_STORAGE_PID = "storage"  # the interned literal torch's persistent_id uses


def archive_name(file_name: str) -> str:
    """The record prefix torch.save derives from the file name (caffe2's basename(): the part after
    the last '/' or backslash up to its last '.'; 'archive' for a name that is not ASCII, which torch
    writes through a Python file object)."""
    try:
        file_name.encode("ascii")
    except UnicodeEncodeError:
        return "archive"
    start = max(file_name.rfind("/"), file_name.rfind("\\")) + 1
    dot = file_name.rfind(".", start)
    return file_name[start: dot if dot >= 0 else len(file_name)]


def _zip64_extra(size: int, offset: int, compressed_size: int) -> bytes:
    fields = b""
    if size >= _MAX32:
        fields += struct.pack("<2Q", size, compressed_size)
    if offset >= _MAX32:
        fields += struct.pack("<Q", offset)
    return struct.pack("<2H", 1, len(fields)) + fields if fields else b""


class _StreamZipWriter:
    """Writes the records of a torch zip archive exactly as torch's PyTorchFileWriter does."""

    def __init__(self, f, archive_name: str, alignment: int, compute_crc32: bool):
        self.f = f
        self.prefix = (archive_name + "/").encode("utf-8")
        self.alignment = alignment
        self.compute_crc32 = compute_crc32
        self.pos = 0
        self.names: list[str] = []
        self.central: list[bytes] = []
        self.combined_crc = 0
        self.holes = False   # the record being written has a Hole (its CRC-32 is not known)

    def _write(self, data) -> None:
        n = memoryview(data).nbytes
        self.f.write(data)
        self.pos += n

    def begin(self, name: str, size: int) -> int:
        """Write the local header of a record of ``size`` bytes; returns its offset."""
        full = self.prefix + name.encode("utf-8")
        offset = self.pos
        z64 = _zip64_extra(size, offset, 0)  # miniz: the compressed size is not known yet (0)
        start = offset + _LOCAL_HEADER.size + len(full) + len(z64) + 4
        pad = -start % self.alignment
        extra = z64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = _ZIP_FLAGS if size else _ZIP_FLAGS_EMPTY
        self._write(_LOCAL_HEADER.pack(b"PK\x03\x04", 0, flags, 0, 0, 0, 0, 0, 0, len(full), len(extra))
                    + full + extra)
        return offset

    def end(self, name: str, size: int, crc: int, offset: int) -> None:
        """After the data: the data descriptor, and the record's central directory entry."""
        crc = crc if self.compute_crc32 else 0
        z64 = _zip64_extra(size, offset, size)
        if not size:
            pass  # miniz writes no data descriptor for an empty record
        elif z64:
            self._write(_DESCRIPTOR64.pack(b"PK\x07\x08", crc, size, size))
        else:
            self._write(_DESCRIPTOR32.pack(b"PK\x07\x08", crc, size, size))
        full = self.prefix + name.encode("utf-8")
        flags = _ZIP_FLAGS if size else _ZIP_FLAGS_EMPTY
        self.central.append(_CENTRAL_HEADER.pack(
            b"PK\x01\x02", 0, 0, flags, 0, 0, 0, crc, min(size, _MAX32), min(size, _MAX32), len(full), len(z64),
            0, 0, 0, 0, min(offset, _MAX32)) + full + z64)
        self.names.append(name)
        if size:
            self.combined_crc = hash_combine(self.combined_crc, crc)

    def record(self, name: str, data: bytes) -> None:
        offset = self.begin(name, len(data))
        self._write(data)
        self.end(name, len(data), byte_io.crc32(data) if self.compute_crc32 else 0, offset)

    def finish(self) -> None:
        self.record("version", _FILE_FORMAT_VERSION)
        names_part = name_hash_digits(self.names[:-1])
        self.record(".data/serialization_id", f"{names_part}{self.combined_crc:020d}".encode("ascii"))
        cd_offset = self.pos
        for entry in self.central:
            self._write(entry)
        cd_size = self.pos - cd_offset
        n = len(self.central)
        eocd64 = self.pos
        self._write(_ZIP64_EOCD.pack(b"PK\x06\x06", _ZIP64_EOCD.size - 12, 0x031E, 45, 0, 0, n, n, cd_size,
                                     cd_offset))
        self._write(_ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, eocd64, 1))
        self._write(_EOCD.pack(b"PK\x05\x06", 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), min(cd_size, _MAX32),
                               min(cd_offset, _MAX32), 0))


class _RefStorage:
    """The storage behind one TensorRef storage key (or one HeldTensor) while pickling (what
    TypedStorage is to torch)."""

    __slots__ = ("key", "dtype", "storage_type", "numel", "location", "held")

    def __init__(self, ref: TensorRef, held=None):
        self.held = held
        self.key = ref.storage
        self.dtype = ref.dtype
        self.storage_type = _global("torch", STORAGE_TYPE_OF[dtypes.get(ref.dtype).name])
        self.numel = ref.storage_numel
        self.location = ref.location

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


# types persistent_id can pass at once (it sees every object the C pickler writes)
_PLAIN_TYPES = frozenset({type(None), bool, int, float, str, bytes, tuple, list, dict, collections.OrderedDict})


class _StreamRules:
    """torch.save's persistent ids, pickling a TensorRef as torch pickles the equivalent CPU tensor
    (``Tensor._reduce_ex_internal``): ``_rebuild_tensor_v2(TypedStorage, offset, size, stride,
    requires_grad, OrderedDict())``; on either pickler (``_StreamPickler``, ``_StreamPicklerC``)."""

    def __init__(self, file, path):
        super().__init__(file, protocol=DEFAULT_PROTOCOL)
        self.path = path
        self.id_map: dict = {}
        self.storages: dict[str, object] = {}  # output key -> _RefStorage | torch.UntypedStorage
        self.ref_storages: dict[str, _RefStorage] = {}
        self.storage_dtypes: dict[int, object] = {}
        self.locations: dict[str, str] = {}

    def _reduce_special(self, obj):
        if isinstance(obj, TensorRef):
            return self._reduce_ref(obj)
        if isinstance(obj, HeldTensor):
            return self._reduce_held(obj)
        return NotImplemented

    def _reduce_held(self, held: HeldTensor):
        data = held.data
        if not data.flags.c_contiguous or data.dtype != dtypes.storage(held.dtype):
            raise CkptmapError(f"a HeldTensor of {held.dtype} must hold a C-contiguous {dtypes.storage(held.dtype)} "
                               f"array, got {data.dtype} (contiguous: {data.flags.c_contiguous})")
        key = f"held/{id(held)}"
        st = self.ref_storages.get(key)
        if st is None:
            ref = TensorRef(key, held.dtype, 0, held.shape, _contiguous(held.shape), int(data.size))
            st = self.ref_storages[key] = _RefStorage(ref, held)
        args = (st, 0, tuple(held.shape), _contiguous(held.shape), False, collections.OrderedDict())
        return _global("torch._utils", "_rebuild_tensor_v2"), args

    def _reduce_ref(self, ref: TensorRef):
        if ref.parameter:  # as torch pickles an nn.Parameter: _rebuild_parameter(self.data, requires_grad, hooks)
            data = attrs.evolve(ref, parameter=False, requires_grad=False, msadapter=None)
            return (_global("torch._utils", "_rebuild_parameter"),
                    (data, bool(ref.requires_grad), collections.OrderedDict()))
        problem = _ref_problem(ref)
        if problem:
            raise CkptmapError(f"tensor reference {ref} does not fit its storage ({problem})")
        if not isinstance(ref.storage, str):
            raise CkptmapError(f"tensor reference {ref} names its storage with a {type(ref.storage).__name__}, "
                               f"not a string")
        if not isinstance(ref.location, str) or not ref.location:
            raise CkptmapError(f"tensor reference {ref} has no device location string (e.g. 'cpu')")
        st = self.ref_storages.get(ref.storage)
        if st is None:
            st = self.ref_storages[ref.storage] = _RefStorage(ref)
        elif (st.dtype, st.numel, st.location) != (ref.dtype, ref.storage_numel, ref.location):
            raise CkptmapError(f"tensor references disagree about storage {ref.storage!r}: one says "
                               f"{st.numel} x {st.dtype} on {st.location}, another {ref.storage_numel} x "
                               f"{ref.dtype} on {ref.location} — a storage has one dtype, size and device")
        # fresh tuples, like Tensor.size() / stride(): torch never memo-shares them between tensors
        args = (st, operator.index(ref.storage_offset), tuple([operator.index(n) for n in ref.shape]),
                tuple([operator.index(s) for s in ref.stride]), bool(ref.requires_grad),
                collections.OrderedDict())
        return _global("torch._utils", "_rebuild_tensor_v2"), args

    def persistent_id(self, obj):
        t = type(obj)
        if t in _PLAIN_TYPES:
            return None
        if t is _RefStorage:
            key = self.id_map.setdefault(("ref", obj.key), str(len(self.id_map)))
            self.storages[key] = obj
            loc = obj.location
            if ":" in loc:  # torch builds 'cuda:0' anew for every tensor (never memo-shared)
                head, _, tail = loc.partition(":")
                loc = head + ":" + tail
            else:  # 'cpu' is one (interned) string in torch: memo-shared after its first use
                loc = self.locations.setdefault(loc, loc)
            return (_STORAGE_PID, obj.storage_type, key, loc, obj.numel)
        torch = sys.modules.get("torch")  # a real tensor can only be here if the caller imported torch
        if torch is not None and (isinstance(obj, torch.storage.TypedStorage) or torch.is_storage(obj)):
            # a real tensor in the object: torch.serialization._save's persistent_id
            if isinstance(obj, torch.storage.TypedStorage):
                storage = obj._untyped_storage
                storage_dtype = obj.dtype
                storage_type = getattr(torch, obj._pickle_storage_type())
                storage_numel = obj._size()
            else:
                storage = obj
                storage_dtype = torch.uint8
                storage_type = torch.serialization.normalize_storage_type(type(obj))
                storage_numel = storage.nbytes()
            if str(storage.device) != "meta" and storage.data_ptr() != 0:
                if self.storage_dtypes.setdefault(storage.data_ptr(), storage_dtype) != storage_dtype:
                    raise CkptmapError("two tensors view the same memory as different dtypes; torch.save "
                                       "cannot write that either — save copies (tensor.clone())")
            if str(storage.device) == "meta":
                raise CkptmapError("a tensor on the meta device has no data to write")
            key = self.id_map.setdefault(storage._cdata, str(len(self.id_map)))
            location = torch.serialization.location_tag(storage)
            self.storages[key] = storage
            return (_STORAGE_PID, storage_type, key, location, storage_numel)
        return None


class _StreamPickler(_StreamRules, _Pickler):
    pass


class _StreamPicklerC(_StreamRules, _CPickler):
    pass


def _dump(pickler, obj, path) -> None:
    try:
        pickler.dump(obj)
    except CkptmapError as e:
        raise CkptmapError(f"cannot save {path}: {e}") from None
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError, RuntimeError, ValueError) as e:
        raise CkptmapError(f"cannot save {path}: the object cannot be pickled ({type(e).__name__}: "
                           f"{str(e)[:300]}) — save tensors and plain data only") from None


def _stream_storage(writer: _StreamZipWriter, name: str, st: _RefStorage, fill, path) -> None:
    expected = st.nbytes
    offset = writer.begin(name, expected)
    chunks = fill(st.key)
    try:
        iterator = iter(chunks)
    except TypeError:
        raise CkptmapError(f"cannot save {path}: fill({st.key!r}) returned {type(chunks).__name__}, not an "
                           f"iterable of byte chunks") from None
    try:
        crc = _stream_chunks(writer, st, iterator, path)
    finally:
        close = getattr(iterator, "close", None)  # a generator stopped early releases its resources now
        if close is not None:
            close()
    writer.end(name, expected, crc, offset)
    writer.holes = False


def _stream_chunks(writer: _StreamZipWriter, st: _RefStorage, iterator, path) -> int:
    expected = st.nbytes
    done, crc = 0, 0
    while True:
        try:
            chunk = next(iterator)
        except StopIteration:
            break
        except OSError as e:
            raise CkptmapError(f"cannot save {path}: reading the data of storage {st.key!r} failed "
                               f"({e.strerror or e}) — check the source files") from None
        if isinstance(chunk, FileRange):
            done, crc = _stream_range(writer, st, chunk, path, done, crc)
            continue
        if isinstance(chunk, Hole):   # an intermediate file's bytes served from elsewhere: no CRC-32 (0)
            if type(writer) is not _StreamZipWriter or done + chunk.nbytes > expected:
                raise CkptmapError(f"cannot save {path}: storage {st.key!r}: a hole of {chunk.nbytes} bytes "
                                   f"does not fit (stock torch files only, within the storage's {expected} bytes)")
            writer.f.flush()
            writer.f.seek(chunk.nbytes, os.SEEK_CUR)
            writer.pos += chunk.nbytes
            writer.holes = True
            done += chunk.nbytes
            continue
        try:
            view = memoryview(chunk)
        except TypeError:
            raise CkptmapError(f"cannot save {path}: fill({st.key!r}) yielded a {type(chunk).__name__}, not a "
                               f"bytes-like chunk") from None
        if not view.c_contiguous:
            raise CkptmapError(f"cannot save {path}: fill({st.key!r}) yielded a non-contiguous buffer")
        n = view.nbytes
        if done + n > expected:
            raise CkptmapError(f"cannot save {path}: storage {st.key!r} ({st.numel} x {st.dtype}) must be "
                               f"{expected} bytes but fill yielded at least {done + n} — the storage's data "
                               f"source does not match its tensors")
        if n:
            if view.ndim != 1 or view.format not in ("B", "b", "c"):
                view = view.cast("B")
            writer._write(view)
            if writer.compute_crc32:
                crc = byte_io.crc32(view, crc)
            done += n
    if done != expected:
        raise CkptmapError(f"cannot save {path}: storage {st.key!r} ({st.numel} x {st.dtype}) must be "
                           f"{expected} bytes but fill yielded only {done} — the storage's data source "
                           f"does not match its tensors")
    return 0 if getattr(writer, "holes", False) else crc


def _small_run(rng: FileRange) -> bytes:
    """The bytes of a small run copied into a torch file, read in one pread (to the write buffer)."""
    return byte_io.read_small(rng)


def _stream_range(writer, st, rng: FileRange, path, done: int, crc: int) -> tuple[int, int]:
    """A chunk given as a FileRange: the bytes of another file. A small run (``byte_io.SMALL_RUN``) is read
    into the stock torch writer's buffer. A larger one is copied by the kernel when no CRC is
    wanted or when the range is the whole record and carries its CRC-32 (a record of the source:
    ``torch_zip_reader.file_range``), else read once into a small reused buffer, CRC'd there and
    written from it (cheaper than a kernel copy plus a second read for the CRC). Either goes to the
    descriptor at its position once the file object's buffer is flushed (the MSAdapter writer, which
    seeks back to patch its headers, asks the file object for the position, which asks the descriptor)."""
    expected = st.nbytes
    if done + rng.nbytes > expected:
        raise CkptmapError(f"cannot save {path}: storage {st.key!r} ({st.numel} x {st.dtype}) must be "
                           f"{expected} bytes but fill yielded at least {done + rng.nbytes} — the storage's data "
                           f"source does not match its tensors")
    recorded = rng.crc32 is not None and done == 0 and rng.nbytes == expected   # a whole record of the source
    try:
        if rng.nbytes <= byte_io.SMALL_RUN and type(writer) is _StreamZipWriter:
            # one pread into the write buffer: a flush and a write per small tensor cost more (a rank's
            # distrib_optim.pt of thousands of small pieces; the MSAdapter writer, which translates single
            # files, keeps the copies below). A whole record keeps the CRC its source recorded, as below.
            data = _small_run(rng)
            writer._write(data)
            if writer.compute_crc32:
                crc = rng.crc32 if recorded else byte_io.crc32(data, crc)
            return done + rng.nbytes, crc
        writer.f.flush()   # written at the descriptor's position, after what is buffered
        if recorded:
            # the whole record is a record of the source, which recorded its CRC-32: copied by the kernel
            byte_io.copy_range(rng, writer.f.fileno())
            crc = rng.crc32
        elif writer.compute_crc32:
            crc = byte_io.copy_range_crc(rng, writer.f.fileno(), crc)
        else:
            byte_io.copy_range(rng, writer.f.fileno())
        writer.pos += rng.nbytes
    except OSError as e:
        raise CkptmapError(f"cannot save {path}: copying the data of storage {st.key!r} from {rng.path} failed "
                           f"({e.strerror or e}) — check the source files") from None
    return done + rng.nbytes, crc


def _write_real_storage(writer: _StreamZipWriter, name: str, storage) -> None:
    import torch

    if storage.device.type != "cpu":
        storage = storage.cpu()
    n = storage.nbytes()
    data = (torch.empty(0, dtype=torch.uint8).set_(storage).numpy() if n else b"")
    offset = writer.begin(name, n)
    writer._write(data)
    writer.end(name, n, byte_io.crc32(data) if writer.compute_crc32 else 0, offset)


def save_streaming(obj, path, fill, *, fsync: bool = False, dialect: str = "torch", date_time=None,
                   records: dict | None = None, pickled: list | None = None, kept: list | None = None) -> None:
    """Write ``obj`` exactly as torch.save would write it (same bytes) if every TensorRef in it were a
    real CPU tensor: a view (TensorRef.storage_offset, shape, stride, requires_grad) of a storage of
    TensorRef.storage_numel elements of TensorRef.dtype, TensorRefs with the same ``storage`` key
    sharing one storage, saved from device TensorRef.location. The storages' bytes are not in
    memory: ``fill(key)`` (key = the TensorRef.storage key as found in ``obj``) returns an iterable of
    bytes-like chunks whose concatenation is that storage's bytes (numel * itemsize, little-endian);
    chunks are written as they come (one chunk in memory at a time), CRC32 computed incrementally.
    A chunk may also be a ``FileRange``: those bytes of another file, copied by the kernel.
    A wrong total length is a :class:`CkptmapError` naming the storage and path, and no file is left
    at ``path``. Stand-ins re-pickle as in :func:`save`; real tensors may appear too (written from
    memory, as torch.save does). The archive prefix is the file stem, as torch.save derives it: the
    file is written under a temporary name beside ``path`` (the archive prefix is computed from the
    final name) and renamed into place, so ``path`` never holds a partial file. Storage keys in the output are renumbered in
    pickling (first-encounter) order exactly as torch.save numbers them; ``fill`` is called once per
    storage, in the order the records are written (that same order). Honours torch's save options
    (``torch.serialization.set_crc32_options``, ``torch.utils.serialization.config.save.storage_alignment``)
    as torch.save does. ``fsync``: make the file durable before it is renamed into place. A chunk may
    also be a ``Hole``: bytes left unwritten (read back as zeros; the record gets no CRC-32) -- for an
    intermediate file only. ``records``: a dict, filled with {storage key as in ``obj``: its record key}
    (in the order the records are written; a HeldTensor's key is ``held/<its id()>``). ``pickled``: a
    list the ``data.pkl`` bytes are appended to when every storage was a TensorRef's or a HeldTensor's
    (stock torch files; then ``records`` names every storage written). ``kept``: a list a :class:`Kept`
    is appended to when every storage was a TensorRef's (stock torch files): :func:`save_kept` writes
    another file of the same object graph from it, with other storage bytes, without pickling again.

    ``dialect="msadapter"`` writes the bytes MindSpeed-Core-MS's MSAdapter shim writes (notes above
    ``_PyZipWriter``; ``formats/msadapter.py``) instead: every TensorRef must then be a whole,
    C-contiguous storage of its own (offset 0, ``storage_numel`` = its numel; a 0-d tensor has one
    element) of one of the six storage kinds MindSpore-side readers know, each TensorRef object becomes
    one record, and its ``msadapter`` / ``parameter`` fields choose the tensor class and the recorded
    stride (default: ``mindspore.common.tensor.Tensor`` or the shim's ``Parameter``, C-contiguous
    stride as a list). Torch dtype globals and real torch objects are refused (translate the graph
    first: ``dialect_translate``). ``fill(key)`` is called once per record in the order the records are
    written (keys sorted as strings). ``date_time``: the zip entries' timestamp, default
    1980-01-01 00:00:00 (the shim writes the wall-clock time)."""
    path = Path(os.fspath(path))
    if dialect == "msadapter":
        _save_msadapter(obj, path, fill, fsync, DEFAULT_DATE_TIME if date_time is None else date_time)
        return
    if dialect != "torch":
        raise CkptmapError(f"unknown torch zip dialect {dialect!r}; ckptmap writes 'torch' and 'msadapter'")
    if date_time is not None:
        raise CkptmapError("stock torch files carry no zip timestamps (torch writes 0); date_time is for the "
                           "msadapter dialect")
    archive = archive_name(path.name)
    if not archive:
        raise CkptmapError(f"cannot save {path}: torch.save cannot write a file whose name has no stem "
                           f"(the zip records are named after it) — choose a name like model_optim_rng.pt")
    data_pkl, pickler = _pickled(_StreamPicklerC, _StreamPickler, obj, path)

    def storages(writer):
        for key, st in pickler.storages.items():
            if records is not None and type(st) is _RefStorage:
                records[st.key] = key
            if type(st) is _RefStorage:
                _stream_storage(writer, f"data/{key}", st,
                                fill if st.held is None else (lambda _key, st=st: _held_bytes(st)), path)
            else:
                _write_real_storage(writer, f"data/{key}", st)
    _write_torch_archive(path, archive, data_pkl, storages, fsync)
    if pickled is not None and all(type(st) is _RefStorage for st in pickler.storages.values()):
        pickled.append(data_pkl)
    if kept is not None and all(type(st) is _RefStorage and st.held is None for st in pickler.storages.values()):
        kept.append(Kept(data_pkl, tuple(pickler.storages.items())))


@attrs.frozen
class Kept:
    """What :func:`save_streaming` pickled for an object graph of TensorRefs: its ``data.pkl`` and its
    storages in record order, (record key, the storage: key in the graph, dtype, size)."""

    data_pkl: bytes
    storages: tuple


def save_kept(kept: Kept, path, fill, *, fsync: bool = False) -> None:
    """What :func:`save_streaming` writes for the object graph ``kept`` was made from, at ``path``, with the
    storages' bytes from ``fill(key)`` (called once per storage, in record order; same checks)."""
    path = os.fspath(path)   # a str: pathlib's parsing costs ~10 us a file, thousands of rank files

    def storages(writer):
        for key, st in kept.storages:
            _stream_storage(writer, f"data/{key}", st, fill, path)
    _write_torch_archive(path, archive_name(os.path.basename(path)), kept.data_pkl, storages, fsync)


def pickle_bytes(obj, path) -> bytes:
    """The ``data.pkl`` :func:`save_streaming` writes for ``obj`` (stock torch; ``path`` names the file
    in messages), without writing anything."""
    return _pickled(_StreamPicklerC, _StreamPickler, obj, path)[0]


def save_pickled(data_pkl: bytes, storages, path, *, fsync: bool = False) -> None:
    """Write the stock torch file whose ``data.pkl`` is ``data_pkl`` (a pickle :func:`save_streaming`
    wrote, its numbers possibly changed) and whose storages are ``storages``: [(record key, bytes-like)]
    in the order save_streaming wrote them. Same bytes as save_streaming of the object ``data_pkl``
    pickles."""
    path = os.fspath(path)

    def write(writer):
        for key, data in storages:
            writer.record(f"data/{key}", memoryview(data).cast("B"))
    _write_torch_archive(path, archive_name(os.path.basename(path)), data_pkl, write, fsync)


def _write_torch_archive(path, archive: str, data_pkl: bytes, write_storages, fsync: bool) -> None:
    """The records of a stock torch file, written atomically; ``write_storages(writer)`` adds the storages."""
    alignment, compute_crc32 = _torch_options()
    directory = os.path.dirname(os.fspath(path)) or "."
    if not os.path.isdir(directory):
        raise CkptmapError(f"cannot save {path}: the directory {directory} does not exist — create it first")
    with atomic.atomic_output(path, fsync=fsync) as tmp:
        try:
            with open(tmp, "wb", buffering=1 << 20) as f:
                writer = _StreamZipWriter(f, archive, alignment, compute_crc32)
                writer.record("data.pkl", data_pkl)
                writer.record(".format_version", b"1")
                writer.record(".storage_alignment", str(alignment).encode("ascii"))
                writer.record("byteorder", b"little")
                write_storages(writer)
                writer.finish()
        except OSError as e:
            raise CkptmapError(f"cannot save {path}: writing failed ({e.strerror or e}) — check free space "
                               f"and permissions") from None


# -------------------------------------------------------------------------------------------------
# The MSAdapter dialect (formats/msadapter.py): what MindSpeed-Core-MS's shim torch.save writes
#
# Container: Python's zipfile (3.11), entries added with ZipFile.writestr to a seekable file, in the
# order data.pkl, version ("3"), byteorder ("little"), data/<key> with the keys sorted as strings, all
# under "archive/". Each record: local header (PK\3\4, version needed 20, flags 0, method 0 (stored),
# DOS time and date, CRC32, both sizes, name, no extra field) then the data -- no alignment padding,
# no data descriptor. A record of more than ZIP64_LIMIT / 1.05 bytes (ZIP64_LIMIT = 2**31 - 1) gets
# zipfile's zip64 local header instead: sizes 0xFFFFFFFF, versions 45 and the zip64 extra field
# (1, 16, size, size). Central directory: one PK\1\2 entry per record (made by 20 on Unix (3), needed
# 20 -- 45 for a zip64 record --, flags 0, external attributes 0o600 << 16, no comment; zip64 extra
# with the size pair when size > ZIP64_LIMIT and the header offset when that offset > ZIP64_LIMIT),
# then the zip64 end record and locator only when the entry count, directory size or offset need them,
# and the classic end record. Timestamps: the shim writes the wall-clock time of the save; ckptmap
# writes 1980-01-01 00:00:00 (zipfile's default for a ZipInfo without a date), so its output is
# reproducible: the same object graph gives the same bytes.
#
# Pickle: protocol 2, Python's pickler; a tensor is
#     torch._tensor._rebuild_from_type_v2(torch._utils._rebuild_tensor_v2, <class>,
#                                         (<pid>, 0, <size tuple>, <stride list>, False, None, None), None)
# with pid ('storage', '<Name>Storage', '<key>', 'cpu', numel) -- a string storage type, one storage
# (and record) per tensor holding its elements in C order, keys '0', '1', ... in pickling order.

_PY_ZIP64_LIMIT = (1 << 31) - 1         # zipfile.ZIP64_LIMIT
_PY_ZIP_FILECOUNT_LIMIT = (1 << 16) - 1  # zipfile.ZIP_FILECOUNT_LIMIT
_PY_FILE_HEADER = struct.Struct("<4s2B4HL2L2H")
_PY_CENTRAL_DIR = struct.Struct("<4s4B4HL2L5H2L")
_PY_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_PY_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_PY_EOCD = struct.Struct("<4s4H2LH")
DEFAULT_DATE_TIME = (1980, 1, 1, 0, 0, 0)


class _PyZipWriter:
    """Writes records exactly as Python 3.11's ``zipfile.ZipFile.writestr`` does on a seekable file,
    a record's data streamed in chunks (its CRC is patched into the local header afterwards, as
    zipfile itself does by rewriting the header)."""

    def __init__(self, f, prefix: str, date_time=DEFAULT_DATE_TIME):
        self.f = f
        self.prefix = prefix
        dt = tuple(date_time)
        if len(dt) != 6 or not 1980 <= dt[0] <= 2107:
            raise CkptmapError(f"zip timestamps must be (year >= 1980, month, day, hour, minute, second), got {dt!r}")
        self.dosdate = (dt[0] - 1980) << 9 | dt[1] << 5 | dt[2]
        self.dostime = dt[3] << 11 | dt[4] << 5 | (dt[5] // 2)
        self.pos = 0
        self.compute_crc32 = True  # zipfile always does
        self.entries: list[tuple[bytes, int, int, int, int]] = []  # (name, crc, size, offset, version)

    def _write(self, data) -> None:
        self.f.write(data)
        self.pos += memoryview(data).nbytes

    def begin(self, name: str, size: int, crc: int = 0) -> int:
        full = (self.prefix + name).encode("ascii")
        offset = self.pos
        zip64 = size * 1.05 > _PY_ZIP64_LIMIT
        version = 45 if zip64 else 20
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        shown = 0xFFFFFFFF if zip64 else size
        self._write(_PY_FILE_HEADER.pack(b"PK\x03\x04", version, 0, 0, 0, self.dostime, self.dosdate, crc, shown,
                                         shown, len(full), len(extra)) + full + extra)
        self.entries.append((full, crc, size, offset, version))
        return offset

    def end(self, crc: int) -> None:
        """After a streamed record's data: its CRC into the local header and the directory entry."""
        full, old, size, offset, version = self.entries[-1]
        if crc != old:
            here = self.f.tell()
            self.f.seek(offset + 14)
            self.f.write(struct.pack("<L", crc))
            self.f.seek(here)
            self.entries[-1] = (full, crc, size, offset, version)

    def record(self, name: str, data: bytes) -> None:
        self.begin(name, len(data), byte_io.crc32(data))
        self._write(data)

    def finish(self) -> None:
        start = self.pos
        for full, crc, size, offset, version in self.entries:
            extra = []
            if size > _PY_ZIP64_LIMIT:
                extra += [size, size]
            if offset > _PY_ZIP64_LIMIT:
                extra.append(offset)
            extra_data = struct.pack("<HH" + "Q" * len(extra), 1, 8 * len(extra), *extra) if extra else b""
            v = 45 if extra else version
            self._write(_PY_CENTRAL_DIR.pack(
                b"PK\x01\x02", v, 3, v, 0, 0, 0, self.dostime, self.dosdate, crc,
                0xFFFFFFFF if size > _PY_ZIP64_LIMIT else size, 0xFFFFFFFF if size > _PY_ZIP64_LIMIT else size,
                len(full), len(extra_data), 0, 0, 0, 0o600 << 16, 0xFFFFFFFF if offset > _PY_ZIP64_LIMIT else offset)
                + full + extra_data)
        end = self.pos
        count, cd_size, cd_offset = len(self.entries), end - start, start
        if count > _PY_ZIP_FILECOUNT_LIMIT or cd_offset > _PY_ZIP64_LIMIT or cd_size > _PY_ZIP64_LIMIT:
            self._write(_PY_EOCD64.pack(b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_offset))
            self._write(_PY_EOCD64_LOCATOR.pack(b"PK\x06\x07", 0, end, 1))
            count, cd_size, cd_offset = min(count, 0xFFFF), min(cd_size, 0xFFFFFFFF), min(cd_offset, 0xFFFFFFFF)
        self._write(_PY_EOCD.pack(b"PK\x05\x06", 0, 0, count, count, cd_size, cd_offset, 0))


class _MSStorage:
    """The one storage (record) of one tensor in an MSAdapter file."""

    __slots__ = ("source_key", "dtype", "numel", "held")

    def __init__(self, source_key, dtype, numel, held=None):
        self.source_key, self.dtype, self.numel, self.held = source_key, dtype, numel, held

    @property
    def key(self):  # what _stream_chunks names in its messages
        return self.source_key

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


def _class_global(cls: tuple[str, str]):
    return TENSOR_TYPE_MARKERS[cls] if cls in TENSOR_TYPE_MARKERS else StandInClass.make(*cls)


class _MSAdapterRules:
    """Pickles like the MSAdapter shim: TensorRefs (and HeldTensors) as
    ``_rebuild_from_type_v2(_rebuild_tensor_v2, <class>, (pid, 0, size, stride list, False, None, None),
    None)`` over one storage each, persistent ids with string storage types; on either pickler
    (``_MSAdapterPickler``, ``_MSAdapterPicklerC``)."""

    def __init__(self, file, path):
        super().__init__(file, protocol=DEFAULT_PROTOCOL)
        self.path = path
        self.storages: dict[str, _MSStorage] = {}       # output key -> storage
        self.by_source: dict[str, tuple[TensorRef, _MSStorage]] = {}

    def _reduce_special(self, obj):
        if isinstance(obj, TensorRef):
            return self._reduce(obj, self._ref_storage(obj), obj.shape)
        if isinstance(obj, HeldTensor):
            data = obj.data
            if not data.flags.c_contiguous or data.dtype != dtypes.storage(obj.dtype):
                raise CkptmapError(f"a HeldTensor of {obj.dtype} must hold a C-contiguous "
                                   f"{dtypes.storage(obj.dtype)} array")
            msadapter.storage_string(obj.dtype, f"a {obj.dtype} tensor of shape {list(obj.shape)}")
            return self._reduce(obj, _MSStorage(f"held/{id(obj)}", obj.dtype, int(data.size), obj), obj.shape)
        if isinstance(obj, GlobalMarker) and obj.dtype is not None:
            raise CkptmapError(f"the object holds the torch global {obj!r}; MSAdapter files hold MindSpore dtype "
                               f"objects — translate the graph first (formats/dialect_translate.py)")
        if type(obj).__module__.startswith("torch"):
            raise CkptmapError(f"a real {type(obj).__module__}.{type(obj).__name__} cannot be written in the "
                               f"MSAdapter dialect; give TensorRef or HeldTensor values")
        return NotImplemented

    def _ref_storage(self, ref: TensorRef) -> _MSStorage:
        problem = _ref_problem(ref)
        if problem:
            raise CkptmapError(f"tensor reference {ref} does not fit its storage ({problem})")
        if ref.storage_offset != 0 or ref.storage_numel != ref.numel or ref.stride != _contiguous(ref.shape):
            raise CkptmapError(f"tensor reference {ref} is a view (offset {ref.storage_offset}, stride {ref.stride}, "
                               f"storage of {ref.storage_numel} elements); an MSAdapter file holds one C-contiguous "
                               f"tensor per storage — give each tensor a storage of its own (dialect_translate "
                               f"does this)")
        msadapter.storage_string(ref.dtype, f"storage {ref.storage!r} ({list(ref.shape)})")
        seen = self.by_source.get(ref.storage)
        if seen is not None:
            if seen[0] != ref:
                raise CkptmapError(f"two different tensors use storage {ref.storage!r}; MSAdapter files never share "
                                   f"storage between tensors")
            raise CkptmapError(f"storage {ref.storage!r} is used by two tensor objects; MSAdapter files write each "
                               f"tensor object once — use the same TensorRef object for the same tensor")
        st = _MSStorage(ref.storage, ref.dtype, ref.numel)
        self.by_source[ref.storage] = (ref, st)
        return st

    def _reduce(self, obj, st: _MSStorage, shape):
        info = obj.msadapter if isinstance(obj, TensorRef) else None
        parameter = isinstance(obj, TensorRef) and obj.parameter
        if info is not None:
            cls = info.cls
            if parameter != (cls == msadapter.PARAMETER_CLASS):
                cls = msadapter.PARAMETER_CLASS if parameter else msadapter.TENSOR_CLASS
            stride = list(info.stride) if info.stride_is_list else tuple(info.stride)
            if len(stride) != len(shape):
                raise CkptmapError(f"tensor reference {obj} records a stride of another rank than its shape")
        else:
            cls = msadapter.PARAMETER_CLASS if parameter else msadapter.TENSOR_CLASS
            stride = list(_contiguous(shape))
        args = (st, 0, tuple([operator.index(n) for n in shape]), stride, False, None, None)
        return (_global("torch._tensor", "_rebuild_from_type_v2"),
                (_global("torch._utils", "_rebuild_tensor_v2"), _class_global(cls), args, None))

    def persistent_id(self, obj):
        if type(obj) is _MSStorage:
            key = str(len(self.storages))
            self.storages[key] = obj
            return (_STORAGE_PID, msadapter.storage_string(obj.dtype, f"storage {obj.source_key!r}"), key, "cpu",
                    obj.numel)
        return None


class _MSAdapterPickler(_MSAdapterRules, _Pickler):
    pass


class _MSAdapterPicklerC(_MSAdapterRules, _CPickler):
    pass


def _save_msadapter(obj, path: Path, fill, fsync: bool, date_time) -> None:
    data_pkl, pickler = _pickled(_MSAdapterPicklerC, _MSAdapterPickler, obj, path)
    if not path.parent.is_dir():
        raise CkptmapError(f"cannot save {path}: the directory {path.parent} does not exist — create it first")
    with atomic.atomic_output(path, fsync=fsync) as tmp:
        try:
            with open(tmp, "wb", buffering=1 << 20) as f:
                writer = _PyZipWriter(f, msadapter.ARCHIVE + "/", date_time)
                writer.record("data.pkl", data_pkl)
                writer.record("version", msadapter.VERSION_RECORD)
                writer.record("byteorder", b"little")
                for key in sorted(pickler.storages):
                    st = pickler.storages[key]
                    writer.begin(f"data/{key}", st.nbytes)
                    source = (lambda _k, st=st: _held_bytes(st)) if st.held is not None else fill
                    chunks = source(st.source_key)
                    try:
                        iterator = iter(chunks)
                    except TypeError:
                        raise CkptmapError(f"cannot save {path}: fill({st.source_key!r}) returned "
                                           f"{type(chunks).__name__}, not an iterable of byte chunks") from None
                    try:
                        crc = _stream_chunks(writer, st, iterator, path)
                    finally:
                        close = getattr(iterator, "close", None)
                        if close is not None:
                            close()
                    writer.end(crc)
                writer.finish()
        except OSError as e:
            raise CkptmapError(f"cannot save {path}: writing failed ({e.strerror or e}) — check free space "
                               f"and permissions") from None


def _held_bytes(st: "_RefStorage"):
    yield st.held.data.reshape(-1).view("u1")


def save(obj, path, *, fsync: bool = False) -> None:
    """Write ``obj`` as a torch zip checkpoint, like ``torch.save(obj, path)``: the same bytes for the
    same objects. Tensors must be in memory — :class:`HeldTensor` values, or real torch tensors (from
    ``torch_zip_reader.load``, or the caller's own) — a :class:`TensorRef` is refused (its bytes live in
    another file: use :func:`save_streaming`). Stand-ins are written back as the globals and
    reconstructions they were read from."""
    def no_refs(key):
        raise CkptmapError(f"cannot save {path}: the object holds a TensorRef (storage {key!r}), which only "
                           f"describes a tensor inside its source file; use save_streaming() with a fill that "
                           f"reads it, or load() the source to get real tensors")
    save_streaming(obj, path, no_refs, fsync=fsync)
