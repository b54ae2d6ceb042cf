"""An independent reader for MSAdapter-dialect ``.pt`` files, for tests.

Written from the format spec in ``shared/fixtures/msadapter-r0.2.0/README.md`` (sections 1-2)
alone: it is an oracle that ckptmap's own reader and writer are checked against, so it shares no
code with ckptmap.  It needs numpy and nothing else: it never imports mindspore (a test blocks that
import), and torch only inside :meth:`SpecTensor.to_torch`.

* :func:`load` reads an MSAdapter file (MindSpeed-Core-MS r0.2-r0.5 ``torch.save`` through the
  msadaptor shim) *or* a stock torch zip file and returns the unpickled object, tensors as
  :class:`SpecTensor`.  MSAdapter storages (storage type given as a plain string) are read as
  "the record is the tensor's elements in C order": the recorded stride is ignored.  Stock
  storages (``torch.<X>Storage`` globals) honour offset and stride and may be shared.
* MindSpore dtype objects (``mindspore._c_expression.typing.<Class>`` + ``(nbits,)``) become
  :class:`MSDtype`, stock ``torch.<dtype>`` globals :class:`TorchDtype`; both are hashable, so the
  ``(param dtype, grad dtype)`` key of ``distrib_optim.pt`` stays a usable dict key.
* Allowed globals: the ones the spec lists (argparse.Namespace, collections.OrderedDict,
  _io.BytesIO, numpy's _reconstruct / ndarray / dtype, _codecs.encode, the torch rebuild
  functions, tensor type markers) plus the stock-torch storage and dtype globals.  Everything else
  is refused with :class:`SpecReaderError` (callers may add globals with ``extra_globals``).
* :func:`check_msadapter_file` checks every byte-level property the spec lists and raises
  :class:`MSAdapterFormatError` naming every violation; apply it to files ckptmap writes.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import io
import math
import pickle
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

__all__ = [
    "SpecReaderError", "MSAdapterFormatError", "SpecTensor", "MSDtype", "TorchDtype", "TypeMarker",
    "LoadInfo", "load", "load_with_info", "check_msadapter_file", "msadapter_file_problems",
    "walk_tensors", "MSADAPTER_STORAGE", "CONSUMER_READABLE_STORAGE",
]


class SpecReaderError(Exception):
    """The file is not something the spec describes (or it uses something the spec does not allow)."""


class MSAdapterFormatError(AssertionError):
    """:func:`check_msadapter_file` found deviations from the MSAdapter r0.2.0 byte format."""


# ------------------------------------------------------------------------------------------------
# dtypes

# storage string written by the MSAdapter shim -> (dtype name, numpy dtype of the raw elements)
# (bfloat16 is kept as its raw 16-bit patterns: numpy has no bfloat16)
MSADAPTER_STORAGE: dict[str, tuple[str, str]] = {
    "HalfStorage": ("float16", "<f2"),
    "FloatStorage": ("float32", "<f4"),
    "BFloat16Storage": ("bfloat16", "<u2"),
    "LongStorage": ("int64", "<i8"),
    "IntStorage": ("int32", "<i4"),  # written by the shim, but readable by neither MindSpeed reader
    "ByteStorage": ("uint8", "u1"),
    "BoolStorage": ("bool", "?"),
}
# the six storage kinds that both MindSpore-side readers (MSAdapter's torch.load and
# MindSpeed-Core-MS r0.5.0 load_ms_weights) understand
CONSUMER_READABLE_STORAGE = frozenset(MSADAPTER_STORAGE) - {"IntStorage"}

# stock torch storage classes (pickled as GLOBAL 'torch <X>Storage')
_STOCK_STORAGE: dict[str, tuple[str, str]] = {
    **MSADAPTER_STORAGE,
    "DoubleStorage": ("float64", "<f8"),
    "ShortStorage": ("int16", "<i2"),
    "CharStorage": ("int8", "i1"),
    "UntypedStorage": ("uint8", "u1"),
}
_TORCH_DTYPE_NAMES = frozenset({
    "float16", "half", "float32", "float", "float64", "double", "bfloat16", "int8", "int16", "short",
    "int32", "int", "int64", "long", "uint8", "bool", "complex64", "complex128",
})
_NUMPY_OF_NAME = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "bfloat16": "<u2",
                  "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1",
                  "bool": "?"}

_MS_TYPING_MODULE = "mindspore._c_expression.typing"
_MS_DTYPE_KINDS = {"Float": "float", "BFloat": "bfloat", "Int": "int", "UInt": "uint", "Bool": "bool"}


class MSDtype:
    """A MindSpore dtype object as pickled by the shim: ``typing.<kind>`` rebuilt with ``(nbits,)``."""

    __slots__ = ("nbits", "_built")
    kind = "?"

    def __new__(cls, *args):
        if args:
            raise SpecReaderError(f"mindspore typing.{cls.kind} created with arguments {args!r}")
        self = object.__new__(cls)
        self.nbits = None
        self._built = False
        return self

    def __setstate__(self, state):
        if self.kind == "Bool":  # mindspore.bool_ pickles with an empty state
            ok = state == ()
        else:
            ok = isinstance(state, tuple) and len(state) == 1 and type(state[0]) is int
        if self._built or not ok:
            raise SpecReaderError(f"mindspore typing.{self.kind} state {state!r} is not (nbits,)")
        self.nbits = state[0] if state else None
        self._built = True

    @property
    def name(self) -> str:
        if self.kind == "Bool":
            return "bool"
        return f"{_MS_DTYPE_KINDS[self.kind]}{self.nbits}"

    def __eq__(self, other):
        return isinstance(other, MSDtype) and (self.kind, self.nbits) == (other.kind, other.nbits)

    def __hash__(self):
        return hash(("MSDtype", self.kind, self.nbits))

    def __repr__(self):
        return f"mindspore.{self.name}"


def _ms_dtype_class(kind: str) -> type:
    return type(f"MS{kind}", (MSDtype,), {"kind": kind, "__slots__": ()})


_MS_DTYPE_CLASSES = {kind: _ms_dtype_class(kind) for kind in _MS_DTYPE_KINDS}


@dataclass(frozen=True)
class TorchDtype:
    """A stock ``torch.<name>`` dtype global."""
    name: str

    def __repr__(self):
        return f"torch.{self.name}"


@dataclass(frozen=True)
class TypeMarker:
    """The ``<type>`` argument of ``_rebuild_from_type_v2`` (a tensor class the reader ignores)."""
    qualname: str

    def __call__(self, *args, **kwargs):
        raise SpecReaderError(f"{self.qualname} may only appear as the tensor type of "
                              "_rebuild_from_type_v2, not be called")


@dataclass(frozen=True)
class _StockStorageType:
    name: str


# ------------------------------------------------------------------------------------------------
# tensors


@dataclass(eq=False)
class SpecTensor:
    """A tensor read from the file.

    ``array`` is a C-contiguous numpy array of ``shape``; for bfloat16 it holds the raw 16-bit
    patterns as ``uint16``.  The other fields say how the tensor was written."""
    dtype: str
    shape: tuple
    array: np.ndarray
    dialect: str                 # 'msadapter' (string storage type) or 'stock'
    storage_type: str            # 'BFloat16Storage', ...
    storage_key: str
    storage_numel: int
    storage_offset: int
    stride: Any                  # as recorded (list or tuple)
    type_name: str | None = None  # <type> of _rebuild_from_type_v2, e.g. 'torch.nn.parameter.Parameter'
    is_parameter: bool = False   # <type> is a Parameter, or stock _rebuild_parameter
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    def tobytes(self) -> bytes:
        """The elements in C order, little-endian (bf16: the raw 2-byte patterns)."""
        return self.array.tobytes(order="C")

    def numpy(self) -> np.ndarray:
        """Values as numpy; bfloat16 widened exactly to float32."""
        if self.dtype == "bfloat16":
            return (self.array.astype("<u4") << 16).view("<f4")
        return self.array

    def to_torch(self):
        import torch  # only here; the reader itself does not need torch
        dt = getattr(torch, self.dtype)
        if self.dtype == "bfloat16":
            return torch.from_numpy(self.array.view("<i2").copy()).view(torch.bfloat16)
        return torch.from_numpy(self.array.copy()).to(dt)

    def __repr__(self):
        return f"SpecTensor({self.dtype}, {self.shape}, {self.dialect}, key={self.storage_key})"


@dataclass
class _Storage:
    dialect: str
    storage_type: str
    dtype: str
    key: str
    location: Any
    numel: Any
    array: np.ndarray  # the whole record, as elements


@dataclass
class TensorCall:
    """How one tensor was pickled (for :func:`check_msadapter_file`)."""
    pid: tuple
    args: tuple                 # arguments of _rebuild_tensor_v2 (storage replaced by its pid)
    wrapped: bool               # reached through _rebuild_from_type_v2
    type_name: str | None
    wrapper_state: Any
    via_parameter: bool


@dataclass
class LoadInfo:
    prefix: str
    records: list
    pids: list = field(default_factory=list)           # persistent ids in the order met
    globals: list = field(default_factory=list)        # (module, name) in the order resolved
    tensor_calls: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# unpickler


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, info: LoadInfo,
                 extra_globals: dict | None, extra_storage: dict | None):
        super().__init__(file)
        self._ms_storage = {**MSADAPTER_STORAGE, **(extra_storage or {})}
        self._zf = zf
        self._prefix = prefix
        self._info = info
        self._storages: dict[str, _Storage] = {}
        self._extra = dict(extra_globals or {})
        self._wrap_depth = 0
        self._wrap_type: TypeMarker | None = None

    # -- globals
    def find_class(self, module, name):
        self._info.globals.append((module, name))
        key = (module, name)
        if key in self._extra:
            return self._extra[key]
        simple = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("argparse", "Namespace"): argparse.Namespace,
            ("_io", "BytesIO"): io.BytesIO,
            ("_codecs", "encode"): codecs.encode,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
        }
        if key in simple:
            return simple[key]
        if module == _MS_TYPING_MODULE and name in _MS_DTYPE_CLASSES:
            return _MS_DTYPE_CLASSES[name]
        if key in {("mindspore.common.tensor", "Tensor"), ("torch.nn.parameter", "Parameter"),
                   ("mindspore.common._stub_tensor", "StubTensor")}:
            return TypeMarker(f"{module}.{name}")
        if module == "torch" and name.endswith("Storage") and name in _STOCK_STORAGE:
            return _StockStorageType(name)
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return TorchDtype({"half": "float16", "float": "float32", "double": "float64",
                               "short": "int16", "int": "int32", "long": "int64"}.get(name, name))
        raise SpecReaderError(f"global {module}.{name} is not allowed by the spec")

    # -- storages
    def persistent_load(self, pid):
        self._info.pids.append(pid)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise SpecReaderError(f"unsupported persistent id {pid!r}")
        _, stype, key, location, numel = pid
        if isinstance(stype, str):
            dialect, table, name = "msadapter", self._ms_storage, stype
        elif isinstance(stype, _StockStorageType):
            dialect, table, name = "stock", _STOCK_STORAGE, stype.name
        else:
            raise SpecReaderError(f"storage type {stype!r} is neither a string nor a torch storage class")
        if name not in table:
            raise SpecReaderError(f"unsupported storage type {name!r}")
        if not isinstance(key, str):
            raise SpecReaderError(f"storage key {key!r} is not a string")
        if key in self._storages:
            st = self._storages[key]
            if st.storage_type != name:
                raise SpecReaderError(f"storage {key} used with two types")
            return st
        dtype, npdt = table[name]
        record = f"{self._prefix}/data/{key}"
        try:
            raw = self._zf.read(record)
        except KeyError:
            raise SpecReaderError(f"record {record} is missing") from None
        itemsize = np.dtype(npdt).itemsize
        if len(raw) % itemsize:
            raise SpecReaderError(f"record {record} has {len(raw)} bytes, not a multiple of {itemsize}")
        st = _Storage(dialect, name, dtype, key, location, numel, np.frombuffer(raw, npdt))
        self._storages[key] = st
        return st

    # -- rebuild functions
    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None, *more):
        if more:
            raise SpecReaderError(f"_rebuild_tensor_v2 with {7 + len(more)} arguments")
        if not isinstance(storage, _Storage):
            raise SpecReaderError("_rebuild_tensor_v2 without a storage")
        shape = tuple(int(s) for s in size)
        n = int(math.prod(shape))
        if storage.dialect == "msadapter":
            # the record holds exactly this tensor's elements in C order; the stride is ignored
            if storage_offset + n > storage.array.size:
                raise SpecReaderError(f"tensor of {n} elements at offset {storage_offset} does not "
                                      f"fit storage {storage.key} of {storage.array.size}")
            arr = storage.array[storage_offset:storage_offset + n].reshape(shape).copy()
        else:
            st = tuple(int(s) for s in stride)
            if len(st) != len(shape):
                raise SpecReaderError(f"stride {stride!r} does not match size {size!r}")
            if n:
                last = storage_offset + sum((d - 1) * s for d, s in zip(shape, st))
                if storage_offset < 0 or last >= storage.array.size or min(st, default=0) < 0:
                    raise SpecReaderError(f"view size {shape} stride {st} offset {storage_offset} "
                                          f"exceeds storage {storage.key}")
            base = storage.array[storage_offset:] if n else storage.array[:0]
            item = storage.array.itemsize
            arr = np.lib.stride_tricks.as_strided(
                base, shape=shape, strides=tuple(s * item for s in st)).copy() if n else \
                np.zeros(shape, storage.array.dtype)
        wrapped = self._wrap_depth > 0
        type_name = self._wrap_type.qualname if wrapped and self._wrap_type else None
        pid_like = ("storage", storage.storage_type, storage.key, storage.location, storage.numel)
        self._info.tensor_calls.append(TensorCall(
            pid=pid_like, args=(storage_offset, size, stride, requires_grad, backward_hooks, metadata),
            wrapped=wrapped, type_name=type_name, wrapper_state=None, via_parameter=False))
        return SpecTensor(
            dtype=storage.dtype, shape=shape, array=np.array(arr, order="C"), dialect=storage.dialect,
            storage_type=storage.storage_type, storage_key=storage.key, storage_numel=storage.numel,
            storage_offset=storage_offset, stride=stride, type_name=type_name,
            is_parameter=type_name is not None and type_name.endswith(".Parameter"),
            requires_grad=bool(requires_grad))

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        if func != self._rebuild_tensor_v2:
            raise SpecReaderError("_rebuild_from_type_v2 must wrap _rebuild_tensor_v2")
        if not isinstance(new_type, TypeMarker):
            raise SpecReaderError(f"tensor type {new_type!r} is not a tensor class")
        self._wrap_depth += 1
        self._wrap_type = new_type
        try:
            t = func(*args)
        finally:
            self._wrap_depth -= 1
            self._wrap_type = None
        self._info.tensor_calls[-1].wrapper_state = state
        if state:
            raise SpecReaderError(f"_rebuild_from_type_v2 with state {state!r}")
        return t

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        if not isinstance(data, SpecTensor):
            raise SpecReaderError("_rebuild_parameter of something that is not a tensor")
        data.is_parameter = True
        data.type_name = data.type_name or "torch.nn.parameter.Parameter"
        data.requires_grad = bool(requires_grad)
        self._info.tensor_calls[-1].via_parameter = True
        return data


def _open(path_or_bytes) -> tuple[bytes, zipfile.ZipFile]:
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data = bytes(path_or_bytes)
    else:
        data = Path(path_or_bytes).read_bytes()
    if not data.startswith(b"PK\x03\x04"):
        raise SpecReaderError("not a zip file (legacy or tar torch files are not in the spec)")
    return data, zipfile.ZipFile(io.BytesIO(data))


def load_with_info(path_or_bytes, *, extra_globals: dict | None = None,
                   extra_storage: dict | None = None) -> tuple[Any, LoadInfo]:
    """Read one file; return the object and a :class:`LoadInfo` of what the pickle used.

    ``extra_globals``: ``{(module, name): object}`` to allow beyond the spec's list.
    ``extra_storage``: ``{'<Name>Storage': (dtype name, numpy dtype str)}`` storage strings to
    accept beyond the spec's table (e.g. the hand-made ``'DoubleStorage'`` fixture)."""
    _, zf = _open(path_or_bytes)
    names = zf.namelist()
    if not names or "/" not in names[0]:
        raise SpecReaderError("zip file without a top directory")
    prefix = names[0].split("/", 1)[0]
    pkl = f"{prefix}/data.pkl"
    if pkl not in names:
        raise SpecReaderError(f"{pkl} missing")
    bo = f"{prefix}/byteorder"
    if bo in names and zf.read(bo) != b"little":
        raise SpecReaderError(f"byteorder {zf.read(bo)!r}: only little-endian files are supported")
    info = LoadInfo(prefix=prefix, records=names)
    up = _Unpickler(io.BytesIO(zf.read(pkl)), zf, prefix, info, extra_globals, extra_storage)
    obj = up.load()
    return obj, info


def load(path_or_bytes, *, extra_globals: dict | None = None, extra_storage: dict | None = None) -> Any:
    """Read an MSAdapter or stock torch zip file; tensors come back as :class:`SpecTensor`."""
    return load_with_info(path_or_bytes, extra_globals=extra_globals, extra_storage=extra_storage)[0]


def walk_tensors(obj, prefix: str = ""):
    """Yield ``(dotted path, SpecTensor)`` for every tensor in a loaded object."""
    if isinstance(obj, SpecTensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk_tensors(v, f"{prefix}.{i}" if prefix else str(i))
    elif isinstance(obj, argparse.Namespace):
        yield from walk_tensors(vars(obj), prefix)


# ------------------------------------------------------------------------------------------------
# byte-level format check


_ITEMSIZE = {k: np.dtype(v[1]).itemsize for k, v in MSADAPTER_STORAGE.items()}
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"), ("argparse", "Namespace"), ("_io", "BytesIO"),
    ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("mindspore.common.tensor", "Tensor"), ("torch.nn.parameter", "Parameter"),
    ("mindspore.common._stub_tensor", "StubTensor"),
} | {(_MS_TYPING_MODULE, k) for k in _MS_DTYPE_KINDS}
_TENSOR_TYPES = {"mindspore.common.tensor.Tensor", "torch.nn.parameter.Parameter",
                 "mindspore.common._stub_tensor.StubTensor"}


def _local_headers(data: bytes, zf: zipfile.ZipFile) -> list[dict]:
    """The records in file order, from their local headers (sizes from the central directory,
    since a writer that streams puts them in a data descriptor after the payload instead)."""
    out = []
    for info in sorted(zf.infolist(), key=lambda i: i.header_offset):
        pos = info.header_offset
        if data[pos:pos + 4] != b"PK\x03\x04":
            raise SpecReaderError(f"no local header at {pos} for {info.filename}")
        (_sig, _ver, flags, method, mtime, mdate, _crc, _cs, _us, nlen, xlen) = struct.unpack_from(
            "<IHHHHHIIIHH", data, pos)
        name = data[pos + 30:pos + 30 + nlen].decode("utf-8")
        payload = pos + 30 + nlen + xlen
        end = payload + info.compress_size
        if flags & 0x08:  # data descriptor (optional signature, crc, sizes)
            end += (4 if data[end:end + 4] == b"PK\x07\x08" else 0) + 12
        out.append(dict(name=name, offset=pos, flags=flags, method=method, extra_len=xlen,
                        payload=payload, size=info.compress_size, end=end, time=(mdate, mtime)))
    return out


def _contiguous_stride(shape) -> list:
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= max(d, 1)
    return list(reversed(st))


def _pickle_ops_problems(pkl: bytes) -> list[str]:
    problems = []
    ops = [(op.name, arg) for op, arg, _pos in pickletools.genops(pkl)]
    if not ops or ops[0] != ("PROTO", 2):
        problems.append(f"pickle does not start with PROTO 2: {ops[:1]}")
    memo_ops = {"BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"}
    plain = [(n, a) for n, a in ops if n not in memo_ops]
    for i, (name, arg) in enumerate(plain):
        if name in ("STACK_GLOBAL", "INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
            problems.append(f"pickle opcode {name} (the shim's protocol-2 pickles use GLOBAL/REDUCE/NEWOBJ)")
        if name != "GLOBAL":
            continue
        module, _, cls = arg.partition(" ")
        if module == "torch" and cls.endswith("Storage"):
            problems.append(f"stock storage class global torch.{cls} (MSAdapter writes the storage type as a string)")
        elif module == "torch":
            problems.append(f"stock torch global torch.{cls} (dtypes must be MindSpore typing objects)")
        elif (module, cls) == ("torch._utils", "_rebuild_parameter"):
            problems.append("stock _rebuild_parameter (MSAdapter wraps Parameters in _rebuild_from_type_v2)")
        elif (module, cls) not in _ALLOWED_GLOBALS:
            problems.append(f"global {module}.{cls} is not one the spec lists")
        if module == _MS_TYPING_MODULE and cls == "Bool":
            seq = [n for n, _ in plain[i + 1:i + 5]]
            if seq != ["EMPTY_TUPLE", "NEWOBJ", "EMPTY_TUPLE", "BUILD"]:
                problems.append(f"{module}.{cls} is not pickled as EMPTY_TUPLE NEWOBJ () BUILD: {plain[i + 1:i + 5]}")
        elif module == _MS_TYPING_MODULE:
            seq = [n for n, _ in plain[i + 1:i + 6]]
            nb = plain[i + 3][1] if len(plain) > i + 3 else None
            if len(seq) < 5 or seq[:2] != ["EMPTY_TUPLE", "NEWOBJ"] or \
                    seq[2] not in ("BININT1", "BININT2", "BININT") or seq[3:] != ["TUPLE1", "BUILD"] \
                    or not isinstance(nb, int):
                problems.append(f"{module}.{cls} is not pickled as EMPTY_TUPLE NEWOBJ (nbits,) BUILD: "
                                f"{plain[i + 1:i + 6]}")
    return problems


def msadapter_file_problems(path_or_bytes, *, allow_int32: bool = False,
                            require_contiguous: bool = True, stride_type: type | None = list) -> list[str]:
    """Every way in which the file differs from what MindSpeed-Core-MS r0.2.0's MSAdapter
    ``torch.save`` writes (spec sections 1-2).  Empty list = conforming.

    ``allow_int32``: accept ``IntStorage`` (the shim writes it, but no MindSpore-side reader can
    read it back).  ``require_contiguous``: every recorded stride must be the C-contiguous one
    (Megatron checkpoints hold only such tensors).  ``stride_type``: the recorded stride's Python
    type (list with MindSpore 2.10; ``None`` accepts list or tuple)."""
    problems: list[str] = []
    data, zf = _open(path_or_bytes)
    headers = _local_headers(data, zf)
    names = [h["name"] for h in headers]
    if names != [i.filename for i in zf.infolist()]:
        problems.append("the central directory lists the records in another order than the file holds them")
    if headers and headers[0]["offset"] != 0:
        problems.append(f"{headers[0]['offset']} bytes before the first record")

    # -- container
    for h in headers:
        if not h["name"].startswith("archive/"):
            problems.append(f"record {h['name']!r} is not under archive/")
        if h["method"] != zipfile.ZIP_STORED:
            problems.append(f"record {h['name']} is compressed (method {h['method']})")
        if h["extra_len"]:
            problems.append(f"record {h['name']} has a {h['extra_len']}-byte local extra field "
                            "(stock torch's 64-byte alignment padding)")
    for a, b in zip(headers, headers[1:]):
        if a["end"] != b["offset"]:
            problems.append(f"{b['offset'] - a['end']} bytes between records {a['name']} and {b['name']}")
    for bad in (".format_version", ".storage_alignment", ".data/serialization_id"):
        if any(n.endswith("/" + bad) or n.endswith(bad) for n in names):
            problems.append(f"stock-only record {bad} present")
    for h in headers:
        if h["flags"] & 0x08:
            problems.append(f"record {h['name']} has a data descriptor (zipfile writes none to a seekable file)")
    fixed = ["archive/data.pkl", "archive/version", "archive/byteorder"]
    if names[:3] != fixed:
        problems.append(f"first records are {names[:3]}, expected {fixed}")
    if "archive/version" in names and zf.read("archive/version") != b"3":
        problems.append(f"version record is {zf.read('archive/version')!r}, expected b'3' (no newline)")
    if "archive/byteorder" in names and zf.read("archive/byteorder") != b"little":
        problems.append(f"byteorder record is {zf.read('archive/byteorder')!r}")
    data_names = names[3:]
    keys = [n[len("archive/data/"):] for n in data_names if n.startswith("archive/data/")]
    if len(keys) != len(data_names):
        problems.append(f"unexpected records {[n for n in data_names if not n.startswith('archive/data/')]}")
    if keys != sorted(keys):
        problems.append(f"data records not sorted as strings: {keys}")
    if sorted(keys, key=lambda k: int(k) if k.isdigit() else -1) != [str(i) for i in range(len(keys))]:
        problems.append(f"storage keys are not the decimal strings 0..{len(keys) - 1}: {keys}")

    prefix = names[0].split("/", 1)[0] if names else "archive"
    if f"{prefix}/data.pkl" not in names:
        return problems + [f"{prefix}/data.pkl missing"]
    pkl = zf.read(f"{prefix}/data.pkl")
    problems += _pickle_ops_problems(pkl)

    # -- pickle semantics
    try:
        obj, info = load_with_info(data)
    except Exception as e:  # noqa: BLE001 - reported as a problem
        return problems + [f"spec reader failed: {type(e).__name__}: {e}"]
    seen_keys: list[str] = []
    for pid in info.pids:
        if not (isinstance(pid, tuple) and len(pid) == 5):
            problems.append(f"persistent id {pid!r} is not a 5-tuple")
            continue
        tag, stype, key, loc, numel = pid
        if tag != "storage" or type(stype) is not str or type(key) is not str or loc != "cpu" \
                or type(numel) is not int:
            problems.append(f"persistent id {pid!r} is not ('storage', '<Name>Storage', '<key>', 'cpu', numel)")
            continue
        if stype not in MSADAPTER_STORAGE:
            problems.append(f"storage type {stype!r} is not one the shim writes")
        elif stype == "IntStorage" and not allow_int32:
            problems.append("IntStorage (int32): no MindSpore-side reader can read it")
        if key not in seen_keys:
            seen_keys.append(key)
            rec = f"archive/data/{key}"
            if rec in names and stype in _ITEMSIZE and zf.getinfo(rec).file_size != numel * _ITEMSIZE[stype]:
                problems.append(f"record {rec} holds {zf.getinfo(rec).file_size} bytes, "
                                f"pid says {numel} x {_ITEMSIZE[stype]}")
        else:
            problems.append(f"storage {key} is referenced by two persistent ids (no sharing in MSAdapter files)")
    if seen_keys != [str(i) for i in range(len(seen_keys))]:
        problems.append(f"storage keys not given out as 0, 1, 2, ... in pickling order: {seen_keys}")
    if sorted(seen_keys) != sorted(keys):
        problems.append(f"storages in the pickle {sorted(seen_keys)} != data records {sorted(keys)}")
    for tc in info.tensor_calls:
        where = f"tensor in storage {tc.pid[2]}"
        if not tc.wrapped:
            problems.append(f"{where}: _rebuild_tensor_v2 not wrapped in _rebuild_from_type_v2")
        if tc.via_parameter:
            problems.append(f"{where}: stock _rebuild_parameter")
        if tc.type_name not in _TENSOR_TYPES:
            problems.append(f"{where}: tensor type {tc.type_name!r}")
        if tc.wrapper_state is not None:
            problems.append(f"{where}: _rebuild_from_type_v2 state {tc.wrapper_state!r} is not None")
        offset, size, stride, req, hooks, meta = tc.args
        if offset != 0:
            problems.append(f"{where}: storage offset {offset}")
        if type(size) is not tuple or not all(type(s) is int for s in size):
            problems.append(f"{where}: size {size!r} is not a tuple of ints")
            continue
        if math.prod(size) != tc.pid[4]:
            problems.append(f"{where}: size {size} but storage numel {tc.pid[4]}")
        if stride_type is not None and type(stride) is not stride_type:
            problems.append(f"{where}: stride {stride!r} is a {type(stride).__name__}, "
                            f"expected {stride_type.__name__}")
        elif not isinstance(stride, (list, tuple)) or len(stride) != len(size):
            problems.append(f"{where}: stride {stride!r} does not fit size {size}")
        elif require_contiguous and list(stride) != _contiguous_stride(size):
            problems.append(f"{where}: stride {stride!r} is not C-contiguous for size {size}")
        if req is not False:
            problems.append(f"{where}: requires_grad {req!r}")
        if hooks is not None:
            problems.append(f"{where}: backward hooks {hooks!r} (MSAdapter writes None)")
        if meta is not None:
            problems.append(f"{where}: metadata {meta!r} (MSAdapter writes None as a 7th argument)")
    return problems


def check_msadapter_file(path_or_bytes, **options) -> None:
    """Raise :class:`MSAdapterFormatError` listing every deviation from the MSAdapter r0.2.0 format
    (record order, ``archive/`` prefix, ``version`` = ``3``, no stock-only records, no alignment
    padding, decimal storage keys sorted as strings, string storage types in the persistent ids,
    ``_rebuild_from_type_v2`` wrapping, MindSpore dtype globals).  Options as for
    :func:`msadapter_file_problems`."""
    problems = msadapter_file_problems(path_or_bytes, **options)
    if problems:
        name = path_or_bytes if not isinstance(path_or_bytes, (bytes, bytearray)) else "<bytes>"
        raise MSAdapterFormatError(f"{name}: not in MSAdapter r0.2.0 format:\n  " + "\n  ".join(problems))
