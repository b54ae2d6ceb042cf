"""PyTorch's zip checkpoint format (``torch.save`` >= 1.6), read safely and lazily, without torch.

A torch zip checkpoint is an uncompressed zip archive whose records all live under one directory
(the *prefix*, derived from the file name by ``torch.save``: ``model_optim_rng/``)::

    <prefix>/data.pkl          the pickled object graph; tensors appear as
                               torch._utils._rebuild_tensor_v2(<persistent id>, offset, shape, stride, ...)
                               with persistent id ('storage', torch.BFloat16Storage, '0', 'cpu', numel)
    <prefix>/byteorder         'little' (absent in files from very old torch: little)
    <prefix>/data/<key>        the raw bytes of storage <key>
    <prefix>/version, .format_version, .storage_alignment, .data/serialization_id

The zip directory is read from its end records (:mod:`zipfile` for unusual archives), the file is
mmap'd copy-on-write, and ``data.pkl`` is unpickled by :mod:`safe_unpickler`'s restricted unpickler (never imports a module named in the
pickle, never runs code from it) plus the tensor rebuild functions of this module. Tensors become
:class:`TensorRef` values — where the tensor lies, not its bytes — and :meth:`TorchZipFile.array`
gives a zero-copy numpy view of the mapping on demand (bfloat16 as ``uint16`` bit patterns, see
``ckptmap.dtypes``). :func:`load` is the torch-materialising variant for callers that want real
tensors (it imports torch). All tensors of one storage record are views of one base, so storage
sharing survives a re-save. Writing is ``torch_zip_writer``.

Two dialects are read, detected from the file (``TorchZipFile.dialect``): stock ``torch.save``
(``torch.<X>Storage`` globals in the persistent ids) and MindSpeed-Core-MS's MSAdapter shim
(``formats/msadapter.py``: string storage types, ``_rebuild_from_type_v2`` with MindSpore tensor
classes, one C-order record per tensor whatever stride it recorded). What differs lives in the
:class:`ReadDialect` hooks ``STOCK_READ`` / ``MSADAPTER_READ`` (storage type -> dtype, rebuild
arguments -> TensorRef, tensor class -> TensorRef); the unpickler asks them per storage.
"""

from __future__ import annotations

import array
import contextlib
import math
import mmap
import os
import pickle
import struct
import sys
import typing
import weakref
import zipfile
import zlib

import attrs
import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats.base import FileRange
from ckptmap.formats import msadapter, pickle_delta
from ckptmap.formats.safe_unpickler import (ALLOWED_OBJECTS, TENSOR_TYPE_MARKERS, GlobalMarker, RestrictedUnpickler,
                                            StandIn, StandInClass, dtype_name, unpickle)

__all__ = ["TensorRef", "HeldTensor", "TorchZipFile", "read_objects", "load", "file_offset"]


# -------------------------------------------------------------------------------------------------
# Values in the object graph


@attrs.frozen
class TensorRef:
    """A tensor inside a torch zip checkpoint, described without reading its bytes.

    ``storage`` is the record key (``data/<storage>``), ``dtype`` a canonical ckptmap dtype name,
    ``storage_offset`` / ``shape`` / ``stride`` are in elements of ``dtype``, ``storage_numel`` is
    the length of the whole storage in elements, ``location`` the device it was saved from
    (tensors always load on the CPU). Several refs may name the same storage (views).
    ``parameter``: pickled as a Parameter (stock ``_rebuild_parameter``, or the MSAdapter shim's
    ``torch.nn.parameter.Parameter`` class). ``msadapter``: set for a tensor of the MSAdapter dialect
    (see :class:`MSAdapterTensor`); its ``stride`` is then the C-contiguous one, because the record
    holds the elements in C order whatever stride the file recorded."""

    storage: str
    dtype: str
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_numel: int
    requires_grad: bool = False
    location: str = "cpu"
    parameter: bool = False
    msadapter: "MSAdapterTensor | None" = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return dtypes.itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@attrs.frozen
class MSAdapterTensor:
    """How the MSAdapter shim pickled a tensor, beyond what :class:`TensorRef` says: the tensor class
    given to ``_rebuild_from_type_v2`` (``mindspore.common.tensor.Tensor``, ``…_stub_tensor.StubTensor``
    or ``torch.nn.parameter.Parameter``) and the stride exactly as recorded (the view's own stride,
    which readers must ignore; a list with MindSpore 2.10) — what a faithful rewrite needs."""

    cls: tuple[str, str]
    stride: tuple[int, ...]
    stride_is_list: bool = True


def _ref_problem(ref: TensorRef) -> str | None:
    """Why ``ref`` does not fit inside its storage, or None."""
    if ref.storage_offset < 0 or ref.storage_numel < 0:
        return f"negative storage offset {ref.storage_offset} or storage size {ref.storage_numel}"
    if len(ref.shape) != len(ref.stride):
        return f"shape {ref.shape} and stride {ref.stride} have different lengths"
    if any(s < 0 for s in ref.shape) or any(s < 0 for s in ref.stride):
        return f"negative size or stride (shape {ref.shape}, stride {ref.stride})"
    if ref.numel == 0:
        return None
    end = ref.storage_offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
    if end > ref.storage_numel:
        return (f"shape {ref.shape}, stride {ref.stride} at offset {ref.storage_offset} reaches element "
                f"{end} but the storage holds {ref.storage_numel}")
    return None




@attrs.frozen(eq=False)
class HeldTensor:
    """A tensor whose bytes are in memory (``data``: a C-contiguous numpy array of ``dtype``'s storage
    type, ``shape`` as given), for object graphs that ckptmap builds itself (pt_meta padding, demo
    checkpoints). The writer pickles it as a tensor over a storage of its own."""

    dtype: str
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


# -------------------------------------------------------------------------------------------------
# Zip archive


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # LONG1 0x1950a86a20f9469cfc6c, torch's pre-zip magic


class _Record(typing.NamedTuple):   # a tuple: made ~10 times per rank file, thousands of rank files
    name: str
    offset: int  # of the data, in the file
    size: int
    crc32: int = 0   # as the central directory records it (0: not recorded, e.g. torch without CRC-32)


_EOCD = struct.Struct("<4s4H2LH")               # end of central directory
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")      # central directory entry (zipfile's structCentralDir)


def _central_directory(mm, size: int) -> list | None:
    """The records of the zip's central directory as (name, flag bits, method, compressed size, size,
    local header offset), read straight from the mapping: what ``zipfile.ZipFile`` gives for the
    archives torch.save writes (zip64 end records, no comment, no extra fields, nothing prepended),
    at a third of its cost per file (thousands of rank files). None for anything else -- zipfile
    then reads it (and words what is wrong)."""
    if size < _EOCD.size + _EOCD64_LOCATOR.size:
        return None
    end = size - _EOCD.size
    sig, disk, disk_cd, n_here, n_total, cd_size, cd_offset, comment = _EOCD.unpack_from(mm, end)
    if sig != b"PK\x05\x06" or comment or disk or disk_cd:
        return None
    loc = end - _EOCD64_LOCATOR.size
    lsig, ldisk, eocd64, ndisks = _EOCD64_LOCATOR.unpack_from(mm, loc)
    if lsig == b"PK\x06\x07":
        if ldisk or ndisks != 1 or eocd64 + _EOCD64.size != loc:
            return None
        zsig, _, _, _, zdisk, zdisk_cd, _, _, cd_size, cd_offset = _EOCD64.unpack_from(mm, eocd64)
        if zsig != b"PK\x06\x06" or zdisk or zdisk_cd:
            return None
        cd_end = eocd64
    else:
        cd_end = end
    if cd_offset + cd_size != cd_end:   # data before the archive, or a damaged end record
        return None
    out, pos = [], cd_offset
    while pos < cd_end:
        if pos + _CENTRAL.size > cd_end:
            return None
        (csig, _, _, _, _, flags, method, _, _, crc, csize, fsize, nlen, elen, clen, _, _, _,
         header) = _CENTRAL.unpack_from(mm, pos)
        if csig != b"PK\x01\x02" or elen or 0xFFFFFFFF in (csize, fsize, header):
            return None
        pos += _CENTRAL.size
        raw = mm[pos: pos + nlen]
        pos += nlen + clen
        if pos > cd_end:
            return None
        try:
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            return None
        if "\x00" in name:
            return None
        out.append((name, flags, method, csize, fsize, header, crc))
    return out


# Zip directories already read by this process (or by its parent before it forked the workers): path ->
# (the file's identity, length and CRC-32 of its bytes after the last record — central directory and end
# records —, its records' CRC-32s, prefix, records' (name, offset, size) — one tuple for the files of one
# layout —, placement (remember_placement) or None): ~0.4 KB a file, no pickle bytes kept. A file planning read and a worker opens again,
# unchanged since, is not parsed a second time (at thousands of ranks each rank's two files were parsed
# three times: planning, its .ckpt, its pt_meta). Unchanged: the same device, inode, size, modification
# and change times, and the same directory bytes — which hold every record's offset, size and CRC-32, so
# a file rewritten in place within one tick of the filesystem's clock is read afresh too.
_DIRECTORIES: dict = {}
_DIRECTORIES_KEPT = 1 << 15   # the two files of 16,384 ranks
_REMEMBER = True


@contextlib.contextmanager
def remembering(on: bool):
    """Whether files opened inside are remembered for a later open (off where nothing reopens them: a
    plan that is only printed or saved, whose 16,384 ranks' directories would cost ~40 MiB and 0.3 s; and
    the writing workers, which read what planning remembered and would only copy it page by page)."""
    global _REMEMBER
    outer, _REMEMBER = _REMEMBER, on
    try:
        yield
    finally:
        _REMEMBER = outer


def remembered_directories(skip=frozenset()) -> dict:
    """The zip directories remembered (path -> what :meth:`_Archive.remember` keeps: plain values and
    placements, picklable), but those of the paths in ``skip``: what a planning process hands back with its
    part of a plan, so that the workers writing that part do not parse those files again
    (:func:`remember_directories`)."""
    return {p: known for p, known in _DIRECTORIES.items() if p not in skip} if _REMEMBER else {}


def remember_directories(known: dict) -> None:
    """Keep directories another process remembered (:func:`remembered_directories`). Each is used only
    for a file whose identity and directory bytes are still the ones recorded (:func:`_unchanged`)."""
    if _REMEMBER:
        _DIRECTORIES.update(known)
        while len(_DIRECTORIES) > _DIRECTORIES_KEPT:
            del _DIRECTORIES[next(iter(_DIRECTORIES))]


def remembered_placement(path: str, fd: int):
    """What a reader derived from the file ``path`` (open as ``fd``) about where its tensors lie
    (:func:`remember_placement`), when its directory is remembered and the file is unchanged since —
    the test :class:`_Archive` makes before reusing it —, else None."""
    st = os.fstat(fd)
    known = _unchanged(path, _identity(st), lambda tail: os.pread(fd, tail, st.st_size - tail))
    return None if known is None else known[6]


def _unchanged(path: str, identity: tuple, read_tail):
    """The remembered directory of ``path`` if the file (of ``identity``; ``read_tail(n)``: its last n bytes)
    is unchanged since it was remembered, else None."""
    known = _DIRECTORIES.get(path)
    if known is not None and known[0] == identity and zlib.crc32(read_tail(known[1])) == known[2]:
        return known
    return None


def remember_placement(zf: "TorchZipFile", placement) -> None:
    """Keep ``placement`` (a reader's table of where the tensors of ``zf`` lie, one object for files
    whose tables are equal) with the remembered directory of its file."""
    known = _DIRECTORIES.get(zf.path)
    archive = zf._archive
    if known is not None and archive is not None and known[0] == archive.identity:
        _DIRECTORIES[zf.path] = known[:6] + (placement,)


def _identity(st) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_ZIP64_ENDS = _EOCD64.size + _EOCD64_LOCATOR.size + _EOCD.size   # torch's archives end with all three
_SHAPES: dict = {}   # (file size, its last _ZIP64_ENDS bytes) -> _DirectoryShape of the last file parsed
_SHAPES_KEPT = 64


class _DirectoryShape:
    """The bytes a parsed zip directory was read from — central directory and end records, and the
    local headers' signatures and name / extra lengths — with the records' CRC-32s left out. A file of
    the same size and end records whose bytes there are the same (another rank of a pipeline stage: the
    same record names, sizes and offsets; only the CRC-32s differ) has the same records: they are taken
    from here with its own CRC-32s, not parsed again (~0.15 ms a file at thousands of rank files)."""

    def __init__(self, archive: "_Archive", header_offsets: list):
        mm, records = archive.mm, archive.records
        self.central = _zip64_central_start(mm, archive.size)
        crc_at = []   # offsets of the CRC-32 fields in the central directory, relative to its start
        pos = self.central
        for _ in records:
            crc_at.append(pos + 16 - self.central)
            nlen, elen, clen = struct.unpack_from("<3H", mm, pos + 28)
            pos += _CENTRAL.size + nlen + elen + clen
        # byte indices, so that a file is compared and its CRC-32s read by one numpy gather each
        self.crc_bytes = (np.array(crc_at, dtype=np.intp)[:, None] + np.arange(4)).ravel()
        self.masked = self._masked(mm[self.central:])
        self.header_bytes = (np.array(header_offsets, dtype=np.intp)[:, None] + np.array([0, 1, 2, 3, 26, 27, 28, 29])
                             ).ravel()
        self.headers = self._gather(mm, self.header_bytes)
        self.layout = [(r.name, r.offset, r.size) for r in records.values()]
        self.prefix = archive.prefix

    @staticmethod
    def _gather(mm, at: np.ndarray) -> bytes:
        return np.frombuffer(mm, dtype=np.uint8)[at].tobytes()   # the view is dropped at once: mm stays closable

    def _masked(self, tail: bytes) -> bytes:
        out = np.frombuffer(tail, dtype=np.uint8).copy()
        out[self.crc_bytes] = 0
        return out.tobytes()

    def read(self, archive: "_Archive") -> bool:
        """Fill ``archive``'s records if its directory bytes are this shape's; False if not (parse it)."""
        mm = archive.mm
        tail = mm[self.central:]
        if self._masked(tail) != self.masked or self._gather(mm, self.header_bytes) != self.headers:
            return False
        crcs = np.frombuffer(self._gather(tail, self.crc_bytes), dtype="<u4").tolist()
        archive.records = {name: _Record(name, offset, size, crc)
                           for (name, offset, size), crc in zip(self.layout, crcs)}
        archive.prefix = self.prefix
        archive._check_byte_order()
        return True


def _zip64_central_start(mm, size: int) -> int | None:
    """The central directory's offset in an archive _central_directory read, if it ends with zip64 end
    records (torch's always do; an archive without them has CRC-32s in its last _ZIP64_ENDS bytes, which
    then tell no two files' directories alike), else None."""
    lsig, _, eocd64, _ = _EOCD64_LOCATOR.unpack_from(mm, size - _EOCD.size - _EOCD64_LOCATOR.size)
    return _EOCD64.unpack_from(mm, eocd64)[-1] if lsig == b"PK\x06\x07" else None


class _Archive:
    """The zip directory and the copy-on-write mmap of one file; no record data is read."""

    def __init__(self, path):
        self.path = os.fspath(path)
        p = self.path
        self.reopened = False   # its directory was remembered (remember), not parsed
        try:   # open first, diagnose after: two stat calls fewer per file (thousands of rank files)
            with open(p, "rb") as f:
                st = os.fstat(f.fileno())
                self.size = st.st_size
                if self.size == 0:
                    raise CkptmapError(f"{p} is empty (0 bytes); expected a torch zip checkpoint — the file "
                                       f"was not written completely, copy or save it again")
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self.identity = _identity(st)
                known = _unchanged(p, self.identity, lambda tail: self.mm[self.size - tail:])
                if known is not None:
                    _, _, _, crcs, self.prefix, layout, _ = known
                    self.records = {name: _Record(name, offset, size, crc)
                                    for (name, offset, size), crc in zip(layout, crcs)}
                    self.reopened = True
                    return
                shape_key = (self.size, self.mm[-_ZIP64_ENDS:])
                shape = _SHAPES.get(shape_key)
                if shape is not None and shape.read(self):
                    return
                infos = _central_directory(self.mm, self.size)
                shape_key = shape_key if infos is not None else None   # zipfile's archives are not kept
                if infos is None:   # anything the fast path does not know: zipfile decides (and words errors)
                    head = f.read(512)
                    f.seek(0)
                    try:
                        zf = zipfile.ZipFile(f)
                        infos = [(zi.filename, zi.flag_bits, zi.compress_type, zi.compress_size, zi.file_size,
                                  zi.header_offset, zi.CRC) for zi in zf.infolist()]
                    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
                            struct.error, NotImplementedError) as e:
                        raise CkptmapError(self._not_zip_message(head, e)) from None
        except CkptmapError:
            raise
        except OSError as e:
            if not os.path.exists(p):
                raise CkptmapError(f"{p} does not exist; expected a torch checkpoint file (.pt) — check the path") \
                    from None
            if os.path.isdir(p):
                raise CkptmapError(f"{p} is a directory, not a torch checkpoint file; pass the .pt file inside "
                                   f"it (e.g. model_optim_rng.pt)") from None
            raise CkptmapError(f"cannot read {p}: {e.strerror or e}; expected a readable torch checkpoint "
                               f"file — check the path and its permissions") from None
        self.records: dict[str, _Record] = {}
        for info in infos:
            self._add_record(*info)
        pkls = [n for n in self.records if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            found = ", ".join(list(self.records)[:8]) or "no records"
            raise CkptmapError(f"{p} is a zip archive but not a torch checkpoint: expected exactly one "
                               f"'<name>/data.pkl' record, found {len(pkls)} (records: {found}) — pass a file "
                               f"written by torch.save")
        self.prefix = pkls[0][: -len("data.pkl")]
        self._check_byte_order()
        if shape_key is not None and _zip64_central_start(self.mm, self.size) is not None:
            _SHAPES[shape_key] = _DirectoryShape(self, [info[5] for info in infos])
            if len(_SHAPES) > _SHAPES_KEPT:
                del _SHAPES[next(iter(_SHAPES))]

    def _check_byte_order(self) -> None:
        order = self.read_record("byteorder", missing_ok=True)
        if order is not None and order != b"little":
            shown = order[:20].decode("latin1")
            raise CkptmapError(f"{self.path} was saved on a {shown!r}-endian machine; ckptmap only reads "
                               f"little-endian torch checkpoints — load and re-save it with torch on a "
                               f"little-endian (x86/ARM) machine")

    def remember(self) -> None:
        """Keep this file's directory for a later open of it."""
        if not _REMEMBER or self.reopened:
            return
        tail = self.size - max((r.offset + r.size for r in self.records.values()), default=0)
        crcs = array.array("L", [r.crc32 for r in self.records.values()])
        _DIRECTORIES[self.path] = (self.identity, tail, zlib.crc32(self.mm[self.size - tail:]), crcs,
                                   sys.intern(self.prefix), _layout(self), None)
        if len(_DIRECTORIES) > _DIRECTORIES_KEPT:
            del _DIRECTORIES[next(iter(_DIRECTORIES))]

    def _not_zip_message(self, head, err):
        p = self.path
        if _LEGACY_MAGIC in head[:32] or (len(head) >= 262 and head[257:262] == b"ustar"):
            return (f"{p} is in PyTorch's legacy pre-1.6 (non-zip) serialization format; ckptmap reads only "
                    f"the zip format — if the file is trusted, re-save it with torch >= 1.6: "
                    f"torch.save(torch.load(path, weights_only=False), new_path)")
        if head.startswith(b"PK"):
            return (f"{p} is truncated or corrupt: it starts like a zip archive but its {self.size} bytes end "
                    f"without a valid zip central directory ({err}); expected a complete torch zip checkpoint "
                    f"— the copy or save was probably interrupted, copy or save it again")
        return (f"{p} is not a torch checkpoint: expected a zip archive written by torch.save (>= 1.6), "
                f"found {self.size} bytes starting with {head[:8]!r} ({err}) — check that the path names a "
                f".pt file")

    def _add_record(self, name, flag_bits, compress_type, compress_size, file_size, h, crc32=0):
        p = self.path
        if name in self.records:
            raise CkptmapError(f"{p} holds the record {name!r} twice; a torch checkpoint never does — the file "
                               f"is corrupt or was tampered with, save it again")
        if flag_bits & 0x1:
            raise CkptmapError(f"{p}: record {name!r} is encrypted; torch checkpoints are never encrypted — "
                               f"save the file again with torch.save")
        if compress_type != zipfile.ZIP_STORED or compress_size != file_size:
            raise CkptmapError(f"{p}: record {name!r} is compressed (zip method {compress_type}); torch "
                               f"checkpoints store records uncompressed and ckptmap maps them directly — "
                               f"re-create the archive without compression (zip -0) or save it again with "
                               f"torch.save")
        if h < 0 or h + _LOCAL_HEADER.size > self.size:
            raise CkptmapError(self._truncated(name, "its local header lies past the end of the file"))
        sig, _, _, _, _, _, _, _, _, nlen, elen = _LOCAL_HEADER.unpack_from(self.mm, h)
        if sig != b"PK\x03\x04":
            raise CkptmapError(self._truncated(name, f"no local file header at offset {h}"))
        start = h + _LOCAL_HEADER.size + nlen + elen
        if start + file_size > self.size:
            raise CkptmapError(self._truncated(
                name, f"its {file_size} data bytes at offset {start} run past the end of the file"))
        self.records[name] = _Record(name, start, file_size, crc32)

    def _truncated(self, name, what):
        return (f"{self.path} is truncated or corrupt: record {name!r} is damaged ({what}; file size "
                f"{self.size} bytes) — the copy or save was probably interrupted, copy or save it again")

    def record(self, rel: str) -> _Record | None:
        return self.records.get(self.prefix + rel)

    def read_record(self, rel: str, missing_ok=False) -> bytes | None:
        r = self.record(rel)
        if r is None:
            if missing_ok:
                return None
            raise CkptmapError(f"{self.path} has no record {self.prefix + rel!r}; it is not a complete torch "
                               f"checkpoint — save it again")
        return self.mm[r.offset: r.offset + r.size]


# -------------------------------------------------------------------------------------------------
# Unpickling


class _Storage:
    """What a persistent id resolves to: one storage record, typed, and the dialect whose persistent
    id named it."""

    __slots__ = ("key", "dtype", "location", "numel", "dialect")

    def __init__(self, key, dtype, location, numel, dialect):
        self.key, self.dtype, self.location, self.numel, self.dialect = key, dtype, location, numel, dialect


class ReadDialect:
    """What differs between dialects of the torch zip format when *reading*, as small named hooks.
    The unpickler asks each dialect in turn (:data:`READ_DIALECTS`) which one a persistent id's storage
    type belongs to; from then on that storage's tensors go through that dialect's hooks."""

    name = "?"

    def storage_dtype(self, stype) -> str | None:
        """The element dtype a persistent id's storage type names, or None if it is not this dialect's."""
        raise NotImplementedError

    def tensor(self, up: "_TorchUnpickler", storage: _Storage, offset, size, stride, requires_grad,
               backward_hooks, metadata) -> TensorRef:
        """The TensorRef that ``_rebuild_tensor_v2(storage, offset, size, stride, …)`` means here."""
        raise NotImplementedError

    def tensor_class(self, ref: TensorRef, new_type) -> TensorRef | None:
        """``_rebuild_from_type_v2(…, new_type, …)``: the ref with the class remembered, or None if
        this dialect does not know that class."""
        raise NotImplementedError


class _StockRead(ReadDialect):
    """Stock ``torch.save``: storage types are ``torch.<X>Storage`` globals; offset and stride are
    honoured (views of one storage share it)."""

    name = "torch"

    def storage_dtype(self, stype):
        return stype.dtype if isinstance(stype, GlobalMarker) else None

    def tensor(self, up, storage, offset, size, stride, requires_grad, backward_hooks, metadata):
        return up._make_ref(storage, offset, size, stride, requires_grad)

    def tensor_class(self, ref, new_type):
        return ref if new_type in TENSOR_TYPE_MARKERS.values() else None


def _class_name(obj) -> tuple[str, str] | None:
    if isinstance(obj, StandInClass):
        return obj.__module__, obj.__qualname__
    if isinstance(obj, GlobalMarker):
        return obj.module, obj.qualname
    return None


class _MSAdapterRead(ReadDialect):
    """MSAdapter (``formats/msadapter.py``): the storage type is a string; each record holds exactly
    one tensor's elements in C order, so the recorded stride (the view's own; a list) is kept aside in
    :class:`MSAdapterTensor` and the ref gets the C-contiguous stride; the tensor class of
    ``_rebuild_from_type_v2`` is remembered (a shim Parameter becomes ``parameter=True``)."""

    name = "msadapter"

    def storage_dtype(self, stype):
        return msadapter.read_storage_dtype(stype)

    def tensor(self, up, storage, offset, size, stride, requires_grad, backward_hooks, metadata):
        if isinstance(size, StandIn) and size.module == "torch" and size.qualname == "Size" and size.args:
            size = tuple(size.args[0])
        ok = (type(offset) is int and isinstance(size, tuple) and isinstance(stride, (list, tuple))
              and all(type(x) is int for x in size) and all(type(x) is int for x in stride)
              and type(requires_grad) is bool and len(stride) == len(size))
        if not ok:
            raise pickle.UnpicklingError(f"malformed MSAdapter tensor arguments "
                                         f"{(offset, size, stride, requires_grad)!r:.200}")
        up.storages_used.add(id(storage))
        shape = tuple(size)
        ref = TensorRef(storage=storage.key, dtype=storage.dtype, storage_offset=offset, shape=shape,
                        stride=contiguous_stride(shape), storage_numel=storage.numel, requires_grad=requires_grad,
                        location=storage.location,
                        msadapter=MSAdapterTensor(msadapter.TENSOR_CLASS, tuple(stride), type(stride) is list))
        problem = _ref_problem(ref)
        if problem:
            raise CkptmapError(f"{up.path} is corrupt: a tensor in storage {storage.key!r} does not fit "
                               f"its storage ({problem}) — save the file again")
        return ref

    def tensor_class(self, ref, new_type):
        cls = _class_name(new_type)
        if cls not in msadapter.TENSOR_CLASSES:
            return None
        return attrs.evolve(ref, parameter=cls == msadapter.PARAMETER_CLASS,
                            msadapter=attrs.evolve(ref.msadapter, cls=cls))


STOCK_READ = _StockRead()
MSADAPTER_READ = _MSAdapterRead()
READ_DIALECTS = (STOCK_READ, MSADAPTER_READ)


class _TorchUnpickler(RestrictedUnpickler):
    """The restricted unpickler plus torch's persistent ids and tensor rebuild functions; the
    dialect-specific parts go through :class:`ReadDialect` hooks."""

    def __init__(self, data: bytes, archive: _Archive, materialize: bool, bases: dict, evidence: dict | None = None):
        rebuilders = {
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter_with_state,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
        }
        if materialize:  # real torch values for the caller that asked for torch objects
            rebuilders.update(_real_torch_globals())
        super().__init__(data, archive.path, rebuilders)
        self.archive = archive
        self.materialize = materialize
        self.bases = bases
        self.storages_made: dict[int, _Storage] = {}
        self.storages_used: set[int] = set()
        self.tensor_funcs = set(rebuilders.values())
        self.dialects_seen: set[str] = set()  # evidence: storages and tensor classes of each dialect
        self.mindspore_globals = False
        self.evidence = evidence  # filled by run() with what the dialect detection needs

    def find_class(self, module, name):
        obj = super().find_class(module, name)
        if isinstance(module, str) and module.split(".", 1)[0] == "mindspore":
            self.mindspore_globals = True
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.200}")
        _, stype, key, location, numel = pid
        for dialect in READ_DIALECTS:
            dtype = dialect.storage_dtype(stype)
            if dtype is not None:
                break
        else:
            raise pickle.UnpicklingError(f"persistent id names {stype!r:.100} instead of a storage type ckptmap "
                                         f"reads (a torch.<X>Storage global, or an MSAdapter '<X>Storage' string)")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage persistent id {pid!r:.200}")
        rec = self.archive.record("data/" + key)
        if rec is None:
            raise CkptmapError(f"{self.path} references storage {key!r} but has no record "
                               f"{self.archive.prefix}data/{key}; the file is incomplete — save it again")
        need = numel * dtypes.itemsize(dtype)
        if rec.size < need:
            raise CkptmapError(f"{self.path}: storage record {self.archive.prefix}data/{key} holds {rec.size} "
                               f"bytes but the pickle expects {numel} x {dtype} = {need} bytes; the file "
                               f"is corrupt — save it again")
        self.dialects_seen.add(dialect.name)
        st = _Storage(key, dtype, location, numel, dialect)
        self.storages_made[id(st)] = st
        return st

    def _make_ref(self, storage, offset, size, stride, requires_grad, dtype=None):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"tensor rebuild got {type(storage).__name__} instead of a storage")
        if isinstance(size, StandIn) and size.module == "torch" and size.qualname == "Size" and size.args:
            size = tuple(size.args[0])
        ok = (type(offset) is int and isinstance(size, tuple) and isinstance(stride, tuple)
              and all(type(x) is int for x in size) and all(type(x) is int for x in stride)
              and isinstance(requires_grad, bool))
        if not ok:
            raise pickle.UnpicklingError(f"malformed tensor arguments {(offset, size, stride, requires_grad)!r:.200}")
        self.storages_used.add(id(storage))
        if dtype is None:
            name, numel = storage.dtype, storage.numel
        else:
            name = dtype_name(dtype)
            if not isinstance(dtype, GlobalMarker) and name is None:
                raise pickle.UnpicklingError(f"tensor dtype {dtype!r:.100} is not a torch dtype")
            if name is None:
                raise CkptmapError(f"{self.path} holds a tensor of dtype {dtype!r} (storage "
                                   f"{storage.key!r}); ckptmap supports {', '.join(dtypes.NAMES)} — convert that "
                                   f"tensor before using ckptmap")
            numel = storage.numel * dtypes.itemsize(storage.dtype) // dtypes.itemsize(name)
        ref = TensorRef(storage=storage.key, dtype=name, storage_offset=offset, shape=size, stride=stride,
                        storage_numel=numel, requires_grad=requires_grad, location=storage.location)
        problem = _ref_problem(ref)
        if problem:
            raise CkptmapError(f"{self.path} is corrupt: a tensor in storage {storage.key!r} does not fit "
                               f"its storage ({problem}) — save the file again")
        return ref

    def _finish(self, ref: TensorRef):
        return _torch_view(self.archive, self.bases, ref) if self.materialize else ref

    def _check_metadata(self, metadata):
        if metadata and any(metadata.values()):
            raise CkptmapError(f"{self.path} holds a tensor with metadata {metadata!r} (conjugate or negative "
                               f"bit); ckptmap does not support such tensors — resolve them (tensor.resolve_conj()"
                               f".resolve_neg()) and save again")

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._finish(self._make_ref(storage, storage_offset, size, stride, False))

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                           metadata=None):
        self._check_metadata(metadata)
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"tensor rebuild got {type(storage).__name__} instead of a storage")
        ref = storage.dialect.tensor(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                                     metadata)
        # inside _rebuild_from_type_v2 the class decides (and materialises); see there
        return ref if self._in_from_type else self._finish(ref)

    _in_from_type = False

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        self._check_metadata(metadata)
        return self._finish(self._make_ref(storage, storage_offset, size, stride, requires_grad, dtype))

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        if isinstance(data, TensorRef):
            return attrs.evolve(data, requires_grad=bool(requires_grad), parameter=True)
        if self.materialize and type(data).__module__.startswith("torch"):
            import torch
            return torch.nn.Parameter(data, bool(requires_grad))
        raise pickle.UnpicklingError(f"_rebuild_parameter got {type(data).__name__} instead of a tensor")

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        if state:
            raise CkptmapError(f"{self.path} holds a torch.nn.Parameter with Python attributes "
                               f"({', '.join(map(str, state))}); ckptmap does not keep those — save the plain "
                               f"tensors (state_dict) instead")
        return self._rebuild_parameter(data, requires_grad, backward_hooks)

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        if func not in self.tensor_funcs or not isinstance(args, tuple):
            raise CkptmapError(f"{self.path} holds a tensor subclass ({new_type!r}); ckptmap reads only plain "
                               f"tensors and parameters — save the plain tensors (state_dict) instead")
        if state:
            raise CkptmapError(f"{self.path} holds a tensor with Python attributes "
                               f"({', '.join(map(str, state))}); ckptmap does not keep those — save "
                               f"tensor.detach() values (a state_dict) instead")
        self._in_from_type = True
        try:
            out = func(*args)
        finally:
            self._in_from_type = False
        if isinstance(out, TensorRef):
            dialect = MSADAPTER_READ if out.msadapter is not None else STOCK_READ
            ref = dialect.tensor_class(out, new_type)
            if ref is None:
                raise CkptmapError(f"{self.path} holds a tensor of class {new_type!r} in a {dialect.name}-dialect "
                                   f"storage; ckptmap reads only plain tensors and parameters — save the plain "
                                   f"tensors (state_dict) instead")
            if _class_name(new_type) in msadapter.TENSOR_CLASSES[:2]:
                self.dialects_seen.add(MSADAPTER_READ.name)
            if not self.materialize:
                return ref
            out = _torch_view(self.archive, self.bases, ref)
            is_param = ref.parameter
        else:  # a real tensor (materialize) from a func that materialised itself
            is_param = False
        is_param = is_param or (_class_name(new_type) or ("", ""))[1] == "Parameter"
        if self.materialize and is_param:
            import torch
            if not isinstance(out, torch.nn.Parameter):
                out = torch.nn.Parameter(out, out.requires_grad)
        return out

    def run(self):
        root = super().run()
        if set(self.storages_made) - self.storages_used:
            raise CkptmapError(f"{self.path} holds a bare torch storage (not inside a tensor); ckptmap reads "
                               f"only tensors — wrap it in a tensor (torch.tensor([], dtype=torch.uint8)"
                               f".set_(storage)) and save again")
        if self.evidence is not None:
            self.evidence.update(seen=set(self.dialects_seen), mindspore=self.mindspore_globals)
        return root


def _real_torch_globals() -> dict:
    import torch

    out = {("torch", "Size"): torch.Size, ("torch", "device"): torch.device}
    for (module, name), marker in ALLOWED_OBJECTS.items():
        if module == "torch" and isinstance(marker, GlobalMarker) and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype):
            out[(module, name)] = getattr(torch, name)
    return out


def _unpickle(archive: _Archive, materialize: bool, bases: dict, dialect_out: list | None = None):
    data = archive.read_record("data.pkl")
    evidence: dict = {}
    up = _TorchUnpickler(data, archive, materialize, bases, evidence)
    root = unpickle(up, f"{archive.path} ({archive.prefix}data.pkl)")
    if dialect_out is not None:
        dialect_out.append(_dialect(archive, evidence["seen"], evidence["mindspore"]))
    return root


def _dialect(archive: _Archive, seen: set, mindspore_globals: bool) -> str:
    """``torch`` or ``msadapter``, from the file: the storages' persistent ids and the tensor classes
    decide; a file without tensors is MSAdapter's if it names MindSpore globals or has MSAdapter's
    container (``version`` = ``3`` without newline, no ``.format_version``)."""
    if len(seen) > 1:
        raise CkptmapError(f"{archive.path} mixes stock torch storages (torch.<X>Storage globals) with MSAdapter "
                           f"ones ('<X>Storage' strings); no torch.save writes that — the file was assembled by "
                           f"hand or is corrupt, save it again with one framework")
    if seen:
        return next(iter(seen))
    if mindspore_globals:
        return MSADAPTER_READ.name
    version = archive.read_record("version", missing_ok=True)
    stock_only = any(archive.record(r) is not None for r in (".format_version", ".data/serialization_id"))
    return MSADAPTER_READ.name if version == msadapter.VERSION_RECORD and not stock_only else STOCK_READ.name


def _base(archive: _Archive, bases: dict, key: str) -> np.ndarray:
    base = bases.get(key)
    if base is None:
        rec = archive.record("data/" + key)
        if rec is None:
            raise CkptmapError(f"{archive.path} has no storage record {archive.prefix}data/{key}; the tensor "
                               f"reference does not belong to this file")
        base = bases[key] = np.frombuffer(archive.mm, dtype=np.uint8, count=rec.size, offset=rec.offset) \
            if rec.size else np.empty(0, dtype=np.uint8)
    return base


def _checked_base(archive: _Archive, bases: dict, ref: TensorRef) -> np.ndarray:
    problem = _ref_problem(ref)
    if problem:
        raise CkptmapError(f"{archive.path}: tensor reference {ref} does not fit its storage ({problem}); "
                           f"it does not belong to this file")
    base = _base(archive, bases, ref.storage)
    size = dtypes.itemsize(ref.dtype)
    if ref.storage_numel * size > base.size:
        raise CkptmapError(f"{archive.path}: tensor reference {ref} needs {ref.storage_numel} elements of "
                           f"{ref.dtype} but storage record {archive.prefix}data/{ref.storage} holds only "
                           f"{base.size} bytes; it does not belong to this file")
    return base


def _numpy_view(archive: _Archive, bases: dict, ref: TensorRef) -> np.ndarray:
    base = _checked_base(archive, bases, ref)
    st = dtypes.storage(ref.dtype)
    typed = base[: ref.storage_numel * st.itemsize].view(st)
    if ref.numel == 0:
        return np.empty(ref.shape, dtype=st)
    if ref.stride == contiguous_stride(ref.shape):
        return typed[ref.storage_offset: ref.storage_offset + ref.numel].reshape(ref.shape)
    return np.lib.stride_tricks.as_strided(typed[ref.storage_offset:], ref.shape,
                                           tuple(s * st.itemsize for s in ref.stride), writeable=False)


def _torch_view(archive: _Archive, bases: dict, ref: TensorRef):
    import torch

    base = _checked_base(archive, bases, ref)
    key = ("torch", ref.storage)
    tbase = bases.get(key)
    if tbase is None:
        tbase = bases[key] = torch.from_numpy(base) if base.size else torch.empty(0, dtype=torch.uint8)
    dt = dtypes.to_torch(ref.dtype)
    usable = tbase.numel() // dt.itemsize
    typed = tbase[: usable * dt.itemsize].view(dt) if dt != torch.uint8 else tbase
    t = typed.as_strided(ref.shape, ref.stride, ref.storage_offset)
    if ref.requires_grad:
        t.requires_grad_(True)
    return t


def contiguous_stride(shape) -> tuple[int, ...]:
    """The strides of a C-contiguous tensor of ``shape`` (dims of size 0 count as 1)."""
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def file_offset(zf: "TorchZipFile", ref: TensorRef) -> tuple[int, int] | None:
    """``(offset in the file, nbytes)`` of ``ref``'s elements when they lie contiguous in C order,
    else None — what a byte-range copy needs."""
    if ref.stride != contiguous_stride(ref.shape) and ref.numel > 1:
        return None
    rec = zf._live().record(f"data/{ref.storage}")
    size = dtypes.itemsize(ref.dtype)
    return rec.offset + ref.storage_offset * size, ref.numel * size


def file_range(zf: "TorchZipFile", ref: TensorRef) -> FileRange | None:
    """The FileRange of ``ref``'s elements when they lie contiguous in C order (else None), with its
    record's CRC-32 when it is the whole record and the file recorded one: a torch zip writer copying
    the tensor into a record of its own takes that CRC instead of reading the bytes again. The CRC
    is the source's, not recomputed: a record damaged since it was saved keeps failing its check in
    the copy, as in the original, instead of getting a fresh CRC that vouches for the damage."""
    where = file_offset(zf, ref)
    if where is None:
        return None
    rec = zf._live().record(f"data/{ref.storage}")
    whole = ref.storage_offset == 0 and where[1] == rec.size and rec.crc32
    return FileRange(str(zf.path), where[0], where[1], rec.crc32 if whole else None)


# -------------------------------------------------------------------------------------------------
# Object trees shared between files of the same structure


_shared_trees: dict | None = None   # structure key -> (root, dialect), inside shared_trees() only


@contextlib.contextmanager
def shared_trees(trees: dict | None = None):
    """Inside this context, a :class:`TorchZipFile` whose structure equals one already read (same
    ``data.pkl`` bytes, same records with the same names, offsets and sizes, same ``version`` record)
    gets that file's object tree instead of unpickling its own. What the unpickler makes of a file
    depends on exactly those (its TensorRefs name storage keys and element offsets, never the file),
    so the trees are equal; they are the *same* objects, so callers must only read them. A file whose
    pickle differs from the last one read of its length and records only in plain numbers (a rank's
    ``args.rank``) gets that one's tree with those numbers replaced (pickle_delta; containers on their
    paths copied, the rest shared). Planning thousands of ranks uses this: the ranks of a stage write
    pickles that differ in their args' rank alone (tensor values live in the records, layer numbers
    are stage-local). A writer may read inside when it never
    changes the trees and never puts two files of one structure into one pickle (they would share
    objects a fresh read keeps apart): pt_meta does (``execute``: its model_optim_rng.pt and
    distrib_optim.pt differ in name, so in structure) and writes the same bytes; ms2pt's writers read
    pt_meta inside too (``pt_meta.bind_skeleton`` copies every container and Namespace it may set a value
    in). ``trees``: the dict to keep them in, which outlives the context (its
    owner bounds it); default: the enclosing context's, else a new one for this context."""
    global _shared_trees
    outer = _shared_trees
    if trees is not None:
        _shared_trees = trees
    elif outer is None:
        _shared_trees = {}
    try:
        yield
    finally:
        _shared_trees = outer


def trim_trees(trees: dict, kept: int) -> None:
    """Drop the oldest entries of a shared_trees dict beyond ``kept`` (its owner bounds it: the files read
    next are a stage's, whose trees are the newest)."""
    while len(trees) > kept:
        del trees[next(iter(trees))]


def _structure_key(archive: _Archive):
    """Everything the unpickler and the dialect detection read from a file, as a hashable value."""
    return (archive.prefix, archive.read_record("data.pkl"), archive.read_record("version", missing_ok=True),
            _layout(archive))


def _near_key(key) -> tuple:
    """A structure key with the pickle's bytes replaced by their length and the records named without
    the archive prefix: the files whose pickles pickle_delta may read from another's tree. The prefix
    is the file's name (pt_meta's ``args_tp00_pp003/``, one per rank): nothing the unpickler makes
    depends on it, while the records' offsets and sizes (all a tensor's place is made of) stay in the key."""
    prefix, data, version, layout = key
    return ("near", len(prefix), len(data), version, _relative_layout(layout, prefix))


class _Template:
    """The first pickle read of a near key, its tree, and (made when another file first needs them)
    the numbers in it that may differ."""

    def __init__(self, data: bytes, root, dialect: str, shared_tensors: dict):
        self.data, self.root, self.dialect, self.shared_tensors = data, root, dialect, shared_tensors
        self._slots = None
        self._followed = False
        # what a writer derives from a file's tree that holds for every file read from this template with
        # its numbers put in (pt_meta: the pickle it writes and where those numbers land in it)
        self.derived: dict = {}
        self._last = None   # (pickle bytes, what patched() gave): a rank's two ms2pt files read one pt_meta

    def slots(self) -> "pickle_delta.ScalarSlots | None":
        if not self._followed:
            self._slots = pickle_delta.scalar_slots(self.data)
            self._followed = True
        return self._slots

    # Following a pickle's opcodes costs ~6 unpickles of it (3 ms for a Megatron rank's 10 KB pickle), a read
    # from the followed tree ~1/5 of one. So a template is followed for a file that differs from it in a few
    # bytes (another rank of its stage), not for one that differs in hundreds (another stage's RNG state) —
    # files read in any order cost about an unpickle each. Even a stage of 8 ranks (TP 8) gains: besides
    # its reads, its writers derive from the template (pt_meta's kept pickles: ms2pt 4,096 ranks 7.5 -> 6.7 s,
    # 186 -> 98 MB; following only after 8 unpickles, as before those, made a TP 8 stage plain files).
    FOLLOW_WITHIN_BYTES = 64

    def patched(self, data: bytes):
        """(tree, indices of the slots whose numbers differ) of the pickle ``data``, or None."""
        positions = pickle_delta.differing_bytes(self.data, data)
        if positions is None or not self._followed and positions.size > self.FOLLOW_WITHIN_BYTES:
            return None
        last = self._last
        if last is not None and last[0] == data:
            return last[1]   # the same tree again (read-only, as every tree read from a template)
        slots = self.slots()
        owners = None if slots is None else slots.owners(positions)
        root = None if owners is None else pickle_delta.patched_at(self.root, slots, owners, data)
        found = None if root is None else (root, owners)
        self._last = (data, found)
        return found


# records' (name, offset, size) tuples, one object for equal ones (files of one stage) -> (that object, the
# same with names relative to the archive prefix)
_LAYOUTS: dict = {}


def _layout(archive: _Archive) -> tuple:
    layout = tuple((r.name, r.offset, r.size) for r in archive.records.values())
    kept = _LAYOUTS.get(layout)
    if kept is None:
        kept = _LAYOUTS[layout] = (layout, _relative(layout, archive.prefix))
        if len(_LAYOUTS) > _DIRECTORIES_KEPT:   # at most one per remembered file is of use
            del _LAYOUTS[next(iter(_LAYOUTS))]
    return kept[0]


def _relative(layout: tuple, prefix: str) -> tuple:
    n = len(prefix)
    return tuple((name[n:] if name.startswith(prefix) else "/" + name, offset, size) for name, offset, size in layout)


def _relative_layout(layout: tuple, prefix: str) -> tuple:
    kept = _LAYOUTS.get(layout)
    return kept[1] if kept is not None else _relative(layout, prefix)


# -------------------------------------------------------------------------------------------------
# Public reading API


class TorchZipFile:
    """An open torch zip checkpoint: ``root`` is the object graph with :class:`TensorRef` in place of
    tensors (no tensor bytes are read); :meth:`array` gives a zero-copy numpy view on demand.
    ``dialect`` says who wrote it: ``"torch"`` (stock ``torch.save``) or ``"msadapter"`` (MindSpeed-Core-MS's
    MSAdapter shim, ``formats/msadapter.py``), detected from the file itself.

    Arrays handed out stay valid after :meth:`close` (they keep the mapping alive)."""

    def __init__(self, path):
        self._archive = _Archive(path)
        self.path = self._archive.path
        self.prefix = self._archive.prefix
        self._bases: dict = {}
        # inside shared_trees(): a dict shared by the files of this structure, for what readers derive
        # from the tree and the records alone (OptimFile's parsed state); None outside
        self.shared: dict | None = None
        # and one shared also by files whose pickles differ from theirs in plain numbers only
        # (pickle_delta), for what is derived from the tensors and records alone (entries, byte ranges)
        self.shared_tensors: dict | None = None
        # inside shared_trees(): (a weak reference to the _Template this file's tree is, or is read from —
        # not kept alive by the thousands of files a plan holds —; {index of a slot whose number this
        # file's pickle holds otherwise: that number's opcode and argument bytes}); None outside
        self.near: tuple | None = None
        trees = _shared_trees
        key = _structure_key(self._archive) if trees is not None else None
        hit = trees.get(key) if key is not None else None
        near = self._near_read(trees, key) if key is not None and hit is None else False
        if hit is not None:
            self.root, self.dialect, self.shared, self.shared_tensors, template = hit
            self.near = (weakref.ref(template), {})
        elif near:
            pass   # read from a template's tree
        else:
            found: list = []
            self.root = _unpickle(self._archive, materialize=False, bases=self._bases, dialect_out=found)
            self.dialect: str = found[0]  # "torch" or "msadapter", detected from the file (never a flag)
            if key is not None:
                self.shared, self.shared_tensors = {}, {}
                template = _Template(key[1], self.root, self.dialect, self.shared_tensors)
                trees[key] = (self.root, self.dialect, self.shared, self.shared_tensors, template)
                trees[_near_key(key)] = template
                self.near = (weakref.ref(template), {})
        if key is not None:
            self._archive.remember()

    def _near_read(self, trees: dict, key):
        """The tree of a pickle that differs from the last one read of this length and records only in
        plain numbers (pickle_delta): that one's tree with those numbers replaced, every other object
        shared (read-only); its ``shared_tensors`` too (same tensors, same records), not its ``shared``.
        True when read so, else False."""
        template = trees.get(_near_key(key))
        if template is None:
            return False
        found = template.patched(key[1])
        if found is None:
            return False
        self.root, self.dialect, self.shared_tensors = found[0], template.dialect, template.shared_tensors
        slots = template.slots().slots
        self.near = (weakref.ref(template), {i: pickle_delta.slot_bytes(slots[i], key[1]) for i in found[1]})
        self.shared = {}   # not kept: the template stays the one tree of these files kept (the oldest go first)
        return True

    def storage_keys(self) -> list[str]:
        n = len(self.prefix) + len("data/")
        return [name[n:] for name in self._archive.records if name.startswith(self.prefix + "data/")]

    def storage_nbytes(self, key) -> int:
        rec = self._live().record(f"data/{key}")
        if rec is None:
            raise CkptmapError(f"{self.path} has no storage {key!r} (storages: {', '.join(self.storage_keys())})")
        return rec.size

    def storage_bytes(self, key) -> np.ndarray:
        """The raw bytes of storage record ``key`` (uint8 view of the mapping)."""
        self.storage_nbytes(key)
        return _base(self._live(), self._bases, key)

    def array(self, ref: TensorRef) -> np.ndarray:
        if not isinstance(ref, TensorRef):
            raise CkptmapError(f"{self.path}: array() needs a TensorRef, got {type(ref).__name__}")
        return _numpy_view(self._live(), self._bases, ref)

    def tensor(self, ref: TensorRef):
        """A zero-copy torch view (imports torch)."""
        if not isinstance(ref, TensorRef):
            raise CkptmapError(f"{self.path}: tensor() needs a TensorRef, got {type(ref).__name__}")
        return _torch_view(self._live(), self._bases, ref)

    def _live(self) -> _Archive:
        if self._archive is None:
            raise CkptmapError(f"{self.path} was already closed; open it again with TorchZipFile(path)")
        return self._archive

    def close(self):
        # Do not close the mmap: arrays handed out may still point into it. Dropping our references
        # unmaps it once the last such array is gone.
        self._archive = None
        self._bases = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"TorchZipFile({self.path!r})"


def read_objects(path) -> object:
    """The object graph of a torch zip checkpoint with :class:`TensorRef` in place of tensors."""
    with TorchZipFile(path) as f:
        return f.root


def load(path) -> object:
    """Like ``torch.load(path, mmap=True, map_location='cpu')`` but safe: tensors are real torch CPU
    views of a copy-on-write mmap of the file (kept alive by the tensors), views of one storage share
    it, and unknown classes come back as inert stand-ins. Imports torch."""
    archive = _Archive(path)
    return _unpickle(archive, materialize=True, bases={})
