"""pt_meta: what a MindSpore checkpoint cannot hold, kept so the way back can rebuild Megatron's files
byte for byte.

A *skeleton* is a file's object graph with every converted tensor replaced by the placeholder
(PLACEHOLDER, i) and described by entry i of a list of TensorRef fields; the bytes of storages that no
converted tensor covers (bucket padding) are kept as uint8 tensors. ``pt_meta/args_tpTT_ppPPP.pt``
holds, per mp_rank, the non-model entries of ``model_optim_rng.pt`` as read plus the skeletons of
both Megatron files (``build_pt_meta``); ``write_from_skeleton`` binds a skeleton to new storage
bytes and writes the Megatron file again.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import torch_zip_writer
from ckptmap.formats.megatron_files import KEY_SEP, OptimFile, model_chunk_keys
from ckptmap.formats.torch_zip_reader import HeldTensor, TensorRef, TorchZipFile

PLACEHOLDER = "__ckptmap_tensor__"
META_KEY = "ckptmap"
META_VERSION = 1
_REF_FIELDS = ("storage", "dtype", "storage_offset", "shape", "stride", "storage_numel", "requires_grad",
               "location")


def _ref_fields(ref: TensorRef) -> list:
    return [getattr(ref, f) for f in _REF_FIELDS]


def ref_from_fields(fields) -> TensorRef:
    values = dict(zip(_REF_FIELDS, fields))
    values["shape"], values["stride"] = tuple(values["shape"]), tuple(values["stride"])
    return TensorRef(**values)


def _placeholders(node, refs: list):
    """Copy ``node`` (same container types and key objects) with every TensorRef replaced by a
    placeholder whose fields are appended to ``refs``."""
    if isinstance(node, TensorRef):
        refs.append(_ref_fields(node))
        return (PLACEHOLDER, len(refs) - 1)
    if isinstance(node, dict):
        out = type(node)()
        _copy_attributes(node, out)
        for k, v in node.items():
            out[k] = _placeholders(v, refs)
        return out
    if type(node) in (list, tuple):
        items = [_placeholders(v, refs) for v in node]
        return items if type(node) is list else tuple(items)
    return node


def _copy_attributes(source, target) -> None:
    """Instance attributes of a dict subclass (a state dict's ``_metadata``) are part of its pickle."""
    if hasattr(source, "__dict__"):
        target.__dict__.update(source.__dict__)


def _uncovered(numel: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    gaps, pos = [], 0
    for start, end in sorted(covered):
        if start > pos:
            gaps.append((pos, start))
        pos = max(pos, end)
    if pos < numel:
        gaps.append((pos, numel))
    return gaps


def _padding(zf: TorchZipFile, storages: dict) -> dict:
    """storage key -> [(start, end, uint8 bytes)] for the element ranges no converted tensor covers."""
    out = {}
    for key, (dtype, numel, covered) in storages.items():
        size = dtypes.itemsize(dtype)
        raw = zf.storage_bytes(key)
        out[key] = [(a, b, HeldTensor("uint8", np.array(raw[a * size:b * size])))
                    for a, b in _uncovered(numel, covered)]
    return out


def padding_key(which: str, storage: str, index: int) -> str:
    """Key (for PtFile.get) of the ``index``-th kept padding range of ``storage`` in a pt_meta file;
    ``which``: "model_optim_rng" or "distrib_optim"."""
    table = {"model_optim_rng": "model_padding", "distrib_optim": "distrib_optim_padding"}[which]
    return KEY_SEP.join([META_KEY, table, storage, str(index), "2"])


def write_pt_meta(model_path, optim_path, keys, extra, path, *, fsync: bool = False) -> None:
    """Write the pt_meta file of one mp_rank: the listed top-level entries of ``model_optim_rng.pt``
    exactly as read (their tensors, e.g. RNG states, copied from it), ``extra``, and under ``ckptmap``
    the skeletons and padding of ``model_optim_rng.pt`` (model chunk tensors replaced) and
    ``distrib_optim.pt`` (every tensor). ``extra["optim_ranges"]``: [(buffer, bucket or None, start,
    end)] — where parameters' states lie in distrib_optim.pt's tensors; every other byte (bucket
    padding, 64-element alignment gaps) is kept as padding."""
    zf = TorchZipFile(model_path)
    root = zf.root
    missing = [k for k in keys if k not in root]
    if missing:
        raise CkptmapError(f"{model_path} lacks {', '.join(missing)}; it changed since the plan was made")
    chunk_keys = {k for k, _ in model_chunk_keys(root, model_path)}
    refs: list = []
    skeleton = type(root)()
    _copy_attributes(root, skeleton)
    for k, v in root.items():
        skeleton[k] = _placeholders(v, refs) if k in chunk_keys else v
    storages = {}
    for fields in refs:
        ref = ref_from_fields(fields)
        entry = storages.setdefault(ref.storage, (ref.dtype, ref.storage_numel, []))
        if entry[0] != ref.dtype or ref.numel and ref.stride != _contiguous_stride(ref.shape):
            raise CkptmapError(f"{model_path}: model tensor views of storage {ref.storage} are not plain "
                               f"contiguous {entry[0]} slices; ckptmap cannot rebuild this file byte for byte")
        entry[2].append((ref.storage_offset, ref.storage_offset + ref.numel))
    meta = {"version": META_VERSION, "model_optim_rng": skeleton, "model_tensors": refs,
            "model_padding": _padding(zf, storages)}
    if optim_path is not None and Path(optim_path).is_file():
        optim = OptimFile(optim_path)
        orefs: list = []
        oskeleton = _placeholders(optim.root, orefs)
        ranges = {}
        for g, bucket, start, end in extra.get("optim_ranges", ()):
            ranges.setdefault((g, bucket), []).append((start, end))
        meta.update(distrib_optim=oskeleton, distrib_optim_tensors=orefs,
                    distrib_optim_padding=_padding(optim._zip, optim.covered_storages(ranges or None)))
    out = {k: root[k] for k in keys}
    out.update({k: v for k, v in extra.items() if k != "optim_ranges"})  # the ranges became the padding
    out[META_KEY] = meta
    # what is left of the model file in `out` (RNG states, ...) is copied from it
    torch_zip_writer.save_streaming(out, path, lambda key: [zf.storage_bytes(key)], fsync=fsync)


_TENSOR_LISTS = {"model_optim_rng": "model_tensors", "distrib_optim": "distrib_optim_tensors"}
STREAM_CHUNK = 64 * 1024 * 1024


def _set_path(root, path, value) -> None:
    node = root
    for part in path[:-1]:
        node = node[part] if isinstance(node, (dict, list)) else getattr(node, part)
    if isinstance(node, (dict, list)):
        node[path[-1]] = value
    else:
        setattr(node, path[-1], value)


def write_from_skeleton(meta_path, which: str, sets, path, fill, *, fsync: bool = False) -> None:
    """Write Megatron's ``model_optim_rng.pt`` / ``distrib_optim.pt`` (``which``) at ``path`` from the
    skeleton kept in the pt_meta file ``meta_path``: the same object graph (so the same pickle bytes),
    each placeholder bound to its original storage, whose bytes ``fill(storage_key)`` streams; the
    pt_meta file's own tensors (RNG states) are copied from it. ``sets``: [(path, value)] updates."""
    zf = TorchZipFile(meta_path)
    meta = zf.root.get(META_KEY) if isinstance(zf.root, dict) else None
    if not isinstance(meta, dict) or which not in meta:
        raise CkptmapError(f"{meta_path} has no {which} skeleton; re-run `ckptmap pt2ms`")
    refs = meta[_TENSOR_LISTS[which]]
    memo: dict[int, object] = {}

    def bind(node):
        hit = memo.get(id(node))
        if hit is not None:
            return hit
        if type(node) is tuple and len(node) == 2 and node[0] == PLACEHOLDER:
            ref = ref_from_fields(refs[node[1]])
            out = attrs.evolve(ref, storage="out/" + ref.storage)
        elif isinstance(node, TensorRef):
            out = attrs.evolve(node, storage="meta/" + node.storage)
        elif isinstance(node, dict):
            out = memo[id(node)] = type(node)()
            _copy_attributes(node, out)
            for k, v in node.items():
                out[k] = bind(v)
            return out
        elif type(node) is list:
            out = memo[id(node)] = []
            out.extend(bind(v) for v in node)
            return out
        elif type(node) is tuple:
            out = tuple(bind(v) for v in node)
        else:
            return node
        memo[id(node)] = out
        return out

    obj = bind(meta[which])
    for set_path, value in sets:
        _set_path(obj, set_path, value)

    def stream(key):
        kind, _, original = key.partition("/")
        if kind == "out":
            yield from fill(original)
            return
        raw = zf.storage_bytes(original)
        for start in range(0, raw.size, STREAM_CHUNK):
            yield raw[start:start + STREAM_CHUNK]

    torch_zip_writer.save_streaming(obj, path, stream, fsync=fsync)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))
