"""Megatron's ``torch_dist`` checkpoint directory (``torch.distributed.checkpoint``, DCP), read and
written without torch and without running code from a pickle.

On disk (one ``iter_NNNNNNN`` folder, what megatron-core >= 0.9 writes by default)::

    metadata.json   {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
    common.pt       torch.save of the replicated, non-sharded state: args, iteration,
                    checkpoint_version, optimizer param groups (model-space sharding types),
                    scheduler, rerun state machine (0.12), content_metadata (0.16: the sharding type)
    .metadata       pickle (protocol 4) of torch.distributed.checkpoint.metadata.Metadata:
                      state_dict_metadata {key: TensorStorageMetadata(properties=TensorProperties(
                                              dtype, layout, requires_grad, memory format, pin_memory),
                                              size=torch.Size(global shape),
                                              chunks=[ChunkStorageMetadata(offsets, sizes), ...])
                                         | BytesStorageMetadata()}
                      storage_data   {MetadataIndex(fqn=key, offset=chunk offsets | None, index):
                                      _StorageInfo(relative_path, offset, length[, transform_descriptors])}
                      planner_data (None), storage_meta (checkpoint / save ids), version ("1.0.0")
                    plus Megatron's attributes: mcore_data {key: {"nd_reformulated_orig_global_shape":
                    shape}} (0.8 - 0.14, see megatron_dist) and all_local_plans (0.12+, cached save
                    plans; never read when loading)
    __R_N.distcp    the items, back to back: rank R's N-th writer file

A *tensor* key is a global tensor; each saved *chunk* is a box of it (``offsets``, ``sizes``),
stored as one item at ``[offset, offset + length)`` of ``relative_path``. torch's
``filesystem._write_item`` -- which ``FileSystemWriter`` and Megatron's own async writer call --
``torch.save``s every tensor item in the ``torch_save`` serialization format (torch 2.13: the
default, and what megatron-core 0.16 passes; the torch 2.3 signature megatron 0.8 calls has no
other format): an item is a complete ``torch.save(chunk, stream)`` zip archive (records
``archive/data.pkl``, ``archive/data/0``, ...; offsets inside it relative to the item's start,
storages 64-byte aligned relative to it) whose tensor is the chunk, shape = the chunk's sizes.
torch's writer saves a compact copy of each chunk (its ``_SerialCpuLoader`` clones views), so these
items are byte for byte what :func:`write_checkpoint` writes. megatron-core 0.8.0's writer stages
tensors with ``.to("cpu")`` and no clone, so on a CPU run (the test harness) each item pickles the
chunk as a *view* of the whole storage behind it (the rank's parameter buffer) -- read the same way
(``TensorRef`` offset and strides), rewritten compact. A *raw* item
(the bytes of the chunk in C order, ``length = numel * itemsize``; what a writer without
``torch.save`` produces) is read too; items written through a stream transform (non-empty
``transform_descriptors``: compression, ...) are refused. A *byte* key (``BytesStorageMetadata``;
Megatron's ``ShardedObject``, key ``<name>/shard_<offsets>_<shape>``) is one item whose bytes are
the object: Megatron writes ``torch.save([object, ...])`` there.

Reading never imports torch or Megatron: ``.metadata`` goes through ckptmap's restricted unpickler
with the DCP classes mapped to inert value records (:class:`DcpRecord`) and ``torch.Size`` to a
tuple; the items and ``common.pt`` through ``torch_zip_reader`` (tensors as zero-copy views of the
mapped file). :class:`TorchDistCheckpoint` is the ``registry.open_reader`` reader of a directory:
every tensor key with its global shape, dtype and chunks (:class:`Chunk`: a ``sharding.Box`` and the
item's file, offset and length), :meth:`TorchDistCheckpoint.read_box` (one box, never the global
tensor), :meth:`TorchDistCheckpoint.array` (the global tensor assembled), the byte objects
(:meth:`TorchDistCheckpoint.read_object`) and ``common.pt``.

Writing (:func:`write_checkpoint`) is the mirror: the caller declares every output tensor with its
chunks (boxes and the ``.distcp`` file each goes to) and every object, and supplies the data one box
at a time; each tensor item is written as ``torch.save`` would write it (byte for byte: the same
zip records and pickle), ``.metadata`` is pickled with ckptmap's pure-Python pickler over inert
stand-ins of the same globals torch pickles, ``common.pt`` through ``torch_zip_writer``. The
directory is assembled under a temporary name beside the target and renamed into place when every
file is complete; every file goes through ``ckptmap.atomic``.
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import math
import mmap
import os
import pickle
import shutil
import struct
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import attrs
import numpy as np

from ckptmap import atomic, dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_folders
from ckptmap.formats import torch_zip_reader as tzr
from ckptmap.formats import torch_zip_writer as tzw
from ckptmap.formats.base import FileRange, TensorSpec
from ckptmap.formats.safe_unpickler import (RestrictedUnpickler, StandIn, StandInClass, dtype_name,
                                            torch_global, unpickle)
from ckptmap.mapping.sharding import Box

__all__ = ["Chunk", "TensorMeta", "ObjectMeta", "DcpMetadata", "TorchDistCheckpoint", "ItemFile", "OutChunk",
           "OutTensor", "OutObject", "write_checkpoint", "is_torch_dist_dir", "read_dcp_metadata",
           "METADATA_JSON", "DCP_METADATA", "COMMON_PT"]

METADATA_JSON = "metadata.json"
DCP_METADATA = megatron_folders.DCP_METADATA
COMMON_PT = "common.pt"
DISTCP_SUFFIX = ".distcp"
BACKEND_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                "common_backend_version": 1}
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION (torch 2.4 - 2.13)
METADATA_PROTOCOL = 4  # pickle.DEFAULT_PROTOCOL of Python 3.8 - 3.13: what DCP's pickle.dump writes
_ZIP_MAGIC = b"PK\x03\x04"

# -------------------------------------------------------------------------------------------------
# .metadata: torch.distributed.checkpoint's classes as inert value records


def _freeze(x):
    if isinstance(x, dict):
        return tuple((k, _freeze(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, set):
        return frozenset(_freeze(v) for v in x)
    return x


class DcpRecord:
    """An object of one of torch.distributed.checkpoint's (data)classes as the pickle described it:
    the constructor arguments (``args``, an Enum member's value) and the BUILD state (``state``: a
    dataclass's ``__dict__``, or ``TensorProperties``' tuple). Nothing of torch runs; records are
    values (equal and hashable by class, arguments and state), so a pickled dict keyed by
    ``MetadataIndex`` loads in linear time. One subclass per pickled class (:func:`_dcp_class`)."""

    __slots__ = ("args", "state")
    MODULE = ""

    def __new__(cls, *args, **kwargs):  # NEWOBJ / REDUCE
        if kwargs:
            raise pickle.UnpicklingError(f"{cls.__qualname__} built with keyword arguments")
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args):
        pass

    def __setstate__(self, state):  # BUILD
        self.state = state

    def get(self, name, default=None):
        """A field of a dataclass record (its BUILD state is the ``__dict__``)."""
        return self.state.get(name, default) if isinstance(self.state, dict) else default

    def __eq__(self, other):
        return type(self) is type(other) and self.args == other.args and self.state == other.state

    def __hash__(self):
        return hash((type(self).__qualname__, _freeze(self.args), _freeze(self.state)))

    def __repr__(self):
        return f"<{self.MODULE}.{type(self).__qualname__} args={self.args!r} state={self.state!r}>"


class TorchSize(tuple):
    """``torch.Size`` as read from a pickle: a tuple of ints."""

    __slots__ = ()


class Layout(str):
    """``torch.serialization._get_layout('torch.strided')`` as read: the layout's name."""

    __slots__ = ()


_DCP_CLASS_NAMES = {
    "torch.distributed.checkpoint.metadata": ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo", "_StoragePrefix"),
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData", "LoadPlan", "ReadItem", "LoadItemType"),
    # torch < 2.4 pickled the metadata classes from the package itself
    "torch.distributed.checkpoint": ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                     "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                     "StorageMeta"),
    "torch.distributed._shard.sharded_tensor.metadata": ("TensorProperties", "MEM_FORMAT_ENCODING"),
}
_DCP_CLASSES: dict = {}
for _module, _names in _DCP_CLASS_NAMES.items():
    for _name in _names:
        _DCP_CLASSES[(_module, _name)] = type(_name, (DcpRecord,), {"__module__": __name__, "__qualname__": _name,
                                                                   "__slots__": (), "MODULE": _module})


def _torch_size(seq=()):
    if not isinstance(seq, (list, tuple)) or not all(type(n) is int for n in seq):
        raise pickle.UnpicklingError(f"torch.Size of {seq!r:.100}")
    return TorchSize(seq)


def _get_layout(name):
    if not isinstance(name, str) or not name.startswith("torch."):
        raise pickle.UnpicklingError(f"torch.serialization._get_layout({name!r:.100})")
    return Layout(name)


class _DcpUnpickler(RestrictedUnpickler):
    """The shared restricted unpickler plus the DCP classes (inert records), ``torch.Size`` (a tuple)
    and ``torch.serialization._get_layout`` (the layout's name). Everything else is the shared
    policy: Megatron's classes (``MCoreSavePlan``) and ``pathlib`` paths become stand-ins."""

    def __init__(self, data: bytes, path):
        extra = {key: cls for key, cls in _DCP_CLASSES.items()}
        extra[("torch", "Size")] = _torch_size
        extra[("torch.serialization", "_get_layout")] = _get_layout
        super().__init__(data, path, extra)


def _is(obj, name: str) -> bool:
    return isinstance(obj, DcpRecord) and type(obj).__qualname__ == name


# -------------------------------------------------------------------------------------------------
# Plain records of what a torch_dist checkpoint holds


@attrs.frozen
class Chunk:
    """One saved chunk of tensor ``key``: the box it covers in the global tensor and the item that
    holds it, ``[offset, offset + length)`` of the checkpoint directory's file ``file``."""

    key: str
    box: Box
    file: str
    offset: int
    length: int


@attrs.frozen
class TensorMeta:
    key: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


@attrs.frozen
class ObjectMeta:
    """A byte item (Megatron ``ShardedObject``): ``key`` is the full DCP key (``name/shard_…``)."""

    key: str
    file: str
    offset: int
    length: int

    @property
    def name(self) -> str:
        """The ShardedObject's key (without ``/shard_<offsets>_<shape>``)."""
        return self.key.rpartition("/shard_")[0] or self.key


@attrs.frozen
class DcpMetadata:
    tensors: dict            # key -> TensorMeta, in the order of state_dict_metadata
    objects: dict            # key -> ObjectMeta
    order: tuple             # every key (tensors and objects) in state_dict_metadata order
    mcore_data: dict | None  # Megatron's per-key data (None: attribute absent or None)
    version: str | None
    attributes: tuple        # the Metadata attributes present in the pickle


_METADATA_CACHE: dict = {}   # (path, inode, size, mtime) -> DcpMetadata: read once per process


def read_dcp_metadata(path) -> DcpMetadata:
    """Parse a ``.metadata`` file (see the module docstring) into plain records (read-only: one parse is
    shared by every reader of the same unchanged file in this process -- pt2ms of torch_dist opens the
    checkpoint once per legacy file it plans, and the parse is a tenth of a second at 2 GB)."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
        hit = _METADATA_CACHE.get(key)
        if hit is not None:
            return hit
        data = path.read_bytes()
    except OSError as e:
        raise CkptmapError(f"cannot read {path}: {e.strerror or e}; a torch_dist checkpoint folder holds a "
                           f"'.metadata' file written by torch.distributed.checkpoint") from None
    root = unpickle(_DcpUnpickler(data, path), str(path))
    meta = _METADATA_CACHE[key] = _parse_metadata(root, path)
    return meta


def _bad(path, what) -> CkptmapError:
    return CkptmapError(f"{path} is not a torch.distributed.checkpoint metadata file ({what}); the checkpoint is "
                        f"corrupt or was not written by torch_dist — save it again")


def _ints(value, n=None) -> tuple[int, ...] | None:
    if isinstance(value, StandIn) and value.module == "torch" and value.qualname == "Size" and value.args:
        value = value.args[0]
    if not isinstance(value, (list, tuple)) or not all(type(v) is int and v >= 0 for v in value):
        return None
    if n is not None and len(value) != n:
        return None
    return tuple(value)


def _tensor_dtype(props, path, key) -> str:
    state = props.state if _is(props, "TensorProperties") else None
    if isinstance(state, tuple) and state:
        marker = state[0]
    elif isinstance(state, dict):
        marker = state.get("dtype")
    else:
        raise _bad(path, f"tensor {key!r} has no TensorProperties")
    name = dtype_name(marker)
    if name is None:
        raise CkptmapError(f"{path}: tensor {key!r} has dtype {marker!r}; ckptmap reads {', '.join(dtypes.NAMES)}")
    return name


def _parse_metadata(root, path) -> DcpMetadata:
    if not _is(root, "Metadata") or not isinstance(root.state, dict):
        raise _bad(path, f"the pickle holds {type(root).__name__}, not a Metadata object")
    st = root.state
    sdm, storage = st.get("state_dict_metadata"), st.get("storage_data")
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise _bad(path, "state_dict_metadata or storage_data is missing")
    infos: dict = {}
    for index, info in storage.items():
        if not _is(index, "MetadataIndex") or not _is(info, "_StorageInfo"):
            raise _bad(path, f"storage_data maps {index!r:.80} to {info!r:.80}")
        fqn, off = index.get("fqn"), index.get("offset")
        rel, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
        if not isinstance(fqn, str) or not isinstance(rel, str) or type(offset) is not int or type(length) is not int \
                or offset < 0 or length < 0:
            raise _bad(path, f"malformed storage entry {index!r:.120} -> {info!r:.120}")
        if info.get("transform_descriptors"):
            raise CkptmapError(f"{path}: item {fqn!r} was written through the stream transforms "
                               f"{list(info.get('transform_descriptors'))} (a DCP storage extension such as "
                               f"compression); ckptmap reads plain torch_dist items only — save the checkpoint "
                               f"without storage extensions")
        if os.path.isabs(rel) or ".." in Path(rel).parts or "/" in rel or "\\" in rel:
            raise _bad(path, f"item {fqn!r} names the file {rel!r} outside the checkpoint folder")
        key = (fqn, None if off is None else _ints(off))
        if key in infos:
            raise _bad(path, f"item {fqn!r} at {key[1]} is listed twice")
        infos[key] = (rel, offset, length)
    tensors, objects, order = {}, {}, []
    used = set()
    for key, meta in sdm.items():
        if not isinstance(key, str):
            raise _bad(path, f"key {key!r:.80} is not a string")
        order.append(key)
        if _is(meta, "BytesStorageMetadata"):
            loc = infos.get((key, None))
            if loc is None:
                raise _bad(path, f"object {key!r} has no storage entry")
            used.add((key, None))
            objects[key] = ObjectMeta(key, *loc)
            continue
        if not _is(meta, "TensorStorageMetadata"):
            raise _bad(path, f"key {key!r} is described by {meta!r:.100}")
        shape = _ints(meta.get("size"))
        chunks_meta = meta.get("chunks")
        if shape is None or not isinstance(chunks_meta, list):
            raise _bad(path, f"tensor {key!r} has no size or chunk list")
        dtype = _tensor_dtype(meta.get("properties"), path, key)
        chunks = []
        for c in chunks_meta:
            if not _is(c, "ChunkStorageMetadata"):
                raise _bad(path, f"tensor {key!r} has a chunk {c!r:.80}")
            offs, sizes = _ints(c.get("offsets"), len(shape)), _ints(c.get("sizes"), len(shape))
            if offs is None or sizes is None:
                raise _bad(path, f"tensor {key!r} (shape {list(shape)}) has a chunk with offsets "
                                 f"{c.get('offsets')!r} and sizes {c.get('sizes')!r}")
            loc = infos.get((key, offs))
            if loc is None:
                raise CkptmapError(f"{path}: chunk {list(offs)} of tensor {key!r} has no storage entry; the "
                                   f".metadata does not describe the .distcp files — the checkpoint is incomplete "
                                   f"or corrupt, save it again")
            used.add((key, offs))
            chunks.append(Chunk(key, Box(offs, sizes), *loc))
        _check_tiling(path, key, shape, chunks)
        tensors[key] = TensorMeta(key, dtype, shape, tuple(chunks))
    extra = set(infos) - used
    if extra:
        fqn, off = sorted(extra, key=str)[0]
        raise _bad(path, f"{len(extra)} storage entries belong to no key of state_dict_metadata (first: {fqn!r} "
                         f"at {off})")
    mcore = st.get("mcore_data")
    if mcore is not None and not isinstance(mcore, dict):
        raise _bad(path, f"mcore_data is a {type(mcore).__name__}")
    version = st.get("version")
    return DcpMetadata(tensors, objects, tuple(order), mcore, version if isinstance(version, str) else None,
                       tuple(st))


def _check_tiling(path, key, shape, chunks) -> None:
    """Every chunk inside the global tensor, none overlapping another, together covering it."""
    total = 0
    for c in chunks:
        if any(o + n > s for o, n, s in zip(c.box.offsets, c.box.lengths, shape)):
            raise CkptmapError(f"{path}: chunk at {list(c.box.offsets)} of size {list(c.box.lengths)} lies outside "
                               f"tensor {key!r} of shape {list(shape)}; the metadata is corrupt — save it again")
        total += c.box.numel
    numel = math.prod(shape)
    if total != numel or _overlapping(chunks):
        what = "overlap" if total >= numel else f"cover {total} of its {numel} elements"
        raise CkptmapError(f"{path}: the {len(chunks)} saved chunks of tensor {key!r} (shape {list(shape)}) {what}; "
                           f"ckptmap reads checkpoints whose chunks tile each tensor exactly (what Megatron's "
                           f"validated saves write) — save it again")


def _overlapping(chunks) -> bool:
    boxes = [c.box for c in chunks if c.box.numel]
    return _boxes_overlap(boxes, tuple(range(len(boxes[0].offsets))) if boxes else ())


def _boxes_overlap(boxes: list, axes: tuple) -> bool:
    """Whether two of ``boxes`` (non-empty) overlap: near-linear for the grid-like chunkings
    checkpoints use. Along the first axis, boxes either share an interval or lie apart (a grid):
    only boxes sharing it can overlap, so recurse into each group on the other axes; otherwise
    sweep along that axis, testing the boxes whose intervals there overlap."""
    if len(boxes) < 2:
        return False
    if not axes:
        return True  # two non-empty boxes equal along every axis
    a = axes[0]
    groups: dict = {}
    for b in boxes:
        groups.setdefault((b.offsets[a], b.lengths[a]), []).append(b)
    ivs = sorted(groups)
    if all(o1 + n1 <= o2 for (o1, n1), (o2, _) in zip(ivs, ivs[1:])):
        return any(_boxes_overlap(g, axes[1:]) for g in groups.values())
    active: list = []
    for b in sorted(boxes, key=lambda b: b.offsets[a]):
        active = [x for x in active if x.offsets[a] + x.lengths[a] > b.offsets[a]]
        if any(x.intersect(b) is not None for x in active):
            return True
        active.append(b)
    return False


# -------------------------------------------------------------------------------------------------
# Items: a torch.save archive (or raw bytes) inside a .distcp file


class _Window(io.RawIOBase):
    """A read-only, seekable file view of ``[base, base + length)`` of a mapping (for ``zipfile``)."""

    def __init__(self, mm, base: int, length: int):
        self.mm, self.base, self.length, self.pos = mm, base, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def read(self, n=-1):
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        data = self.mm[self.base + self.pos: self.base + max(end, self.pos)]
        self.pos = max(end, self.pos)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


class _ItemArchive:
    """What ``torch_zip_reader`` needs of an archive (``path``, ``mm``, ``prefix``, ``record``,
    ``read_record``) for a torch zip archive that is one item of a ``.distcp`` file."""

    def __init__(self, label: str, mm, base: int, length: int):
        self.path = label
        self.mm = mm
        self.size = length
        try:
            with zipfile.ZipFile(_Window(mm, base, length)) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error) as e:
            raise CkptmapError(f"{label} is not a complete torch.save archive ({e}); the .metadata does not match "
                               f"the .distcp file — the checkpoint is corrupt, save it again") from None
        self.records = {}
        for zi in infos:
            h = zi.header_offset
            if zi.compress_type != zipfile.ZIP_STORED or zi.flag_bits & 0x1 or h + _LOCAL_HEADER.size > length:
                raise CkptmapError(f"{label}: record {zi.filename!r} is compressed, encrypted or out of range; "
                                   f"not an item torch wrote")
            sig, *_, nlen, elen = _LOCAL_HEADER.unpack_from(mm, base + h)
            start = h + _LOCAL_HEADER.size + nlen + elen
            if sig != _ZIP_MAGIC or start + zi.file_size > length:
                raise CkptmapError(f"{label}: record {zi.filename!r} runs past the item's {length} bytes; the "
                                   f".metadata does not match the .distcp file — the checkpoint is corrupt")
            self.records[zi.filename] = tzr._Record(zi.filename, base + start, zi.file_size)
        pkls = [n for n in self.records if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CkptmapError(f"{label} is a zip archive but not a torch.save archive (no '<name>/data.pkl')")
        self.prefix = pkls[0][: -len("data.pkl")]

    def record(self, rel):
        return self.records.get(self.prefix + rel)

    def read_record(self, rel, missing_ok=False):
        r = self.record(rel)
        if r is None:
            if missing_ok:
                return None
            raise CkptmapError(f"{self.path} has no record {self.prefix + rel!r}; the item is incomplete")
        return self.mm[r.offset: r.offset + r.size]


class ItemFile:
    """A ``torch.save`` archive that is one item of a ``.distcp`` file, opened like
    ``torch_zip_reader.TorchZipFile``: ``root`` is its object graph (``TensorRef`` for tensors),
    :meth:`array` a zero-copy view of a tensor in it."""

    def __init__(self, label: str, mm, base: int, length: int):
        self._archive = _ItemArchive(label, mm, base, length)
        self.path = label
        self._bases: dict = {}
        self.root = tzr._unpickle(self._archive, materialize=False, bases=self._bases)

    def array(self, ref: tzr.TensorRef) -> np.ndarray:
        if not isinstance(ref, tzr.TensorRef):
            raise CkptmapError(f"{self.path}: array() needs a TensorRef, got {type(ref).__name__}")
        return tzr._numpy_view(self._archive, self._bases, ref)

    def storage_bytes(self, key) -> np.ndarray:
        return tzr._base(self._archive, self._bases, key)

    def storage_record(self, key):
        return self._archive.record(f"data/{key}")


# -------------------------------------------------------------------------------------------------
# Reader


class _ChunkIndex:
    """The chunks of one tensor, indexed to find those a box intersects in O(log n + hits): grouped by
    their intervals on every axis but the last (the grid of TP shards, stacked layers, experts,
    fragments), each group sorted along the last axis (DP ranges, bucket pieces); the exact chunk
    boxes in a dict."""

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.exact = {(c.box.offsets, c.box.lengths): c for c in self.chunks}
        self.nd = len(self.chunks[0].box.offsets) if self.chunks else 0
        groups: dict = {}
        for c in self.chunks:
            if c.box.numel:
                groups.setdefault(tuple(zip(c.box.offsets[:-1], c.box.lengths[:-1])), []).append(c)
        self.groups = {}
        for k, cs in groups.items():
            cs.sort(key=lambda c: c.box.offsets[-1])
            self.groups[k] = ([c.box.offsets[-1] for c in cs], [c.box.offsets[-1] + c.box.lengths[-1] for c in cs], cs)
        self.axes = [sorted({k[a] for k in groups}) for a in range(max(self.nd - 1, 0))]

    def find(self, box: Box) -> list:
        hit = self.exact.get((box.offsets, box.lengths))
        if hit is not None:
            return [hit]
        if not box.numel:
            return []
        if self.nd == 0:
            return list(self.chunks)
        per_axis = []
        for a, ivs in enumerate(self.axes):
            lo, hi = box.offsets[a], box.offsets[a] + box.lengths[a]
            end = bisect.bisect_left(ivs, (hi, 0))
            per_axis.append([iv for iv in ivs[:end] if iv[0] + iv[1] > lo])
        lo, hi = box.offsets[-1], box.offsets[-1] + box.lengths[-1]
        out = []
        for key in itertools.product(*per_axis):
            g = self.groups.get(key)
            if g is None:
                continue
            starts, ends, cs = g
            out.extend(cs[bisect.bisect_right(ends, lo): bisect.bisect_left(starts, hi)])
        return out


OBJECT_TENSOR = "#"   # object key + this + a path inside the object's graph: a tensor stored inside a byte object


def object_tensor_key(obj_key: str, path) -> str:
    """The key under which the reader serves a tensor inside byte object ``obj_key`` (``spec``,
    ``read_range_box``): ``path`` picks list items by index and dict entries by ``str(key)``."""
    return obj_key + OBJECT_TENSOR + "/".join(str(p) for p in path)


CHUNK_AT = "@"   # tensor key + this + the chunk's offsets: one saved chunk served as a tensor of its own


def chunk_tensor_key(key: str, chunk: Chunk) -> str:
    """The key under which the reader serves one saved chunk of ``key`` as a tensor of the chunk's shape
    (``spec``, ``array``, ``byte_range``): a plan source whose bytes the executor can copy kernel-side."""
    return key + CHUNK_AT + ",".join(str(o) for o in chunk.box.offsets)


def is_torch_dist_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file()


class TorchDistCheckpoint:
    """A torch_dist checkpoint folder (``iter_NNNNNNN``), read lazily: metadata on open (and checked
    against the files: every item inside an existing file), item bytes on demand from memory maps.

    The ``registry.open_reader`` protocol (``formats/base.py``) over the *tensor* keys: ``keys``,
    ``spec`` (dtype, global shape), ``array`` (the global tensor, assembled in memory),
    ``byte_range`` (a tensor stored as one chunk), ``close``. Beyond it: :meth:`chunks`,
    :meth:`chunk_array` (one saved chunk, zero-copy), :meth:`read_box` (any box of a global tensor,
    read from the chunks it intersects -- memory = the box), :meth:`objects` / :meth:`read_object`
    (byte items), :meth:`common` (``common.pt``), :attr:`backend` (``metadata.json``)."""

    dialect = "torch_dist"

    def __init__(self, path):
        path = Path(path)
        if not path.exists():
            raise CkptmapError(f"{path} does not exist; expected a torch_dist checkpoint folder (iter_NNNNNNN)")
        if not path.is_dir():
            raise CkptmapError(f"{path} is a file; a torch_dist checkpoint is a folder holding .metadata, "
                               f"common.pt, metadata.json and __R_N.distcp files")
        if not (path / DCP_METADATA).is_file():
            raise CkptmapError(f"{path} holds no {DCP_METADATA} file, so it is not a torch_dist checkpoint "
                               f"(iter_NNNNNNN folder of --ckpt-format torch_dist); if the save was interrupted, "
                               f"save it again")
        self.path = path
        self.backend = self._read_backend()
        self.meta = read_dcp_metadata(path / DCP_METADATA)
        self._maps: dict = {}
        self._fds: dict = {}
        self._ranges: dict = {}
        self._index: dict = {}
        self._objects: dict = {}
        self._common = None
        self._check_files()

    # --- opening ---
    def _read_backend(self) -> dict | None:
        f = self.path / METADATA_JSON
        if not f.exists():
            return None
        try:
            backend = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CkptmapError(f"{f} is not valid JSON ({e}); save the checkpoint again") from None
        if not isinstance(backend, dict) or backend.get("sharded_backend") != "torch_dist":
            raise CkptmapError(f"{f} says sharded_backend {backend.get('sharded_backend') if isinstance(backend, dict) else backend!r}; "
                               f"ckptmap reads torch_dist checkpoints (zarr and others are not supported)")
        return backend

    def _check_files(self) -> None:
        needed: dict[str, int] = {}
        for items in (*(t.chunks for t in self.meta.tensors.values()), self.meta.objects.values()):
            for it in items:
                needed[it.file] = max(needed.get(it.file, 0), it.offset + it.length)
        for name, end in sorted(needed.items()):
            f = self.path / name
            if not f.is_file():
                keys = sorted({it.key for t in self.meta.tensors.values() for it in t.chunks if it.file == name}
                              | {o.key for o in self.meta.objects.values() if o.file == name})
                raise CkptmapError(f"{self.path}: {name} is missing but .metadata stores {len(keys)} items in it "
                                   f"(e.g. {keys[0]!r}); the checkpoint is incomplete — copy the whole folder again")
            size = f.stat().st_size
            if size < end:
                raise CkptmapError(f"{f} has {size} bytes but .metadata places items up to byte {end}; the file is "
                                   f"truncated or does not belong to this .metadata — copy or save it again")

    def _map(self, name: str):
        mm = self._maps.get(name)
        if mm is None:
            if self._maps is None:
                raise CkptmapError(f"{self.path} was closed")
            f = self.path / name
            with open(f, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._maps[name] = mm
        return mm

    # --- protocol ---
    def keys(self) -> list[str]:
        return list(self.meta.tensors)

    def tensor(self, key) -> TensorMeta:
        t = self.meta.tensors.get(key)
        if t is None:
            hint = " (it is a byte object, see read_object)" if key in self.meta.objects else ""
            raise CkptmapError(f"{self.path} has no tensor {key!r}{hint}")
        return t

    def spec(self, key) -> TensorSpec:
        if key not in self.meta.tensors and CHUNK_AT in key:
            c = self._chunk_at(key)
            return TensorSpec(self.tensor(c.key).dtype, tuple(c.box.lengths))
        if key not in self.meta.tensors and OBJECT_TENSOR in key:
            ref = self._object_tensor(key)[1]
            return TensorSpec(ref.dtype, tuple(ref.shape))
        t = self.tensor(key)
        return TensorSpec(t.dtype, t.shape)

    def _object_tensor(self, key) -> tuple[ItemFile, tzr.TensorRef]:
        """``(item, ref)`` of an object tensor key (:func:`object_tensor_key`); the opened item is cached
        (its arrays are views of the mapped file)."""
        obj, _, path = key.partition(OBJECT_TENSOR)
        item = self._objects.get(obj)
        if item is None:
            item = self._objects[obj] = self.read_object(obj)
        node = item.root
        for part in path.split("/"):
            if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            hits = [v for k, v in node.items() if str(k) == part] if isinstance(node, dict) else []
            if len(hits) != 1:
                raise CkptmapError(f"{self.path}: object {obj!r} has no entry {path!r} (at {part!r}); the checkpoint "
                                   f"is not the one the plan was made from — re-create the plan")
            node = hits[0]
        if not isinstance(node, tzr.TensorRef):
            raise CkptmapError(f"{self.path}: object {obj!r} entry {path!r} is a {type(node).__name__}, not a tensor")
        return item, node

    def chunks(self, key) -> tuple[Chunk, ...]:
        return self.tensor(key).chunks

    def _chunk_at(self, key) -> Chunk:
        """The chunk a :func:`chunk_tensor_key` names."""
        base, _, at = key.rpartition(CHUNK_AT)
        try:
            offsets = tuple(int(o) for o in at.split(",")) if at else ()
        except ValueError:
            offsets = None
        hit = next((c for c in self.tensor(base).chunks if c.box.offsets == offsets), None)
        if hit is None:
            raise CkptmapError(f"{self.path}: tensor {base!r} has no saved chunk at offsets {at!r} (plan source "
                               f"{key!r}); the checkpoint is not the one the plan was made from — re-create the plan")
        return hit

    def chunk_runs(self, key, start: int, numel: int | None, view, offsets, lengths) -> list[tuple] | None:
        """For a plan ``Read`` (the arguments of :meth:`read_range_box`): its elements, in order, as runs of
        consecutive elements of saved chunks, ``[(chunk key, chunk shape, first element, count)]`` — the
        executor can copy each run's bytes kernel-side (:meth:`byte_range` of the chunk key) — or None when
        they are not. Planning only: reads the metadata, not the items."""
        if key not in self.meta.tensors:
            return None   # tensors inside byte objects: read through the object
        t = self.tensor(key)
        shape, view, offsets, lengths = tuple(t.shape), tuple(view), tuple(offsets), tuple(lengths)
        numel = math.prod(shape) - start if numel is None else numel
        if not numel or not math.prod(lengths) or not shape:
            return None
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = _ChunkIndex(t.chunks)
        first = Box(offsets, lengths).run_start(view)
        if first is not None:
            # consecutive elements of the tensor (a whole nd-flattened fragment, a parameter's range of a
            # bucket, a TP shard of dim 0): walk the chunks that hold them (DP ranges of a fragment, …)
            a = start + first
            return self._flat_runs(key, index, shape, a, math.prod(lengths))
        # a box whose rows are not consecutive (a TP shard of dim 1): one chunk must hold it as a run, which
        # it does when the chunk is that TP fragment; the view is then the stored tensor's trailing axes
        for j in range(len(shape) + 1):
            tail, lead_shape = shape[len(shape) - j:], shape[:len(shape) - j]
            if math.prod(tail) != numel or start % numel:
                continue
            if view != tail:
                return None
            lead = tuple(int(i) for i in np.unravel_index(start // numel, lead_shape)) if lead_shape else ()
            box = Box(lead + offsets, (1,) * len(lead) + lengths)
            hits = index.find(box)
            if len(hits) != 1 or hits[0].box.intersect(box) != box:
                return None
            c = hits[0]
            local = Box(tuple(o - co for o, co in zip(box.offsets, c.box.offsets)), box.lengths)
            first = local.run_start(c.box.lengths)
            if first is None:
                return None
            return [(chunk_tensor_key(key, c), tuple(c.box.lengths), first, box.numel)]
        return None

    @staticmethod
    def _flat_runs(key, index, shape, a: int, n: int) -> list[tuple] | None:
        """Elements ``[a, a + n)`` of a C-order tensor of ``shape`` as runs of consecutive elements of its
        chunks (see chunk_runs), or None where a chunk does not hold its part as one run."""
        out = []
        while n:
            at = tuple(int(i) for i in np.unravel_index(a, shape))
            hits = index.find(Box(at, (1,) * len(shape)))
            if len(hits) != 1:
                return None
            c = hits[0]
            o, ln = c.box.offsets, c.box.lengths
            m = 0   # the chunk's elements come in runs over axes m.. (whole after m): the run holding `at`
            for k in range(len(shape)):
                if ln[k] != shape[k]:
                    m = k
            inner = math.prod(shape[m + 1:])
            run = ln[m] * inner
            local = tuple(x - y for x, y in zip(at, o))
            pos = local[m] * inner + (int(np.ravel_multi_index(local[m + 1:], shape[m + 1:])) if m + 1 < len(shape)
                                      else 0)
            runs_before = int(np.ravel_multi_index(local[:m], ln[:m])) if m else 0
            take = min(n, run - pos)
            out.append((chunk_tensor_key(key, c), tuple(ln), runs_before * run + pos, take))
            a, n = a + take, n - take
        return out

    def chunk_array(self, chunk: Chunk) -> np.ndarray:
        """The chunk's elements, shape ``chunk.box.lengths``: a read-only view of the mapped file."""
        t = self.tensor(chunk.key)
        mm = self._map(chunk.file)
        label = f"{self.path / chunk.file} (item of {chunk.key!r} at byte {chunk.offset})"
        st = dtypes.storage(t.dtype)
        numel = chunk.box.numel
        if self._is_archive(mm, chunk.offset, chunk.length):
            item = ItemFile(label, mm, chunk.offset, chunk.length)
            ref = item.root
            if not isinstance(ref, tzr.TensorRef):
                raise CkptmapError(f"{label} holds a {type(ref).__name__}, not a tensor; the .metadata does not "
                                   f"match the .distcp file — the checkpoint is corrupt")
            if ref.dtype != t.dtype or ref.numel != numel:
                raise CkptmapError(f"{label} holds a {ref.dtype} tensor of shape {list(ref.shape)} but .metadata "
                                   f"says {t.dtype} {list(chunk.box.lengths)}; the checkpoint is corrupt")
            return item.array(ref).reshape(chunk.box.lengths)
        if chunk.length != numel * st.itemsize:
            raise CkptmapError(f"{label} is {chunk.length} bytes: neither a torch.save archive nor the raw "
                               f"{numel} x {t.dtype} = {numel * st.itemsize} bytes of the chunk; the .metadata does "
                               f"not match the .distcp file — the checkpoint is corrupt, save it again")
        return np.frombuffer(mm, dtype=st, count=numel, offset=chunk.offset).reshape(chunk.box.lengths)

    @staticmethod
    def _is_archive(mm, offset: int, length: int) -> bool:
        """A ``torch.save`` item starts with a zip local header and ends with the end-of-central-directory
        record (torch writes no archive comment); a raw item is just the chunk's bytes."""
        if length < 44 or bytes(mm[offset: offset + 4]) != _ZIP_MAGIC:
            return False
        return bytes(mm[offset + length - 22: offset + length - 18]) == b"PK\x05\x06"

    def check_items(self) -> None:
        """Every tensor item is a ``torch.save`` archive (zip header and end record in place) or exactly
        the raw bytes of its chunk: a cheap check (two small reads per item) that the ``.metadata``
        describes these ``.distcp`` files, before anything is written."""
        for t in self.meta.tensors.values():
            size = dtypes.itemsize(t.dtype)
            for c in t.chunks:
                mm = self._map(c.file)
                if not self._is_archive(mm, c.offset, c.length) and c.length != c.box.numel * size:
                    raise CkptmapError(f"{self.path / c.file}: the item of {c.key!r} at byte {c.offset} ({c.length} "
                                       f"bytes) is neither a torch.save archive nor the raw {c.box.numel} x {t.dtype} "
                                       f"of its chunk; the .metadata does not match the .distcp files — the checkpoint "
                                       f"is corrupt, save it again")

    def chunk_range(self, chunk: Chunk) -> FileRange | None:
        """Where the chunk's C-order bytes lie in its file (for a kernel-side copy), or None."""
        t = self.tensor(chunk.key)
        nbytes = chunk.box.numel * dtypes.itemsize(t.dtype)
        mm = self._map(chunk.file)
        if not self._is_archive(mm, chunk.offset, chunk.length):
            return FileRange(str(self.path / chunk.file), chunk.offset, nbytes) if chunk.length == nbytes else None
        label = f"{self.path / chunk.file} (item of {chunk.key!r} at byte {chunk.offset})"
        item = ItemFile(label, mm, chunk.offset, chunk.length)
        ref = item.root
        if isinstance(ref, tzr.TensorRef) and (ref.dtype != t.dtype or ref.numel != chunk.box.numel):
            # what chunk_array refuses: the bytes of another item must not be copied as this one's
            raise CkptmapError(f"{label} holds a {ref.dtype} tensor of shape {list(ref.shape)} but .metadata "
                               f"says {t.dtype} {list(chunk.box.lengths)}; the checkpoint is corrupt")
        if not isinstance(ref, tzr.TensorRef) or ref.stride != tzr.contiguous_stride(ref.shape) and ref.numel > 1:
            return None
        rec = item.storage_record(ref.storage)
        if rec is None or (ref.storage_offset + ref.numel) * dtypes.itemsize(ref.dtype) > rec.size:
            raise CkptmapError(f"{label}: its tensor's storage record is missing or shorter than the tensor; the "
                               f"checkpoint is corrupt — save it again")
        return FileRange(str(self.path / chunk.file), rec.offset + ref.storage_offset * dtypes.itemsize(ref.dtype),
                         nbytes)

    def byte_range(self, key) -> FileRange | None:
        if key not in self.meta.tensors and CHUNK_AT in key:
            return self.chunk_range(self._chunk_at(key))
        t = self.tensor(key)
        if len(t.chunks) != 1:
            return None
        return self.chunk_range(t.chunks[0])

    def read_box(self, key, box: Box, out: np.ndarray | None = None) -> np.ndarray:
        """The elements of ``box`` of global tensor ``key`` (a new C-contiguous array of the box's shape,
        or ``out``), copied from every chunk the box intersects."""
        t = self.tensor(key)
        if len(box.offsets) != len(t.shape) or any(o < 0 or n < 0 or o + n > s for o, n, s in
                                                   zip(box.offsets, box.lengths, t.shape)):
            raise CkptmapError(f"box {box} is not inside tensor {key!r} of shape {list(t.shape)}")
        if out is None:
            out = np.empty(box.lengths, dtype=dtypes.storage(t.dtype))
        covered = 0
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = _ChunkIndex(t.chunks)
        for c in index.find(box):
            hit = c.box.intersect(box) if box.numel else None
            if hit is None:
                continue
            dst_idx = tuple(slice(h - o, h - o + n) for h, o, n in zip(hit.offsets, box.offsets, hit.lengths))
            if hit == c.box and self._read_into(c, out[dst_idx]):
                covered += hit.numel
                continue
            src = self.chunk_array(c)
            src_idx = tuple(slice(h - o, h - o + n) for h, o, n in zip(hit.offsets, c.box.offsets, hit.lengths))
            out[dst_idx] = src[src_idx]
            covered += hit.numel
        if covered != box.numel:  # chunks tile the tensor (checked on open), so this is an internal error
            raise CkptmapError(f"internal error: box {box} of {key!r} covered {covered} of {box.numel} elements")
        return out

    def _read_into(self, chunk: Chunk, dst: np.ndarray) -> bool:
        """A whole chunk read with pread straight into ``dst`` when that is one contiguous block: one
        kernel copy, no page faults of a mapping and no intermediate array. False where it is not
        (``dst`` strided, the chunk not one plain byte range); the caller then copies from the map."""
        if not dst.flags.c_contiguous or not dst.flags.writeable or dst.size == 0 \
                or dst.dtype != dtypes.storage(self.tensor(chunk.key).dtype):
            return False
        rng = self._ranges.get((chunk.file, chunk.offset), False)
        if rng is False:
            rng = self._ranges[(chunk.file, chunk.offset)] = self.chunk_range(chunk)
        if rng is None or rng.nbytes != dst.nbytes:
            return False
        fd = self._fds.get(chunk.file)
        if fd is None:
            fd = self._fds[chunk.file] = os.open(self.path / chunk.file, os.O_RDONLY)
        view = memoryview(dst.reshape(-1).view(np.uint8))
        done = 0
        while done < rng.nbytes:
            n = os.preadv(fd, [view[done:]], rng.offset + done)
            if n <= 0:
                raise CkptmapError(f"{self.path / chunk.file}: ends inside the item of {chunk.key!r} at byte "
                                   f"{rng.offset + done} ({rng.nbytes - done} bytes missing); the file is truncated "
                                   f"— the checkpoint is incomplete, copy or save it again")
            done += n
        return True

    def read_range_box(self, key, start: int, numel: int | None, view, offsets, lengths,
                       out: np.ndarray | None = None) -> np.ndarray:
        """Box ``offsets``/``lengths`` of the flat element range ``[start, start + numel)`` of ``key``
        viewed (C order) as ``view`` -- a plan ``Read`` -- reading only the chunks under it, not the
        global tensor: the range must be whole trailing-axis rows of the stored tensor (one stacked
        layer of a ``[L, …]`` tensor, one fragment of an nd-flattened one), which is what plans make.
        With ``out`` (shape ``lengths``, e.g. its place in an assembled shard) the box is written there
        and ``out`` returned; whole chunks then go straight into it, without an intermediate array."""
        def place(box):
            if out is None:
                return box
            out[...] = box
            return out

        def cut(rows):
            return place(rows[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))])

        if key not in self.meta.tensors and OBJECT_TENSOR in key:   # a tensor inside a byte object: a mapped view
            item, ref = self._object_tensor(key)
            flat = item.array(ref).reshape(-1)
            numel = flat.size - start if numel is None else numel
            return cut(flat[start:start + numel].reshape(view))
        t = self.tensor(key)
        shape, view, offsets, lengths = tuple(t.shape), tuple(view), tuple(offsets), tuple(lengths)
        numel = math.prod(shape) - start if numel is None else numel
        if len(shape) == 1:   # a range of a 1-D tensor (a dp_reshardable bucket): only the chunks under it
            return cut(self.read_box(key, Box((start,), (numel,))).reshape(view))
        for j in range(len(shape) + 1):
            tail, lead_shape = shape[len(shape) - j:], shape[:len(shape) - j]
            if math.prod(tail) != numel or (numel and start % numel):
                continue
            lead = tuple(int(i) for i in np.unravel_index(start // numel, lead_shape)) if lead_shape else ()
            rows = Box(lead + (0,) * j, (1,) * len(lead) + tail)
            if view == tail:   # the box itself, straight from the chunks
                box = Box(lead + offsets, (1,) * len(lead) + lengths)
                if out is not None:
                    self.read_box(key, box, out=out[(np.newaxis,) * len(lead)])
                    return out
                return self.read_box(key, box).reshape(lengths)
            if out is not None and lengths == view and not any(offsets) and out.flags.c_contiguous:
                # all of a row block viewed in another shape (an nd-flattened fragment): the same bytes
                self.read_box(key, rows, out=out.reshape(rows.lengths))
                return out
            return cut(self.read_box(key, rows).reshape(view))
        return cut(self.array(key).reshape(-1)[start:start + numel].reshape(view))

    def array(self, key) -> np.ndarray:
        """The whole global tensor (in memory; prefer :meth:`read_box` for large tensors)."""
        if key not in self.meta.tensors and CHUNK_AT in key:
            return self.chunk_array(self._chunk_at(key))
        t = self.tensor(key)
        if len(t.chunks) == 1 and t.chunks[0].box.lengths == t.shape:
            return self.chunk_array(t.chunks[0])
        return self.read_box(key, Box((0,) * len(t.shape), t.shape))

    # --- objects and common.pt ---
    def objects(self) -> list[str]:
        return list(self.meta.objects)

    def object_bytes(self, key) -> memoryview:
        o = self.meta.objects.get(key)
        if o is None:
            raise CkptmapError(f"{self.path} has no byte object {key!r}")
        return memoryview(self._map(o.file))[o.offset: o.offset + o.length]

    def read_object(self, key) -> ItemFile:
        """The object item ``key`` (Megatron: ``torch.save([data, ...])``) opened safely: ``.root`` is its
        object graph (tensors as ``TensorRef``), ``.array(ref)`` reads a tensor in it."""
        o = self.meta.objects.get(key)
        if o is None:
            raise CkptmapError(f"{self.path} has no byte object {key!r}")
        return ItemFile(f"{self.path / o.file} (object {key!r} at byte {o.offset})", self._map(o.file), o.offset,
                        o.length)

    def common(self) -> tzr.TorchZipFile:
        """``common.pt`` opened with the safe reader (``.root`` is the object graph)."""
        if self._common is None:
            f = self.path / COMMON_PT
            if not f.is_file():
                raise CkptmapError(f"{self.path} has no {COMMON_PT}; a torch_dist checkpoint folder written by "
                                   f"Megatron always has one — copy the whole folder again")
            self._common = tzr.TorchZipFile(f)
        return self._common

    def close(self) -> None:
        for mm in (self._maps or {}).values():
            if isinstance(mm, mmap.mmap):
                try:
                    mm.close()
                except BufferError:  # an array handed out still views it: unmapped when that goes
                    pass
        self._maps = {}
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        self._objects = {}
        if self._common is not None:
            self._common.close()
            self._common = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"TorchDistCheckpoint({str(self.path)!r})"


# -------------------------------------------------------------------------------------------------
# Writer


@attrs.frozen
class OutChunk:
    box: Box
    file: str        # output file name (``__R_N.distcp``)


@attrs.frozen
class OutTensor:
    key: str
    dtype: str
    shape: tuple[int, ...] = attrs.field(converter=tuple)
    chunks: tuple[OutChunk, ...] = attrs.field(converter=tuple)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


@attrs.frozen
class OutObject:
    key: str         # the full DCP key (``name/shard_…``)
    file: str


def _distcp_name_ok(name: str) -> bool:
    return name.endswith(DISTCP_SUFFIX) and "/" not in name and "\\" not in name and not name.startswith(".")


def check_outputs(tensors: list[OutTensor], objects: list[OutObject]) -> None:
    """What ``write_checkpoint`` checks before writing anything: keys unique, dtypes known, chunks tile
    each tensor, file names plain ``*.distcp`` names."""
    seen = set()
    for t in tensors:
        if t.key in seen:
            raise CkptmapError(f"internal error: output key {t.key!r} declared twice")
        seen.add(t.key)
        dtypes.get(t.dtype)
        chunks = [Chunk(t.key, c.box, c.file, 0, 0) for c in t.chunks]
        _check_tiling("output", t.key, t.shape, chunks)
        for c in t.chunks:
            if not _distcp_name_ok(c.file):
                raise CkptmapError(f"internal error: output file name {c.file!r}")
    for o in objects:
        if o.key in seen:
            raise CkptmapError(f"internal error: output key {o.key!r} declared twice")
        seen.add(o.key)
        if not _distcp_name_ok(o.file):
            raise CkptmapError(f"internal error: output file name {o.file!r}")


def item_writer_bytes(data: np.ndarray, dtype: str) -> Iterable:
    """The chunks of bytes ``torch.save(tensor, stream)`` writes for a C-contiguous CPU tensor holding
    ``data`` (its storage type): a zip archive named ``archive`` (see ``torch_zip_writer``)."""
    sink = _ListSink()
    _write_tensor_item(sink, data, dtype)
    return sink.parts


class _ListSink:
    def __init__(self):
        self.parts = []

    def write(self, b):
        self.parts.append(bytes(b))


def _write_tensor_item(f, data: "np.ndarray | tuple[FileRange, ...]", dtype: str, shape=None) -> int:
    """Write ``torch.save(tensor)`` of ``data`` to ``f`` at its position; returns the bytes written. ``data``
    may be FileRanges holding the tensor's bytes in order (of ``shape``): streamed from those files as they are."""
    if isinstance(data, tuple):
        rng = data
        if sum(r.nbytes for r in rng) != math.prod(shape) * dtypes.itemsize(dtype):
            raise CkptmapError(f"internal error: {sum(r.nbytes for r in rng)} bytes of {rng[0].path} given for a "
                               f"{dtype} {list(shape)} item")
        # np.empty reserves address space only: the pickle needs the shape and dtype, the bytes come from rng
        data = np.empty(shape, dtype=dtypes.storage(dtype))
    else:
        rng = None
        data = np.ascontiguousarray(data)
    if data.dtype != dtypes.storage(dtype):
        raise CkptmapError(f"internal error: {dtype} data given as {data.dtype}")
    held = tzr.HeldTensor(dtype, data)
    buf = io.BytesIO()
    pickler = tzw._StreamPickler(buf, "item")
    tzw._dump(pickler, held, "item")
    writer = tzw._StreamZipWriter(f, "archive", tzw.DEFAULT_ALIGNMENT, True)
    writer.record("data.pkl", buf.getvalue())
    writer.record(".format_version", b"1")
    writer.record(".storage_alignment", str(tzw.DEFAULT_ALIGNMENT).encode("ascii"))
    writer.record("byteorder", b"little")
    for key, st in pickler.storages.items():
        fill = (lambda _k: iter(rng)) if rng is not None else (lambda _k, st=st: tzw._held_bytes(st))
        tzw._stream_storage(writer, f"data/{key}", st, fill, "item")
    writer.finish()
    return writer.pos


# --- .metadata with ckptmap's pickler: inert stand-ins of the globals torch pickles ---

def _cls(module: str, name: str) -> StandInClass:
    return StandInClass.make(module, name)


def _newobj(module, name, state) -> StandIn:
    obj = _cls(module, name).__new__(_cls(module, name))
    obj.__setstate__(state)
    return obj


def _reduce(module, name, *args) -> StandIn:
    return _cls(module, name)(*args)


_MD = "torch.distributed.checkpoint.metadata"


def _value_standin_class(module: str, qualname: str) -> StandInClass:
    """A stand-in class for ``module.qualname`` that pickles exactly like ``StandInClass.make``'s but
    hashes by its state: tens of thousands of ``MetadataIndex`` keys of one dict would otherwise all
    share one hash (a stand-in hashes by its constructor arguments, here none)."""
    base = StandInClass.make(module, qualname)

    def __hash__(self):
        return hash((qualname, _freeze(self.state)))

    return type.__new__(StandInClass, qualname, (base,), {"__module__": module, "__qualname__": qualname,
                                                         "__slots__": (), "__hash__": __hash__})


_METADATA_INDEX = _value_standin_class(_MD, "MetadataIndex")


def _size(values) -> StandIn:
    return _reduce("torch", "Size", tuple(int(v) for v in values))


def _properties(dtype: str) -> StandIn:
    # TensorProperties.__getstate__: (dtype, layout, requires_grad, memory-format encoding, pin_memory)
    return _newobj(_MD, "TensorProperties", (
        torch_global("torch", dtypes.get(dtype).name),
        _reduce("torch.serialization", "_get_layout", "torch.strided"),
        False,
        _reduce(_MD, "_MEM_FORMAT_ENCODING", 0),
        False))


def metadata_object(tensors: list[OutTensor], objects: list[OutObject], locations: dict, *, order=None,
                    mcore_data=None, checkpoint_id: str = "", version: str = DCP_VERSION) -> StandIn:
    """The ``Metadata`` object (inert stand-ins) for the declared outputs; ``locations`` maps
    ``(key, chunk offsets | None)`` to ``(file, offset, length)``."""
    by_key = {t.key: t for t in tensors}
    obj_keys = {o.key for o in objects}
    keys = list(order) if order is not None else [t.key for t in tensors] + [o.key for o in objects]
    sdm = {}
    for key in keys:
        if key in obj_keys:
            sdm[key] = _newobj(_MD, "BytesStorageMetadata", {})
            continue
        t = by_key[key]
        chunks = [_newobj(_MD, "ChunkStorageMetadata", {"offsets": _size(c.box.offsets), "sizes": _size(c.box.lengths)})
                  for c in t.chunks]
        sdm[key] = _newobj(_MD, "TensorStorageMetadata", {"properties": _properties(t.dtype), "size": _size(t.shape),
                                                         "chunks": chunks})
    storage = {}
    for key in keys:
        if key in obj_keys:
            entries = [(None, None)]
        else:
            entries = [(tuple(c.box.offsets), i) for i, c in enumerate(by_key[key].chunks)]
        for offs, index in entries:
            rel, offset, length = locations[(key, offs)]
            idx = _METADATA_INDEX.__new__(_METADATA_INDEX)
            idx.__setstate__({"fqn": key, "offset": None if offs is None else _size(offs), "index": index})
            storage[idx] = _newobj("torch.distributed.checkpoint.filesystem", "_StorageInfo",
                                   {"relative_path": rel, "offset": offset, "length": length})
    storage_meta = _newobj(_MD, "StorageMeta", {"checkpoint_id": checkpoint_id, "save_id": str(uuid.uuid4()),
                                               "load_id": None, "modules": []})
    state = {"state_dict_metadata": sdm, "planner_data": None, "storage_data": storage, "storage_meta": storage_meta,
             "version": version}
    if mcore_data is not None:   # megatron-core 0.15+ saves without the attribute when it has nothing to record
        state["mcore_data"] = dict(mcore_data)
    return _newobj(_MD, "Metadata", state)


def _pickle_metadata(obj) -> bytes:
    buf = io.BytesIO()
    pickler = tzw._Pickler(buf, protocol=METADATA_PROTOCOL)
    try:
        pickler.dump(obj)
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError, ValueError) as e:
        raise CkptmapError(f"internal error: cannot pickle the checkpoint metadata ({type(e).__name__}: {e})") from None
    return buf.getvalue()


class _DirTarget:
    """An output folder assembled under a temporary name beside ``final`` and renamed into place when
    complete (``final`` must not exist: a torch_dist folder is never merged into)."""

    def __init__(self, final: Path, fsync: bool):
        self.final = Path(final)
        self.fsync = fsync
        self.tmp = atomic.temp_name(self.final)

    def __enter__(self) -> Path:
        if self.final.exists():
            raise CkptmapError(f"{self.final} already exists; ckptmap never writes into an existing checkpoint "
                               f"folder — choose another --dst or remove it")
        if not self.final.parent.is_dir():
            self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                if self.fsync:
                    atomic.fsync_directory(self.tmp)
                os.replace(self.tmp, self.final)
                if self.fsync:
                    atomic.fsync_directory(self.final.parent)
                return False
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise CkptmapError(f"cannot put {self.final} in place ({e.strerror or e})") from None
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def write_checkpoint(dst, tensors: list[OutTensor], objects: list[OutObject], *,
                     read_box: Callable[[str, Box], np.ndarray], read_object: Callable[[str], bytes],
                     common=None, common_fill=None, order=None, mcore_data=None, backend: dict | None = None,
                     positions: dict | None = None, fsync: bool = False,
                     progress: Callable[[str, int], None] | None = None) -> None:
    """Write a torch_dist checkpoint folder ``dst`` (must not exist).

    ``tensors`` / ``objects`` declare every key, its chunks and the ``.distcp`` file of each item;
    ``read_box(key, box)`` returns one chunk's data (C order, the dtype's storage type; one chunk in
    memory at a time) or a tuple of FileRanges holding exactly its bytes in order (copied as byte runs),
    ``read_object(key)`` an object item's bytes (Megatron: a ``torch.save`` of a
    list). ``common`` is the object graph of ``common.pt`` (``common_fill(storage key)``: the bytes
    of any ``TensorRef`` in it, as ``torch_zip_writer.save_streaming``); ``order`` the key order of
    the metadata; ``mcore_data`` Megatron's per-key metadata; ``backend`` ``metadata.json``.
    Within a file, object items come first, then tensor items in declaration order (as torch's
    writer does) -- or, with ``positions`` ({(key, chunk offsets | None): sort key}), in that order
    (a rewrite keeps the source's order, so its files come out byte-identical). Everything is checked first; the folder appears at ``dst`` only when complete."""
    dst = Path(dst)
    check_outputs(tensors, objects)
    if order is not None and sorted(order) != sorted([t.key for t in tensors] + [o.key for o in objects]):
        raise CkptmapError("internal error: the metadata key order does not list exactly the declared keys")
    files: dict[str, list] = {}
    for o in objects:
        files.setdefault(o.file, []).append(("object", o.key, None))
    for t in tensors:
        for c in t.chunks:
            files.setdefault(c.file, []).append(("tensor", t.key, c))
    for name in files:
        if positions is None:
            files[name].sort(key=lambda e: e[0] != "object")  # stable: objects first
        else:
            files[name].sort(key=lambda e: positions[(e[1], None if e[2] is None else tuple(e[2].box.offsets))])
    dtype_of = {t.key: t.dtype for t in tensors}
    locations: dict = {}
    with _DirTarget(dst, fsync) as tmp:
        for name in sorted(files, key=_file_sort_key):
            with atomic.atomic_output(tmp / name, fsync=fsync) as part:
                try:
                    with open(part, "wb", buffering=1 << 20) as f:
                        pos = 0
                        for kind, key, c in files[name]:
                            if kind == "object":
                                data = read_object(key)
                                f.write(data)
                                n = memoryview(data).nbytes
                                locations[(key, None)] = (name, pos, n)
                            else:
                                arr = read_box(key, c.box)   # an array, or FileRanges of the chunk's bytes
                                if not isinstance(arr, tuple) and tuple(arr.shape) != tuple(c.box.lengths):
                                    raise CkptmapError(f"internal error: {key} box {c.box} read as {arr.shape}")
                                n = _write_tensor_item(f, arr, dtype_of[key], tuple(c.box.lengths))
                                locations[(key, tuple(c.box.offsets))] = (name, pos, n)
                                del arr
                            pos += n
                except OSError as e:
                    raise CkptmapError(f"cannot write {dst / name}: {e.strerror or e} — check free space and "
                                       f"permissions") from None
            if progress:
                progress(name, pos)
        meta = metadata_object(tensors, objects, locations, order=order, mcore_data=mcore_data,
                               checkpoint_id=str(dst))
        atomic.write_bytes(tmp / DCP_METADATA, _pickle_metadata(meta), fsync=fsync)
        if common is not None:
            tzw.save_streaming(common, tmp / COMMON_PT, common_fill or _no_fill, fsync=fsync)
        atomic.write_text(tmp / METADATA_JSON, json.dumps(backend or BACKEND_JSON), fsync=fsync)


def _no_fill(key):
    raise CkptmapError(f"internal error: common.pt holds a tensor (storage {key!r}) but no data source was given")


def _file_sort_key(name: str):
    stem = name[: -len(DISTCP_SUFFIX)] if name.endswith(DISTCP_SUFFIX) else name
    parts = stem.lstrip("_").split("_")
    try:
        return (0, tuple(int(p) for p in parts), name)
    except ValueError:
        return (1, (), name)
