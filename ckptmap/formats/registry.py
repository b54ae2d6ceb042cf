"""Pick the reader or writer for a file by its format, so the executor and `inspect` stay
format-agnostic."""

from __future__ import annotations

import os
import stat
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
    # one stat and no pathlib parsing for a .ckpt: planning opens one per rank (16,384 at the largest)
    text = os.fspath(path)
    try:
        is_dir = stat.S_ISDIR(os.stat(text).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        raise CkptmapError(f"source file {text} does not exist") from None
    except OSError as e:
        raise CkptmapError(f"cannot read source file {text}: {e.strerror or e}") from None
    if not is_dir and os.path.splitext(text)[1] == ".ckpt":
        from ckptmap.formats.mindspore_ckpt import CkptReader
        return CkptReader(text)
    path = Path(text)
    if is_dir:
        from ckptmap.formats.torch_dist import TorchDistCheckpoint, is_torch_dist_dir
        if is_torch_dist_dir(path):
            return TorchDistCheckpoint(path)
        raise CkptmapError(f"{path} is a folder but not a torch_dist checkpoint (no .metadata); ckptmap reads .pt, "
                           f".ckpt and .safetensors files and torch_dist iter_* folders")
    suffix = path.suffix
    if suffix == ".safetensors":
        from ckptmap.formats.safetensors_io import SafetensorsReader
        return SafetensorsReader(path)
    if suffix == ".pt":
        from ckptmap.formats.megatron_files import PtFile
        return PtFile(path)
    raise CkptmapError(f"{path}: unknown file type {suffix!r}; ckptmap reads .pt, .ckpt and .safetensors")
