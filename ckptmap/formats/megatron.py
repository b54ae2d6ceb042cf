"""Megatron-LM legacy ("torch") checkpoints: directory layout, `model_optim_rng.pt`, param_map.

    <save>/latest_checkpointed_iteration.txt     "1000" or "release"
    <save>/iter_{it:07d}/mp_rank_{tp:02d}[_{pp:03d} when PP > 1][_{ep:03d} under expert parallelism]/
        model_optim_rng.pt    dict: args, checkpoint_version, iteration, model | model0, model1, …,
                              optimizer, opt_param_scheduler, rng_state, num_floating_point_operations_so_far
        distrib_optim.pt      distributed optimizer buckets (DP rank 0 only)
    <save>/param_map/param_map_buffer{B}_dp{d}tp{t}pp{p}vpp{v}.json

The `.pt` files are read with ``torch_zip`` (restricted unpickler, lazy mmap'd tensors), so Megatron
never needs to be importable. Model chunks are nested dicts; a tensor's *Megatron name* is its
dotted path inside the chunk (``language_model.encoder.layers.0.input_norm.weight``) and its *key*
in this module is the slash-joined path from the file root (``model0/language_model/encoder/
layers.0.input_norm.weight``), which addresses it unambiguously.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import torch

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import torch_zip

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
PARAM_MAP_DIR = "param_map"
KEY_SEP = "/"
EXTRA_STATE = "_extra_state"
CHECKPOINT_VERSION = 3.0


def iter_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def mp_rank_dir_name(tp: int, pp: int, pp_size: int) -> str:
    return f"mp_rank_{tp:02d}" if pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"


def parse_mp_rank_dir_name(name: str) -> tuple[int, ...] | None:
    """(tp,) / (tp, pp) / (tp, pp, ep) from ``mp_rank_TT[_PPP[_EEE]]``; None if it is not one."""
    if not name.startswith("mp_rank_"):
        return None
    parts = name[len("mp_rank_"):].split("_")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def param_map_file_name(buffer: int, dp: int, tp: int, pp: int, vpp: int) -> str:
    return f"param_map_buffer{buffer}_dp{dp}tp{tp}pp{pp}vpp{vpp}.json"


# -------------------------------------------------------------------------------------------------
# Directories


@attrs.frozen
class CheckpointDir:
    root: Path             # the iteration directory
    iteration: int | str
    ranks: dict            # (tp, pp) -> rank directory Path
    has_pp_suffix: bool
    save_root: Path | None  # the --save directory, when known

    @property
    def tp_size(self) -> int:
        return 1 + max(tp for tp, _ in self.ranks)

    @property
    def pp_size(self) -> int:
        return 1 + max(pp for _, pp in self.ranks)


def read_tracker(save_root) -> int | str:
    """The iteration named by ``latest_checkpointed_iteration.txt``: a number or ``"release"``."""
    tracker = Path(save_root) / TRACKER
    text = tracker.read_text().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CkptmapError(f"{tracker} holds {text!r}; expected an iteration number or 'release'") from None


def latest_iteration(save_root) -> int | str:
    """The tracker's iteration, or the only ``iter_*`` folder's when there is no tracker."""
    save_root = Path(save_root)
    if (save_root / TRACKER).is_file():
        return read_tracker(save_root)
    iters = sorted(p.name for p in save_root.glob("iter_*") if p.name[len("iter_"):].isdigit())
    if len(iters) != 1:
        raise CkptmapError(f"{save_root} has no {TRACKER} and {len(iters)} iter_* folders; keep one or add "
                           f"the tracker file")
    return int(iters[0][len("iter_"):])


def looks_like_checkpoint(path) -> bool:
    """A save root or iteration folder of a Megatron checkpoint (it has mp_rank_* folders)."""
    path = Path(path)
    return path.is_dir() and (any(path.glob("iter_*/mp_rank_*")) or any(path.glob("mp_rank_*")))


def open_checkpoint_dir(path) -> CheckpointDir:
    """Accept an ``iter_*`` directory, or a save root holding the tracker file."""
    path = Path(path)
    if not path.exists():
        raise CkptmapError(f"Megatron checkpoint path {path} does not exist; pass the training run's "
                           f"--save directory or one of its iter_* directories")
    if not path.is_dir():
        raise CkptmapError(f"Megatron checkpoint path {path} is a file; pass the directory that holds "
                           f"{TRACKER} or an iter_* directory")
    save_root = None
    if (path / TRACKER).is_file():
        save_root = path
        iteration = read_tracker(path)
        iter_dir = path / iter_dir_name(iteration)
        if not iter_dir.is_dir():
            raise CkptmapError(f"{path / TRACKER} names iteration {iteration}, but {iter_dir} does not exist; "
                               f"pass the iter_* directory you want explicitly")
    elif path.name.startswith("iter_") or path.name == "release":
        iter_dir = path
        save_root = path.parent if (path.parent / TRACKER).is_file() else None
        if path.name == "release":
            iteration = "release"
        else:
            try:
                iteration = int(path.name[len("iter_"):])
            except ValueError:
                raise CkptmapError(f"{path}: cannot read the iteration from the directory name; expected "
                                   f"iter_NNNNNNN") from None
    else:
        iters = sorted(p.name for p in path.glob("iter_*") if p.is_dir())
        if iters:
            raise CkptmapError(f"{path} has {len(iters)} iter_* directories ({', '.join(iters[:4])}"
                               f"{', …' if len(iters) > 4 else ''}) but no {TRACKER}; pass the one you "
                               f"want, e.g. {path / iters[-1]}")
        iter_dir, iteration = path, None
    ranks, suffixes = {}, set()
    for child in sorted(iter_dir.iterdir()):
        if not child.is_dir() or not child.name.startswith("mp_rank_"):
            continue
        parts = parse_mp_rank_dir_name(child.name)
        if parts is None:
            raise CkptmapError(f"{child}: unexpected directory name; Megatron writes mp_rank_TT or "
                               f"mp_rank_TT_PPP")
        if len(parts) == 3:
            raise CkptmapError(f"{child}: expert-parallel checkpoints (mp_rank_TT_PPP_EEE) are not "
                               f"supported yet by ckptmap; convert a checkpoint saved without expert "
                               f"parallelism, or open an issue with your layout")
        tp = parts[0]
        pp = parts[1] if len(parts) == 2 else 0
        suffixes.add(len(parts) == 2)
        ranks[(tp, pp)] = child
    if not ranks:
        raise CkptmapError(f"no mp_rank_* directories in {iter_dir}; this is not a Megatron checkpoint "
                           f"iteration directory (expected mp_rank_TT or mp_rank_TT_PPP inside)")
    if len(suffixes) > 1:
        raise CkptmapError(f"{iter_dir} mixes mp_rank_TT and mp_rank_TT_PPP directories; remove the stale ones")
    tps = {tp for tp, _ in ranks}
    pps = {pp for _, pp in ranks}
    missing = [(t, p) for t in range(max(tps) + 1) for p in range(max(pps) + 1) if (t, p) not in ranks]
    if missing:
        t, p = missing[0]
        raise CkptmapError(f"{iter_dir} lacks the directory of tp rank {t}, pp rank {p} "
                           f"({mp_rank_dir_name(t, p, 2 if suffixes == {True} else 1)}); the checkpoint "
                           f"is incomplete")
    if iteration is None:
        raise CkptmapError(f"{path}: cannot tell the iteration; pass an iter_NNNNNNN directory or the save "
                           f"root holding {TRACKER}")
    return CheckpointDir(iter_dir, iteration, ranks, suffixes == {True}, save_root)


# -------------------------------------------------------------------------------------------------
# model_optim_rng.pt


@attrs.frozen
class ModelTensor:
    chunk: int          # VPP chunk index (0 without VPP)
    name: str           # dotted Megatron name inside the chunk
    key: str            # slash-joined path from the file root
    dtype: str
    shape: tuple[int, ...]


def model_chunk_keys(root: dict, path) -> list[tuple[str, int]]:
    if "model" in root:
        return [("model", 0)]
    keys = sorted((k for k in root if isinstance(k, str) and k.startswith("model") and k[5:].isdigit()),
                  key=lambda k: int(k[5:]))
    if not keys:
        raise CkptmapError(f"{path} has no 'model' or 'model0' entry (top-level keys: "
                           f"{', '.join(map(str, root))}); it is not a Megatron model checkpoint, or it "
                           f"was saved without weights")
    return [(k, int(k[5:])) for k in keys]


def _walk(node, prefix_names, prefix_keys, out, chunk):
    for k, v in node.items():
        if not isinstance(k, str):
            continue
        if isinstance(v, dict):
            _walk(v, prefix_names + [k], prefix_keys + [k], out, chunk)
        elif isinstance(v, torch_zip.TensorRef):
            if k == EXTRA_STATE or k.endswith("." + EXTRA_STATE):
                continue
            out.append(ModelTensor(chunk, ".".join(prefix_names + [k]), KEY_SEP.join(prefix_keys + [k]),
                                   v.dtype, tuple(v.shape)))
        # None (_extra_state) and other values are not tensors to convert


def encode_key(k) -> str:
    """One path element of a flat key: str/int keys as text, dtype-tuple keys as ``a,b``."""
    if isinstance(k, tuple):
        return ",".join(encode_key(x) for x in k)
    if isinstance(k, str):
        return k
    if isinstance(k, torch.dtype):
        return dtypes.name_of(k)
    return str(k)


class PtFile:
    """A lazily opened torch checkpoint: the object tree is read, tensor bytes are not. Tensors are
    addressed by slash-joined paths (``model0/language_model/…``)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CkptmapError(f"{self.path} is missing")
        self._zip = torch_zip.TorchZipFile(self.path)
        self.root = self._zip.root

    def entries(self) -> list[tuple[str, torch_zip.TensorRef]]:
        out = []

        def rec(node, path):
            items = node.items() if isinstance(node, dict) else enumerate(node) \
                if isinstance(node, (list, tuple)) else ()
            for k, v in items:
                if isinstance(v, torch_zip.TensorRef):
                    out.append((KEY_SEP.join(path + [encode_key(k)]), v))
                elif isinstance(v, (dict, list, tuple)):
                    rec(v, path + [encode_key(k)])
        rec(self.root, [])
        return out

    def keys(self) -> list[str]:
        return [k for k, _ in self.entries()]

    def spec(self, key: str) -> tuple[str, tuple[int, ...]]:
        ref = dict(self.entries())[key]
        return ref.dtype, tuple(ref.shape)

    def get(self, key: str):
        node = self.root
        for part in key.split(KEY_SEP):
            if isinstance(node, dict):
                match = [v for k, v in node.items() if encode_key(k) == part]
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                match = [node[int(part)]]
            else:
                match = []
            if not match:
                raise CkptmapError(f"{self.path} has no tensor {key!r}; the plan was made for a different "
                                   f"checkpoint — re-create it")
            node = match[0]
        if not isinstance(node, torch_zip.TensorRef):
            raise CkptmapError(f"{self.path}: {key!r} is not a tensor")
        return self._zip.tensor(node)

    def close(self):
        self._zip.close()


class ModelFile(PtFile):
    """``model_optim_rng.pt``: model chunks as flat lists of named tensors, plus the other entries."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise CkptmapError(f"{path} is missing; every mp_rank directory of a Megatron checkpoint "
                               f"holds {MODEL_FILE}")
        super().__init__(path)
        if not isinstance(self.root, dict):
            raise CkptmapError(f"{self.path} holds a {type(self.root).__name__}, not the dict Megatron saves")

    def chunks(self) -> list[tuple[str, int]]:
        return model_chunk_keys(self.root, self.path)

    def tensors(self) -> list[ModelTensor]:
        out: list[ModelTensor] = []
        for key, v in self.chunks():
            _walk(self.root[key], [], [key], out, v)
        return out

    @property
    def args(self):
        return self.root.get("args")

    @property
    def iteration(self):
        return self.root.get("iteration")

    def meta_keys(self) -> list[str]:
        """Top-level entries other than the model chunks, in file order."""
        chunk_keys = {k for k, _ in self.chunks()}
        return [k for k in self.root if k not in chunk_keys]


OPTIM_STATES = ("param", "exp_avg", "exp_avg_sq")


class OptimFile(PtFile):
    """``distrib_optim.pt`` (formats.md §1.3): per buffer (numbered across model chunks), per
    (param dtype, grad dtype), per state, one fp32 tensor per padded bucket."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise CkptmapError(f"{path} is missing: converting the optimizer state needs the distributed "
                               f"optimizer's file, written by Megatron with --use-distributed-optimizer; "
                               f"convert the weights alone with --convert-param-only")
        super().__init__(path)
        root = self.root
        if not isinstance(root, dict) or "per_bucket_numel" not in root:
            raise CkptmapError(f"{path} has no per_bucket_numel; it is not a Megatron core_r0.6-style "
                               f"distrib_optim.pt (DistributedOptimizer.save_parameter_state)")
        self.buffers = []   # per global buffer index: (dtype key, [padded], [unpadded])
        for g, (padded, unpadded) in enumerate(zip(root["per_bucket_numel"], root["per_bucket_numel_unpadded"])):
            if len(padded) != 1 or padded.keys() != unpadded.keys():
                raise CkptmapError(f"{path}: buffer {g} has dtype keys {list(padded)}; ckptmap expects one "
                                   f"(param dtype, grad dtype) pair per buffer, as Megatron core_r0.6 writes")
            key = next(iter(padded))
            self.buffers.append((key, list(padded[key]), list(unpadded[key])))
            if g not in root:
                raise CkptmapError(f"{path}: per_bucket_numel lists buffer {g} but the file has no entry {g}")
            for state in OPTIM_STATES:
                tensors = root[g].get(key, {}).get(state)
                if tensors is None or len(tensors) != len(padded[key]):
                    raise CkptmapError(f"{path}: buffer {g} lacks {state!r} tensors for its {len(padded[key])} "
                                       f"bucket(s); the file is incomplete")
                for j, (ref, n) in enumerate(zip(tensors, padded[key])):
                    if tuple(ref.shape) != (n,) or ref.dtype != "float32":
                        raise CkptmapError(f"{path}: buffer {g} {state} bucket {j} is {ref.dtype} "
                                           f"{list(ref.shape)}, expected float32 [{n}] (per_bucket_numel)")

    def param_dtype(self, buffer: int) -> str:
        return dtypes.name_of(self.buffers[buffer][0][0])

    def key(self, buffer: int, state: str, bucket: int) -> str:
        return KEY_SEP.join([str(buffer), encode_key(self.buffers[buffer][0]), state, str(bucket)])


# -------------------------------------------------------------------------------------------------
# pt_meta: what a MindSpore checkpoint cannot hold, kept so the way back can rebuild Megatron's files
# byte for byte. A *skeleton* is a file's object graph with every converted tensor replaced by the
# placeholder (PLACEHOLDER, i) and described by entry i of a list of TensorRef fields; the bytes of
# storages that no converted tensor covers (bucket padding) are kept as uint8 tensors.

PLACEHOLDER = "__ckptmap_tensor__"
META_KEY = "ckptmap"
META_VERSION = 1
_REF_FIELDS = ("storage", "dtype", "storage_offset", "shape", "stride", "storage_numel", "requires_grad",
               "location")


def _ref_fields(ref: torch_zip.TensorRef) -> list:
    return [getattr(ref, f) for f in _REF_FIELDS]


def ref_from_fields(fields) -> torch_zip.TensorRef:
    values = dict(zip(_REF_FIELDS, fields))
    values["shape"], values["stride"] = tuple(values["shape"]), tuple(values["stride"])
    return torch_zip.TensorRef(**values)


def _placeholders(loaded, refs_node, refs: list):
    """Copy ``loaded`` (same container types and key objects) with TensorRefs of ``refs_node`` (the
    same graph read lazily) replaced by placeholders."""
    if isinstance(refs_node, torch_zip.TensorRef):
        refs.append(_ref_fields(refs_node))
        return (PLACEHOLDER, len(refs) - 1)
    if isinstance(loaded, dict):
        out = type(loaded)()
        _copy_attributes(loaded, out)
        for (k, v), (_, rv) in zip(loaded.items(), refs_node.items()):
            out[k] = _placeholders(v, rv, refs)
        return out
    if isinstance(loaded, (list, tuple)) and type(loaded) in (list, tuple):
        items = [_placeholders(v, rv, refs) for v, rv in zip(loaded, refs_node)]
        return items if isinstance(loaded, list) else tuple(items)
    return loaded


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


def _padding(zf: torch_zip.TorchZipFile, storages: dict) -> dict:
    """storage key -> [(start, end, uint8 bytes)] for the element ranges no converted tensor covers."""
    out = {}
    for key, (dtype, numel, covered) in storages.items():
        size = dtypes.itemsize(dtype)
        raw = zf.tensor(torch_zip.TensorRef(key, "uint8", 0, (numel * size,), (1,), numel * size))
        out[key] = [(a, b, raw[a * size:b * size].clone()) for a, b in _uncovered(numel, covered)]
    return out


def padding_key(which: str, storage: str, index: int) -> str:
    """Key (for PtFile.get) of the ``index``-th kept padding range of ``storage`` in a pt_meta file;
    ``which``: "model_optim_rng" or "distrib_optim"."""
    table = {"model_optim_rng": "model_padding", "distrib_optim": "distrib_optim_padding"}[which]
    return KEY_SEP.join([META_KEY, table, storage, str(index), "2"])


def build_pt_meta(model_path, optim_path, keys, extra) -> dict:
    """The pt_meta object of one mp_rank: the listed top-level entries of ``model_optim_rng.pt``
    exactly as read, ``extra``, and under ``ckptmap`` the skeletons and padding of
    ``model_optim_rng.pt`` (model chunk tensors replaced) and ``distrib_optim.pt`` (every tensor)."""
    loaded = torch_zip.load(model_path)
    missing = [k for k in keys if k not in loaded]
    if missing:
        raise CkptmapError(f"{model_path} lacks {', '.join(missing)}; it changed since the plan was made")
    zf = torch_zip.TorchZipFile(model_path)
    chunk_keys = {k for k, _ in model_chunk_keys(loaded, model_path)}
    refs: list = []
    skeleton = type(loaded)()
    for k, v in loaded.items():
        skeleton[k] = _placeholders(v, zf.root[k], refs) if k in chunk_keys else v
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
        ozf = torch_zip.TorchZipFile(optim_path)
        orefs: list = []
        oskeleton = _placeholders(ozf.root, ozf.root, orefs)
        ostorages = {}
        for g, (dtype_key, padded, unpadded) in enumerate(OptimFile(optim_path).buffers):
            for state in OPTIM_STATES:
                for j, ref in enumerate(ozf.root[g][dtype_key][state]):
                    ostorages[ref.storage] = (ref.dtype, ref.storage_numel,
                                              [(ref.storage_offset, ref.storage_offset + unpadded[j])])
        meta.update(distrib_optim=oskeleton, distrib_optim_tensors=orefs, distrib_optim_padding=_padding(ozf, ostorages))
    out = {k: loaded[k] for k in keys}
    out.update(extra)
    out[META_KEY] = meta
    return out


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


def write_from_skeleton(meta_path, which: str, sets, path, fill) -> None:
    """Write Megatron's ``model_optim_rng.pt`` / ``distrib_optim.pt`` (``which``) at ``path`` from the
    skeleton kept in the pt_meta file ``meta_path``: the same object graph (so the same pickle bytes),
    each placeholder bound to its original storage, whose bytes ``fill(storage_key)`` streams; the
    pt_meta file's own tensors (RNG states) are copied from it. ``sets``: [(path, value)] updates."""
    zf = torch_zip.TorchZipFile(meta_path)
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
        elif isinstance(node, torch_zip.TensorRef):
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
        n = zf.storage_nbytes(original)
        raw = zf.tensor(torch_zip.TensorRef(original, "uint8", 0, (n,), (1,), n))
        for start in range(0, n, STREAM_CHUNK):
            yield raw[start:start + STREAM_CHUNK].numpy()

    torch_zip.save_streaming(obj, path, stream)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def save_object(obj, path) -> None:
    torch_zip.save(obj, path)


# -------------------------------------------------------------------------------------------------
# param_map


@attrs.frozen
class ParamMapFile:
    path: Path
    buffer: int
    dp: int
    tp: int
    pp: int
    vpp: int


def parse_param_map_name(name: str) -> tuple[int, int, int, int, int] | None:
    prefix, suffix = "param_map_buffer", ".json"
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    rest = name[len(prefix):-len(suffix)]
    values = []
    for tag in ("_dp", "tp", "pp", "vpp", None):
        head, sep, rest = rest.partition(tag) if tag else (rest, "", "")
        if (tag and not sep) or not head.isdigit():
            return None
        values.append(int(head))
    buffer, dp, tp, pp, vpp = values
    if param_map_file_name(buffer, dp, tp, pp, vpp) != name:
        return None
    return buffer, dp, tp, pp, vpp


def find_param_maps(directory) -> list[ParamMapFile]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CkptmapError(f"--param-map-path {directory} is not a directory; point it at the param_map "
                           f"folder written during training (<save>/param_map) or a pt_meta folder")
    out = []
    for p in sorted(directory.iterdir()):
        parsed = parse_param_map_name(p.name)
        if parsed:
            out.append(ParamMapFile(p, *parsed))
    return out


def read_param_map(path) -> dict:
    """name -> (dtype, shape, start, end, bucket) in file (= buffer) order."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CkptmapError(f"cannot read param_map {path}: {e}") from None
    out = {}
    for name, entry in raw.items():
        try:
            dtype, shape, start, end, bucket = entry
            out[name] = (dtypes.name_of(_torch_dtype_from_string(dtype)), tuple(shape), int(start), int(end),
                         int(bucket))
        except (TypeError, ValueError) as e:
            raise CkptmapError(f"{path}: entry {name!r} = {entry!r} is not [dtype, shape, start, end, "
                               f"bucket]: {e}") from None
    return out


def param_map_text(slots) -> str:
    """A param_map JSON file for slots with (name, dtype, shape, start, end, bucket), buffer order."""
    return json.dumps({s.name: [f"torch.{s.dtype}", list(s.shape), s.start, s.end, s.bucket] for s in slots})


def write_param_map(path, slots) -> Path:
    """Write one param_map JSON file (``param_map_text``) atomically: a temporary file in the same
    directory, renamed into place, so a reader never sees half a file and concurrent writers of the
    same name (identical content) cannot interleave. Creates the directory."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(param_map_text(slots))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


@attrs.frozen
class ParamMapDifference:
    """The first entry where two param_maps disagree. ``saved``/``live`` are (name, (dtype, shape,
    start, end, bucket)) or None when that side has no entry at ``index``."""

    index: int
    saved: tuple | None
    live: tuple | None


def _bucket_bases(entries: dict) -> dict[int, int]:
    bases: dict[int, int] = {}
    for _dtype, _shape, start, _end, bucket in entries.values():
        bases[bucket] = min(start, bases.get(bucket, start))
    return bases


def param_map_difference(saved: dict, live: dict, relative: bool = True) -> ParamMapDifference | None:
    """Compare two param_maps (``read_param_map`` form: name -> (dtype, shape, start, end, bucket) in
    buffer order) entry by entry; None if they describe the same layout.

    ``relative``: offsets are compared relative to the start of their bucket (the smallest start in
    it), which is what Megatron's ``load_parameter_state`` relies on — it moves each bucket as a whole
    and cuts parameters out at bucket-relative offsets, so bucket *padding* (which depends on the
    data-parallel size) may differ. Otherwise start and end must be equal as recorded."""
    saved_items, live_items = list(saved.items()), list(live.items())
    saved_bases, live_bases = _bucket_bases(saved), _bucket_bases(live)

    def key(entry, bases):
        dtype, shape, start, end, bucket = entry
        base = bases[bucket] if relative else 0
        return dtype, tuple(shape), bucket, start - base, end - base

    for i in range(max(len(saved_items), len(live_items))):
        s = saved_items[i] if i < len(saved_items) else None
        v = live_items[i] if i < len(live_items) else None
        if s is None or v is None or s[0] != v[0] or key(s[1], saved_bases) != key(v[1], live_bases):
            return ParamMapDifference(i, s, v)
    return None


def describe_param_map_entry(entry) -> str:
    """``torch.bfloat16 [37, 16], elements [0, 592) of bucket 0`` for a (dtype, shape, start, end, bucket)."""
    dtype, shape, start, end, bucket = entry
    return f"torch.{dtype} {list(shape)}, elements [{start}, {end}) of the buffer, bucket {bucket}"


def _torch_dtype_from_string(text: str):
    name = text[len("torch."):] if text.startswith("torch.") else text
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {text!r}")
    return dt


# -------------------------------------------------------------------------------------------------
# Writing (demo and test checkpoints; `ckptmap ms2pt` builds on this later)


def write_tracker(save_root, iteration) -> None:
    path = Path(save_root) / TRACKER
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(iteration))
    os.replace(tmp, path)
