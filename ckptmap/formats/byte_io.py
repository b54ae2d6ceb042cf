"""Moving runs of bytes between files without looking at them, and reading them in large chunks.

Most of a checkpoint conversion's bytes need no conversion (fp32 main params and Adam moments are
contiguous runs of ``distrib_optim.pt`` storages; a ``.ckpt`` / safetensors tensor is its raw
bytes): :func:`copy_range` lets the kernel copy them from the source file to the output file
(``copy_file_range``, else ``sendfile``), never through Python. :func:`read_chunks` reads a run
into one reused buffer with sequential ``preadv`` calls, for bytes that must be looked at (a cast,
a CRC): fewer page faults and no page-table growth compared with touching an ``mmap`` of the file.
"""

from __future__ import annotations

import errno
import mmap
import os

try:   # zlib-ng's CRC-32 (carry-less multiply): the same values, 2-3x zlib's speed; optional
    from zlib_ng.zlib_ng import crc32
except ImportError:
    from zlib import crc32

from ckptmap.formats.base import FileRange

CHUNK = 8 * 1024 * 1024
_KERNEL_COPY = hasattr(os, "copy_file_range")
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}


def _advise_sequential(fd: int, offset: int, n: int) -> None:
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass   # advice only


def copy_range(src: FileRange, out_fd: int, out_offset: int | None = None) -> None:
    """Write the bytes of ``src`` to ``out_fd`` at ``out_offset``, or (None) at its current position,
    which then advances by ``src.nbytes``. A source shorter than the range is an OSError (the file
    changed under us)."""
    global _KERNEL_COPY
    fd = os.open(src.path, os.O_RDONLY)
    try:
        _advise_sequential(fd, src.offset, src.nbytes)
        pos, end = src.offset, src.offset + src.nbytes
        while pos < end and _KERNEL_COPY:
            try:
                at = None if out_offset is None else out_offset + pos - src.offset
                n = os.copy_file_range(fd, out_fd, min(end - pos, 1 << 30), pos, at)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY or pos != src.offset:
                    raise
                _KERNEL_COPY = False   # this kernel / filesystem pair cannot: copy through a buffer
                break
            if n == 0:
                raise OSError(errno.EIO, f"{src.path} ends before byte {end} (at {pos}); the file changed")
            pos += n
        if pos < end:
            at = None if out_offset is None else out_offset + pos - src.offset
            for chunk in _pread_chunks(fd, src.path, pos, end - pos):
                if at is None:
                    _write_all(out_fd, chunk)
                else:
                    pwrite_all(out_fd, chunk, at)
                    at += len(chunk)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pread_chunks(fd: int, path: str, offset: int, nbytes: int, chunk: int = CHUNK):
    buf = bytearray(min(chunk, max(nbytes, 1)))
    view = memoryview(buf)
    pos, end = offset, offset + nbytes
    while pos < end:
        want = min(len(buf), end - pos)
        got = 0
        while got < want:   # whole chunks (a short read is retried), so callers may pair chunk streams
            n = os.preadv(fd, [view[got:want]], pos + got)
            if n == 0:
                raise OSError(errno.EIO, f"{path} ends before byte {end} (at {pos + got}); the file changed")
            got += n
        yield view[:want]
        pos += want


def read_chunks(src: FileRange, chunk: int = CHUNK):
    """The bytes of ``src`` as memoryviews of one reused buffer (each valid until the next is asked
    for), read sequentially: every chunk ``chunk`` bytes long but the last."""
    fd = os.open(src.path, os.O_RDONLY)
    try:
        _advise_sequential(fd, src.offset, src.nbytes)
        yield from _pread_chunks(fd, src.path, src.offset, src.nbytes, chunk)
    finally:
        os.close(fd)


_MAP_WINDOW = 64 * 1024 * 1024


def crc32_range(src: FileRange, crc: int = 0) -> int:
    """CRC-32 (zlib's) of the bytes of ``src``, continuing ``crc``: read through a read-only map of the
    file, 64 MiB at a time, pre-faulted (MAP_POPULATE), so no byte is copied to compute it."""
    if not src.nbytes:
        return crc
    fd = os.open(src.path, os.O_RDONLY)
    try:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        pos, end = src.offset, src.offset + src.nbytes
        while pos < end:
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            length = min(end, base + _MAP_WINDOW) - base
            with mmap.mmap(fd, length, flags=flags, prot=mmap.PROT_READ, offset=base) as mm:
                with memoryview(mm) as view:
                    crc = crc32(view[pos - base:], crc)
            pos = base + length
    finally:
        os.close(fd)
    return crc
