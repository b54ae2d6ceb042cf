"""Canonical dtype names shared by every module, and their torch equivalents.

Formats translate between these names and their own spelling (MindSpore ``Float32``,
safetensors ``F32``, ...) inside ``ckptmap/formats/``; everything else speaks these names.
"""

import torch

from ckptmap.errors import CkptmapError

TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES_BY_TORCH = {v: k for k, v in TORCH_DTYPES.items()}


def to_torch(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise CkptmapError(f"unknown dtype {name!r}; known dtypes: {', '.join(TORCH_DTYPES)}") from None


def name_of(dtype: torch.dtype) -> str:
    try:
        return _NAMES_BY_TORCH[dtype]
    except KeyError:
        raise CkptmapError(f"dtype {dtype} is not supported by ckptmap") from None


def itemsize(name: str) -> int:
    return to_torch(name).itemsize
