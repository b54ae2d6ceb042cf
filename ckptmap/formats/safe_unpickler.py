"""The restricted unpickler every ckptmap reader of pickled checkpoints shares.

It never imports a module named in a pickle and never calls anything from it except a fixed
allow-list of side-effect-free constructors:

* allow-list (real objects): ``collections.OrderedDict``, ``argparse.Namespace``,
  ``types.SimpleNamespace``, ``io.BytesIO`` (TransformerEngine's ``_extra_state``), numpy's
  array/scalar/dtype reconstruction, ``_codecs.encode`` (only ``(str, 'latin1')``), ``builtins``
  constructors of plain values (set, frozenset, slice, complex, bytes, bytearray, range, int, float,
  str, bool, tuple, list, dict, object), ``builtins.getattr`` only to reach a nested class of a
  stand-in class, and ``copyreg._reconstructor`` / ``__newobj__`` / ``__newobj_ex__``
  (re-implemented: they only build stand-ins or allow-listed objects).
* torch's own globals, without importing torch: every ``torch.<dtype>`` and every storage type
  (``torch.BFloat16Storage``) become :class:`GlobalMarker` values that know their dtype and re-pickle
  as the same GLOBAL; ``torch.Size`` and ``torch.device`` become stand-ins; the tensor rebuild
  functions are supplied by the format that reads tensors (``torch_zip_reader``).
* deny-list (:class:`CkptmapError`): everything else in ``builtins``, ``torch``, ``numpy``,
  ``copyreg``, ``_codecs`` and in modules whose members are code-execution gadgets (os, posix,
  subprocess, sys, importlib, runpy, shutil, pickle, marshal, types, code, ctypes, socket,
  functools, operator, ...; see ``DENIED_ROOTS``).
* everything else (``megatron.*``, ``transformer_engine.*``, ``mindspore.*``, ``enum``, user
  modules, ...): an inert stand-in. The referenced class becomes a :class:`StandInClass` (a class
  object that only remembers module and qualified name), calling it or ``__new__``-ing it yields a
  :class:`StandIn` that remembers the arguments, and BUILD / SETITEMS / APPENDS only store their data.
  A stand-in re-pickles as the same GLOBAL and the same reconstruction, so a file is written back
  exactly as it was read (an ``enum`` member such as ``signal.Signals.SIGTERM`` or
  ``megatron.core.enums.ModelType.encoder_or_decoder`` included).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import copyreg
import io
import pickle
import threading
import types

import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError

__all__ = ["StandInClass", "StandIn", "GlobalMarker", "RestrictedUnpickler", "Refused", "dtype_name",
           "torch_global"]

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


class GlobalMarker:
    """An allow-listed global that is a *value*, not a constructor: a torch dtype (``torch.bfloat16``,
    ``dtype`` = its ckptmap name, or None for dtypes ckptmap does not convert), a storage type
    (``torch.BFloat16Storage``), a tensor type (``torch.nn.parameter.Parameter``) or a rebuild
    function name the writer needs. One object per global, so identity, equality and hashing work
    (a ``(bf16, fp32)`` dict key of ``distrib_optim.pt`` stays a usable key); re-pickles as its
    original GLOBAL."""

    __slots__ = ("module", "qualname", "dtype")
    _cache: dict = {}

    def __new__(cls, module: str, qualname: str, dtype: str | None = None):
        key = (module, qualname)
        hit = cls._cache.get(key)
        if hit is None:
            hit = object.__new__(cls)
            hit.module, hit.qualname, hit.dtype = module, qualname, dtype
            cls._cache[key] = hit
        return hit

    def __repr__(self):
        return f"{self.module}.{self.qualname}"

    def __reduce__(self):
        return self.qualname  # ckptmap's picklers write module/qualname (see torch_zip_writer)

    def __call__(self, *args, **kwargs):  # callable for pickle's save_reduce; never runs anything
        raise TypeError(f"{self} is an inert marker of a torch global; it cannot be called")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def torch_global(module: str, qualname: str) -> GlobalMarker:
    """The marker of one of torch's value globals (``torch_global("torch", "bfloat16")``), for writers."""
    marker = GlobalMarker._cache.get((module, qualname))
    if marker is None:
        raise CkptmapError(f"internal error: {module}.{qualname} is not a torch global ckptmap knows")
    return marker


# -------------------------------------------------------------------------------------------------
# Allow / deny policy

# torch storage types by element dtype (UntypedStorage: bytes)
STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": None, "ComplexDoubleStorage": None,
    "UntypedStorage": "uint8",
}
STORAGE_TYPE_OF = {dt: name for name, dt in STORAGE_TYPES.items() if dt and name != "UntypedStorage"}
_STORAGE_MARKERS = {("torch", name): GlobalMarker("torch", name, dt) for name, dt in STORAGE_TYPES.items()}
_STORAGE_MARKERS[("torch.storage", "UntypedStorage")] = GlobalMarker("torch.storage", "UntypedStorage", "uint8")
TENSOR_TYPE_MARKERS = {key: GlobalMarker(*key) for key in (
    ("torch", "Tensor"), ("torch._tensor", "Tensor"), ("torch.nn.parameter", "Parameter"),
    ("torch.nn", "Parameter"))}

# every dtype torch pickles (torch.dtype.__reduce__ gives its canonical name)
_TORCH_DTYPES = {name: (name if name in dtypes.TABLE else None) for name in """
    float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex32 complex64 complex128
    uint16 uint32 uint64 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu
    float4_e2m1fn_x2 qint8 quint8 qint32 quint4x2 quint2x4 bits1x8 bits2x4 bits4x2 bits8 bits16
    int1 int2 int3 int4 int5 int6 int7 uint1 uint2 uint3 uint4 uint5 uint6 uint7
    """.split()}
_TORCH_DTYPE_MARKERS = {("torch", n): GlobalMarker("torch", n, dt) for n, dt in _TORCH_DTYPES.items()}
# the writer's own globals
for _key in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
             ("torch._tensor", "_rebuild_from_type_v2")):
    GlobalMarker(*_key)


def dtype_name(obj) -> str | None:
    """The ckptmap dtype name of a dtype *value* found in a pickle — a torch dtype global, a real
    torch dtype, or a MindSpore dtype object (a stand-in of ``mindspore._c_expression.typing``
    ``Float``/``BFloat``/``Int``/``UInt``/``Bool`` with state ``(nbits,)``) — else None."""
    if isinstance(obj, GlobalMarker):
        return obj.dtype if (obj.module, obj.qualname) in _TORCH_DTYPE_MARKERS else None
    if isinstance(obj, StandIn) and obj.module == "mindspore._c_expression.typing":
        state = obj.state
        bits = state[0] if isinstance(state, tuple) and len(state) == 1 and type(state[0]) is int else None
        kind = {"Float": "float", "BFloat": "bfloat", "Int": "int", "UInt": "uint"}.get(obj.qualname)
        if obj.qualname == "Bool" and state in (None, (), (8,)):
            return "bool"
        name = f"{kind}{bits}" if kind and bits else None
        return name if name in dtypes.TABLE else None
    if type(obj).__module__ == "torch" and type(obj).__name__ == "dtype":
        name = str(obj).rpartition(".")[2]
        return name if name in dtypes.TABLE else None
    return None


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

ALLOWED_OBJECTS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("types", "SimpleNamespace"): types.SimpleNamespace,
    ("_io", "BytesIO"): io.BytesIO,
    ("io", "BytesIO"): io.BytesIO,
    # inert stand-ins although their modules are denied: value types, never called for effect
    ("torch", "Size"): StandInClass.make("torch", "Size"),
    ("torch", "device"): StandInClass.make("torch", "device"),
    ("signal", "Signals"): StandInClass.make("signal", "Signals"),  # Megatron >= 0.10 args.exit_signal
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
    **_TORCH_DTYPE_MARKERS,
    **_STORAGE_MARKERS,
    **TENSOR_TYPE_MARKERS,
}

# Real classes that copyreg._reconstructor / __newobj__ may instantiate (their __new__ is C code).
_SAFE_NEW_CLASSES = frozenset({collections.OrderedDict, types.SimpleNamespace, io.BytesIO, set, frozenset,
                               complex, int, float, str, bool, tuple, list, dict, object, argparse.Namespace})
_SAFE_RECONSTRUCTOR_BASES = frozenset({object, dict, list, tuple, set, frozenset, int, float, str, bytes})

# Modules (and their submodules) whose globals are refused unless allow-listed above.
DENIED_ROOTS = frozenset("""
    builtins __builtin__ exceptions os posix nt posixpath ntpath subprocess _posixsubprocess sys
    importlib imp runpy shutil pickle _pickle cPickle pickletools marshal types code codeop ctypes
    _ctypes socket _socket pty webbrowser functools _functools operator _operator torch numpy
    copyreg copy_reg _codecs codecs io _io multiprocessing _multiprocessing threading _thread
    signal asyncio inspect gc pdb bdb timeit trace profile cProfile pydoc ssl http urllib urllib2
    ftplib smtplib telnetlib xmlrpc shelve dbm sqlite3 zipimport pkgutil site sysconfig distutils
    setuptools pip ensurepip venv compileall py_compile zipapp fcntl resource mmap select selectors
    dill cloudpickle joblib yaml jinja2 tempfile unittest doctest idlelib tkinter _winapi winreg
""".split())


def denied_message(path, module, name):
    return (f"refusing to load {path}: its pickle references {module}.{name}, which can execute code "
            f"or is not on ckptmap's allow-list of safe constructors; ckptmap never runs code from a "
            f"checkpoint — if this file is trusted, load it with torch.load(..., weights_only=False) in "
            f"a trusted environment, keep only tensors and plain data (dicts, lists, numbers, strings, "
            f"argparse.Namespace), save that with torch.save and give ckptmap the new file")


# -------------------------------------------------------------------------------------------------
# The unpickler


class Refused(CkptmapError):
    """A pickle named a global ckptmap will not load."""


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


class RestrictedUnpickler(pickle.Unpickler):
    """The policy above as a ``pickle.Unpickler``. A format subclasses it to add its own globals
    (``extra_globals``: tensor rebuild functions) and ``persistent_load``; :meth:`run` loads and
    finishes the namespaces; :func:`unpickle` wraps it with readable errors."""

    # globals resolved to this unpickler's own methods / namespace class (after the format's own
    # globals, before ALLOWED_OBJECTS): looked up per name rather than merged into a table per file,
    # which cost ~60 us a file at thousands of rank files
    _SPECIAL = {("argparse", "Namespace"): "namespace_cls", ("copyreg", "_reconstructor"): "_reconstructor",
                ("copyreg", "__newobj__"): "_newobj", ("copyreg", "__newobj_ex__"): "_newobj_ex",
                ("builtins", "getattr"): "_getattr"}

    def __init__(self, data: bytes, path, extra_globals: dict | None = None):
        self._source = io.BytesIO(data)
        super().__init__(self._source, encoding="utf-8")
        self.path = path
        self._ns_cls = None
        self.extra_globals = extra_globals or {}

    @property
    def namespace_cls(self):
        """This load's argparse.Namespace stand-in class, made on first use (a class costs ~70 us, and
        most rank files hold no Namespace). One per load, never reused: instances of one class share
        their attribute-name strings, and a re-save must see this pickle's own."""
        if self._ns_cls is None:
            self._ns_cls = type("Namespace", (_LoadingNamespaceBase,), {"_created": []})
        return self._ns_cls

    # --- globals ---
    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("a global name in the pickle is not a string")
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        obj = self.extra_globals.get(key)
        if obj is None:
            special = self._SPECIAL.get(key)
            obj = getattr(self, special) if special is not None else ALLOWED_OBJECTS.get(key)
        if obj is not None:
            return obj
        if module.split(".", 1)[0] in DENIED_ROOTS or not module or not name:
            raise Refused(denied_message(self.path, module, name))
        return StandInClass.make(module, name)

    def _getattr(self, obj, name, *default):
        # Protocol <= 3 pickles a nested class Outer.Inner as getattr(Outer, 'Inner').
        if isinstance(obj, StandInClass) and isinstance(name, str) and not default and name.isidentifier():
            return StandInClass.make(obj.__module__, f"{obj.__qualname__}.{name}")
        raise Refused(denied_message(self.path, "builtins", "getattr"))

    def _vet_class(self, cls, via):
        if isinstance(cls, StandInClass) or cls in _SAFE_NEW_CLASSES or (cls is not None and cls is self._ns_cls) \
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

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.200}")

    def run(self):
        root = self.load()
        cls = self._ns_cls
        if cls is not None:
            for ns in cls._created:  # never BUILT (empty namespaces)
                if type(ns) is cls:
                    ns.__class__ = argparse.Namespace
            cls._created.clear()
        return root


def unpickle(unpickler: RestrictedUnpickler, where: str):
    """``unpickler.run()`` with every failure turned into a CkptmapError naming ``where``."""
    try:
        return unpickler.run()
    except CkptmapError:
        raise
    except RecursionError:
        raise CkptmapError(f"{where}: the pickle nests too deeply to read safely; the file is corrupt or not a "
                           f"checkpoint") from None
    except Exception as e:  # any malformed pickle: never leak a raw traceback for bad input
        raise CkptmapError(f"{where} holds a malformed pickle ({type(e).__name__}: {str(e)[:300]}); the file is "
                           f"corrupt or not a checkpoint of the expected kind, save it again") from None
    finally:
        # the unpickler refers to itself (bound methods): without this, whatever it holds (a file
        # map) would live until the next garbage collection, and thousands of rank files would
        # exhaust the process's file handles. Its memo (every object it made: a whole tree, kept past
        # the caller's use of it) and its input (the pickle's bytes) are let go of too
        unpickler.memo = {}
        source = unpickler.__dict__.get("_source")
        if source is not None:
            source.close()
        unpickler.__dict__.clear()


def loads(data: bytes, path) -> object:
    """A plain pickle (no persistent ids) under the policy above."""
    return unpickle(RestrictedUnpickler(data, path), str(path))
