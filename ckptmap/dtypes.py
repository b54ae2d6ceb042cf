"""Canonical dtype names shared by every module, framework-neutral.

Formats translate between these names and their own spelling (MindSpore ``Float32``, safetensors
``F32``, torch ``torch.bfloat16``, a pickled torch storage type, …) inside ``ckptmap/formats/``;
everything else speaks these names. Data move as numpy arrays of the dtype's *storage* type:
numpy has no bfloat16, so bfloat16 values travel as their 16-bit patterns in ``uint16`` arrays, and
the plan, not the array, says which dtype they are. Nothing here imports torch; :func:`to_torch`
does, for the callers that hand tensors to torch (tests, the Megatron hook).
"""

from __future__ import annotations

import attrs
import numpy as np

from ckptmap.errors import CkptmapError


@attrs.frozen
class DType:
    name: str
    itemsize: int
    kind: str            # "float", "int", "uint", "bool"
    storage: np.dtype    # the numpy dtype that holds the values' bytes

    @property
    def is_float(self) -> bool:
        return self.kind == "float"


def _d(name, kind, storage) -> DType:
    st = np.dtype(storage)
    return DType(name, st.itemsize, kind, st)


TABLE: dict[str, DType] = {d.name: d for d in (
    _d("float64", "float", "<f8"),
    _d("float32", "float", "<f4"),
    _d("float16", "float", "<f2"),
    _d("bfloat16", "float", "<u2"),
    _d("int64", "int", "<i8"),
    _d("int32", "int", "<i4"),
    _d("int16", "int", "<i2"),
    _d("int8", "int", "i1"),
    _d("uint8", "uint", "u1"),
    _d("bool", "bool", "?"),
)}
NAMES = tuple(TABLE)
FLOAT_NAMES = tuple(n for n, d in TABLE.items() if d.is_float)

_NUMPY_NAMES = {np.dtype(k): k for k in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                                          "uint8", "bool")}


def get(name: str) -> DType:
    try:
        return TABLE[name]
    except (KeyError, TypeError):
        raise CkptmapError(f"unknown dtype {name!r}; known dtypes: {', '.join(NAMES)}") from None


def itemsize(name: str) -> int:
    return get(name).itemsize


def storage(name: str) -> np.dtype:
    """The numpy dtype holding ``name``'s bytes (``uint16`` for bfloat16)."""
    return get(name).storage


def name_of(dtype) -> str:
    """The canonical name of a dtype object of any framework: a torch dtype, a numpy dtype (not
    bfloat16: numpy has none), or a canonical name."""
    if isinstance(dtype, str):
        return get(dtype).name
    if isinstance(dtype, np.dtype):
        try:
            return _NUMPY_NAMES[dtype]
        except KeyError:
            raise CkptmapError(f"dtype {dtype} is not supported by ckptmap") from None
    if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":  # without importing torch
        name = str(dtype).rpartition(".")[2]
        if name in TABLE:
            return name
    raise CkptmapError(f"dtype {dtype} is not supported by ckptmap")


def to_torch(name: str):
    import torch  # only callers that hand data to torch pay for it

    return getattr(torch, get(name).name)


def array_view(data, name: str, shape) -> np.ndarray:
    """``data`` (a bytes-like object or uint8 array) as a C-order array of ``name``'s storage type."""
    return np.frombuffer(data, dtype=storage(name)).reshape(shape)


def as_array(value, dtype: str | None = None) -> tuple[str, np.ndarray]:
    """``(dtype name, array of that dtype's storage type)`` for a numpy array or a torch tensor (the
    latter only converted, never imported for). ``dtype`` names what a numpy array holds when numpy
    cannot say it (bfloat16 in ``uint16``); a mismatch is an error, never a cast."""
    if type(value).__module__.startswith("torch"):
        t = value.detach().cpu()
        name = name_of(t.dtype)
        import torch
        arr = t.view(torch.int16).numpy().view(np.uint16) if name == "bfloat16" else t.numpy()
    elif isinstance(value, np.ndarray):
        arr = value
        if dtype is not None and arr.dtype == storage(dtype):
            name = dtype
        else:
            name = name_of(arr.dtype)
    else:
        raise CkptmapError(f"expected a numpy array or a torch tensor, got {type(value).__name__}")
    if dtype is not None and name != dtype:
        raise CkptmapError(f"expected {dtype} data, got {name}; ckptmap never casts silently")
    return name, arr
