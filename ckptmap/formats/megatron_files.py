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

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats.megatron_folders import MODEL_FILE, OPTIM_FILE
from ckptmap.formats.safe_unpickler import dtype_name
from ckptmap.formats.base import FileRange, TensorSpec
from ckptmap.formats.torch_zip_reader import TensorRef, TorchZipFile, file_offset

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


class PtFile:
    """A lazily opened torch checkpoint: the object tree is read, tensor bytes are not. Tensors are
    addressed by slash-joined paths (``model0/language_model/…``)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CkptmapError(f"{self.path} is missing")
        self._zip = TorchZipFile(self.path)
        self.root = self._zip.root
        self._entries: dict | None = None

    @property
    def dialect(self) -> str:
        """``torch`` (stock torch.save) or ``msadapter`` (MindSpeed-Core-MS's MSAdapter shim), from the file."""
        return self._zip.dialect

    def entries(self) -> list[tuple[str, TensorRef]]:
        """(key, TensorRef) of every tensor in the object graph, in pickle order."""
        if self._entries is None:
            out = []

            def rec(node, path):
                items = node.items() if isinstance(node, dict) else enumerate(node) \
                    if isinstance(node, (list, tuple)) else ()
                for k, v in items:
                    if isinstance(v, TensorRef):
                        out.append((KEY_SEP.join(path + [encode_key(k)]), v))
                    elif isinstance(v, (dict, list, tuple)):
                        rec(v, path + [encode_key(k)])
            rec(self.root, [])
            self._entries = dict(out)
        return list(self._entries.items())

    def keys(self) -> list[str]:
        return [k for k, _ in self.entries()]

    def __contains__(self, key) -> bool:
        self.entries()
        return key in self._entries

    def ref(self, key: str) -> TensorRef:
        self.entries()
        ref = self._entries.get(key)
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
        where = file_offset(self._zip, self.ref(key))
        return None if where is None else FileRange(str(self.path), *where)

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

    def covered_storages(self) -> dict:
        """storage key -> (dtype, numel, [(start, end)]): the element ranges of each bucket tensor's
        storage that hold parameters' state (the rest is bucket padding)."""
        out = {}
        for g, (dtype_key, padded, unpadded) in enumerate(self.buffers):
            for state in OPTIM_STATES:
                for j, ref in enumerate(self.root[g][dtype_key][state]):
                    out[ref.storage] = (ref.dtype, ref.storage_numel,
                                        [(ref.storage_offset, ref.storage_offset + unpadded[j])])
        return out

    def param_dtype(self, buffer: int) -> str:
        name = dtype_name(self.buffers[buffer][0][0])
        if name is None:
            raise CkptmapError(f"{self.path}: buffer {buffer} is keyed by {self.buffers[buffer][0]!r}; expected "
                               f"(param dtype, grad dtype)")
        return name

    def key(self, buffer: int, state: str, bucket: int) -> str:
        return KEY_SEP.join([str(buffer), encode_key(self.buffers[buffer][0]), state, str(bucket)])
