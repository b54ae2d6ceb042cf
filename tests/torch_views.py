"""Tests compare ckptmap's numpy arrays with torch values: these helpers turn a reader's arrays into
torch tensors of the dtype the file declares (bfloat16 travels as uint16 in ckptmap)."""

import numpy as np
import torch

from ckptmap.formats import registry


def as_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    array = np.asarray(array, order="C")
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def read_tensor(reader, key) -> torch.Tensor:
    value = reader.get(key)
    return value if isinstance(value, str) else as_torch(value, reader.spec(key).dtype)


def load_torch(path) -> dict:
    """Every tensor (and string) of a .ckpt / .safetensors / .pt file as torch tensors, in file order."""
    reader = registry.open_reader(path)
    try:
        return {k: read_tensor(reader, k) for k in reader.keys()}
    finally:
        reader.close()
