"""Megatron-LM legacy checkpoint files: ``model_optim_rng.pt`` (model chunks as named tensors plus the
other entries) and ``distrib_optim.pt`` (the distributed optimizer's flat buckets), read through
``torch_zip_reader`` (restricted unpickler, lazy mmap'd arrays), so Megatron never needs to be
importable. Model chunks are nested dicts; a tensor's *Megatron name* is its dotted path inside the
chunk (``language_model.encoder.layers.0.input_norm.weight``) and its *key* in this module is the
slash-joined path from the file root (``model0/language_model/encoder/layers.0.input_norm.weight``),
which addresses it unambiguously.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from ckptmap.errors import CkptmapError
from ckptmap.formats.megatron_folders import MODEL_FILE
from ckptmap.formats.safe_unpickler import dtype_name
from ckptmap.formats.base import FileRange, TensorSpec
from ckptmap.formats import torch_zip_reader
from ckptmap.formats.torch_zip_reader import TensorRef, TorchZipFile, file_offset, file_range

KEY_SEP = "/"
EXTRA_STATE = "_extra_state"
CHECKPOINT_VERSION = 3.0


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
        elif isinstance(v, TensorRef):
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
    name = dtype_name(k)
    if name is not None:
        return name
    return str(k)


_PLAIN_LEAVES = frozenset({int, float, bool, str, bytes, type(None)})

# What files derive from their trees, by value: each rank's model_optim_rng.pt has its own pickle (its
# args name its rank) but ranks of one stage hold the same tensors at the same offsets; equal entry and
# range tables are one object, so results keyed by their identity (the compiler's) are shared by those
# ranks as by files of one pickle. A few per pipeline stage; the oldest let go of past _INTERNED_KEPT
# (a value made again is then another object: the caches keyed by identity miss, never mix two up, as
# each keeps the objects whose ids it holds).
_INTERNED: dict = {}
_INTERNED_KEPT = 1 << 16


def _interned(key, make):
    hit = _INTERNED.get(key)
    if hit is None:
        hit = _INTERNED[key] = make()
        if len(_INTERNED) > _INTERNED_KEPT:
            del _INTERNED[next(iter(_INTERNED))]
    return hit


class PtFile:
    """A lazily opened torch checkpoint: the object tree is read, tensor bytes are not. Tensors are
    addressed by slash-joined paths (``model0/language_model/…``)."""

    def __init__(self, path, _checked: bool = False):
        self.path = _as_path(path)
        if not _checked and not self.path.is_file():   # _checked: a subclass said why it is missing
            raise CkptmapError(f"{self.path} is missing")
        self._zip = TorchZipFile(self.path)
        self.root = self._zip.root
        self._entries: dict | None = None
        self._ranges: dict | None = None   # kept by close(): key -> (file offset, nbytes) of contiguous tensors

    @property
    def dialect(self) -> str:
        """``torch`` (stock torch.save) or ``msadapter`` (MindSpeed-Core-MS's MSAdapter shim), from the file."""
        return self._zip.dialect

    def entries(self) -> list[tuple[str, TensorRef]]:
        """(key, TensorRef) of every tensor in the object graph, in pickle order."""
        return list(self._entry_map().items())

    def _entry_map(self) -> dict:
        if self._entries is None and self._zip.shared_tensors is not None:   # a file of the same tensors' (read-only)
            self._entries = self._zip.shared_tensors.get("entries")
        if self._entries is None:
            out = []

            def rec(node, prefix):   # prefix: the parent's key + "/", "" at the root
                if isinstance(node, dict):
                    items = node.items()
                else:   # a list or tuple: one of plain values only (an RNG state: 625 ints) is passed whole
                    if set(map(type, node)) <= _PLAIN_LEAVES:
                        return
                    items = enumerate(node)
                for k, v in items:
                    if type(v) in _PLAIN_LEAVES:
                        continue
                    if isinstance(v, TensorRef):
                        out.append((prefix + (k if type(k) is str else encode_key(k)), v))
                    elif isinstance(v, (dict, list, tuple)):
                        rec(v, prefix + (k if type(k) is str else encode_key(k)) + KEY_SEP)
            rec(self.root, "")
            self._entries = _interned(("entries", tuple(out)), lambda: dict(out))
            if self._zip.shared_tensors is not None:
                self._zip.shared_tensors["entries"] = self._entries
        return self._entries

    def keys(self) -> list[str]:
        return [k for k, _ in self.entries()]

    def __contains__(self, key) -> bool:
        return key in self._entry_map()

    def entry(self, key: str) -> TensorRef | None:
        """The TensorRef of ``key``, or None."""
        return self._entry_map().get(key)

    def ref(self, key: str) -> TensorRef:
        ref = self._entry_map().get(key)
        if ref is None:
            raise CkptmapError(f"{self.path} has no tensor {key!r}; the plan was made for a different "
                               f"checkpoint — re-create it")
        return ref

    def spec(self, key: str) -> TensorSpec:
        ref = self.ref(key)
        return TensorSpec(ref.dtype, ref.shape)

    def array(self, key: str):
        return self._zip.array(self.ref(key))

    def byte_range(self, key: str) -> FileRange | None:
        return file_range(self._zip, self.ref(key))

    def close(self):
        # Planning closes every file after reading its object tree (a mapping per rank adds up at
        # thousands of ranks); where each contiguous tensor lies is kept, so a few of its elements can
        # still be read (kept_range) without parsing the file again.
        if self._ranges is None and self.dialect == "torch":
            shared = self._zip.shared_tensors   # same records at the same offsets: the same ranges
            self._ranges = shared.get("ranges") if shared is not None else None
            if self._ranges is None:
                try:
                    ranges = tuple((k, file_offset(self._zip, ref)) for k, ref in self._entry_map().items())
                except CkptmapError:
                    ranges = ()
                self._ranges = _interned(("ranges", ranges), lambda: dict(ranges))
                if shared is not None:
                    shared["ranges"] = self._ranges
            torch_zip_reader.remember_placement(self._zip, self.placement)
        self._zip.close()

    def kept_range(self, key: str) -> tuple[int, int] | None:
        """After close(): (file offset, nbytes) of a contiguous tensor, as close() kept it, or None."""
        return self._ranges.get(key) if self._ranges else None

    @property
    def placement(self) -> tuple:
        """After close(): the objects that say where each tensor lies (entries and kept ranges). Files
        whose tables are equal (ranks of one stage; files of one structure) share them, so their
        identity tells that a result derived from one file's placement holds for the other's."""
        entries, ranges = self._entry_map(), self._ranges
        return _interned(("placement", id(entries), id(ranges)), lambda: (entries, ranges))


def _as_path(path) -> Path:
    return path if isinstance(path, Path) else Path(path)   # a Path again costs ~10 us (thousands of files)


def _open_or_say_missing(open_file, path: Path, missing: str) -> None:
    """``open_file(path, _checked=True)``, with ``missing`` as the error when there is no such file. The
    file is opened first and looked at only if that fails: one stat fewer per file of thousands of ranks."""
    try:
        open_file(path, _checked=True)
    except CkptmapError:
        if not path.is_file():
            raise CkptmapError(missing) from None
        raise


class ModelFile(PtFile):
    """``model_optim_rng.pt``: model chunks as flat lists of named tensors, plus the other entries."""

    def __init__(self, path):
        path = _as_path(path)
        _open_or_say_missing(super().__init__, path, f"{path} is missing; every mp_rank directory of a Megatron "
                                                      f"checkpoint holds {MODEL_FILE}")
        if not isinstance(self.root, dict):
            raise CkptmapError(f"{self.path} holds a {type(self.root).__name__}, not the dict Megatron saves")

    def chunks(self) -> list[tuple[str, int]]:
        return model_chunk_keys(self.root, self.path)

    def slim(self, keep_args=()) -> None:
        """Let go of what a planner that has read this rank no longer needs: the per-rank states
        (LEGACY_RANK_STATE_PATHS: RNG states, ~30 KB of objects a rank) and every arg but ``keep_args``.
        The top-level keys stay (meta_keys); the model chunks and the rest stay the same objects. The
        tree read (perhaps shared with other files) is not changed: this file gets a copy of its top."""
        import types

        root = self.root
        top = type(root)(root)
        if hasattr(root, "__dict__"):
            top.__dict__.update(root.__dict__)
        for key in {p.split(".")[0] for p in LEGACY_RANK_STATE_PATHS}:
            if key in top:
                top[key] = None
        args = root.get("args")
        if args is not None:
            top["args"] = types.SimpleNamespace(**{n: getattr(args, n) for n in keep_args if hasattr(args, n)})
        self.root = self._zip.root = top

    def chunk_leaves(self, chunk_key: str) -> list[tuple[list, object]]:
        """Every leaf of one model chunk in state-dict order: (key path inside the chunk, value) —
        tensors as TensorRefs, ``_extra_state`` entries as they were pickled (None, BytesIO, …)."""
        out = []

        def rec(node, path):
            for k, v in node.items():
                if isinstance(v, dict):
                    rec(v, path + [k])
                else:
                    out.append((path + [k], v))
        rec(self.root[chunk_key], [])
        return out

    def tensors(self) -> list[ModelTensor]:
        """The model chunks' tensors; files whose lists are equal get one list (read-only). Files read
        with the same tensors (``TorchZipFile.shared_tensors``: a stage's ranks) walk their tree once."""
        shared = self._zip.shared_tensors
        found = shared.get("model_tensors") if shared is not None else None
        if found is not None:
            return found
        out: list[ModelTensor] = []
        for key, v in self.chunks():
            _walk(self.root[key], [], [key], out, v)
        found = _interned(("tensors", tuple(out)), lambda: out)
        if shared is not None:
            shared["model_tensors"] = found
        return found

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
# Where a legacy model_optim_rng.pt keeps the per-rank state a torch_dist save stores as ShardedObjects (the
# rules' torch_dist ``rank_object`` lines name these paths): the RNG states, the rerun machine's sharded part
LEGACY_RANK_STATE_PATHS = ("rng_state", "rerun_state_machine.sharded")
PER_BUCKET, COALESCED = "per_bucket", "coalesced"


@attrs.frozen
class OptimBuffer:
    """One DDP buffer's state in ``distrib_optim.pt``.

    ``path``: the keys leading to it (``(gbuf_idx, dtype_key)``, prefixed by the optimizer's index
    when the file holds a ChainedOptimizer's list); ``storage``: ``per_bucket`` (Megatron core_r0.6:
    one padded fp32 tensor per bucket per state, sizes in ``padded`` / ``unpadded``) or ``coalesced``
    (Megatron >= 0.7: one fp32 tensor per state holding every bucket's unpadded part, concatenated;
    only the total ``numel_unpadded`` is recorded)."""

    optimizer: int | None
    index: int
    dtype_key: object
    param_dtype: str
    storage: str
    padded: tuple[int, ...] | None = None
    unpadded: tuple[int, ...] | None = None
    numel_unpadded: int | None = None

    @property
    def prefix(self) -> list[str]:
        head = [] if self.optimizer is None else [str(self.optimizer)]
        return head + [str(self.index), encode_key(self.dtype_key)]

    def key(self, state: str, bucket: int | None = None) -> str:
        """Flat key (``PtFile.array``) of a state's tensor: per bucket, or the coalesced one."""
        return KEY_SEP.join(self.prefix + [state] + ([] if self.storage == COALESCED else [str(bucket)]))

    @property
    def describe(self) -> str:
        where = f"optimizer {self.optimizer} " if self.optimizer is not None else ""
        if self.storage == COALESCED:
            return f"{where}buffer {self.index} ({self.param_dtype}, coalesced, {self.numel_unpadded} elements)"
        return f"{where}buffer {self.index} ({self.param_dtype}, buckets {list(self.padded)})"


class OptimFile(PtFile):
    """``distrib_optim.pt`` as ``DistributedOptimizer.save_parameter_state`` writes it, in any of the
    forms Megatron-LM has used (formats.md §1.3; issue 10):

    * core_r0.6: ``{"per_bucket_numel": [{key: [n...]}], "per_bucket_numel_unpadded": [...],
      g: {key: {state: [fp32 tensor per bucket]}}}`` — buffers numbered across model chunks;
    * 0.7+: ``{"buckets_coalesced": True, g: {key: {state: fp32 tensor, "numel_unpadded": n}}}`` —
      ``n`` may be a 0-d int tensor (MindSpeed-LLM on MindSpore);
    * a ChainedOptimizer (MoE: dense and expert optimizers) writes a list with one such dict per
      optimizer, ``None`` for the optimizers whose data-parallel rank 0 is on another rank.

    ``key`` is ``(param dtype, grad dtype)`` as torch dtypes or MindSpore dtype objects.
    ``buffers`` lists them in file order."""

    def __init__(self, path):
        path = _as_path(path)
        _open_or_say_missing(super().__init__, path, f"{path} is missing: converting the optimizer state needs the "
                                                      f"distributed optimizer's file, written by Megatron with "
                                                      f"--use-distributed-optimizer; convert the weights alone with "
                                                      f"--convert-param-only")
        shared = self._zip.shared   # a file of the same structure parsed it (unless it read a 0-d tensor's value)
        parsed = shared.get("optim_state") if shared is not None else None
        if parsed is None:
            values_read = []

            def read_int(ref):
                values_read.append(ref)
                return int(self._zip.array(ref))
            parsed = parse_optim_state(self.root, str(path), read_int)
            if shared is not None and not values_read:   # a value read from the records is this file's alone
                shared["optim_state"] = parsed
        self.chained, self.absent, self.storage, self.buffers = parsed

    def state_refs(self, buf: OptimBuffer, state: str) -> list[TensorRef]:
        return state_refs(self.root, buf, state)

    def covered_storages(self, ranges: dict | None = None) -> dict:
        """storage key -> (dtype, numel, [(start, end)]): the element ranges of each state tensor's
        storage that hold parameters' state. ``ranges``: {(buffer index in ``buffers``, bucket or None):
        [(start, end)] in that tensor} from the bucket layout; without it, all but the bucket padding of
        per-bucket tensors (the whole of a coalesced one)."""
        out = {}
        for g, buf in enumerate(self.buffers):
            for st in OPTIM_STATES:
                for j, ref in enumerate(self.state_refs(buf, st)):
                    bucket = None if buf.storage == COALESCED else j
                    spans = (ranges or {}).get((g, bucket))
                    if spans is None:
                        spans = [(0, buf.unpadded[j] if buf.storage == PER_BUCKET else buf.numel_unpadded)]
                    out[ref.storage] = (ref.dtype, ref.storage_numel,
                                        [(ref.storage_offset + a, ref.storage_offset + b) for a, b in spans])
        return out


def state_refs(root, buf: OptimBuffer, state: str) -> list:
    node = root
    for part in ([buf.optimizer] if buf.optimizer is not None else []) + [buf.index, buf.dtype_key, state]:
        node = node[part]
    return list(node) if buf.storage == PER_BUCKET else [node]


def parse_optim_state(root, where: str, read_int=None):
    """``(chained, absent optimizer indices, storage kind, [OptimBuffer])`` of a distrib_optim.pt
    object graph (tensors as TensorRefs). ``read_int(ref)`` reads a 0-d int tensor (``numel_unpadded``
    as MindSpeed-LLM on MindSpore stores it); None: such a tensor is refused."""
    chained = isinstance(root, list)
    parts = list(enumerate(root)) if chained else [(None, root)]
    buffers, absent, storage = [], [], None
    for opt_index, state in parts:
        if state is None:
            absent.append(opt_index)
            continue
        here = where + (f" (optimizer {opt_index} of the chained list)" if chained else "")
        if not isinstance(state, dict):
            raise CkptmapError(f"{here} holds a {type(state).__name__}; expected the dict "
                               f"DistributedOptimizer.save_parameter_state writes")
        kind = COALESCED if state.get("buckets_coalesced") is True else \
            PER_BUCKET if "per_bucket_numel" in state else None
        if kind is None:
            raise CkptmapError(f"{here} has neither per_bucket_numel (Megatron core_r0.6) nor buckets_coalesced "
                               f"(Megatron >= 0.7); top-level keys: {', '.join(map(str, state))}; it is not a "
                               f"distrib_optim.pt written by DistributedOptimizer.save_parameter_state")
        if storage not in (None, kind):
            raise CkptmapError(f"{where} mixes coalesced and per-bucket optimizer states")
        storage = kind
        read = _per_bucket if kind == PER_BUCKET else _coalesced
        buffers.extend(read(state, opt_index, here, read_int))
    return chained, absent, storage, buffers


def _dtype_key(key, g, where) -> tuple[object, str]:
    if not (isinstance(key, tuple) and len(key) == 2):
        raise CkptmapError(f"{where}: buffer {g} is keyed by {key!r}; expected (param dtype, grad dtype)")
    names = [dtype_name(k) for k in key]
    if None in names:
        raise CkptmapError(f"{where}: buffer {g} is keyed by {key!r}, which is neither a pair of torch dtypes nor "
                           f"of MindSpore dtypes; the file is not a Megatron distrib_optim.pt")
    return key, names[0]


def _per_bucket(state, opt_index, where, read_int):
    out = []
    for g, (padded, unpadded) in enumerate(zip(state["per_bucket_numel"], state["per_bucket_numel_unpadded"])):
        if len(padded) != 1 or padded.keys() != unpadded.keys():
            raise CkptmapError(f"{where}: buffer {g} has dtype keys {list(padded)}; ckptmap expects one "
                               f"(param dtype, grad dtype) pair per buffer, as Megatron writes")
        key, param_dtype = _dtype_key(next(iter(padded)), g, where)
        if g not in state:
            raise CkptmapError(f"{where}: per_bucket_numel lists buffer {g} but the file has no entry {g}")
        for st in OPTIM_STATES:
            tensors = state[g].get(key, {}).get(st)
            if tensors is None or len(tensors) != len(padded[key]):
                raise CkptmapError(f"{where}: buffer {g} lacks {st!r} tensors for its {len(padded[key])} "
                                   f"bucket(s); the file is incomplete")
            for j, (ref, n) in enumerate(zip(tensors, padded[key])):
                if tuple(ref.shape) != (n,) or ref.dtype != "float32":
                    raise CkptmapError(f"{where}: buffer {g} {st} bucket {j} is {ref.dtype} "
                                       f"{list(ref.shape)}, expected float32 [{n}] (per_bucket_numel)")
        out.append(OptimBuffer(opt_index, g, key, param_dtype, PER_BUCKET, tuple(padded[key]), tuple(unpadded[key])))
    return out


def _coalesced(state, opt_index, where, read_int):
    out = []
    indices = sorted(k for k in state if isinstance(k, int) and not isinstance(k, bool))
    if indices != list(range(len(indices))):
        raise CkptmapError(f"{where}: buffer entries {indices} are not numbered 0, 1, …; the file is damaged")
    for g in indices:
        entry = state[g]
        if not isinstance(entry, dict) or len(entry) != 1:
            raise CkptmapError(f"{where}: buffer {g} has {len(entry) if isinstance(entry, dict) else 0} dtype "
                               f"keys; ckptmap expects one (param dtype, grad dtype) pair per buffer")
        key, param_dtype = _dtype_key(next(iter(entry)), g, where)
        states = entry[key]
        numel = states.get("numel_unpadded")
        if isinstance(numel, TensorRef):  # MindSpeed-LLM on MindSpore stores a 0-d int64 tensor
            if numel.shape != () or numel.dtype != "int64" or read_int is None:
                raise CkptmapError(f"{where}: buffer {g} numel_unpadded is a {numel.dtype} tensor of shape "
                                   f"{list(numel.shape)}; expected an int or a 0-d int64 tensor")
            numel = read_int(numel)
        if type(numel) is not int or numel < 0:
            raise CkptmapError(f"{where}: buffer {g} has no valid numel_unpadded ({numel!r})")
        for st in OPTIM_STATES:
            ref = states.get(st)
            if not isinstance(ref, TensorRef) or tuple(ref.shape) != (numel,) or ref.dtype != "float32":
                found = f"{ref.dtype} {list(ref.shape)}" if isinstance(ref, TensorRef) else repr(ref)
                raise CkptmapError(f"{where}: buffer {g} {st!r} is {found}, expected float32 [{numel}] "
                                   f"(numel_unpadded); the file is damaged")
        out.append(OptimBuffer(opt_index, g, key, param_dtype, COALESCED, numel_unpadded=numel))
    return out
