"""Pick the reader or writer for a file by its format, so the executor and `inspect` stay
format-agnostic."""

from __future__ import annotations

from pathlib import Path

from ckptmap.errors import CkptmapError

TENSOR_FORMATS = ("ckpt", "safetensors")


def open_writer(fmt: str, path, entries, metadata=None, *, crc: bool = False):
    """A writer of ``entries`` [(name, dtype, shape)] in that order at ``path`` (the caller's temporary
    name: durability and the rename are ``ckptmap.atomic``'s)."""
    if fmt == "ckpt":
        from ckptmap.formats.mindspore_ckpt import CkptWriter
        return CkptWriter(path, entries, metadata, crc=crc)
    if fmt == "safetensors":
        from ckptmap.formats.safetensors_io import SafetensorsWriter
        return SafetensorsWriter(path, entries, metadata)
    raise CkptmapError(f"cannot write tensor format {fmt!r}; use one of {', '.join(TENSOR_FORMATS)}")


def open_reader(path):
    """A reader (``formats/base.py``: keys, spec, array, byte_range, close) for a source file, chosen by
    suffix, or for a torch_dist checkpoint folder (``formats/torch_dist.py``)."""
    path = Path(path)
    if not path.exists():
        raise CkptmapError(f"source file {path} does not exist")
    if path.is_dir():
        from ckptmap.formats.torch_dist import TorchDistCheckpoint, is_torch_dist_dir
        if is_torch_dist_dir(path):
            return TorchDistCheckpoint(path)
        raise CkptmapError(f"{path} is a folder but not a torch_dist checkpoint (no .metadata); ckptmap reads .pt, "
                           f".ckpt and .safetensors files and torch_dist iter_* folders")
    suffix = path.suffix
    if suffix == ".ckpt":
        from ckptmap.formats.mindspore_ckpt import CkptReader
        return CkptReader(path)
    if suffix == ".safetensors":
        from ckptmap.formats.safetensors_io import SafetensorsReader
        return SafetensorsReader(path)
    if suffix == ".pt":
        from ckptmap.formats.megatron_files import PtFile
        return PtFile(path)
    raise CkptmapError(f"{path}: unknown file type {suffix!r}; ckptmap reads .pt, .ckpt and .safetensors")
