"""pt_meta: what a MindSpore checkpoint cannot hold, kept so the way back can rebuild Megatron's files
byte for byte.

A *skeleton* is a file's object graph with every converted tensor replaced by the placeholder
(PLACEHOLDER, i) and described by entry i of a list of TensorRef fields; the bytes of storages that no
converted tensor covers (bucket padding) are kept as uint8 tensors. ``pt_meta/args_tpTT_ppPPP.pt``
holds, per mp_rank, the non-model entries of ``model_optim_rng.pt`` as read plus the skeletons of
both Megatron files (``build_pt_meta``); ``write_from_skeleton`` binds a skeleton to new storage
bytes and writes the Megatron file again.

Dialects (``formats/msadapter.py``). A Megatron checkpoint saved through MindSpeed-Core-MS's MSAdapter
shim is the same object graph in another dialect of the torch zip format. pt_meta records each
file's dialect (``ckptmap/dialects``) and is itself written in the model file's dialect, so that the
entries it keeps (RNG states: MindSpore generator states there) stay exactly as read — tensor class
and recorded stride included; a placeholder's fields carry the same (``parameter``, ``msadapter``).
The way back writes each file in the dialect it came from, or translates it on the way
(``dialect="torch"``: ``dialect_translate``, with its RNG policy). Zip timestamps are the one thing an
MSAdapter file holds that is not kept: the shim writes the wall-clock time of the save, ckptmap writes
1980-01-01 00:00:00 (``torch_zip_writer.DEFAULT_DATE_TIME``), so the same conversion gives the same bytes.
"""

from __future__ import annotations

import argparse
import os
import pickle

import attrs
import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import byte_io, pickle_delta, torch_zip_writer
from ckptmap.formats.megatron_files import KEY_SEP, OptimFile, model_chunk_keys
from ckptmap.formats.torch_zip_reader import HeldTensor, MSAdapterTensor, TensorRef, TorchZipFile, contiguous_stride

PLACEHOLDER = "__ckptmap_tensor__"
META_KEY = "ckptmap"
META_VERSION = 1
DIALECTS_KEY = "dialects"   # meta[DIALECTS_KEY] = {"model_optim_rng": "torch" | "msadapter", "distrib_optim": ...}
_REF_FIELDS = ("storage", "dtype", "storage_offset", "shape", "stride", "storage_numel", "requires_grad",
               "location")
# appended only for a Parameter or a tensor of the MSAdapter dialect (older pt_meta files lack them)
_EXTRA_FIELDS = ("parameter", "msadapter")


def _ref_fields(ref: TensorRef) -> list:
    fields = [getattr(ref, f) for f in _REF_FIELDS]
    if ref.parameter or ref.msadapter is not None:
        info = ref.msadapter
        fields += [ref.parameter, None if info is None else
                   [list(info.cls), list(info.stride), info.stride_is_list]]
    return fields


def ref_from_fields(fields) -> TensorRef:
    values = dict(zip(_REF_FIELDS + _EXTRA_FIELDS, fields))
    values["shape"], values["stride"] = tuple(values["shape"]), tuple(values["stride"])
    info = values.get("msadapter")
    if info is not None:
        values["msadapter"] = MSAdapterTensor(tuple(info[0]), tuple(info[1]), bool(info[2]))
    return TensorRef(**values)


def source_dialect(meta: dict, which: str) -> str:
    """The dialect the Megatron file ``which`` was read in (pt_meta written before dialects were
    recorded: stock torch, the only one pt2ms read then)."""
    return (meta.get(DIALECTS_KEY) or {}).get(which, "torch")


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


def _padding(zf: TorchZipFile, storages: dict, which: str, sources: dict) -> dict:
    """storage key -> [(start, end, uint8 bytes)] for the element ranges no converted tensor covers;
    ``sources`` gets {``held/<id>`` of each kept tensor: (which, storage key, first byte, end byte)}."""
    out = {}
    for key, (dtype, numel, covered) in storages.items():
        size = dtypes.itemsize(dtype)
        raw = zf.storage_bytes(key)
        kept = out[key] = []
        for a, b in _uncovered(numel, covered):
            held = HeldTensor("uint8", np.array(raw[a * size:b * size]))
            sources[f"held/{id(held)}"] = (which, key, a * size, b * size)
            kept.append((a, b, held))
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
    padding, 64-element alignment gaps) is kept as padding.

    Inside ``torch_zip_reader.shared_trees`` the ranks of a pipeline stage are written from the first
    one's pickle (:class:`_Written`)."""
    zf = TorchZipFile(model_path)
    missing = [k for k in keys if k not in zf.root]
    if missing:
        raise CkptmapError(f"{model_path} lacks {', '.join(missing)}; it changed since the plan was made")
    optim = OptimFile(optim_path) if optim_path is not None and os.path.isfile(optim_path) else None
    template, key = _Written.key(zf, optim, keys, extra)
    written = template.derived.get(key) if key is not None else None
    if written is not None and written.write(template, zf, optim, keys, extra, path, fsync):
        return
    out, sources = _pt_meta_tree(zf, zf.root, optim, keys, extra)
    records: dict = {}
    pickled: list = []
    # what is left of the model file in `out` (RNG states, ...) is copied from it, in its own dialect
    torch_zip_writer.save_streaming(out, path, lambda key: [zf.storage_bytes(key)], fsync=fsync,
                                    dialect=zf.dialect, records=records, pickled=pickled)
    if key is not None and written is None and pickled:
        _Written.keep(template, key, zf, optim, pickled[0], records, sources)


def _pt_meta_tree(zf: TorchZipFile, root, optim, keys, extra) -> tuple[dict, dict]:
    """(the object pt_meta pickles for the model file ``zf`` read as ``root`` and the optimizer file
    ``optim``, {``held/<id>`` of each kept padding tensor: (file: "model" | "optim", storage key, first
    byte, end byte)})."""
    model_path = zf.path
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
        if entry[0] != ref.dtype or ref.numel and ref.stride != contiguous_stride(ref.shape):
            raise CkptmapError(f"{model_path}: model tensor views of storage {ref.storage} are not plain "
                               f"contiguous {entry[0]} slices; ckptmap cannot rebuild this file byte for byte")
        entry[2].append((ref.storage_offset, ref.storage_offset + ref.numel))
    sources: dict = {}
    meta = {"version": META_VERSION, DIALECTS_KEY: {"model_optim_rng": zf.dialect},
            "model_optim_rng": skeleton, "model_tensors": refs,
            "model_padding": _padding(zf, storages, "model", sources)}
    if optim is not None:
        orefs: list = []
        oskeleton = _placeholders(optim.root, orefs)
        ranges = {}
        for g, bucket, start, end in extra.get("optim_ranges", ()):
            ranges.setdefault((g, bucket), []).append((start, end))
        covered = optim.covered_storages(ranges or None)
        for fields in orefs:   # tensors that are no state (numel_unpadded as a 0-d tensor): kept whole
            ref = ref_from_fields(fields)
            covered.setdefault(ref.storage, (ref.dtype, ref.storage_numel, []))
        meta[DIALECTS_KEY]["distrib_optim"] = optim.dialect
        meta.update(distrib_optim=oskeleton, distrib_optim_tensors=orefs,
                    distrib_optim_padding=_padding(optim._zip, covered, "optim", sources))
    out = {k: root[k] for k in keys}
    out.update({k: v for k, v in extra.items() if k != "optim_ranges"})  # the ranges became the padding
    out[META_KEY] = meta
    return out, sources


class _Written:
    """The pt_meta pickle written for one rank, and how to write another's from it. The ranks of a stage
    read their model files from one template (``TorchZipFile.near``: its tree with some plain numbers
    put in); with the same optimizer tree, keys and extra, their pt_meta objects are one object with
    those numbers put in, and their pickles differ exactly in those numbers' bytes. Where a number lands
    in the pickle is found by a probe: the object made again with that one number changed (another of
    the same opcode), pickled, compared — the bytes that differ are its (wherever the number is
    pickled, once or more). Kept per template (``_keep_derived``; a rank of other keys or extra, or of
    another optimizer tree, is written in full)."""

    def __init__(self, data: bytes, storages: list, base: dict, optim_root):
        self.data = data
        self.storages = storages   # [(record key, "model" | "optim", storage key, first byte, end byte)]
        self.base = base           # {slot index: its number's bytes} where `data` was made from other numbers than the template's
        self.optim_root = optim_root   # kept alive: its id() is part of the key
        self.places: dict = {}     # slot index -> [positions of its number's argument in `data`] (or None)

    @staticmethod
    def key(zf, optim, keys, extra) -> tuple:
        """(the template ``zf`` was read from, the key of what is kept for it with this optimizer tree, keys
        and extra), or (None, None) when nothing can be kept or used."""
        template = zf.near[0]() if zf.near is not None else None
        if template is None or zf.dialect != "torch" or (optim is not None and optim.dialect != "torch"):
            return None, None
        # the bytes, not ==: 1, 1.0 and True are equal and pickle apart
        extra_bytes = pickle.dumps(extra, protocol=2)
        return template, ("pt_meta", None if optim is None else id(optim.root), tuple(keys), extra_bytes)

    @classmethod
    def keep(cls, template, key, zf, optim, data: bytes, records: dict, sources: dict) -> None:
        storages = [(record_key,) + sources.get(source_key, ("model", source_key, 0, None))
                    for source_key, record_key in records.items()]
        _keep_derived(template, key, cls(data, storages, zf.near[1], None if optim is None else optim.root))

    def _place(self, i: int, template, zf, optim, keys, extra):
        """Where slot ``i``'s number lies in ``data``: [argument offsets], or None if a probe cannot tell."""
        if i not in self.places:
            starts = _number_places(template, self.base, i, self.data,
                                    lambda root: _pt_meta_tree(zf, root, optim, keys, extra)[0], zf.path)
            self.places[i] = starts or None   # a model file's number is in its pt_meta: not finding it is a failure
        return self.places[i]

    def write(self, template, zf, optim, keys, extra, path, fsync: bool) -> bool:
        """Write ``zf``'s pt_meta from this one; False (nothing written) when a number of its model file
        cannot be put in (not found, or one this pickler would write with another opcode)."""
        pkl = _with_numbers(self.data, template, self.base, zf.near[1],
                            lambda i: self._place(i, template, zf, optim, keys, extra))
        if pkl is None:
            return False
        files = {"model": zf, "optim": None if optim is None else optim._zip}
        storages = [(record, files[which].storage_bytes(key)[start:end])
                    for record, which, key, start, end in self.storages]
        torch_zip_writer.save_pickled(pkl, storages, path, fsync=fsync)
        return True


_KEPT_PER_TEMPLATE = 4


def _keep_derived(template, key: tuple, value) -> None:
    """``template.derived[key] = value``, the oldest of its kind (``key[0]``) dropped beyond _KEPT_PER_TEMPLATE:
    a stage's ranks mostly share one key, so a few cover the odd rank."""
    derived = template.derived
    mine = [k for k in derived if k[0] == key[0]]
    if key not in derived and len(mine) >= _KEPT_PER_TEMPLATE:
        del derived[mine[0]]
    derived[key] = value


def _number_places(template, base: dict, i: int, data: bytes, make, path) -> list | None:
    """Where slot ``i``'s number lies in ``data`` — the pickle of ``make(tree)`` for the ``template``'s tree
    with the numbers ``base`` ({slot index: bytes}) put in: [argument offsets], [] when the number is not
    in it, or None if a probe cannot tell. The probe: the object made again with that one number changed
    (another of the same opcode), pickled, compared — the bytes that differ are its."""
    slots = template.slots()
    name = slots.slots[i][1]
    held = _number_bytes(template, base, i)
    width = len(held) - 1
    # another number of the same opcode: the lowest bit of the (little-endian) int, or of the (big-endian)
    # double's mantissa
    flip = 1 if name != "BINFLOAT" else width
    flipped = held[:flip] + bytes([held[flip] ^ 1]) + held[flip + 1:]
    probe = pickle_delta.with_numbers(template.data, slots, {**base, i: flipped})
    root = pickle_delta.patched_at(template.root, slots, sorted(set(base) | {i}), probe)
    if root is None or not pickle_delta.pickled_as(pickle_delta.number_value(flipped), name):
        return None
    changed = torch_zip_writer.pickle_bytes(make(root), path)
    if len(changed) != len(data):
        return None
    differ = np.flatnonzero(np.frombuffer(changed, np.uint8) != np.frombuffer(data, np.uint8)).tolist()
    starts = [d if name != "BINFLOAT" else d - width + 1 for d in differ]
    if any(data[s - 1:s + width] != held for s in starts):
        return None
    return starts


def _with_numbers(data: bytes, template, base: dict, changes: dict, places) -> bytes | None:
    """``data`` (a pickle made from ``template``'s tree with ``base`` put in) as made with ``changes`` put in
    instead, ``places(i)`` saying where slot ``i``'s number lies in it; None when one cannot be put in (not
    found, or a number this pickler writes with another opcode)."""
    differ = set(changes) | set(base)
    if not differ:
        return data
    out = bytearray(data)
    for i in sorted(differ):
        starts = places(i)
        held = _number_bytes(template, changes, i)
        if starts is None or not pickle_delta.pickled_as(pickle_delta.number_value(held),
                                                         template.slots().slots[i][1]):
            return None
        for s in starts:
            out[s:s + len(held) - 1] = held[1:]
    return bytes(out)


def _number_bytes(template, changes: dict, i: int) -> bytes:
    """Slot ``i``'s number (opcode and argument bytes) in a file read from ``template`` whose pickle holds
    ``changes`` ({slot index: bytes}, ``TorchZipFile.near``) where it differs from the template's."""
    return changes.get(i) or pickle_delta.slot_bytes(template.slots().slots[i], template.data)


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


def bind_skeleton(meta: dict, which: str):
    """The skeleton of ``which`` with every placeholder bound to a TensorRef over storage
    ``out/<original key>`` (the bytes the conversion supplies) and every tensor pt_meta kept itself
    (RNG states) over ``meta/<its key in the pt_meta file>``; same object graph, shared objects shared.
    Its containers and Namespaces are new objects (updates are set on them: the tree read may be shared
    with other files, ``torch_zip_reader.shared_trees``)."""
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
                out[k] = v if type(v) in _PLAIN_VALUES else bind(v)
            return out
        elif type(node) is list:
            out = memo[id(node)] = []
            out.extend(v if type(v) in _PLAIN_VALUES else bind(v) for v in node)
            return out
        elif type(node) is argparse.Namespace:
            out = memo[id(node)] = argparse.Namespace()
            # a dict of its own, not filled through setattr or update: an instance dict sharing the class's
            # key table would hold that table's key strings, not these (the memo identity a re-save needs:
            # safe_unpickler._LoadingNamespaceBase)
            out.__dict__ = {k: v if type(v) in _PLAIN_VALUES else bind(v) for k, v in vars(node).items()}
            return out
        elif type(node) is tuple:
            # a tuple of plain values (an RNG state: 625 ints) binds to itself: kept, not rebuilt item by item
            out = node if set(map(type, node)) <= _PLAIN_VALUES else tuple(bind(v) for v in node)
        else:
            return node
        memo[id(node)] = out
        return out

    return bind(meta[which])


_PLAIN_VALUES = frozenset({int, float, bool, str, bytes, type(None)})


def _meta_of(zf: TorchZipFile, meta_path, which: str) -> dict:
    meta = zf.root.get(META_KEY) if isinstance(zf.root, dict) else None
    if not isinstance(meta, dict) or which not in meta:
        raise CkptmapError(f"{meta_path} has no {which} skeleton; re-run `ckptmap pt2ms`")
    return meta


def translation(obj, source: str, target: str, rng: str, where: str):
    """The dialect translation of a bound skeleton (``dialect_translate.translate_graph``: its checks,
    its RNG policy), or None when ``target`` is ``source``. Writing back in another dialect than the
    source's is supported from MSAdapter to stock torch; the other way, views of Megatron's shared
    parameter buffer would each need the whole buffer computed — ``ckptmap convert --from torch --to
    msadapter`` does it from the written files."""
    if target == source:
        return None
    if source != "msadapter":
        raise CkptmapError(f"{where} came from a stock PyTorch file; ms2pt writes it back as such (--dialect torch "
                           f"or source). For MSAdapter files run `ckptmap convert --from torch --to msadapter` on "
                           f"the written checkpoint")
    from ckptmap.formats import dialect_translate
    return dialect_translate.translate_graph(obj, source=source, target=target, where=where, rng=rng)


def check_write(meta_path, which: str, target: str | None, rng: str, where: str) -> str:
    """Planning: the dialect ``write_from_skeleton`` will write ``which`` in, after every check the
    translation to it makes (RNG policy, storage kinds, dtype keys, objects without a counterpart) —
    so that a refusal comes before anything is written."""
    with TorchZipFile(meta_path) as zf:
        meta = _meta_of(zf, meta_path, which)
        source = source_dialect(meta, which)
        target = target or source
        translation(bind_skeleton(meta, which), source, target, rng, where)
    return target


def write_from_skeleton(meta_path, which: str, sets, path, fill, *, fsync: bool = False, dialect: str | None = None,
                        rng: str = "refuse", where: str | None = None) -> None:
    """Write Megatron's ``model_optim_rng.pt`` / ``distrib_optim.pt`` (``which``) at ``path`` from the
    skeleton kept in the pt_meta file ``meta_path``: the same object graph (so the same pickle bytes),
    each placeholder bound to its original storage, whose bytes ``fill(storage_key)`` streams; the
    pt_meta file's own tensors (RNG states) are copied from it. ``sets``: [(path, value)] updates.
    ``dialect``: the torch zip dialect to write (None: the one the file was read in, recorded in
    pt_meta); another than the source's goes through ``dialect_translate`` with RNG policy ``rng``."""
    zf = TorchZipFile(meta_path)
    meta = _meta_of(zf, meta_path, which)
    source = source_dialect(meta, which)
    target = dialect or source

    def stream(key):
        kind, _, original = key.partition("/")
        if kind == "out":
            yield from fill(original)
            return
        raw = zf.storage_bytes(original)
        for start in range(0, raw.size, STREAM_CHUNK):
            yield raw[start:start + STREAM_CHUNK]

    # a stage's pt_meta read from one template (torch_zip_reader.shared_trees): its first file's pickle serves
    reusable = target == source == "torch" and zf.near is not None and zf.near[0]() is not None
    kept = _KeptSkeleton.find(zf, meta, which, sets) if reusable else None
    if kept is not None:
        torch_zip_writer.save_kept(kept, path, stream, fsync=fsync)
        return
    obj = _bound(meta, which, sets)
    t = translation(obj, source, target, rng, where or f"{path} (from {meta_path})")
    if t is not None:
        obj, sources = t.root, t.sources

        def translated(key):   # the translated tensor's elements: a contiguous range of its source storage
            ref = sources[key]
            return byte_io.sliced(stream(ref.storage), ref.storage_offset * ref.itemsize, ref.nbytes)
        torch_zip_writer.save_streaming(obj, path, translated, fsync=fsync, dialect=target)
        return
    made: list = []
    torch_zip_writer.save_streaming(obj, path, stream, fsync=fsync, dialect=target, kept=made if reusable else None)
    if made:
        _KeptSkeleton.keep(zf, meta, which, sets, made[0])


class _KeptSkeleton:
    """The pickle of a skeleton written once, for the next files of the same stage. The ranks of a stage
    read their pt_meta from one template (torch_zip_reader.shared_trees: its tree with some plain numbers
    put in). With the same updates (``sets``, compared as pickled bytes: 1, 1.0 and True pickle apart)
    and the same tensor list (one object, proven with ``is``): a skeleton that is the same object too
    (distrib_optim.pt's holds no args.rank) pickles to the same bytes; one made with other numbers put
    in (model_optim_rng.pt's args) pickles to those bytes with its numbers' bytes replaced, where a probe
    finds them (``_number_places``). Either way the same storages in the same order. Kept per template
    (``_keep_derived``); ``zf`` below is a pt_meta file read from one (``zf.near``)."""

    def __init__(self, skeleton, tensors, kept, base: dict):
        self.skeleton, self.tensors, self.kept = skeleton, tensors, kept   # the objects kept alive: `is` holds
        self.base = base   # {slot index: bytes} the pickled tree had where it differs from the template's
        self.places: dict = {}   # slot index -> [offsets of its number in kept.data_pkl], or None

    @staticmethod
    def _key(which: str, sets) -> tuple:
        return ("skeleton", which, pickle.dumps(sets, protocol=2))

    @classmethod
    def find(cls, zf, meta: dict, which: str, sets):
        """The Kept to write ``zf``'s ``which`` from, or None."""
        template = zf.near[0]()
        entry = template.derived.get(cls._key(which, sets))
        if entry is None or entry.tensors is not meta[_TENSOR_LISTS[which]]:
            return None
        if entry.skeleton is meta[which]:
            return entry.kept

        def places(i):
            if i not in entry.places:
                entry.places[i] = _number_places(template, entry.base, i, entry.kept.data_pkl,
                                                 lambda root: _bound(root[META_KEY], which, sets), zf.path)
            return entry.places[i]
        data = _with_numbers(entry.kept.data_pkl, template, entry.base, zf.near[1], places)
        return None if data is None else attrs.evolve(entry.kept, data_pkl=data)

    @classmethod
    def keep(cls, zf, meta: dict, which: str, sets, kept) -> None:
        _keep_derived(zf.near[0](), cls._key(which, sets),
                      cls(meta[which], meta[_TENSOR_LISTS[which]], kept, dict(zf.near[1])))


def _bound(meta: dict, which: str, sets):
    obj = bind_skeleton(meta, which)
    for set_path, value in sets:
        _set_path(obj, set_path, value)
    return obj


def kept_array(meta_path, meta: dict, which: str, ref: TensorRef):
    """The elements of a tensor of ``which`` that pt_meta kept whole as padding bytes (e.g.
    ``numel_unpadded`` stored as a 0-d int64 tensor), as a numpy array of its dtype."""
    size = dtypes.itemsize(ref.dtype)
    table = {"model_optim_rng": "model_padding", "distrib_optim": "distrib_optim_padding"}[which]
    lo, hi = ref.storage_offset, ref.storage_offset + ref.numel
    with TorchZipFile(meta_path) as zf:
        for a, b, kept in meta.get(table, {}).get(ref.storage, []):
            if a <= lo and hi <= b:
                raw = np.array(zf.array(kept))[(lo - a) * size:(hi - a) * size]
                return raw.view(dtypes.storage(ref.dtype)).reshape(ref.shape)
    raise CkptmapError(f"{meta_path} does not keep tensor {ref.storage!r} of {which}; re-run `ckptmap pt2ms`")
