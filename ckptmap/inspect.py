"""`ckptmap inspect PATH`: keys, shapes and dtypes of any supported file or checkpoint directory."""

from __future__ import annotations

import math
from pathlib import Path

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import registry

SUFFIXES = (".pt", ".ckpt", ".safetensors")


def inspect_file(path: Path, out) -> None:
    reader = registry.open_reader(path)
    try:
        keys = reader.keys()
        total = 0
        dialect = getattr(reader, "dialect", None)  # torch zip files: who wrote them
        shown = f", {dialect} dialect" if dialect else ""
        print(f"{path}  ({len(keys)} tensors{shown})", file=out)
        width = max((len(k) for k in keys), default=0)
        for key in keys:
            dtype, shape = reader.spec(key)
            nbytes = math.prod(shape) * dtypes.itemsize(dtype) if dtype in dtypes.TABLE else 0
            total += nbytes
            print(f"  {key.ljust(width)}  {dtype:9s} {list(shape)}", file=out)
        print(f"  total {total} bytes of tensor data", file=out)
    finally:
        reader.close()


def inspect_path(path, out) -> None:
    path = Path(path)
    if not path.exists():
        raise CkptmapError(f"{path} does not exist")
    if path.is_file():
        inspect_file(path, out)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise CkptmapError(f"{path} holds no .pt, .ckpt or .safetensors files")
    for f in files:
        inspect_file(f, out)
        print(file=out)
