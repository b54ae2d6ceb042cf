"""MindSpeed-Core-MS distributed-optimizer shards: the ``opt_shard_info`` JSON and the file names of
the per-rank shard checkpoints (formats.md §3.4).

The JSON (written by every DP-rank-0 rank of a MindSpeed run with the distributed optimizer)::

    {"dp_rank_list": [0, 2],                 # global ranks of the DP group, ascending; DP rank k = position k
     "param_info": {NAME: {"range_map": [buffer_idx, bucket_idx, start, end],   # offsets in the whole buffer
                           "shape": [20, 8], "dtype": "bfloat16"}, …},          # end - start = prod(shape)
     "zero3_params": [NAME, …],              # sharded ZeRO-3 style: rank k holds a dim-0 slice under NAME
     "buffer_info": {"0": {"buckets": {"0": [padded_numel, unpadded_numel], …},
                           "buffer_size": sum of padded, "buffer_numel_unpadded": sum of unpadded,
                           "bucket_num": number of buckets}, …}}

Bucket ``j`` of a buffer starts at the sum of the padded sizes of buckets ``0..j-1``. DP rank ``k``
holds elements ``[k·n/dp, (k+1)·n/dp)`` of every bucket (``n`` = padded size) under the keys
``buffer_{i}_bucket_{j}`` (fp32 main parameters) and ``{state}.buffer_{i}_bucket_{j}``
(``exp_avg``, ``exp_avg_sq``: the Adam moments).

Layouts (``S`` = the strategy dir, default ``output/opt_shard_info``; ``C`` = the checkpoint dir):

    V1  S/rank_{r}/dist_opt_shard_info_rank_{r}-0_0.json                 r = the group's lowest global rank
        C/rank_{g}/{prefix}-{epoch}_{step}.{ckpt|safetensors}          e.g. network_rank_0-0_2.ckpt
        merged: rank_{g}/{prefix}-{epoch}_{step}_dp_merged.{fmt}       (g = the rank whose file it is named after)
    V2  S/mp_rank_{tp:02d}[_{pp:03d}…]/dist_opt_shard_info_model_optim_rng.json
        C/iter_{it:07d}/mp_rank_…/model_optim_rng_{k:03d}.{fmt}        k = DP rank (position in dp_rank_list)
        merged: iter_{it:07d}/mp_rank_…/model_optim_rng.{fmt} + latest_checkpointed_iteration.txt

The V1 JSON's ``-0_0`` suffix is the epoch/step at which MindSpeed wrote it (when the model was
built); another single ``-E_S`` suffix is accepted too. The V2 reading follows formats.md §3.1 (V2
directories are Megatron's ``iter_*/mp_rank_*``) with one shard file per DP rank, numbered by the
DP rank's position in ``dp_rank_list``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import attrs

from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_folders, mindspeed
from ckptmap.mapping.buckets import Bucket, BufferLayout, ParamSlot

STRATEGY_DIR_NAME = "opt_shard_info"
V2_SHARD_INFO_NAME = "dist_opt_shard_info_model_optim_rng.json"
MERGED_SUFFIX = "_dp_merged"
FORMATS = ("ckpt", "safetensors")

_V1_INFO_RE = re.compile(r"^dist_opt_shard_info_rank_(?P<rank>\d+)-(?P<epoch>\d+)_(?P<step>\d+)\.json$")
_V1_CKPT_RE = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d+)_(?P<step>\d+)\.(?P<fmt>ckpt|safetensors)$")
_V2_SHARD_RE = re.compile(r"^" + re.escape(mindspeed.V2_FILE_STEM) + r"_(?P<dp>\d{3,})\.(?P<fmt>ckpt|safetensors)$")
_RANK_DIR_RE = re.compile(r"^rank_(?P<rank>\d+)$")
_BUFFER_KEY_RE = re.compile(r"^(?:(?P<state>.+)\.)?buffer_(?P<buffer>\d+)_bucket_(?P<bucket>\d+)$")


# -------------------------------------------------------------------------------------------------
# Shard keys


def buffer_key(buffer: int, bucket: int, state: str = "") -> str:
    """``buffer_{i}_bucket_{j}`` (state "" = the fp32 parameters) or ``{state}.buffer_{i}_bucket_{j}``."""
    return f"{state + '.' if state else ''}buffer_{buffer}_bucket_{bucket}"


def parse_buffer_key(key: str) -> tuple[str, int, int] | None:
    """(state, buffer, bucket) of a flat shard key, state "" for the parameters; None for other keys."""
    m = _BUFFER_KEY_RE.match(key)
    if m is None:
        return None
    return m["state"] or "", int(m["buffer"]), int(m["bucket"])


def state_name(state: str, name: str) -> str:
    """The named key of ``state`` of parameter ``name``: the state prefix of the flat key carried over
    (``exp_avg.buffer_0_bucket_0`` -> ``exp_avg.<name>``)."""
    return f"{state}.{name}" if state else name


# -------------------------------------------------------------------------------------------------
# File names


def v1_shard_info_path(rank: int, epoch: int = 0, step: int = 0) -> str:
    return f"rank_{rank}/dist_opt_shard_info_rank_{rank}-{epoch}_{step}.json"


def v2_shard_info_path(mp_dir: str) -> str:
    return f"{mp_dir}/{V2_SHARD_INFO_NAME}"


def rank_dir_name(rank: int) -> str:
    return f"rank_{rank}"


def parse_rank_dir_name(name: str) -> int | None:
    m = _RANK_DIR_RE.match(name)
    return int(m["rank"]) if m else None


@attrs.frozen
class V1Checkpoint:
    path: Path
    prefix: str
    epoch: int
    step: int

    @property
    def stem(self) -> str:
        return f"{self.prefix}-{self.epoch}_{self.step}"

    @property
    def step_id(self) -> tuple[int, int]:
        return self.epoch, self.step


def parse_v1_checkpoint_name(name: str) -> tuple[str, int, int, str] | None:
    """(prefix, epoch, step, format) of ``{prefix}-{epoch}_{step}.{ckpt|safetensors}``; None for any
    other name (merged ``…_dp_merged.*`` outputs, temporary files, …)."""
    m = _V1_CKPT_RE.match(name)
    if m is None:
        return None
    return m["prefix"], int(m["epoch"]), int(m["step"]), m["fmt"]


def list_v1_checkpoints(rank_dir: Path, fmt: str) -> list[V1Checkpoint]:
    """The shard checkpoints of format ``fmt`` in one ``rank_{g}`` folder, by (epoch, step)."""
    out = []
    for p in rank_dir.iterdir():
        parsed = parse_v1_checkpoint_name(p.name)
        if parsed is not None and parsed[3] == fmt and p.is_file():
            out.append(V1Checkpoint(p, parsed[0], parsed[1], parsed[2]))
    return sorted(out, key=lambda c: (c.epoch, c.step, c.prefix))


def v1_merged_path(rank: int, stem: str, fmt: str) -> str:
    return f"{rank_dir_name(rank)}/{stem}{MERGED_SUFFIX}.{fmt}"


def v2_shard_path(iteration: int, mp_dir: str, dp: int, fmt: str) -> str:
    return f"{megatron_folders.iter_dir_name(iteration)}/{mp_dir}/{mindspeed.V2_FILE_STEM}_{dp:03d}.{fmt}"


def v2_merged_path(iteration: int, mp_dir: str, fmt: str) -> str:
    return f"{megatron_folders.iter_dir_name(iteration)}/{mp_dir}/{mindspeed.V2_FILE_STEM}.{fmt}"


def list_v2_iterations(checkpoint_dir: Path) -> list[int]:
    out = []
    for p in checkpoint_dir.iterdir():
        m = re.match(r"^iter_(\d{7,})$", p.name)
        if m and p.is_dir():
            out.append(int(m[1]))
    return sorted(out)


def find_v1_shard_infos(strategy_dir: Path) -> dict[int, Path]:
    """{rank: JSON path} for every ``rank_{r}`` folder of ``strategy_dir`` holding a shard-info JSON."""
    found = {}
    for d in sorted(strategy_dir.iterdir()):
        rank = parse_rank_dir_name(d.name)
        if rank is None or not d.is_dir():
            continue
        candidates = sorted(p for p in d.iterdir() if (m := _V1_INFO_RE.match(p.name)) and int(m["rank"]) == rank)
        if not candidates:
            continue
        exact = d / Path(v1_shard_info_path(rank)).name
        if exact in candidates:
            found[rank] = exact
        elif len(candidates) == 1:
            found[rank] = candidates[0]
        else:
            raise CkptmapError(
                f"{d}: several shard-info files ({', '.join(p.name for p in candidates)}) and none is "
                f"{exact.name}; keep the one written by the run whose checkpoints you combine")
    return found


def find_v2_shard_infos(strategy_dir: Path) -> dict[str, Path]:
    """{mp_rank dir name: JSON path} for every ``mp_rank_*`` folder holding the V2 shard-info JSON."""
    found = {}
    for d in sorted(strategy_dir.iterdir()):
        if megatron_folders.parse_mp_rank_dir_name(d.name) is None or not d.is_dir():
            continue
        p = d / V2_SHARD_INFO_NAME
        if p.is_file():
            found[d.name] = p
    return found


def parse_v2_shard_name(name: str) -> tuple[int, str] | None:
    m = _V2_SHARD_RE.match(name)
    return (int(m["dp"]), m["fmt"]) if m else None


# -------------------------------------------------------------------------------------------------
# The JSON


@attrs.frozen
class ShardInfo:
    """One DP group's shard layout: its global ranks (DP order), buffers and ZeRO-3 parameters."""

    path: str
    dp_ranks: tuple[int, ...] = attrs.field(converter=tuple)
    buffers: dict = attrs.field(factory=dict)            # buffer index -> BufferLayout
    zero3_params: tuple[str, ...] = attrs.field(converter=tuple, default=())
    declared: dict = attrs.field(factory=dict)          # name -> (shape, dtype) of param_info entries

    @property
    def dp(self) -> int:
        return len(self.dp_ranks)


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}


def _canonical_dtype(value: str) -> str:
    name = str(value).strip()
    for prefix in ("mindspore.", "torch.", "ms."):
        name = name.removeprefix(prefix)
    name = name.lower()
    return _DTYPE_ALIASES.get(name, name)


def _int(value, what, where) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CkptmapError(f"{where}: {what} is {value!r}, expected an integer; the opt_shard_info file is "
                           f"corrupt — use the one written by the training run")
    return value


def read_opt_shard_info(path) -> ShardInfo:
    """Read and check one shard-info JSON: every range inside its buffer and bucket, no overlaps,
    sizes consistent. Names the entry at fault."""
    path = Path(path)
    fix = "use the opt_shard_info folder written by the training run whose checkpoints you combine"
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise CkptmapError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise CkptmapError(f"{path} is not valid JSON ({e}); the file is damaged — {fix}") from None
    if not isinstance(raw, dict):
        raise CkptmapError(f"{path}: expected a JSON object, found {type(raw).__name__}; {fix}")
    missing = [k for k in ("dp_rank_list", "param_info", "buffer_info") if k not in raw]
    if missing:
        raise CkptmapError(f"{path}: missing {', '.join(missing)} (expected keys dp_rank_list, param_info, "
                           f"zero3_params, buffer_info); this is not a MindSpeed shard-info file — {fix}")

    ranks = raw["dp_rank_list"]
    if (not isinstance(ranks, list) or not ranks
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks)
            or any(a >= b for a, b in zip(ranks, ranks[1:]))):
        raise CkptmapError(f"{path}: dp_rank_list is {ranks!r}, expected the DP group's global ranks as "
                           f"ascending distinct non-negative integers; {fix}")

    if not isinstance(raw["buffer_info"], dict):
        raise CkptmapError(f"{path}: buffer_info is {type(raw['buffer_info']).__name__}, expected an object; {fix}")
    bucket_tables: dict[int, tuple[Bucket, ...]] = {}
    for bkey, binfo in raw["buffer_info"].items():
        where = f"{path}: buffer_info[{bkey!r}]"
        if not str(bkey).isdigit() or not isinstance(binfo, dict) or not isinstance(binfo.get("buckets"), dict):
            raise CkptmapError(f"{where} is {binfo!r}, expected an integer key and an object with \"buckets\"; {fix}")
        table = binfo["buckets"]
        if sorted(table, key=lambda k: int(k) if str(k).isdigit() else -1) != [str(j) for j in range(len(table))]:
            raise CkptmapError(f"{where}: bucket keys {list(table)} are not 0..{len(table) - 1}; {fix}")
        buckets, start = [], 0
        for j in range(len(table)):
            sizes = table[str(j)]
            if (not isinstance(sizes, list) or len(sizes) != 2
                    or any(isinstance(x, bool) or not isinstance(x, int) for x in sizes)
                    or not 0 <= sizes[1] <= sizes[0]):
                raise CkptmapError(f"{where}: bucket {j} is {sizes!r}, expected [padded_numel, unpadded_numel] "
                                   f"with 0 <= unpadded <= padded; {fix}")
            buckets.append(Bucket(start, sizes[0], sizes[1]))
            start += sizes[0]
        if "bucket_num" in binfo and _int(binfo["bucket_num"], "bucket_num", where) != len(buckets):
            raise CkptmapError(f"{where}: bucket_num is {binfo['bucket_num']} but {len(buckets)} buckets are "
                               f"listed; {fix}")
        if "buffer_size" in binfo and _int(binfo["buffer_size"], "buffer_size", where) != start:
            raise CkptmapError(f"{where}: buffer_size is {binfo['buffer_size']} but the padded bucket sizes "
                               f"{[b.numel for b in buckets]} add up to {start}; {fix}")
        if ("buffer_numel_unpadded" in binfo
                and _int(binfo["buffer_numel_unpadded"], "buffer_numel_unpadded", where) > start):
            raise CkptmapError(f"{where}: buffer_numel_unpadded {binfo['buffer_numel_unpadded']} exceeds the "
                               f"buffer size {start}; {fix}")
        bucket_tables[int(bkey)] = tuple(buckets)

    params = raw["param_info"]
    if not isinstance(params, dict):
        raise CkptmapError(f"{path}: param_info is {type(params).__name__}, expected an object; {fix}")
    slots: dict[int, list[ParamSlot]] = {i: [] for i in bucket_tables}
    declared = {}
    for name, info in params.items():
        where = f"{path}: parameter {name}"
        if not isinstance(info, dict) or "range_map" not in info or "shape" not in info:
            raise CkptmapError(f"{where}: entry {info!r} lacks range_map or shape; {fix}")
        rmap, shape = info["range_map"], info["shape"]
        if (not isinstance(rmap, list) or len(rmap) != 4
                or any(isinstance(x, bool) or not isinstance(x, int) for x in rmap)):
            raise CkptmapError(f"{where}: range_map is {rmap!r}, expected [buffer_idx, bucket_idx, start, end]; {fix}")
        if not isinstance(shape, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in shape):
            raise CkptmapError(f"{where}: shape is {shape!r}, expected a list of non-negative integers; {fix}")
        buffer, bucket, start, end = rmap
        dtype = _canonical_dtype(info.get("dtype", "float32"))
        declared[name] = (tuple(shape), dtype)
        if buffer not in bucket_tables:
            raise CkptmapError(f"{where}: range_map names buffer {buffer}, but buffer_info describes buffer(s) "
                               f"{sorted(bucket_tables) or 'none'}; {fix}")
        table = bucket_tables[buffer]
        size = sum(b.numel for b in table)
        if not 0 <= bucket < len(table):
            raise CkptmapError(f"{where}: range_map names bucket {bucket} of buffer {buffer}, which has "
                               f"{len(table)} bucket(s); {fix}")
        numel = math.prod(shape)
        if end - start != numel:
            raise CkptmapError(f"{where}: range [{start}, {end}) holds {end - start} elements but shape "
                               f"{shape} needs {numel}; {fix}")
        if start < 0 or end > size:
            raise CkptmapError(f"{where}: range [{start}, {end}) overruns buffer {buffer}, which has {size} "
                               f"elements (buffer_info); the JSON and the buffer disagree — {fix}")
        b = table[bucket]
        if start < b.start or end > b.start + b.numel:
            raise CkptmapError(f"{where}: range [{start}, {end}) is not inside bucket {bucket} of buffer {buffer} "
                               f"= [{b.start}, {b.start + b.numel}) (padded sizes {[x.numel for x in table]}); "
                               f"the JSON is inconsistent — {fix}")
        slots[buffer].append(ParamSlot(name, dtype, tuple(shape), start, end, bucket))

    buffers = {}
    for i, table in sorted(bucket_tables.items()):
        ordered = sorted(slots[i], key=lambda s: (s.start, s.end))
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.end:
                raise CkptmapError(f"{path}: parameters {a.name} [{a.start}, {a.end}) and {b.name} "
                                   f"[{b.start}, {b.end}) overlap in buffer {i}; {fix}")
        dtype = slots[i][0].dtype if slots[i] else ""
        buffers[i] = BufferLayout(dtype, tuple(slots[i]), table, str(path))

    zero3 = raw.get("zero3_params", [])
    if not isinstance(zero3, list) or any(not isinstance(n, str) for n in zero3) or len(set(zero3)) != len(zero3):
        raise CkptmapError(f"{path}: zero3_params is {zero3!r}, expected a list of distinct parameter names; {fix}")
    return ShardInfo(str(path), tuple(ranks), buffers, tuple(zero3), declared)


def opt_shard_info_dict(dp_ranks, buffers, zero3_params=()) -> dict:
    """The JSON object for ``buffers`` (a list of BufferLayout, index = buffer index, or a dict)."""
    items = buffers.items() if isinstance(buffers, dict) else enumerate(buffers)
    param_info, buffer_info = {}, {}
    for i, layout in sorted(items):
        for s in layout.slots:
            if s.name in param_info:
                raise CkptmapError(f"opt_shard_info: parameter {s.name} appears twice (buffer {i}); every name "
                                   f"must be unique")
            param_info[s.name] = {"range_map": [int(i), int(s.bucket), int(s.start), int(s.end)],
                                  "shape": [int(d) for d in s.shape], "dtype": s.dtype}
        buffer_info[str(i)] = {
            "buckets": {str(j): [int(b.numel), int(b.numel_unpadded)] for j, b in enumerate(layout.buckets)},
            "buffer_size": int(sum(b.numel for b in layout.buckets)),
            "buffer_numel_unpadded": int(sum(b.numel_unpadded for b in layout.buckets)),
            "bucket_num": len(layout.buckets),
        }
    return {"dp_rank_list": [int(r) for r in dp_ranks], "param_info": param_info,
            "zero3_params": list(zero3_params), "buffer_info": buffer_info}


def write_opt_shard_info(path, dp_ranks, buffers, zero3_params=(), *, fsync: bool = True) -> None:
    """Write the shard-info JSON atomically: a temporary file in the same folder (created with
    O_TRUNC), flushed, then renamed over ``path``; readers never see a partial file."""
    path = Path(path)
    text = json.dumps(opt_shard_info_dict(dp_ranks, buffers, zero3_params), indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -------------------------------------------------------------------------------------------------
# Writing at training time (ckptmap.hooks.mindspeed)


def canonical_dtype(value) -> str:
    """ckptmap's dtype name for a dtype as MindSpore, torch, numpy or a JSON file spells it
    (``mindspore.bfloat16`` / ``BFloat16`` / ``torch.bfloat16`` / ``bf16`` -> ``bfloat16``)."""
    return _canonical_dtype(str(value))


def shard_info_relpath(layout: str, *, rank: int, tp: int = 0, pp: int = 0, pp_size: int = 1) -> str:
    """Where the DP-rank-0 rank ``rank`` writes its shard-info JSON, relative to the strategy dir
    (``<output_dir>/opt_shard_info``): V1 ``rank_{rank}/dist_opt_shard_info_rank_{rank}-0_0.json``
    (``-0_0``: MindSpeed writes it before the first step), V2
    ``mp_rank_{tp:02d}[_{pp:03d} if pp_size > 1]/dist_opt_shard_info_model_optim_rng.json``."""
    if layout == "v1":
        return v1_shard_info_path(rank)
    if layout == "v2":
        return v2_shard_info_path(megatron_folders.mp_rank_dir_name(tp, pp, pp_size))
    raise CkptmapError(f"opt_shard_info layout {layout!r} is unknown; use \"v1\" (opt_shard_info/rank_{{r}}/…) or "
                       f"\"v2\" (opt_shard_info/mp_rank_…/…)")
