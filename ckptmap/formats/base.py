"""The small protocol between the executor and the file formats.

A format module owns one on-disk dialect and offers, for reading, an object with

    keys()            the tensor keys, in file order (the format's own flat key spelling)
    spec(key)         TensorSpec(dtype, shape) from metadata, no data read
    array(key)        a numpy array of the tensor's values: a zero-copy view of the mapped file where
                      the layout allows; dtype = ``ckptmap.dtypes.storage(spec.dtype)`` (bfloat16 as
                      uint16 bit patterns), shape = spec.shape
    byte_range(key)   FileRange(path, offset, nbytes) when the tensor's C-order bytes lie contiguous in
                      the file, else None: what lets the executor copy them kernel-side
    close()

and, for writing tensor files, a context manager ``open_writer(fmt, path, entries, …)`` whose
``write(name, array)`` is called once per declared entry, in order. ``formats/registry.py`` picks the
module by file suffix or format name, so the executor, ``verify`` and ``inspect`` stay
format-agnostic. Nothing outside ``ckptmap/formats/`` knows a file layout.
"""

from __future__ import annotations

from typing import NamedTuple

import attrs


class TensorSpec(NamedTuple):
    dtype: str
    shape: tuple[int, ...]


@attrs.frozen
class FileRange:
    path: str
    offset: int
    nbytes: int
    # the CRC-32 of exactly these bytes when their file records it (a whole torch zip record): a writer
    # that needs it copies them kernel-side and takes it instead of reading them (sub-ranges drop it)
    crc32: int | None = None


@attrs.frozen
class Hole:
    """A chunk of storage bytes a writer leaves unwritten (a hole of a sparse file, read back as zeros):
    for an intermediate file whose bytes are served from elsewhere, never for an output (``torch_zip_writer``
    records no CRC-32 for a record with a hole; see ``mapping/torch_dist_pt2ms.py``)."""

    nbytes: int
