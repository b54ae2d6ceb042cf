"""Translate torch zip checkpoints between the stock PyTorch dialect and MindSpeed-Core-MS's MSAdapter
dialect (``formats/msadapter.py``), file by file and for whole Megatron checkpoint folders, without
torch or MindSpore: object graphs are read by ``torch_zip_reader``, rewritten here, written by
``torch_zip_writer``; tensor bytes stream from the source file's mapping to the output (a contiguous
tensor is copied as byte ranges; nothing is held whole in memory).

What is translated (both directions; everything else is kept as the same objects, so the pickle memo
structure — and with it the bytes — survive):

* tensors: MSAdapter ``_rebuild_from_type_v2(…, mindspore.common.tensor.Tensor | StubTensor | the shim's
  Parameter, …)`` over one string-typed storage each ⇄ stock ``_rebuild_tensor_v2`` over a
  ``torch.<X>Storage``; what was a Parameter stays one (stock: ``_rebuild_parameter(t, True, {})``, as
  torch pickles an ``nn.Parameter``). Stock views of a shared storage (Megatron's model tensors view
  one parameter buffer) become one storage per tensor holding the view's elements in C order: MSAdapter
  files have no storage sharing. What that loses (which tensor views which storage where, devices,
  the bytes no tensor covers) goes to a layout file beside the output
  (``model_optim_rng.pt.ckptmap-torch-layout``, a small stock torch file MindSpeed ignores); the way
  back uses it when it still describes the file (sha256 of its ``data.pkl``), so stock -> MSAdapter ->
  stock is byte-identical. A MindSpore StubTensor class is not kept (it becomes Tensor).
* dtypes anywhere in the graph (``args.params_dtype``, the ``(param dtype, grad dtype)`` keys of
  ``distrib_optim.pt``, …): MindSpore dtype objects ⇄ ``torch.<dtype>`` globals; a dtype-pair key of
  plain strings (what MSAdapter's ``torch.load`` makes of a stock key) or of anything else is refused.
* ``OrderedDict._metadata`` of state dicts: the shim's ``{}`` per module ⇄ torch's ``{'version': 1}``
  (other entries are kept as they are).
* storage kinds: only the six both MindSpore-side readers know (float16, float32, bfloat16, int64,
  uint8, bool), in both directions, so every translation can be undone; an int32 ``IntStorage`` or
  float64 tensor is refused naming the file and the key.
* RNG states (``rng_state``, and the top-level ``random_rng_state`` … of old checkpoints): MindSpore's
  16-byte generator states are not PyTorch's CPU/CUDA states and vice versa. ``rng="refuse"``
  (default) stops with a message; ``"drop"`` leaves them out (Megatron-LM / MindSpeed must then resume
  with ``--no-load-rng``); ``"keep"`` copies them unchanged, only so that a later translation back
  restores them (the target framework still needs ``--no-load-rng``). Never silently.
* ``numel_unpadded`` stored as a 0-d int64 tensor (MindSpeed-LLM 2.1/2.2) is kept as a 0-d int64
  tensor: megatron-core 0.8 – 0.12 ``load_parameter_state_from_dp_zero`` only asserts
  ``buffer.numel_unpadded == checkpoint_numel_unpadded``, which a 0-d tensor satisfies, and
  ``torch.load(weights_only=True)`` reads it; converting it to an int would make the way back
  ambiguous.

Nested torch files inside ``BytesIO`` values (TransformerEngine ``_extra_state``) are kept as they
are when they hold no tensors and no dtypes (stock ``torch.load`` and MSAdapter both read such a
``torch.save(None)`` in either dialect); one that holds tensors or dtypes is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickletools
import shutil
import types
import zipfile
from pathlib import Path

import attrs
import numpy as np

from ckptmap import atomic, dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import msadapter
from ckptmap.formats.megatron_folders import TRACKER
from ckptmap.formats.megatron_files import encode_key
from ckptmap.formats.safe_unpickler import GlobalMarker, StandIn, StandInClass, dtype_name, torch_global
from ckptmap.formats.torch_zip_reader import HeldTensor, TensorRef, TorchZipFile, file_range
from ckptmap.formats.torch_zip_reader import contiguous_stride as _contiguous
from ckptmap.formats.torch_zip_writer import save_streaming

__all__ = ["DIALECTS", "RNG_POLICIES", "translate_graph", "Translation", "FileJob", "plan_folder", "write_job",
           "run_jobs"]

DIALECTS = ("msadapter", "torch")
RNG_POLICIES = ("refuse", "drop", "keep")
RNG_KEYS = ("rng_state", "random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
            "rng_tracker_states")
_VERSION_KEY = "version"  # one object, like torch's interned 'version' in every _metadata entry


# -------------------------------------------------------------------------------------------------
# One object graph


@attrs.define
class Translation:
    """A translated object graph: ``root`` for the target dialect, ``sources`` = output storage key ->
    the source TensorRef whose elements (C order) fill it, what was dropped or kept of the RNG."""

    root: object
    sources: dict
    rng_keys: list
    nbytes: int = 0
    pieces: dict | None = None  # stock layout restored: storage key -> [(element offset, source ref)]
    layout_note: str = ""


class _Translator:
    def __init__(self, source: str, target: str, where: str, rng: str, layout: list | None = None):
        if source not in DIALECTS or target not in DIALECTS or source == target:
            raise CkptmapError(f"translate from one of {', '.join(DIALECTS)} to the other, not {source!r} -> {target!r}")
        if rng not in RNG_POLICIES:
            raise CkptmapError(f"rng policy {rng!r}: use one of {', '.join(RNG_POLICIES)}")
        self.source, self.target, self.where, self.rng = source, target, where, rng
        self.memo: dict[int, tuple[object, object]] = {}   # id(source object) -> (source object, translated)
        self.sources: dict[str, TensorRef] = {}
        self.dtype_objects: dict[str, object] = {}          # one MindSpore dtype object per dtype, like the shim
        self.nbytes = 0
        self.layout = layout  # stock TensorRefs to restore, by tensor index (see TorchLayout)
        self.pieces: dict[str, list] = {}  # with a layout: stock storage key -> [(element offset, source ref)]

    def fail(self, path, what):
        key = "/".join(path) or "(root)"
        raise CkptmapError(f"{self.where}: key {key}: {what}")

    # --- dtypes
    def dtype(self, obj, path):
        """The target-dialect dtype value for a dtype value of either dialect, or None if ``obj`` is none."""
        if msadapter.is_ms_dtype(obj):
            name = msadapter.ms_dtype_name(obj)
            if name is None:
                self.fail(path, f"MindSpore dtype object {obj!r} is not one ckptmap knows")
        elif isinstance(obj, GlobalMarker) and obj.module == "torch" and dtype_name(obj) is not None:
            name = obj.dtype
        elif isinstance(obj, GlobalMarker) and obj.module == "torch" and obj.qualname[:1].islower():
            if self.target == "torch":
                return obj
            self.fail(path, f"torch.{obj.qualname} has no MindSpore dtype counterpart ckptmap can write")
        else:
            return None
        if self.target == "torch":
            return torch_global("torch", name)
        if msadapter.is_ms_dtype(obj):
            return obj
        made = self.dtype_objects.get(name)
        if made is None:
            made = self.dtype_objects[name] = msadapter.ms_dtype(name)
        return made

    def key(self, k, path):
        hit = self.memo.get(id(k))
        if hit is not None:
            return hit[1]
        new = self._key(k, path)
        self.memo[id(k)] = (k, new)
        return new

    def _key(self, k, path):
        if not isinstance(k, tuple):
            new = self.dtype(k, path)
            return k if new is None else new
        as_dtypes = [self.dtype(x, path + [encode_key(k)]) for x in k]
        if any(d is not None for d in as_dtypes):
            if not all(d is not None for d in as_dtypes):
                self.fail(path, f"the dict key {k!r} mixes dtypes with other values; Megatron keys its "
                                f"distributed-optimizer buffers by a (param dtype, grad dtype) pair of dtypes")
            return tuple(as_dtypes)
        problem = key_problem(k)
        if problem:
            self.fail(path, problem)
        return k

    # --- values
    def value(self, obj, path):
        hit = self.memo.get(id(obj))
        if hit is not None:
            return hit[1]
        new = self._value(obj, path)
        self.memo[id(obj)] = (obj, new)
        return new

    def _value(self, obj, path):
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray, np.ndarray, np.generic,
                                           np.dtype, range, slice)):
            return obj
        if isinstance(obj, TensorRef):
            return self.tensor(obj, path)
        d = self.dtype(obj, path)
        if d is not None:
            return d
        if isinstance(obj, dict):
            return self.mapping(obj, path)
        if type(obj) is list:
            return [self.value(v, path + [str(i)]) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            items = tuple(self.value(v, path + [str(i)]) for i, v in enumerate(obj))
            return obj if all(a is b for a, b in zip(items, obj)) else items
        if type(obj) in (set, frozenset):
            return obj
        if isinstance(obj, (argparse.Namespace, types.SimpleNamespace)):
            new = type(obj)()
            for k, v in vars(obj).items():  # the same key strings (setattr would intern them: another memo)
                new.__dict__[k] = self.value(v, path + [k])
            return new
        if isinstance(obj, io.BytesIO):
            self.nested(obj, path)
            return obj
        if isinstance(obj, StandInClass):
            self.foreign(obj.__module__, obj.__qualname__, path)
            return obj
        if isinstance(obj, StandIn):
            return self.stand_in(obj, path)
        if isinstance(obj, GlobalMarker):
            self.fail(path, f"{obj!r} (a torch storage or tensor class as a value) has no counterpart in the "
                            f"{self.target} dialect")
        self.fail(path, f"a {type(obj).__module__}.{type(obj).__name__} value, which ckptmap does not translate")

    def foreign(self, module, name, path):
        root = module.split(".", 1)[0]
        if self.target == "torch" and root == "mindspore":
            self.fail(path, f"the MindSpore object {module}.{name} has no PyTorch counterpart; stock torch.load "
                            f"cannot read it — leave it out of the checkpoint")

    def stand_in(self, obj: StandIn, path):
        self.foreign(obj.module, obj.qualname, path)
        args = self.value(obj.args, path + ["(args)"])
        state = self.value(obj.state, path + ["(state)"]) if obj.built else None
        items = [self.value(v, path + [str(i)]) for i, v in enumerate(obj.listitems)]
        ditems = [(self.key(k, path), self.value(v, path + [encode_key(k)])) for k, v in obj.dictitems]
        unchanged = (args is obj.args and (not obj.built or state is obj.state)
                     and all(a is b for a, b in zip(items, obj.listitems))
                     and all(a is b and c is d for (a, c), (b, d) in zip(ditems, obj.dictitems)))
        if unchanged:
            return obj
        new = obj.__copy__()
        new._args = args
        if obj.built:
            new._state = state
        new._listitems = items
        new._dictitems = ditems
        return new

    def mapping(self, obj: dict, path):
        new = type(obj)()
        for k, v in obj.items():
            here = path + [encode_key(k)]
            if not path and k in RNG_KEYS:
                if self.rng == "drop":
                    continue
                if self.rng == "refuse":
                    continue  # reported by translate_graph (all RNG keys at once)
            new[self.key(k, path)] = self.value(v, here)
        attributes = getattr(obj, "__dict__", None)
        if attributes:
            for name, v in attributes.items():
                if name == "_metadata" and isinstance(v, dict):
                    new.__dict__[name] = self.metadata(v, path + ["_metadata"])
                else:
                    new.__dict__[name] = self.value(v, path + [name])
        return new

    def metadata(self, meta: dict, path):
        hit = self.memo.get(id(meta))
        if hit is not None:
            return hit[1]
        out = type(meta)()
        for k, v in meta.items():
            if self.target == "torch" and type(v) is dict and not v:
                v = {_VERSION_KEY: 1}
            elif self.target == "msadapter" and type(v) is dict and list(v) == ["version"] and v["version"] == 1 \
                    and type(v["version"]) is int:
                v = {}
            else:
                v = self.value(v, path + [str(k)])
            out[k] = v
        self.memo[id(meta)] = (meta, out)
        return out

    def tensor(self, ref: TensorRef, path):
        problem = tensor_problem(ref)
        if problem:
            self.fail(path, problem)
        key = f"t{len(self.sources)}"
        self.sources[key] = ref
        self.nbytes += ref.nbytes
        shape = tuple(ref.shape)
        stride = _contiguous(shape)
        if self.layout is not None:
            orig = self.layout[len(self.sources) - 1]
            if (orig.dtype, tuple(orig.shape)) != (ref.dtype, shape):
                raise _LayoutMismatch(f"tensor {'/'.join(path)} is {ref.dtype} {list(shape)} but the layout file "
                                      f"says {orig.dtype} {list(orig.shape)}")
            self.pieces.setdefault(orig.storage, []).append((orig.storage_offset, ref))
            return orig
        if self.target == "torch":
            return TensorRef(storage=key, dtype=ref.dtype, storage_offset=0, shape=shape, stride=stride,
                             storage_numel=ref.numel, requires_grad=ref.parameter, location="cpu",
                             parameter=ref.parameter)
        return TensorRef(storage=key, dtype=ref.dtype, storage_offset=0, shape=shape, stride=stride,
                         storage_numel=ref.numel, requires_grad=False, location="cpu", parameter=ref.parameter)

    def nested(self, buf: io.BytesIO, path):
        data = buf.getvalue()
        if not data.startswith(b"PK\x03\x04"):
            return
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
            if pkl is None:
                return
            ops = [(op.name, arg) for op, arg, _ in pickletools.genops(zf.read(pkl))]
        except Exception:  # not a torch file after all: plain bytes, kept
            return
        for name, arg in ops:
            module = arg.split(" ", 1)[0] if name == "GLOBAL" and isinstance(arg, str) else ""
            if name in ("BINPERSID", "PERSID") or module in ("torch", msadapter.MS_TYPING) or name == "STACK_GLOBAL":
                self.fail(path, "a nested torch file (a BytesIO, e.g. TransformerEngine _extra_state) that holds "
                                "tensors or dtypes; ckptmap does not translate nested files — save the checkpoint "
                                "without it")


class _LayoutMismatch(Exception):
    pass


def tensor_problem(ref: TensorRef) -> str | None:
    """Why ``ref`` cannot be in an MSAdapter checkpoint (a storage kind no MindSpore-side reader knows), or None."""
    if ref.dtype in msadapter.WRITABLE_DTYPES:
        return None
    kind = "IntStorage" if ref.dtype == "int32" else f"{ref.dtype}"
    return (f"{ref.dtype} tensor ({kind}) of shape {list(ref.shape)}: MSAdapter checkpoints hold only "
            f"{', '.join(msadapter.WRITABLE_DTYPES)} — the storage kinds both MindSpore-side readers "
            f"(MSAdapter's torch.load, MindSpeed-Core-MS load_ms_weights) can read; ckptmap refuses "
            f"it in both directions so that every translation can be undone. Store that entry as "
            f"int64 / float32 (Megatron itself stores numel_unpadded as a Python int)")


def key_problem(k) -> str | None:
    """Why the dict key ``k`` is not what Megatron keys its distributed-optimizer buffers by, when it
    looks like a dtype pair of plain strings (what MSAdapter's torch.load makes of a stock key), or None."""
    if isinstance(k, tuple) and k and all(isinstance(x, str) for x in k) and any(_is_dtype_word(x) for x in k):
        return (f"the dict key {k!r} is a pair of plain strings, not dtypes — neither MindSpore nor torch "
                f"dtype objects. That is what MSAdapter's torch.load makes of a stock (torch.bfloat16, "
                f"torch.float32) key; Megatron's load_parameter_state cannot find its buffer under it. "
                f"Re-save the file from the original checkpoint (or with the key as dtype objects)")
    return None


def check_rank_files(model_file, optim_path) -> None:
    """Planning ``pt2ms`` of one mp_rank (``model_file``: a ``megatron_files.ModelFile``): an MSAdapter-dialect
    checkpoint must be writable back as one (``ms2pt``), so what it cannot be is refused naming the file and
    the key (:func:`check_convertible`) — in ``distrib_optim.pt`` too, whose skeleton pt_meta keeps even
    for the weights alone. Stock files: nothing to check."""
    if model_file.dialect != "msadapter":
        return
    check_convertible(model_file.root, str(model_file.path))
    if Path(optim_path).is_file():
        with TorchZipFile(optim_path) as zf:
            check_convertible(zf.root, str(optim_path))


def check_convertible(root, where: str) -> None:
    """Refuse, naming ``where`` (the file) and the key, what an MSAdapter checkpoint converted elsewhere
    (``pt2ms``) could not be written back as: a tensor of a storage kind no MindSpore-side reader knows
    (int32 ``IntStorage``, float64, …) or a dtype-pair key of plain strings. The same checks as the
    translation between dialects, without translating anything."""
    seen: set[int] = set()

    def fail(path, what):
        raise CkptmapError(f"{where}: key {'/'.join(path) or '(root)'}: {what}")

    def walk(node, path):
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, TensorRef):
            problem = tensor_problem(node)
            if problem:
                fail(path, problem)
        elif isinstance(node, dict):
            for k, v in node.items():
                problem = key_problem(k)
                if problem:
                    fail(path, problem)
                walk(v, path + [encode_key(k)])
        elif type(node) in (list, tuple):
            for i, v in enumerate(node):
                walk(v, path + [str(i)])
        elif isinstance(node, (argparse.Namespace, types.SimpleNamespace)):
            for k, v in vars(node).items():
                walk(v, path + [k])
        elif isinstance(node, StandIn):
            for i, v in enumerate((node.args, node.state if node.built else None, node.listitems)):
                walk(v, path + ["(args)", "(state)", "(items)"][i:i + 1])
            for k, v in node.dictitems:
                walk(v, path + [encode_key(k)])
    walk(root, [])


def _is_dtype_word(s: str) -> bool:
    return s in ("bfloat16", "float16", "float32", "float64", "half", "float", "double", "int64", "int32", "int16",
                 "int8", "uint8", "bool", "long", "int")


def translate_graph(root, *, source: str, target: str, where: str, rng: str = "refuse",
                    layout: list | None = None) -> Translation:
    """Translate an object graph read from a ``source``-dialect file (``TorchZipFile(path).root``) into
    one the ``target`` dialect's writer writes (``save_streaming(t.root, dst, fill, dialect=target)``,
    ``fill(key)`` = the C-order elements of ``t.sources[key]``). ``where`` names the file in errors."""
    tr = _Translator(source, target, where, rng, layout)
    rng_keys = [k for k in root if k in RNG_KEYS] if isinstance(root, dict) else []
    if rng_keys and rng == "refuse":
        what = ("MindSpore generator states (16 bytes each: seed, offset)" if source == "msadapter" else
                "PyTorch CPU/CUDA generator states")
        raise CkptmapError(
            f"{where} holds RNG state ({', '.join(rng_keys)}: {what}); {target_name(target)} cannot use the RNG "
            f"state of {target_name(source)} and ckptmap never hands it over silently. Pass --drop-rng to leave it "
            f"out (then resume {target_name(target, training=True)} with --no-load-rng), or --keep-foreign-rng to "
            f"copy it unchanged only so that a later conversion back restores it (the target still needs "
            f"--no-load-rng)")
    new_root = tr.value(root, [])
    if layout is not None and len(layout) != len(tr.sources):
        raise _LayoutMismatch(f"the layout file describes {len(layout)} tensors, the file holds {len(tr.sources)}")
    t = Translation(new_root, tr.sources, rng_keys, tr.nbytes)
    t.pieces = tr.pieces if layout is not None else None
    return t


def target_name(dialect: str, training: bool = False) -> str:
    if dialect == "torch":
        return "Megatron-LM" if training else "PyTorch"
    return "MindSpeed (MindSpore)" if training else "MindSpore / MSAdapter"


def _fill(zf: TorchZipFile, sources: dict):
    """fill(key): the source tensor's elements in C order — for a contiguous tensor the FileRange of its
    bytes in the source file (no page of the source is mapped: the writer copies a whole record kernel-side
    and takes its recorded CRC-32, else copies it through one small buffer while computing the CRC), one
    C-contiguous copy for a strided view."""
    def fill(key):
        ref = sources[key]
        if ref.numel > 1 and ref.stride != _contiguous(ref.shape):
            yield np.ascontiguousarray(zf.array(ref)).reshape(-1).view(np.uint8)
            return
        yield file_range(zf, ref)   # with its record's CRC-32 when it is the whole record
    return fill


LAYOUT_SUFFIX = ".ckptmap-torch-layout"
_LAYOUT_VERSION = 1


def layout_path(path) -> Path:
    """The layout file beside an MSAdapter file made from a stock one (see :func:`translate_file`)."""
    path = Path(path)
    return path.with_name(path.name + LAYOUT_SUFFIX)


def _contiguous_ref(ref: TensorRef) -> bool:
    return ref.numel <= 1 or tuple(ref.stride) == _contiguous(ref.shape)


def _needs_layout(sources: dict) -> bool:
    """Whether the stock file's storage layout differs from "one contiguous storage per tensor, on the
    CPU" — what translating back from MSAdapter would produce without help."""
    seen = set()
    for ref in sources.values():
        if (ref.storage_offset or ref.storage_numel != ref.numel or not _contiguous_ref(ref) or ref.location != "cpu"
                or ref.storage in seen or ref.requires_grad != ref.parameter):
            return True
        seen.add(ref.storage)
    return False


def _write_layout(zf: TorchZipFile, t: Translation, msadapter_file: Path, fsync: bool) -> str:
    """Stock -> MSAdapter: keep what MSAdapter files cannot say — which tensors view which shared
    storage (Megatron's model weights view one parameter buffer), offsets, devices, and the bytes of
    storage that no tensor covers — beside the output, so that the way back is byte-identical.
    MindSpeed ignores the file. Only written when needed and when every tensor is a contiguous view."""
    out = layout_path(msadapter_file)
    if not _needs_layout(t.sources) or not all(_contiguous_ref(r) for r in t.sources.values()):
        if out.exists():
            out.unlink()  # a stale one from an earlier conversion
        return "" if not _needs_layout(t.sources) else "strided views: the way back is value-identical only"
    covered: dict[str, list] = {}
    for ref in t.sources.values():
        covered.setdefault(ref.storage, []).append((ref.storage_offset * ref.itemsize,
                                                    (ref.storage_offset + ref.numel) * ref.itemsize))
    storages = {}
    for key, ranges in covered.items():
        ref = next(r for r in t.sources.values() if r.storage == key)
        total = ref.storage_numel * ref.itemsize
        gaps, pos = [], 0
        for a, b in sorted(ranges):
            if a > pos:
                gaps.append([pos, a])
            pos = max(pos, b)
        if pos < total:
            gaps.append([pos, total])
        base = zf.storage_bytes(key)
        data = np.concatenate([base[a:b] for a, b in gaps]) if gaps else np.zeros(0, np.uint8)
        storages[key] = {"dtype": ref.dtype, "numel": ref.storage_numel, "gaps": gaps,
                         "bytes": HeldTensor("uint8", np.ascontiguousarray(data))}
    fields = ("storage", "dtype", "storage_offset", "shape", "stride", "storage_numel", "requires_grad", "location",
              "parameter")
    pkl = zipfile.ZipFile(msadapter_file).read(f"{msadapter.ARCHIVE}/data.pkl")
    obj = {"ckptmap_torch_layout": _LAYOUT_VERSION, "data_pkl_sha256": hashlib.sha256(pkl).hexdigest(),
           "fields": list(fields),
           "tensors": [[list(v) if isinstance(v, tuple) else v for v in (getattr(r, f) for f in fields)]
                       for r in t.sources.values()],
           "storages": storages}
    save_streaming(obj, out, None, fsync=fsync)
    return f"torch layout kept in {out.name}"


def _read_layout(src: Path, zf: TorchZipFile):
    """(stock TensorRefs by tensor index, storages) from the layout file beside ``src``, or (None, why)."""
    path = layout_path(src)
    if not path.is_file():
        return None, ""
    pkl = zipfile.ZipFile(src).read(f"{zf.prefix}data.pkl")
    lz = TorchZipFile(path)
    root = lz.root
    if not isinstance(root, dict) or root.get("ckptmap_torch_layout") != _LAYOUT_VERSION:
        return None, f"{path.name} is not a ckptmap layout file of version {_LAYOUT_VERSION}; ignored"
    if root.get("data_pkl_sha256") != hashlib.sha256(pkl).hexdigest():
        return None, f"{path.name} describes another version of this file (it changed since); ignored"
    fields = root["fields"]
    refs = []
    for values in root["tensors"]:
        d = dict(zip(fields, values))
        d["shape"], d["stride"] = tuple(d["shape"]), tuple(d["stride"])
        refs.append(TensorRef(**d))
    storages = {k: (v["dtype"], v["numel"], v["gaps"], lz.array(v["bytes"])) for k, v in root["storages"].items()}
    return (refs, storages), ""


def _layout_fill(zf: TorchZipFile, pieces: dict, storages: dict):
    """fill(stock storage key): the tensors' bytes at their offsets, the kept bytes in the gaps."""
    def fill(key):
        dtype, numel, gaps, gap_bytes = storages[key]
        total = numel * dtypes.itemsize(dtype)
        segments = [(a, b, "gap", i) for i, (a, b) in enumerate(gaps)]
        offsets = np.cumsum([0] + [b - a for a, b in gaps])
        for start, ref in pieces.get(key, []):
            a = start * ref.itemsize
            segments.append((a, a + ref.nbytes, "tensor", ref))
        pos = 0
        for a, b, kind, what in sorted(segments, key=lambda s: (s[0], s[2] != "tensor")):
            if b <= pos:
                continue
            skip = pos - a if pos > a else 0
            if a > pos:
                raise CkptmapError(f"layout file: bytes {pos}..{a} of storage {key} are neither a tensor nor kept")
            if kind == "gap":
                chunk = gap_bytes[offsets[what]: offsets[what + 1]]
                yield chunk[skip:]
            else:
                base = zf.storage_bytes(what.storage)
                yield base[skip: what.nbytes]
            pos = b
        if pos != total:
            raise CkptmapError(f"layout file: storage {key} ends at byte {pos}, expected {total}")
    return fill


def translate_file(src, dst, *, source: str, target: str, rng: str = "refuse", fsync: bool = False,
                   date_time=None) -> Translation:
    """Translate one ``.pt`` file (streaming; ``dst`` written atomically). The source's dialect must be
    ``source`` (it is detected from the file). Stock -> MSAdapter also writes ``dst`` +
    ``.ckptmap-torch-layout`` when the stock file shares storages between tensors (MSAdapter files
    cannot), which MSAdapter -> stock then uses to give back the original bytes."""
    src, dst = Path(src), Path(dst)
    with TorchZipFile(src) as zf:
        check_dialect(zf, source)
        layout, note = (None, "")
        if source == "msadapter":
            layout, note = _read_layout(src, zf)
        t = None
        if layout is not None:
            try:
                t = translate_graph(zf.root, source=source, target=target, where=str(src), rng=rng, layout=layout[0])
                fill = _layout_fill(zf, t.pieces, layout[1])
                note = f"torch layout restored from {layout_path(src).name}"
            except _LayoutMismatch as e:
                t, note = None, f"{layout_path(src).name} does not fit ({e}); ignored"
        if t is None:
            t = translate_graph(zf.root, source=source, target=target, where=str(src), rng=rng)
            fill = _fill(zf, t.sources)
        save_streaming(t.root, dst, fill, fsync=fsync, dialect=target,
                       date_time=date_time if target == "msadapter" else None)
        if target == "msadapter":
            note = _write_layout(zf, t, dst, fsync)
    t.layout_note = note
    return t


def check_dialect(zf: TorchZipFile, expected: str) -> None:
    if zf.dialect != expected:
        found = "a stock PyTorch (torch.save) file" if zf.dialect == "torch" else "an MSAdapter-dialect file"
        raise CkptmapError(f"{zf.path} is {found}, not {expected} as --from says; convert from {zf.dialect} "
                           f"(ckptmap detects the dialect of every file)")


# -------------------------------------------------------------------------------------------------
# A Megatron checkpoint folder


@attrs.frozen
class FileJob:
    """One output file: ``translate`` a ``.pt`` or ``copy`` anything else (tracker, param_map JSON, …)."""

    rel: str
    action: str
    source: str
    source_dialect: str | None = None
    tensors: int = 0
    nbytes: int = 0
    note: str = ""


def _checkpoint_files(src: Path) -> tuple[list[Path], list[str]]:
    """The files of a Megatron --save folder that belong to checkpoints (tracker, iter_*/release,
    param_map/), and the top-level entries that do not (not converted)."""
    files, skipped = [], []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if entry.is_file() and name == TRACKER:
            files.append(entry)
        elif entry.is_dir() and (name.startswith("iter_") or name == "release" or name == "param_map"):
            files += sorted(p for p in entry.rglob("*") if p.is_file())
        else:
            skipped.append(name)
    return files, skipped


def plan_folder(src, dst, *, source: str, target: str, rng: str = "refuse") -> tuple[list[FileJob], list[str]]:
    """Check everything and list the work; nothing is written. ``src`` is a Megatron ``--save`` folder
    (``latest_checkpointed_iteration.txt``, ``iter_*``/``release``; every iteration is converted), one
    ``iter_*`` folder, or one ``.pt`` file. Every ``.pt`` is read and translated in memory (object graph
    only) so that any problem is reported, for all files at once, before a byte is written. Returns the
    jobs and the top-level entries left out."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CkptmapError(f"{src} does not exist; pass a Megatron checkpoint folder (the training run's --save "
                           f"directory or one iter_* folder) or one .pt file")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise CkptmapError(f"--dst {dst} is {src} or inside it; write the converted checkpoint to another folder")
    if src.is_file():
        files, skipped = [src], []
        rels = [src.name] if dst.is_dir() else [""]  # "" = the --dst file itself
    else:
        if any(src.glob("mp_rank_*")) and not (src / TRACKER).exists():  # one iter_* folder
            files = sorted(p for p in src.rglob("*") if p.is_file())
            skipped = []
        else:
            files, skipped = _checkpoint_files(src)
        rels = [str(p.relative_to(src)) for p in files]
        if not any(p.suffix == ".pt" for p in files):
            raise CkptmapError(f"{src} holds no Megatron checkpoint files (.pt under iter_*/ or release/); pass the "
                               f"training run's --save directory, one iter_* folder, or one .pt file")
    jobs, problems = [], []
    for path, rel in zip(files, rels):
        if path.name.endswith(LAYOUT_SUFFIX) and path.with_name(path.name[:-len(LAYOUT_SUFFIX)]).is_file():
            continue  # consumed (msadapter -> torch) or re-made with its .pt
        if path.suffix != ".pt":
            jobs.append(FileJob(rel, "copy", str(path), nbytes=0))
            continue
        try:
            with TorchZipFile(path) as zf:
                check_dialect(zf, source)
                t = translate_graph(zf.root, source=source, target=target, where=str(path), rng=rng)
                notes = []
                if t.rng_keys:
                    notes.append(f"RNG {'dropped' if rng == 'drop' else 'kept unchanged (foreign)'}: "
                                 f"{', '.join(t.rng_keys)}")
                if source == "torch" and _needs_layout(t.sources):
                    notes.append("shared storages: layout file written beside it")
                if source == "msadapter" and layout_path(path).is_file():
                    layout, why = _read_layout(path, zf)
                    if layout is not None:
                        try:
                            translate_graph(zf.root, source=source, target=target, where=str(path), rng=rng,
                                            layout=layout[0])
                            why = f"torch layout from {layout_path(path).name}"
                        except _LayoutMismatch as e:
                            why = f"{layout_path(path).name} does not fit ({e}); ignored"
                    notes.append(why)
                note = "; ".join(notes)
                jobs.append(FileJob(rel, "translate", str(path), zf.dialect, len(t.sources), t.nbytes, note))
        except CkptmapError as e:
            problems.append(str(e))
    if problems:
        head = f"{len(problems)} file(s) cannot be converted; nothing was written:\n  "
        raise CkptmapError(head + "\n  ".join(problems))
    return jobs, skipped


def write_job(job: FileJob, dst_root, *, source: str, target: str, rng: str, fsync: bool = False) -> int:
    final = Path(dst_root) / job.rel if job.rel else Path(dst_root)
    final.parent.mkdir(parents=True, exist_ok=True)
    if job.action == "copy":
        with atomic.atomic_output(final, fsync=fsync) as tmp:
            shutil.copyfile(job.source, tmp)
        return 0
    t = translate_file(job.source, final, source=source, target=target, rng=rng, fsync=fsync)
    return t.nbytes


def run_jobs(jobs: list[FileJob], dst_root, *, source: str, target: str, rng: str, fsync: bool = False,
             progress=None) -> list[tuple[FileJob, str | None]]:
    """Write every job (each file atomically); returns (job, error or None) per job."""
    out = []
    for job in jobs:
        try:
            write_job(job, dst_root, source=source, target=target, rng=rng, fsync=fsync)
            out.append((job, None))
        except CkptmapError as e:
            out.append((job, str(e)))
        except OSError as e:
            out.append((job, f"{type(e).__name__}: {e}"))
        if progress:
            progress(job)
    return out
