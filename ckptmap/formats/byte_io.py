"""Moving runs of bytes between files without looking at them, and reading them in large chunks.

Most of a checkpoint conversion's bytes need no conversion (fp32 main params and Adam moments are
contiguous runs of ``distrib_optim.pt`` storages; a ``.ckpt`` / safetensors tensor is its raw
bytes): :func:`copy_range` lets the kernel copy them from the source file to the output file
(``copy_file_range``, else ``sendfile``), never through Python. :func:`read_chunks` reads a run
into one reused buffer with sequential ``preadv`` calls, for bytes that must be looked at (a cast,
a CRC): fewer page faults and no page-table growth compared with touching an ``mmap`` of the file.
:func:`copy_range_crc` copies a run that needs a CRC (torch zip records) through one small reused
buffer: each byte is read from the page cache once and its CRC computed while it is in the CPU cache.
Inside :func:`source_fds` (the executor's scope for one output file) each source path is opened once,
not once per range.

CRC-32 (zlib's function; zip records, ``.ckpt`` trailers): zlib-ng's when installed
(``ckptmap[fast]``), else libdeflate's when the system has ``libdeflate.so.0`` (PCLMULQDQ: about 2.5x
zlib 1.2's speed here; called through ctypes, checked against zlib before first use), else zlib's.
``CKPTMAP_CRC32=zlib`` (or ``libdeflate``, ``zlib-ng``) picks one; :func:`crc32_implementation` says
which is in use.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
import zlib

from ckptmap.errors import CkptmapError
from ckptmap.formats.base import FileRange

CHUNK = 8 * 1024 * 1024
# copy_range_crc's buffer: small enough that a chunk read from the page cache is still in the L2 cache
# when it is CRC'd and written (measured: 128 KiB - 1 MiB alike, 8 MiB slower)
CRC_COPY_CHUNK = 256 * 1024
_KERNEL_COPY = hasattr(os, "copy_file_range")
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}


_open_sources = threading.local()   # inside source_fds(): {path: fd} of this thread


@contextlib.contextmanager
def source_fds():
    """Within the block, in this thread, the functions below open each source path once and keep it
    open until the block ends (a .ckpt of many small tensors took an open, an fadvise and a close
    per tensor and per rounding check). Scope it to one file's writing: the descriptors then never
    outlive the files they were opened for."""
    outer = getattr(_open_sources, "fds", None)
    if outer is not None:
        yield
        return
    _open_sources.fds = {}
    try:
        yield
    finally:
        fds, _open_sources.fds = _open_sources.fds, None
        for fd in fds.values():
            os.close(fd)


@contextlib.contextmanager
def _source(path: str, offset: int, n: int):
    """A read descriptor of ``path`` (advised sequential for ``n`` bytes from ``offset``)."""
    fds = getattr(_open_sources, "fds", None)
    if fds is None:
        fd = os.open(path, os.O_RDONLY)
        try:
            _advise_sequential(fd, offset, n)
            yield fd
        finally:
            os.close(fd)
        return
    fd = source_fd(path)
    if n > CRC_COPY_CHUNK:   # advice for a run worth reading ahead, not for every small tensor
        _advise_sequential(fd, offset, n)
    yield fd


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
    with _source(src.path, src.offset, src.nbytes) as fd:
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


SMALL_RUN = 64 * 1024   # runs up to this size are read and written by the caller, not copied by the kernel


def read_small(src: FileRange) -> bytes:
    """The bytes of a short run (``SMALL_RUN``) in one ``pread``: for a file of many small tensors, one
    read into the output's write buffer costs less than a flush plus a kernel copy per tensor."""
    fds = getattr(_open_sources, "fds", None)
    if fds is None:
        with _source(src.path, src.offset, 0) as fd:
            return _pread_exactly(fd, src)
    return _pread_exactly(source_fd(src.path), src)   # (no context manager: this runs once per small tensor)


def read_into(src: FileRange, out) -> None:
    """The bytes of ``src`` into ``out`` (a writable buffer of exactly ``src.nbytes`` bytes: a slice of a
    file being assembled in memory), read by the kernel straight into it."""
    fds = getattr(_open_sources, "fds", None)
    if fds is None:
        with _source(src.path, src.offset, 0) as fd:
            return _preadv_exactly(fd, src, out)
    _preadv_exactly(source_fd(src.path), src, out)


def _preadv_exactly(fd: int, src: FileRange, out) -> None:
    out = memoryview(out).cast("B")
    if len(out) != src.nbytes:
        raise ValueError(f"internal error: {src.nbytes} bytes of {src.path} read into a buffer of {len(out)}")
    preadv_exactly(fd, src.path, src.offset, out)


def preadv_exactly(fd: int, path: str, offset: int, out) -> None:
    """Fill ``out`` (a writable byte buffer) with the bytes of ``fd`` (open on ``path``) from ``offset``."""
    done, size = 0, len(out)
    while done < size:   # a short read is retried; none at all means the file shrank
        n = os.preadv(fd, [out[done:]], offset + done)
        if not n:
            raise OSError(errno.EIO, f"{path} ends before byte {offset + size} (at {offset + done}); the file changed")
        done += n


def _pread_exactly(fd: int, src: FileRange) -> bytes:
    return pread_exactly(fd, src.path, src.offset, src.nbytes)


def pread_exactly(fd: int, path: str, offset: int, nbytes: int) -> bytes:
    """``nbytes`` bytes of ``fd`` (open on ``path``) from ``offset``."""
    data = os.pread(fd, nbytes, offset)
    while len(data) < nbytes:   # a short read is retried; none at all means the file shrank
        more = os.pread(fd, nbytes - len(data), offset + len(data))
        if not more:
            raise OSError(errno.EIO, f"{path} ends before byte {offset + nbytes} (at {offset + len(data)}); "
                                     f"the file changed")
        data += more
    return data


def source_fd(path: str) -> int:
    """The descriptor of source ``path`` inside :func:`source_fds` (opened on first use, closed when the block ends)."""
    fds = _open_sources.fds
    fd = fds.get(path)
    if fd is None:
        fd = fds[path] = os.open(path, os.O_RDONLY)
    return fd


def ranges_of(source) -> tuple:
    """A FileRange or a sequence of them (a tensor's bytes as consecutive runs of other files) as a tuple."""
    return (source,) if isinstance(source, FileRange) else tuple(source)


def read_windows(source, size: int):
    """The bytes of ``source`` (a FileRange or consecutive runs) in windows of ``size`` bytes (the last
    shorter), across run boundaries: two such streams of equally many elements pair window by window."""
    runs = ranges_of(source)
    if len(runs) == 1:
        yield from read_chunks(runs[0], size)
        return
    total = sum(r.nbytes for r in runs)
    for lo in range(0, total, size):
        parts = [bytes(c) for r in sliced(runs, lo, min(size, total - lo)) for c in read_chunks(r, size)]
        yield parts[0] if len(parts) == 1 else b"".join(parts)


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


def _pread_chunks(fd: int, path: str, offset: int, nbytes: int, chunk: int = CHUNK, buf=None):
    if buf is None:
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


def copy_range_crc(src: FileRange, out_fd: int, crc: int = 0) -> int:
    """Write the bytes of ``src`` to ``out_fd`` at its current position, which advances, and return
    their CRC-32 continuing ``crc``. Read into one reused buffer, CRC'd and written from it: the
    source is read from the page cache once (a kernel copy plus a CRC through a map of the source
    read it twice and map every page)."""
    if not src.nbytes:
        return crc
    buf = getattr(_local, "copy_buf", None)
    if buf is None or len(buf) != CRC_COPY_CHUNK:
        buf = _local.copy_buf = bytearray(CRC_COPY_CHUNK)
    with _source(src.path, src.offset, src.nbytes) as fd:
        for chunk in _pread_chunks(fd, src.path, src.offset, src.nbytes, buf=buf):
            crc = crc32(chunk, crc)
            _write_all(out_fd, chunk)
    return crc


_local = threading.local()   # per thread: copy_range_crc's buffer


def read_chunks(src: FileRange, chunk: int = CHUNK):
    """The bytes of ``src`` as memoryviews of one reused buffer (each valid until the next is asked
    for), read sequentially: every chunk ``chunk`` bytes long but the last."""
    with _source(src.path, src.offset, src.nbytes) as fd:
        yield from _pread_chunks(fd, src.path, src.offset, src.nbytes, chunk)


def file_runs(source, nbytes: int, what: str) -> tuple:
    """``source`` — a FileRange, or a sequence of them whose concatenation is the bytes wanted — as a
    tuple of FileRanges holding exactly ``nbytes`` bytes (``what``: the file and tensor, for the error)."""
    runs = ranges_of(source)
    found = sum(r.nbytes for r in runs)
    if found != nbytes:
        where = ", ".join(dict.fromkeys(r.path for r in runs)) or "no file"
        raise CkptmapError(f"{what} needs {nbytes} bytes but the source range{'s' if len(runs) != 1 else ''} "
                           f"of {where} hold{'s' if len(runs) == 1 else ''} {found}")
    return runs


def sliced(chunks, start: int, n: int):
    """Bytes [start, start + n) of a stream of chunks: bytes-like ones as memoryviews of them,
    ``FileRange`` ones (bytes of another file) as the FileRanges of the part inside."""
    pos = 0
    for chunk in chunks:
        if isinstance(chunk, FileRange):   # bytes of a file range (copied kernel-side): a sub-range
            size = chunk.nbytes
            a, b = max(start - pos, 0), min(start + n - pos, size)
            if a < b:
                yield FileRange(chunk.path, chunk.offset + a, b - a)
            pos += size
            if pos >= start + n:
                return
            continue
        view = memoryview(chunk).cast("B")
        a, b = max(start - pos, 0), min(start + n - pos, len(view))
        if a < b:
            yield view[a:b]
        pos += len(view)
        if pos >= start + n:
            return


# -------------------------------------------------------------------------------------------------
# CRC-32


def _zlib_ng():
    from zlib_ng.zlib_ng import crc32 as ng_crc32
    return ng_crc32


_SMALL = 4096   # below this zlib is faster than a ctypes call


def _libdeflate():
    """libdeflate's crc32 through ctypes (the system library; no build step, no wheel), or None."""
    import ctypes

    for name in ("libdeflate.so.0", "libdeflate.so", "libdeflate.0.dylib", "libdeflate.dylib"):
        try:
            lib = ctypes.CDLL(name)   # dlopen: the standard library path, no `ldconfig -p` subprocess
            fn = lib.libdeflate_crc32
            break
        except (OSError, AttributeError):
            continue
    else:
        return None
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]   # ctypes releases the GIL in the call
    address_of, small = ctypes.addressof, zlib.crc32
    char_at = ctypes.c_char.from_buffer

    def deflate_crc32(data, crc=0):
        if type(data) is bytes:
            return fn(crc, data, len(data)) if len(data) >= _SMALL else small(data, crc)
        view = memoryview(data)
        n = view.nbytes
        if n < _SMALL or not view.c_contiguous:
            return small(view, crc)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if view.readonly:   # ctypes takes the address of writable buffers only; numpy of any
            np = sys.modules.get("numpy")
            return small(view, crc) if np is None else fn(crc, np.frombuffer(view, np.uint8).ctypes.data, n)
        at = char_at(view)
        try:
            return fn(crc, address_of(at), n)
        finally:
            del at   # releases the buffer
    return deflate_crc32


def _agrees_with_zlib(fn) -> bool:
    data = bytearray(bytes(range(256)) * 64 + b"ckptmap")
    tail = memoryview(data)[3:]
    return (fn(bytes(data)) == zlib.crc32(data) and fn(tail, 0x12345678) == zlib.crc32(tail, 0x12345678)
            and fn(b"abc", 7) == zlib.crc32(b"abc", 7))


_IMPLEMENTATIONS = {"zlib-ng": _zlib_ng, "libdeflate": _libdeflate, "zlib": lambda: zlib.crc32}
_chosen: tuple | None = None


def _choose():
    global _chosen, crc32
    wanted = os.environ.get("CKPTMAP_CRC32", "")
    if wanted and wanted not in _IMPLEMENTATIONS:
        raise CkptmapError(f"CKPTMAP_CRC32={wanted}: use one of {', '.join(_IMPLEMENTATIONS)} (or unset it for the "
                           f"fastest available)")
    for name in [wanted] if wanted else list(_IMPLEMENTATIONS):
        try:
            fn = _IMPLEMENTATIONS[name]()
        except ImportError:
            fn = None
        if fn is not None and (name == "zlib" or _agrees_with_zlib(fn)):
            _chosen = (name, fn)
            break
    else:
        raise CkptmapError(f"CKPTMAP_CRC32={wanted}: that CRC-32 implementation is not available here (zlib-ng: "
                           f"pip install ckptmap[fast]; libdeflate: the system's libdeflate.so.0); unset it to use "
                           f"the fastest available")
    crc32 = _chosen[1]
    return _chosen


def _first_crc32(data, crc: int = 0) -> int:
    """zlib.crc32(data, crc), by the fastest implementation available (see the module docstring);
    chosen at the first call (no ctypes import or library search for a run that needs no CRC)."""
    return _choose()[1](data, crc)


crc32 = _first_crc32   # rebound to the chosen implementation by _choose


def crc32_implementation() -> str:
    """Which CRC-32 implementation :func:`crc32` uses: ``zlib-ng``, ``libdeflate`` or ``zlib``."""
    return (_chosen or _choose())[0]
