"""PyTorch's zip checkpoint format (``torch.save`` >= 1.6), read safely and lazily, and written back.

A torch zip checkpoint is an uncompressed zip archive whose records all live under one directory
(the *prefix*, derived from the file name by ``torch.save``: ``model_optim_rng/``)::

    <prefix>/data.pkl          the pickled object graph; tensors appear as
                               torch._utils._rebuild_tensor_v2(<persistent id>, offset, shape, stride, ...)
                               with persistent id ('storage', torch.BFloat16Storage, '0', 'cpu', numel)
    <prefix>/byteorder         'little' (absent in files from very old torch: little)
    <prefix>/data/<key>        the raw bytes of storage <key>
    <prefix>/version, .format_version, .storage_alignment, .data/serialization_id

Reading. The zip directory is parsed with :mod:`zipfile`, the file is mmap'd copy-on-write (so
``torch.frombuffer`` gets a writable buffer without ever writing to disk), and ``data.pkl`` is
unpickled by a *restricted* unpickler that never imports a module named in the pickle and never
calls anything from it except a fixed allow-list of side-effect-free constructors:

* allow-list (real objects): ``collections.OrderedDict``, ``argparse.Namespace``,
  ``types.SimpleNamespace``, ``io.BytesIO`` (TransformerEngine's ``_extra_state``), every
  ``torch.<dtype>``, the torch storage types (only as dtype markers inside persistent ids),
  ``torch.Size``, ``torch.device``, the tensor rebuilders ``torch._utils._rebuild_tensor``,
  ``_rebuild_tensor_v2``, ``_rebuild_tensor_v3``, ``_rebuild_parameter``,
  ``_rebuild_parameter_with_state`` and ``torch._tensor._rebuild_from_type_v2`` (all replaced by
  ckptmap's own functions producing :class:`TensorRef` or mmap views), numpy's array/scalar/dtype
  reconstruction, ``_codecs.encode`` (only ``(str, 'latin1')``), ``builtins`` constructors of plain
  values (set, frozenset, slice, complex, bytes, bytearray, range, int, float, str, bool, tuple,
  list, dict, object), ``builtins.getattr`` only to reach a nested class of a stand-in class, and
  ``copyreg._reconstructor`` / ``__newobj__`` / ``__newobj_ex__`` (re-implemented: they only
  build stand-ins or allow-listed objects).
* deny-list (:class:`CkptmapError`): everything else in ``builtins``, ``torch``, ``numpy``,
  ``copyreg``, ``_codecs`` and in modules whose members are code-execution gadgets (os, posix,
  subprocess, sys, importlib, runpy, shutil, pickle, marshal, types, code, ctypes, socket,
  functools, operator, ...; see ``_DENIED_ROOTS``).
* everything else (``megatron.*``, ``transformer_engine.*``, user modules, ``enum``, ...): an
  inert stand-in. The referenced class becomes a :class:`StandInClass` (a class object that only
  remembers module and qualified name), calling it or ``__new__``-ing it yields a :class:`StandIn`
  that remembers the arguments, and BUILD / SETITEMS / APPENDS only store their data.

Tensors become :class:`TensorRef` values (:class:`TorchZipFile`, :func:`read_objects`) or
zero-copy CPU views of the mmap (:func:`load`, :meth:`TorchZipFile.tensor`). All tensors of one
storage record are views of one base tensor, so storage sharing survives a :func:`save`.

Writing. :func:`save` calls ``torch.save`` with a pickler derived from the pure-Python
``pickle._Pickler``: a stand-in class is written as the same GLOBAL reference it was read from
(no import needed), a stand-in object as the same reconstruction (REDUCE with the same arguments,
or NEWOBJ + BUILD with the same state, + APPENDS/SETITEMS). ``save(load(path), same_file_name)``
reproduces a Megatron ``model_optim_rng.pt`` / ``distrib_optim.pt`` byte for byte, because the
loader also keeps pickle-memo string identity inside ``argparse.Namespace`` (the C unpickler's
BUILD would intern attribute names).

Streaming. :func:`save_streaming` writes an object graph holding :class:`TensorRef` values with the
bytes ``torch.save`` would write for the equivalent real tensors, taking each storage's bytes from a
``fill(key)`` iterable chunk by chunk (a 30 GB ``distrib_optim.pt`` never sits in memory). It pickles
like ``save()`` plus torch's tensor reduction and persistent ids, and re-implements torch's zip
writer (miniz) record for record: 64-byte aligned data, data descriptors, zip64 above 4 GiB and the
``.data/serialization_id`` (see the notes above :func:`save_streaming`). ``save_streaming`` of
``TorchZipFile(f).root`` with the file's own storage bytes reproduces every Megatron fixture byte for
byte. One identity a loaded graph cannot carry: if the training process pickled the interned string
``'storage'`` itself before its first tensor, torch's persistent ids referenced it by memo; a
re-save writes it out again (``save()`` shares this; Megatron checkpoints hold no such string).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import copyreg
import io
import math
import mmap
import operator
import os
import pickle
import struct
import tempfile
import threading
import types
import zipfile
import zlib
from pathlib import Path

import attrs
import numpy as np
import torch

from ckptmap import dtypes
from ckptmap.errors import CkptmapError

__all__ = ["TensorRef", "StandInClass", "StandIn", "TorchZipFile", "read_objects", "load", "save",
           "save_streaming"]


# -------------------------------------------------------------------------------------------------
# TensorRef


@attrs.frozen
class TensorRef:
    """A tensor inside a torch zip checkpoint, described without reading its bytes.

    ``storage`` is the record key (``data/<storage>``), ``dtype`` a canonical ckptmap dtype name,
    ``storage_offset`` / ``shape`` / ``stride`` are in elements of ``dtype``, ``storage_numel`` is
    the length of the whole storage in elements, ``location`` the device it was saved from
    (tensors always load on the CPU). Several refs may name the same storage (views)."""

    storage: str
    dtype: str
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_numel: int
    requires_grad: bool = False
    location: str = "cpu"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return dtypes.itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def _ref_problem(ref: TensorRef) -> str | None:
    """Why ``ref`` does not fit inside its storage, or None."""
    if ref.storage_offset < 0 or ref.storage_numel < 0:
        return f"negative storage offset {ref.storage_offset} or storage size {ref.storage_numel}"
    if len(ref.shape) != len(ref.stride):
        return f"shape {ref.shape} and stride {ref.stride} have different lengths"
    if any(s < 0 for s in ref.shape) or any(s < 0 for s in ref.stride):
        return f"negative size or stride (shape {ref.shape}, stride {ref.stride})"
    if ref.numel == 0:
        return None
    end = ref.storage_offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
    if end > ref.storage_numel:
        return (f"shape {ref.shape}, stride {ref.stride} at offset {ref.storage_offset} reaches element "
                f"{end} but the storage holds {ref.storage_numel}")
    return None


# -------------------------------------------------------------------------------------------------
# Inert stand-ins


class StandInClass(type):
    """The class of every stand-in class: a class object standing for ``module.qualname``, a global
    the loader refused to import. It remembers the name and nothing else. Calling it (pickle
    REDUCE) or ``__new__``-ing it (NEWOBJ) makes a :class:`StandIn`; nothing from the checkpoint
    is ever executed. One stand-in class exists per (module, qualname), so identity and
    ``isinstance`` work across files: ``StandInClass("megatron.core.enums", "ModelType")`` (or
    ``StandInClass.make(...)``) returns it."""

    _cache: dict[tuple[str, str], StandInClass] = {}
    _lock = threading.Lock()

    @classmethod
    def make(mcls, module: str, qualname: str) -> StandInClass:
        if not isinstance(module, str) or not isinstance(qualname, str):
            raise TypeError(f"global name must be two strings, got {module!r}, {qualname!r}")
        key = (module, qualname)
        with mcls._lock:
            cls = mcls._cache.get(key)
            if cls is None:
                cls = type.__new__(mcls, qualname.rpartition(".")[2] or "_", (StandIn,),
                                   {"__module__": module, "__qualname__": qualname, "__slots__": ()})
                mcls._cache[key] = cls
        return cls

    def __new__(mcls, module: str, qualname: str):  # StandInClass(module, qualname) == make(...)
        return mcls.make(module, qualname)

    def __init__(cls, *args, **kwargs):  # type.__init__ would reject the (module, qualname) call
        pass

    @property
    def module(cls) -> str:
        return cls.__module__

    @property
    def qualname(cls) -> str:
        return cls.__qualname__

    def __call__(cls, *args, **kwargs):  # REDUCE (or a stand-in function call)
        obj = object.__new__(cls)
        obj._setup("reduce", args, kwargs)
        return obj

    def __repr__(cls):
        return f"<stand-in class {cls.__module__}.{cls.__qualname__}>"


_NOT_BUILT = object()


class StandIn:
    """An inert stand-in for an object of a class the loader did not import.

    ``kind`` says how the pickle made it: ``'reduce'`` (``cls(*args)``, e.g. an Enum member:
    ``ModelType(1)``), ``'newobj'`` (``cls.__new__(cls, *args)``, plain objects), ``'newobj_ex'``
    (with ``kwargs``) or ``'reconstructor'`` (``copyreg._reconstructor(cls, *args)``). ``state`` is
    what BUILD stored (``None`` if there was no BUILD), ``listitems`` / ``dictitems`` what
    APPENDS / SETITEMS added. Equal when class, kind, arguments, state and items are equal;
    hashable when the arguments are."""

    __slots__ = ("_kind", "_args", "_kwargs", "_state", "_listitems", "_dictitems", "__weakref__")

    def __new__(cls, *args, **kwargs):  # NEWOBJ / NEWOBJ_EX
        if not isinstance(cls, StandInClass):
            raise TypeError("StandIn itself cannot be instantiated; use StandInClass.make(module, name)")
        obj = object.__new__(cls)
        obj._setup("newobj_ex" if kwargs else "newobj", args, kwargs)
        return obj

    def _setup(self, kind, args, kwargs):
        self._kind = kind
        self._args = tuple(args)
        self._kwargs = dict(kwargs)
        self._state = _NOT_BUILT
        self._listitems = []
        self._dictitems = []

    # --- what the pickle opcodes do to it: store, never execute ---
    def __setstate__(self, state):  # BUILD
        self._state = state

    def append(self, item):  # APPEND(S) on a non-list
        self._listitems.append(item)

    def extend(self, items):
        self._listitems.extend(items)

    def __setitem__(self, key, value):  # SETITEM(S) on a non-dict
        self._dictitems.append((key, value))

    # --- inspection ---
    @property
    def module(self) -> str:
        return type(self).__module__

    @property
    def qualname(self) -> str:
        return type(self).__qualname__

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def args(self) -> tuple:
        return self._args

    @property
    def kwargs(self) -> dict:
        return dict(self._kwargs)

    @property
    def built(self) -> bool:
        return self._state is not _NOT_BUILT

    @property
    def state(self):
        return None if self._state is _NOT_BUILT else self._state

    @property
    def listitems(self) -> list:
        return list(self._listitems)

    @property
    def dictitems(self) -> list:
        return list(self._dictitems)

    def _key(self):
        return (type(self), self._kind, self._args, self._kwargs, self.built, self.state,
                self._listitems, self._dictitems)

    def __eq__(self, other):
        if not isinstance(other, StandIn):
            return NotImplemented
        return self is other or self._key() == other._key()

    def __hash__(self):
        return hash((type(self).__module__, type(self).__qualname__, self._kind, self._args,
                     tuple(self._kwargs.items())))

    def __repr__(self):
        name = f"{type(self).__module__}.{type(self).__qualname__}"
        parts = [repr(a) for a in self._args] + [f"{k}={v!r}" for k, v in self._kwargs.items()]
        if self._kind == "reduce":
            text = f"{name}({', '.join(parts)})"
        elif self._kind == "reconstructor":
            text = f"copyreg._reconstructor({name}, {', '.join(parts)})"
        else:
            text = f"{name}.__new__({', '.join(parts)})"
        if self.built:
            text += f" state={self._state!r}"
        if self._listitems:
            text += f" items={self._listitems!r}"
        if self._dictitems:
            text += f" dictitems={dict(self._dictitems)!r}"
        return f"<stand-in {text}>"

    # --- re-pickling: the same reconstruction the checkpoint held ---
    def __reduce_ex__(self, protocol):
        cls = type(self)
        if self._kind == "reduce":
            if self._kwargs:
                raise pickle.PicklingError(f"{self!r} was called with keyword arguments; pickle cannot say that")
            func, args = cls, self._args
        elif self._kind == "newobj":
            func, args = copyreg.__newobj__, (cls,) + self._args
        elif self._kind == "newobj_ex":
            func, args = copyreg.__newobj_ex__, (cls, self._args, self._kwargs)
        else:
            func, args = copyreg._reconstructor, (cls,) + self._args
        return (func, args, self.state,
                iter(self._listitems) if self._listitems else None,
                iter(self._dictitems) if self._dictitems else None)

    def __copy__(self):
        new = object.__new__(type(self))
        new._setup(self._kind, self._args, self._kwargs)
        new._state = self._state
        new._listitems = list(self._listitems)
        new._dictitems = list(self._dictitems)
        return new


class _GlobalMarker:
    """A non-callable allow-listed global (a storage type, ``torch.Tensor``): only meaningful as an
    argument of a rebuild function; re-pickles as its original GLOBAL."""

    __slots__ = ("module", "qualname", "dtype")

    def __init__(self, module, qualname, dtype=None):
        self.module, self.qualname, self.dtype = module, qualname, dtype

    def __repr__(self):
        return f"<global {self.module}.{self.qualname}>"

    def __reduce__(self):
        return self.qualname  # our pickler's save_global writes module/qualname


# -------------------------------------------------------------------------------------------------
# Allow / deny policy


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_STORAGE_MARKERS = {}
for _name, _dt in _STORAGE_DTYPES.items():
    _STORAGE_MARKERS[("torch", _name)] = _GlobalMarker("torch", _name, _dt)
_STORAGE_MARKERS[("torch.storage", "UntypedStorage")] = _GlobalMarker("torch.storage", "UntypedStorage",
                                                                      torch.uint8)
_TENSOR_TYPE_MARKERS = {
    ("torch", "Tensor"): _GlobalMarker("torch", "Tensor"),
    ("torch._tensor", "Tensor"): _GlobalMarker("torch._tensor", "Tensor"),
    ("torch.nn.parameter", "Parameter"): _GlobalMarker("torch.nn.parameter", "Parameter"),
    ("torch.nn", "Parameter"): _GlobalMarker("torch.nn", "Parameter"),
}

_TORCH_DTYPE_GLOBALS = {("torch", n): getattr(torch, n) for n in dir(torch)
                        if isinstance(getattr(torch, n, None), torch.dtype)}


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as encode(str, 'latin1'), got "
                                     f"encode({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin1")


def _no_size(name, real):
    def make(*args):
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            raise pickle.UnpicklingError(f"builtins.{name}(<int>) is not allowed in a checkpoint pickle")
        return real(*args)
    return make


try:  # numpy >= 2 (and the forward-compatibility shim of numpy 1.26)
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - older numpy
    from numpy.core import multiarray as _np_multiarray
_NUMPY_RECONSTRUCT = _np_multiarray._reconstruct
_NUMPY_SCALAR = _np_multiarray.scalar

_ALLOWED_OBJECTS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("types", "SimpleNamespace"): types.SimpleNamespace,
    ("_io", "BytesIO"): io.BytesIO,
    ("io", "BytesIO"): io.BytesIO,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "range"): range,
    ("builtins", "bytes"): _no_size("bytes", bytes),
    ("builtins", "bytearray"): _no_size("bytearray", bytearray),
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "str"): str,
    ("builtins", "bool"): bool,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "object"): object,
    **_TORCH_DTYPE_GLOBALS,
    **_STORAGE_MARKERS,
    **_TENSOR_TYPE_MARKERS,
}

# Real classes that copyreg._reconstructor / __newobj__ may instantiate (their __new__ is C code).
_SAFE_NEW_CLASSES = frozenset({collections.OrderedDict, types.SimpleNamespace, io.BytesIO, torch.Size,
                               torch.device, set, frozenset, complex, int, float, str, bool, tuple,
                               list, dict, object, argparse.Namespace})
_SAFE_RECONSTRUCTOR_BASES = frozenset({object, dict, list, tuple, set, frozenset, int, float, str, bytes})

# Modules (and their submodules) whose globals are refused unless allow-listed above.
_DENIED_ROOTS = frozenset("""
    builtins __builtin__ exceptions os posix nt posixpath ntpath subprocess _posixsubprocess sys
    importlib imp runpy shutil pickle _pickle cPickle pickletools marshal types code codeop ctypes
    _ctypes socket _socket pty webbrowser functools _functools operator _operator torch numpy
    copyreg copy_reg _codecs codecs io _io multiprocessing _multiprocessing threading _thread
    signal asyncio inspect gc pdb bdb timeit trace profile cProfile pydoc ssl http urllib urllib2
    ftplib smtplib telnetlib xmlrpc shelve dbm sqlite3 zipimport pkgutil site sysconfig distutils
    setuptools pip ensurepip venv compileall py_compile zipapp fcntl resource mmap select selectors
    dill cloudpickle joblib yaml jinja2 tempfile unittest doctest idlelib tkinter _winapi winreg
""".split())


def _denied_message(path, module, name):
    return (f"refusing to load {path}: its pickle references {module}.{name}, which can execute code "
            f"or is not on ckptmap's allow-list of safe constructors; ckptmap never runs code from a "
            f"checkpoint — if this file is trusted, load it with torch.load(..., weights_only=False) in "
            f"a trusted environment, keep only tensors and plain data (dicts, lists, numbers, strings, "
            f"argparse.Namespace), save that with torch.save and give ckptmap the new file")


# -------------------------------------------------------------------------------------------------
# Zip archive


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # LONG1 0x1950a86a20f9469cfc6c, torch's pre-zip magic


@attrs.frozen
class _Record:
    name: str
    offset: int  # of the data, in the file
    size: int


class _Archive:
    """The zip directory and the copy-on-write mmap of one file; no record data is read."""

    def __init__(self, path):
        self.path = os.fspath(path)
        p = self.path
        if not os.path.exists(p):
            raise CkptmapError(f"{p} does not exist; expected a torch checkpoint file (.pt) — check the path")
        if os.path.isdir(p):
            raise CkptmapError(f"{p} is a directory, not a torch checkpoint file; pass the .pt file inside "
                               f"it (e.g. model_optim_rng.pt)")
        try:
            with open(p, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size == 0:
                    raise CkptmapError(f"{p} is empty (0 bytes); expected a torch zip checkpoint — the file "
                                       f"was not written completely, copy or save it again")
                head = f.read(512)
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                f.seek(0)
                try:
                    zf = zipfile.ZipFile(f)
                    infos = zf.infolist()
                except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
                        struct.error, NotImplementedError) as e:
                    raise CkptmapError(self._not_zip_message(head, e)) from None
        except CkptmapError:
            raise
        except OSError as e:
            raise CkptmapError(f"cannot read {p}: {e.strerror or e}; expected a readable torch checkpoint "
                               f"file — check the path and its permissions") from None
        self.records: dict[str, _Record] = {}
        for zi in infos:
            self._add_record(zi)
        pkls = [n for n in self.records if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            found = ", ".join(list(self.records)[:8]) or "no records"
            raise CkptmapError(f"{p} is a zip archive but not a torch checkpoint: expected exactly one "
                               f"'<name>/data.pkl' record, found {len(pkls)} (records: {found}) — pass a file "
                               f"written by torch.save")
        self.prefix = pkls[0][: -len("data.pkl")]
        order = self.read_record("byteorder", missing_ok=True)
        if order is not None and order != b"little":
            shown = order[:20].decode("latin1")
            raise CkptmapError(f"{p} was saved on a {shown!r}-endian machine; ckptmap only reads little-endian "
                               f"torch checkpoints — load and re-save it with torch on a little-endian "
                               f"(x86/ARM) machine")

    def _not_zip_message(self, head, err):
        p = self.path
        if _LEGACY_MAGIC in head[:32] or (len(head) >= 262 and head[257:262] == b"ustar"):
            return (f"{p} is in PyTorch's legacy pre-1.6 (non-zip) serialization format; ckptmap reads only "
                    f"the zip format — if the file is trusted, re-save it with torch >= 1.6: "
                    f"torch.save(torch.load(path, weights_only=False), new_path)")
        if head.startswith(b"PK"):
            return (f"{p} is truncated or corrupt: it starts like a zip archive but its {self.size} bytes end "
                    f"without a valid zip central directory ({err}); expected a complete torch zip checkpoint "
                    f"— the copy or save was probably interrupted, copy or save it again")
        return (f"{p} is not a torch checkpoint: expected a zip archive written by torch.save (>= 1.6), "
                f"found {self.size} bytes starting with {head[:8]!r} ({err}) — check that the path names a "
                f".pt file")

    def _add_record(self, zi: zipfile.ZipInfo):
        p = self.path
        name = zi.filename
        if name in self.records:
            raise CkptmapError(f"{p} holds the record {name!r} twice; a torch checkpoint never does — the file "
                               f"is corrupt or was tampered with, save it again")
        if zi.flag_bits & 0x1:
            raise CkptmapError(f"{p}: record {name!r} is encrypted; torch checkpoints are never encrypted — "
                               f"save the file again with torch.save")
        if zi.compress_type != zipfile.ZIP_STORED or zi.compress_size != zi.file_size:
            raise CkptmapError(f"{p}: record {name!r} is compressed (zip method {zi.compress_type}); torch "
                               f"checkpoints store records uncompressed and ckptmap maps them directly — "
                               f"re-create the archive without compression (zip -0) or save it again with "
                               f"torch.save")
        h = zi.header_offset
        if h < 0 or h + _LOCAL_HEADER.size > self.size:
            raise CkptmapError(self._truncated(name, "its local header lies past the end of the file"))
        sig, _, _, _, _, _, _, _, _, nlen, elen = _LOCAL_HEADER.unpack_from(self.mm, h)
        if sig != b"PK\x03\x04":
            raise CkptmapError(self._truncated(name, f"no local file header at offset {h}"))
        start = h + _LOCAL_HEADER.size + nlen + elen
        if start + zi.file_size > self.size:
            raise CkptmapError(self._truncated(
                name, f"its {zi.file_size} data bytes at offset {start} run past the end of the file"))
        self.records[name] = _Record(name, start, zi.file_size)

    def _truncated(self, name, what):
        return (f"{self.path} is truncated or corrupt: record {name!r} is damaged ({what}; file size "
                f"{self.size} bytes) — the copy or save was probably interrupted, copy or save it again")

    def record(self, rel: str) -> _Record | None:
        return self.records.get(self.prefix + rel)

    def read_record(self, rel: str, missing_ok=False) -> bytes | None:
        r = self.record(rel)
        if r is None:
            if missing_ok:
                return None
            raise CkptmapError(f"{self.path} has no record {self.prefix + rel!r}; it is not a complete torch "
                               f"checkpoint — save it again")
        return self.mm[r.offset: r.offset + r.size]


# -------------------------------------------------------------------------------------------------
# Unpickling


class _Storage:
    """What a persistent id resolves to: one storage record, typed."""

    __slots__ = ("key", "dtype", "location", "numel")

    def __init__(self, key, dtype, location, numel):
        self.key, self.dtype, self.location, self.numel = key, dtype, location, numel


class _Refused(CkptmapError):
    pass


class _LoadingNamespaceBase(argparse.Namespace):
    """``argparse.Namespace`` while unpickling: BUILD keeps the pickle's own key strings (the C
    unpickler would intern them, losing the memo identity a byte-exact re-save needs), then the
    object becomes a plain ``argparse.Namespace``."""

    _created: list

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        cls._created.append(obj)
        return obj

    def __init__(self, **kwargs):
        argparse.Namespace.__init__(self, **kwargs)

    def __setstate__(self, state):
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if part is None:
                continue
            if not isinstance(part, dict):
                raise pickle.UnpicklingError(f"argparse.Namespace state must be a dict, got "
                                             f"{type(part).__name__}")
            self.__dict__.update(part)
        self.__class__ = argparse.Namespace


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: _Archive, materialize: bool, bases: dict):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.archive = archive
        self.path = archive.path
        self.materialize = materialize
        self.bases = bases
        self.storages_made: dict[int, _Storage] = {}
        self.storages_used: set[int] = set()
        self.namespace_cls = type("Namespace", (_LoadingNamespaceBase,), {"_created": []})
        rebuilders = {
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter_with_state,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
        }
        self.tensor_funcs = set(rebuilders.values())
        self.table = {
            **_ALLOWED_OBJECTS,
            **rebuilders,
            ("argparse", "Namespace"): self.namespace_cls,
            ("copyreg", "_reconstructor"): self._reconstructor,
            ("copyreg", "__newobj__"): self._newobj,
            ("copyreg", "__newobj_ex__"): self._newobj_ex,
            ("builtins", "getattr"): self._getattr,
        }

    # --- globals ---
    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("a global name in the pickle is not a string")
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = self.table.get((module, name))
        if obj is not None:
            return obj
        if module.split(".", 1)[0] in _DENIED_ROOTS or not module or not name:
            raise _Refused(_denied_message(self.path, module, name))
        return StandInClass.make(module, name)

    def _refuse(self, what):
        raise _Refused(_denied_message(self.path, *what))

    def _getattr(self, obj, name, *default):
        # Protocol <= 3 pickles a nested class Outer.Inner as getattr(Outer, 'Inner').
        if isinstance(obj, StandInClass) and isinstance(name, str) and not default and name.isidentifier():
            return StandInClass.make(obj.__module__, f"{obj.__qualname__}.{name}")
        self._refuse(("builtins", "getattr"))

    def _vet_class(self, cls, via):
        if isinstance(cls, StandInClass) or cls in _SAFE_NEW_CLASSES or cls is self.namespace_cls \
                or cls is np.ndarray or cls is np.dtype:
            return
        raise pickle.UnpicklingError(f"{via} with {cls!r}, which is not a class ckptmap may instantiate")

    def _reconstructor(self, cls, base, state):
        self._vet_class(cls, "copyreg._reconstructor")
        if isinstance(cls, StandInClass):
            obj = object.__new__(cls)
            obj._setup("reconstructor", (base, state), {})
            return obj
        if base not in _SAFE_RECONSTRUCTOR_BASES:
            raise pickle.UnpicklingError(f"copyreg._reconstructor with base {base!r} is not allowed")
        if base is object:
            return cls.__new__(cls)
        obj = base.__new__(cls, state)
        if base.__init__ is not object.__init__:
            base.__init__(obj, state)
        return obj

    def _newobj(self, cls, *args):
        self._vet_class(cls, "copyreg.__newobj__")
        return cls.__new__(cls, *args)

    def _newobj_ex(self, cls, args, kwargs):
        self._vet_class(cls, "copyreg.__newobj_ex__")
        return cls.__new__(cls, *args, **kwargs)

    # --- storages and tensors ---
    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.200}")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _GlobalMarker) or stype.dtype is None:
            raise pickle.UnpicklingError(f"persistent id names {stype!r:.100} instead of a torch storage type")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage persistent id {pid!r:.200}")
        rec = self.archive.record("data/" + key)
        if rec is None:
            raise CkptmapError(f"{self.path} references storage {key!r} but has no record "
                               f"{self.archive.prefix}data/{key}; the file is incomplete — save it again")
        need = numel * stype.dtype.itemsize
        if rec.size < need:
            raise CkptmapError(f"{self.path}: storage record {self.archive.prefix}data/{key} holds {rec.size} "
                               f"bytes but the pickle expects {numel} x {stype.dtype} = {need} bytes; the file "
                               f"is corrupt — save it again")
        st = _Storage(key, stype.dtype, location, numel)
        self.storages_made[id(st)] = st
        return st

    def _make_ref(self, storage, offset, size, stride, requires_grad, dtype=None):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"tensor rebuild got {type(storage).__name__} instead of a storage")
        if isinstance(size, torch.Size):
            size = tuple(size)
        ok = (type(offset) is int and isinstance(size, tuple) and isinstance(stride, tuple)
              and all(type(x) is int for x in size) and all(type(x) is int for x in stride)
              and isinstance(requires_grad, bool))
        if not ok:
            raise pickle.UnpicklingError(f"malformed tensor arguments {(offset, size, stride, requires_grad)!r:.200}")
        self.storages_used.add(id(storage))
        if dtype is None:
            dtype, numel = storage.dtype, storage.numel
        else:
            if not isinstance(dtype, torch.dtype):
                raise pickle.UnpicklingError(f"tensor dtype {dtype!r:.100} is not a torch dtype")
            numel = storage.numel * storage.dtype.itemsize // dtype.itemsize
        try:
            name = dtypes.name_of(dtype)
        except CkptmapError:
            raise CkptmapError(f"{self.path} holds a tensor of dtype {dtype} (storage {storage.key!r}); "
                               f"ckptmap supports {', '.join(dtypes.TORCH_DTYPES)} — convert that tensor "
                               f"before using ckptmap") from None
        ref = TensorRef(storage=storage.key, dtype=name, storage_offset=offset, shape=size, stride=stride,
                        storage_numel=numel, requires_grad=requires_grad, location=storage.location)
        problem = _ref_problem(ref)
        if problem:
            raise CkptmapError(f"{self.path} is corrupt: a tensor in storage {storage.key!r} does not fit "
                               f"its storage ({problem}) — save the file again")
        if self.materialize:
            return _view(self.archive, self.bases, ref)
        return ref

    def _check_metadata(self, metadata):
        if metadata and any(metadata.values()):
            raise CkptmapError(f"{self.path} holds a tensor with metadata {metadata!r} (conjugate or negative "
                               f"bit); ckptmap does not support such tensors — resolve them (tensor.resolve_conj()"
                               f".resolve_neg()) and save again")

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._make_ref(storage, storage_offset, size, stride, False)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                           metadata=None):
        self._check_metadata(metadata)
        return self._make_ref(storage, storage_offset, size, stride, requires_grad)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        self._check_metadata(metadata)
        return self._make_ref(storage, storage_offset, size, stride, requires_grad, dtype)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        if isinstance(data, TensorRef):
            return attrs.evolve(data, requires_grad=bool(requires_grad))
        if isinstance(data, torch.Tensor):
            return torch.nn.Parameter(data, bool(requires_grad))
        raise pickle.UnpicklingError(f"_rebuild_parameter got {type(data).__name__} instead of a tensor")

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        if state:
            raise CkptmapError(f"{self.path} holds a torch.nn.Parameter with Python attributes "
                               f"({', '.join(map(str, state))}); ckptmap does not keep those — save the plain "
                               f"tensors (state_dict) instead")
        return self._rebuild_parameter(data, requires_grad, backward_hooks)

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        if func not in self.tensor_funcs or new_type not in _TENSOR_TYPE_MARKERS.values() \
                or not isinstance(args, tuple):
            raise CkptmapError(f"{self.path} holds a tensor subclass ({new_type!r}); ckptmap reads only plain "
                               f"tensors and parameters — save the plain tensors (state_dict) instead")
        if state:
            raise CkptmapError(f"{self.path} holds a tensor with Python attributes "
                               f"({', '.join(map(str, state))}); ckptmap does not keep those — save "
                               f"tensor.detach() values (a state_dict) instead")
        out = func(*args)
        if self.materialize and new_type.qualname == "Parameter" and not isinstance(out, torch.nn.Parameter):
            out = torch.nn.Parameter(out, out.requires_grad)
        return out

    def run(self):
        root = self.load()
        for ns in self.namespace_cls._created:  # never BUILT (empty namespaces)
            if type(ns) is self.namespace_cls:
                ns.__class__ = argparse.Namespace
        self.namespace_cls._created.clear()
        if set(self.storages_made) - self.storages_used:
            raise CkptmapError(f"{self.path} holds a bare torch storage (not inside a tensor); ckptmap reads "
                               f"only tensors — wrap it in a tensor (torch.tensor([], dtype=torch.uint8)"
                               f".set_(storage)) and save again")
        return root


def _unpickle(archive: _Archive, materialize: bool, bases: dict):
    data = archive.read_record("data.pkl")
    unpickler = _Unpickler(data, archive, materialize, bases)
    try:
        return unpickler.run()
    except CkptmapError:
        raise
    except RecursionError:
        raise CkptmapError(f"{archive.path}: the pickle in {archive.prefix}data.pkl nests too deeply to read "
                           f"safely; the file is corrupt or not a checkpoint") from None
    except Exception as e:  # any malformed pickle: never leak a raw traceback for bad input
        raise CkptmapError(f"{archive.path} has a malformed pickle in {archive.prefix}data.pkl "
                           f"({type(e).__name__}: {str(e)[:300]}); expected the object graph torch.save "
                           f"writes — the file is corrupt or not a torch checkpoint, save it again") from None
    finally:
        # the unpickler refers to itself (bound methods): without this the archive's map, and its
        # file handle, would live until the next garbage collection, and thousands of rank files
        # would exhaust the process's file handles
        unpickler.__dict__.clear()


def _base(archive: _Archive, bases: dict, key: str) -> torch.Tensor:
    base = bases.get(key)
    if base is None:
        rec = archive.record("data/" + key)
        if rec is None:
            raise CkptmapError(f"{archive.path} has no storage record {archive.prefix}data/{key}; the tensor "
                               f"reference does not belong to this file")
        if rec.size == 0:
            base = torch.empty(0, dtype=torch.uint8)
        else:
            base = torch.frombuffer(archive.mm, dtype=torch.uint8, count=rec.size, offset=rec.offset)
        bases[key] = base
    return base


def _view(archive: _Archive, bases: dict, ref: TensorRef) -> torch.Tensor:
    problem = _ref_problem(ref)
    if problem:
        raise CkptmapError(f"{archive.path}: tensor reference {ref} does not fit its storage ({problem}); "
                           f"it does not belong to this file")
    base = _base(archive, bases, ref.storage)
    dt = dtypes.to_torch(ref.dtype)
    usable = base.numel() // dt.itemsize
    if ref.storage_numel > usable:
        raise CkptmapError(f"{archive.path}: tensor reference {ref} needs {ref.storage_numel} elements of "
                           f"{ref.dtype} but storage record {archive.prefix}data/{ref.storage} holds only "
                           f"{base.numel()} bytes; it does not belong to this file")
    typed = base[: usable * dt.itemsize].view(dt) if dt != torch.uint8 else base
    t = typed.as_strided(ref.shape, ref.stride, ref.storage_offset)
    if ref.requires_grad:
        t.requires_grad_(True)
    return t


# -------------------------------------------------------------------------------------------------
# Public reading API


class TorchZipFile:
    """An open torch zip checkpoint: ``root`` is the object graph with :class:`TensorRef` in place of
    tensors (no tensor bytes are read); :meth:`tensor` gives a zero-copy CPU view on demand.

    Tensors handed out stay valid after :meth:`close` (they keep the mapping alive)."""

    def __init__(self, path):
        self._archive = _Archive(path)
        self.path = self._archive.path
        self.prefix = self._archive.prefix
        self._bases: dict[str, torch.Tensor] = {}
        self.root = _unpickle(self._archive, materialize=False, bases=self._bases)

    def storage_keys(self) -> list[str]:
        n = len(self.prefix) + len("data/")
        return [name[n:] for name in self._archive.records if name.startswith(self.prefix + "data/")]

    def storage_nbytes(self, key) -> int:
        rec = self._live().record(f"data/{key}")
        if rec is None:
            raise CkptmapError(f"{self.path} has no storage {key!r} (storages: {', '.join(self.storage_keys())})")
        return rec.size

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        if not isinstance(ref, TensorRef):
            raise CkptmapError(f"{self.path}: tensor() needs a TensorRef, got {type(ref).__name__}")
        return _view(self._live(), self._bases, ref)

    def _live(self) -> _Archive:
        if self._archive is None:
            raise CkptmapError(f"{self.path} was already closed; open it again with TorchZipFile(path)")
        return self._archive

    def close(self):
        # Do not close the mmap: tensors from tensor() may still point into it (torch.frombuffer holds a
        # reference to the mmap object, not a buffer export). Dropping our references unmaps it once
        # the last such tensor is gone.
        self._archive = None
        self._bases = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"TorchZipFile({self.path!r})"


def read_objects(path) -> object:
    """The object graph of a torch zip checkpoint with :class:`TensorRef` in place of tensors."""
    with TorchZipFile(path) as f:
        return f.root


def load(path) -> object:
    """Like ``torch.load(path, mmap=True, map_location='cpu')`` but safe: tensors are CPU views of a
    copy-on-write mmap of the file (kept alive by the tensors), views of one storage share it, and
    unknown classes come back as inert stand-ins."""
    archive = _Archive(path)
    return _unpickle(archive, materialize=True, bases={})


# -------------------------------------------------------------------------------------------------
# Writing


class _Pickler(pickle._Pickler):
    """Pure-Python pickler that writes stand-in classes as their original GLOBAL without importing."""

    def reducer_override(self, obj):
        if isinstance(obj, TensorRef):
            raise CkptmapError(f"cannot save {obj}: a TensorRef only describes a tensor inside its source file; "
                               f"replace it with TorchZipFile(source).tensor(ref) (or use load()) before save()")
        if isinstance(obj, _Storage):
            raise CkptmapError("cannot save an internal storage reference; save tensors instead")
        return NotImplemented

    def save_global(self, obj, name=None):
        if isinstance(obj, StandInClass):
            self._write_global(obj, obj.__module__, obj.__qualname__)
        elif isinstance(obj, _GlobalMarker):
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
                if (module, qualname) in _compat_pickle.REVERSE_NAME_MAPPING:
                    module, qualname = _compat_pickle.REVERSE_NAME_MAPPING[(module, qualname)]
                elif module in _compat_pickle.REVERSE_IMPORT_MAPPING:
                    module = _compat_pickle.REVERSE_IMPORT_MAPPING[module]
            enc = "utf-8" if self.proto >= 3 else "ascii"
            try:
                line = (pickle.GLOBAL + bytes(module, enc) + b"\n" + bytes(qualname, enc) + b"\n")
            except UnicodeEncodeError:
                raise pickle.PicklingError(f"cannot pickle global {module}.{qualname} with protocol "
                                           f"{self.proto}") from None
            self.write(line)
        self.memoize(obj)


_PICKLE_MODULE = types.ModuleType(__name__ + "._pickle")
_PICKLE_MODULE.Pickler = _Pickler


def save(obj, path) -> None:
    """Write ``obj`` as a torch zip checkpoint, like ``torch.save(obj, path)``.

    Stand-ins are written back as the globals and reconstructions they were read from, so a process
    that can import those modules gets the real objects. Tensors must be real tensors: a
    :class:`TensorRef` is refused (resolve it with :meth:`TorchZipFile.tensor` first). The file is
    written under its final name in a temporary directory beside it and then renamed into place, so
    the archive prefix (derived from the file name) is the one ``torch.save(obj, path)`` would write
    and an interrupted save never leaves a partial file."""
    path = Path(os.fspath(path))
    with _temp_beside(path) as tmp:
        try:
            torch.save(obj, tmp, pickle_module=_PICKLE_MODULE)
        except CkptmapError as e:
            raise CkptmapError(f"cannot save {path}: {e}") from None
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError, RuntimeError, ValueError) as e:
            raise CkptmapError(f"cannot save {path}: the object cannot be pickled ({type(e).__name__}: "
                               f"{str(e)[:300]}) — save tensors and plain data only") from None
        except OSError as e:
            raise CkptmapError(f"cannot save {path}: writing failed ({e.strerror or e}) — check free space "
                               f"and permissions") from None
        _move_into_place(tmp, path)


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
_STORAGE_TYPES = {dt: getattr(torch, name) for name, dt in _STORAGE_DTYPES.items() if name != "UntypedStorage"}
_HASH_MASK = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _HASH_MASK) + (seed >> 2)) & _HASH_MASK)) & _HASH_MASK


def _archive_name(file_name: str) -> str:
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


class _NullSink:
    def write(self, data):
        return len(data)

    def flush(self):
        pass


def _name_hash_digits(names: list[str]) -> str:
    """The first 20 characters of the serialization id torch's writer computes for records written
    in the order ``names`` (``version`` and the id itself are added by write_end_of_file)."""
    writer = torch._C.PyTorchFileWriter(_NullSink(), True, 64)
    for name in names:
        writer.write_record(name, b"", 0)
    writer.write_end_of_file()
    sid = writer.serialization_id()
    if len(sid) != 40 or not sid.isdigit():  # pragma: no cover - a torch that changed its format
        raise CkptmapError(f"torch {torch.__version__} writes a serialization id of an unknown form ({sid!r}); "
                           f"ckptmap's streaming .pt writer supports the 40-digit form of torch 2.x")
    return sid[:20]


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
            self.combined_crc = _hash_combine(self.combined_crc, crc)

    def record(self, name: str, data: bytes) -> None:
        offset = self.begin(name, len(data))
        self._write(data)
        self.end(name, len(data), zlib.crc32(data) if self.compute_crc32 else 0, offset)

    def finish(self) -> None:
        self.record("version", _FILE_FORMAT_VERSION)
        names_part = _name_hash_digits(self.names[:-1])
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
    """The storage behind one TensorRef storage key while pickling (what TypedStorage is to torch)."""

    __slots__ = ("key", "dtype", "storage_type", "numel", "location")

    def __init__(self, ref: TensorRef):
        self.key = ref.storage
        self.dtype = ref.dtype
        self.storage_type = _STORAGE_TYPES[dtypes.to_torch(ref.dtype)]
        self.numel = ref.storage_numel
        self.location = ref.location

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


class _StreamPickler(_Pickler):
    """``_Pickler`` plus torch.save's persistent ids, pickling a TensorRef as torch pickles the
    equivalent CPU tensor (``Tensor._reduce_ex_internal``): ``_rebuild_tensor_v2(TypedStorage,
    offset, size, stride, requires_grad, OrderedDict())``."""

    def __init__(self, file, path):
        super().__init__(file, protocol=torch.serialization.DEFAULT_PROTOCOL)
        self.path = path
        self.id_map: dict = {}
        self.storages: dict[str, object] = {}  # output key -> _RefStorage | torch.UntypedStorage
        self.ref_storages: dict[str, _RefStorage] = {}
        self.storage_dtypes: dict[int, torch.dtype] = {}
        self.locations: dict[str, str] = {}

    def reducer_override(self, obj):
        if isinstance(obj, TensorRef):
            return self._reduce_ref(obj)
        return super().reducer_override(obj)

    def _reduce_ref(self, ref: TensorRef):
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
        return torch._utils._rebuild_tensor_v2, args

    def persistent_id(self, obj):
        if type(obj) is _RefStorage:
            key = self.id_map.setdefault(("ref", obj.key), str(len(self.id_map)))
            self.storages[key] = obj
            loc = obj.location
            if ":" in loc:  # torch builds 'cuda:0' anew for every tensor (never memo-shared)
                head, _, tail = loc.partition(":")
                loc = head + ":" + tail
            else:  # 'cpu' is one (interned) string in torch: memo-shared after its first use
                loc = self.locations.setdefault(loc, loc)
            return (_STORAGE_PID, obj.storage_type, key, loc, obj.numel)
        if isinstance(obj, torch.storage.TypedStorage) or torch.is_storage(obj):
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
                crc = zlib.crc32(view, crc)
            done += n
    if done != expected:
        raise CkptmapError(f"cannot save {path}: storage {st.key!r} ({st.numel} x {st.dtype}) must be "
                           f"{expected} bytes but fill yielded only {done} — the storage's data source "
                           f"does not match its tensors")
    return crc


def _write_real_storage(writer: _StreamZipWriter, name: str, storage) -> None:
    if storage.device.type != "cpu":
        storage = storage.cpu()
    n = storage.nbytes()
    data = (torch.empty(0, dtype=torch.uint8).set_(storage).numpy() if n else b"")
    offset = writer.begin(name, n)
    writer._write(data)
    writer.end(name, n, zlib.crc32(data) if writer.compute_crc32 else 0, offset)


def save_streaming(obj, path, fill) -> None:
    """Write ``obj`` exactly as torch.save would write it (same bytes) if every TensorRef in it were a
    real CPU tensor: a view (TensorRef.storage_offset, shape, stride, requires_grad) of a storage of
    TensorRef.storage_numel elements of TensorRef.dtype, TensorRefs with the same ``storage`` key
    sharing one storage, saved from device TensorRef.location. The storages' bytes are not in
    memory: ``fill(key)`` (key = the TensorRef.storage key as found in ``obj``) returns an iterable of
    bytes-like chunks whose concatenation is that storage's bytes (numel * itemsize, little-endian);
    chunks are written as they come (one chunk in memory at a time), CRC32 computed incrementally.
    A wrong total length is a :class:`CkptmapError` naming the storage and path, and no file is left
    at ``path``. Stand-ins re-pickle as in :func:`save`; real tensors may appear too (written from
    memory, as torch.save does). The archive prefix is the file stem, as torch.save derives it: the
    file is written under its final name in a temporary directory beside ``path`` and renamed into
    place, so ``path`` never holds a partial file. Storage keys in the output are renumbered in
    pickling (first-encounter) order exactly as torch.save numbers them; ``fill`` is called once per
    storage, in the order the records are written (that same order). Honours torch's save options
    (``torch.serialization.set_crc32_options``, ``torch.utils.serialization.config.save.storage_alignment``)
    as torch.save does."""
    path = Path(os.fspath(path))
    archive = _archive_name(path.name)
    if not archive:
        raise CkptmapError(f"cannot save {path}: torch.save cannot write a file whose name has no stem "
                           f"(the zip records are named after it) — choose a name like model_optim_rng.pt")
    buf = io.BytesIO()
    pickler = _StreamPickler(buf, path)
    try:
        pickler.dump(obj)
    except CkptmapError as e:
        raise CkptmapError(f"cannot save {path}: {e}") from None
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError, RuntimeError, ValueError) as e:
        raise CkptmapError(f"cannot save {path}: the object cannot be pickled ({type(e).__name__}: "
                           f"{str(e)[:300]}) — save tensors and plain data only") from None
    data_pkl = buf.getvalue()
    del buf
    alignment = int(torch.serialization._get_storage_alignment())
    compute_crc32 = bool(torch.serialization.get_crc32_options())
    with _temp_beside(path) as tmp:
        try:
            with open(tmp, "wb", buffering=1 << 20) as f:
                writer = _StreamZipWriter(f, archive, alignment, compute_crc32)
                writer.record("data.pkl", data_pkl)
                writer.record(".format_version", b"1")
                writer.record(".storage_alignment", str(alignment).encode("ascii"))
                writer.record("byteorder", b"little")
                for key, st in pickler.storages.items():
                    if type(st) is _RefStorage:
                        _stream_storage(writer, f"data/{key}", st, fill, path)
                    else:
                        _write_real_storage(writer, f"data/{key}", st)
                writer.finish()
        except OSError as e:
            raise CkptmapError(f"cannot save {path}: writing failed ({e.strerror or e}) — check free space "
                               f"and permissions") from None
        _move_into_place(tmp, path)


class _temp_beside:
    """A temporary directory beside ``path`` holding a file of the same name; removed on exit."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        parent = self.path.parent
        if not parent.is_dir():
            raise CkptmapError(f"cannot save {self.path}: the directory {parent} does not exist — create it "
                               f"first")
        try:
            self.tmpdir = tempfile.mkdtemp(prefix=".ckptmap-save-", dir=parent)
        except OSError as e:
            raise CkptmapError(f"cannot save {self.path}: cannot write in {parent} ({e.strerror or e}) — check "
                               f"the permissions and free space") from None
        self.tmp = Path(self.tmpdir) / self.path.name
        return self.tmp

    def __exit__(self, *exc):
        if self.tmp.exists():
            self.tmp.unlink()
        os.rmdir(self.tmpdir)


def _move_into_place(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise CkptmapError(f"cannot save {path}: moving the written file into place failed "
                           f"({e.strerror or e}) — check that {path} is not a directory and is "
                           f"writable") from None
