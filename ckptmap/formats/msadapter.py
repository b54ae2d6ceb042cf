"""The MSAdapter dialect of the torch zip format: what MindSpeed-Core-MS (r0.2 – r0.5) writes when
Megatron / MindSpeed-LLM train on MindSpore through its PyTorch shim MSAdapter, whose ``torch.save``
is not PyTorch's. Stock ``torch.load`` cannot read these files. The full spec is
``shared/fixtures/msadapter-r0.2.0/README.md``; this module holds the vocabulary both directions
share (storage strings, tensor classes, MindSpore dtype objects). The reading hooks live in
``torch_zip_reader`` (``MSADAPTER_READ``), the writing hooks in ``torch_zip_writer``
(``save_streaming(..., dialect="msadapter")``), the translation between dialects in
``dialect_translate``.

Differences from stock ``torch.save`` (same zip-of-pickle idea)::

    container   Python zipfile, STORED, no 64-byte alignment, prefix always ``archive/``;
                records data.pkl, version (``3``, no newline), byteorder, data/<key> sorted as
                strings; no .format_version, .storage_alignment, .data/serialization_id;
                entry timestamps = wall clock of the save (ckptmap writes 1980-01-01 00:00:00)
    storage id  ('storage', '<Name>Storage', '<key>', 'cpu', numel): the storage type is a plain
                *string*; one record per tensor holding exactly its elements in C order (no sharing,
                offset 0; a 0-d tensor has numel 1, an empty one 0)
    tensor      torch._tensor._rebuild_from_type_v2(torch._utils._rebuild_tensor_v2, <class>,
                (pid, 0, size tuple, stride LIST, False, None, None), None), <class> one of
                mindspore.common.tensor.Tensor, mindspore.common._stub_tensor.StubTensor (older
                MindSpore) and torch.nn.parameter.Parameter (the shim's Parameter). The stride is the
                view's own, but the bytes are always C order: readers must ignore it.
    dtype       MindSpore dtype objects: GLOBAL mindspore._c_expression.typing <Float|BFloat|Int|UInt|Bool>,
                EMPTY_TUPLE NEWOBJ, BUILD (nbits,) — Bool with the empty state ().
    state dict  OrderedDict._metadata holds {} per module (stock: {'version': 1}).
    RNG         16-byte MindSpore generator states (seed, offset as two int64), not PyTorch's.

Storage kinds: the shim writes Half, Float, BFloat16, Long, Int, Byte, Bool; its writer fails for
every other dtype, and neither MindSpore-side reader (MSAdapter's ``torch.load``, MindSpeed-Core-MS
``load_ms_weights``) can read IntStorage. ckptmap writes only the six both readers know.
"""

from __future__ import annotations

from ckptmap.errors import CkptmapError
from ckptmap.formats.safe_unpickler import STORAGE_TYPE_OF, STORAGE_TYPES, StandIn, StandInClass

__all__ = ["ARCHIVE", "VERSION_RECORD", "WRITABLE_DTYPES", "TENSOR_CLASSES", "PARAMETER_CLASS", "MS_TYPING",
           "ms_dtype", "ms_dtype_name", "is_ms_dtype", "storage_string", "read_storage_dtype"]

ARCHIVE = "archive"
VERSION_RECORD = b"3"
MS_TYPING = "mindspore._c_expression.typing"

# the six storage kinds both MindSpore-side readers know (no IntStorage)
WRITABLE_DTYPES = ("float16", "float32", "bfloat16", "int64", "uint8", "bool")
# what the shim's writer itself writes (IntStorage too)
_SHIM_STORAGE = ("HalfStorage", "FloatStorage", "BFloat16Storage", "LongStorage", "IntStorage", "ByteStorage",
                 "BoolStorage")

TENSOR_CLASS = ("mindspore.common.tensor", "Tensor")
STUB_TENSOR_CLASS = ("mindspore.common._stub_tensor", "StubTensor")
PARAMETER_CLASS = ("torch.nn.parameter", "Parameter")
TENSOR_CLASSES = (TENSOR_CLASS, STUB_TENSOR_CLASS, PARAMETER_CLASS)

# one string object per storage name, like the shim's storage_map values (the pickle memo-shares them)
_STORAGE_STRINGS = {dt: name for dt, name in STORAGE_TYPE_OF.items()}


def storage_string(dtype: str, where: str) -> str:
    """The persistent id's storage string for a tensor of ``dtype``; only the six kinds MindSpore-side
    readers know."""
    if dtype not in WRITABLE_DTYPES:
        extra = (" (IntStorage: the shim writes it, but neither MSAdapter's torch.load nor MindSpeed-Core-MS "
                 "load_ms_weights can read it back)" if dtype == "int32" else
                 " (MSAdapter's torch.save has no storage type for it)")
        raise CkptmapError(f"{where} is {'an' if dtype[0] in 'aeiou' else 'a'} {dtype} tensor{extra}; MSAdapter files hold only "
                           f"{', '.join(WRITABLE_DTYPES)} — convert that entry (e.g. int32 -> int64, "
                           f"float64 -> float32) before writing the MSAdapter dialect")
    return _STORAGE_STRINGS[dtype]


def read_storage_dtype(stype) -> str | None:
    """The dtype a persistent id's *string* storage type names (MSAdapter), else None. Every storage
    name torch knows is accepted for reading, whether or not the shim writes it (a hand-made
    ``DoubleStorage`` still means float64); the writers decide what they accept."""
    if type(stype) is not str:
        return None
    return STORAGE_TYPES.get(stype) if stype != "UntypedStorage" else None


# -------------------------------------------------------------------------------------------------
# MindSpore dtype objects (inert stand-ins; mindspore is never imported)

_MS_DTYPES = {"float16": ("Float", 16), "float32": ("Float", 32), "float64": ("Float", 64),
              "bfloat16": ("BFloat", 16), "int8": ("Int", 8), "int16": ("Int", 16), "int32": ("Int", 32),
              "int64": ("Int", 64), "uint8": ("UInt", 8), "uint16": ("UInt", 16), "uint32": ("UInt", 32),
              "uint64": ("UInt", 64), "bool": ("Bool", None)}


def ms_dtype(name: str) -> StandIn:
    """A new MindSpore dtype object for ckptmap dtype (or torch dtype) ``name``, pickling as
    ``GLOBAL mindspore._c_expression.typing <Class>``, ``EMPTY_TUPLE NEWOBJ``, ``BUILD (nbits,)``
    (``Bool``: state ``()``), exactly as the shim pickles ``mindspore.bfloat16`` etc."""
    try:
        cls_name, bits = _MS_DTYPES[name]
    except KeyError:
        raise CkptmapError(f"MindSpore has no dtype object for {name!r}") from None
    cls = StandInClass.make(MS_TYPING, cls_name)
    obj = cls.__new__(cls)
    obj.__setstate__(() if bits is None else (bits,))
    return obj


def is_ms_dtype(obj) -> bool:
    return isinstance(obj, StandIn) and obj.module == MS_TYPING


def ms_dtype_name(obj) -> str | None:
    """The dtype name (float32, bfloat16, uint16, bool, …) of a MindSpore dtype stand-in, else None."""
    if not is_ms_dtype(obj) or obj.args or obj.kind != "newobj":
        return None
    state = obj.state
    if obj.qualname == "Bool":
        return "bool" if state in ((), (8,)) else None
    if not (isinstance(state, tuple) and len(state) == 1 and type(state[0]) is int):
        return None
    for name, (cls_name, bits) in _MS_DTYPES.items():
        if cls_name == obj.qualname and bits == state[0]:
            return name
    return None
