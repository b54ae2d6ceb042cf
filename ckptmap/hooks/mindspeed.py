"""MindSpeed-Core-MS save hook: write the distributed optimizer's ``opt_shard_info`` JSON.

A MindSpeed run with the distributed optimizer saves, per rank, flat fp32 bucket shards
(``buffer_{i}_bucket_{j}``, ``exp_avg.…``, ``exp_avg_sq.…``) that mean nothing without the
shard-info JSON saying where each parameter sits (formats.md §3.4). ``ckptmap combine`` needs that
JSON; this module writes it, computed from the network's parameters and the DP group by the same
``buckets mindspeed`` block of the rules that ``combine``'s tests and ``ckptmap/mapping/buckets.py``
use, so a checkpoint saved with the hook can always be merged.

Entry points
------------
``compute_opt_shard_info(params, dp_rank_list, *, bucket_size=None, zero3_params=(), rules=…)``
    The JSON object (a dict). No files, no MindSpore communication.
``write_opt_shard_info(output_dir, rank, dp_rank_list, params, *, layout="v1", tp_rank=0, pp_rank=0,
pp_size=1, …)``
    Only the DP-rank-0 rank (``rank == dp_rank_list[0]``) writes
    ``<output_dir>/opt_shard_info/rank_{rank}/dist_opt_shard_info_rank_{rank}-0_0.json`` (V1) or
    ``<output_dir>/opt_shard_info/mp_rank_{tp:02d}[_{pp:03d}]/dist_opt_shard_info_model_optim_rng.json``
    (V2); the other ranks only create their (empty) V1 ``rank_{r}`` folder, as MindSpeed does. The
    file is written to a temporary name created with O_TRUNC, fsynced and renamed over the old one,
    so a shorter JSON never leaves the tail of a longer one behind and readers never see half a file.
``OptShardInfoCallback(network, dp_rank_list, output_dir, …)``
    A ``mindspore.train.Callback`` for ``Model.train`` scripts: after each step, epoch and at the end
    of training it looks at the ``ModelCheckpoint`` callbacks of the run (or the one given as
    ``ckpt_callback``) and (re)writes the JSON whenever one of them saved a new checkpoint
    (``ModelCheckpoint.latest_ckpt_file_name`` changed). Put it *after* the ``ModelCheckpoint`` in
    ``callbacks=[…]``; the other order is refused when training begins.
``install(network, dp_rank_list, output_dir, …)`` / ``uninstall()``
    Patches ``mindspore.save_checkpoint`` (see below) so that every successful
    ``save_checkpoint(obj, path, …)`` whose ``path`` lies inside ``output_dir`` also (re)writes the
    JSON. Installing again (also after re-importing this module) replaces the settings and keeps
    the single wrapper: one save writes the JSON once.

What ``install`` patches
------------------------
Exactly the function ``mindspore.train.serialization.save_checkpoint``: every module attribute named
``save_checkpoint`` in ``sys.modules`` that *is* that function is replaced by one wrapper —
``mindspore.save_checkpoint``, ``mindspore.train.save_checkpoint``, the copies that
``mindspore.train.callback._checkpoint`` (``ModelCheckpoint``) and ``mindspore.train.model``
imported, and any module of the training script or of MindSpeed that did
``from mindspore import save_checkpoint`` before ``install`` (modules importing it later get the
wrapper from ``mindspore``). The wrapper calls the original with the same arguments and returns its
result; only afterwards, if the target path is inside ``output_dir``, it writes the JSON (an error
there raises ``CkptmapError``: a checkpoint without its shard info cannot be merged). Nested calls
(``save_checkpoint`` calling itself) write once. ``uninstall()`` puts the original back everywhere
the wrapper was bound. Nothing else in MindSpore or MindSpeed is touched.

Enabling it in a MindSpeed training script
------------------------------------------
Two lines after the model and the optimizer are built (the distributed optimizer has laid out its
buffers by then), on every rank::

    from ckptmap.hooks import mindspeed as ckptmap_hook
    ckptmap_hook.install(model, dp_group_name_or_ranks, args.save, bucket_size=ddp_bucket_size,
                         tp_rank=tp_rank, pp_rank=pp_rank, pp_size=pp_size)

``model``: the network (a ``Cell``: its ``trainable_params()`` are used) or the list of parameters in
registration order, named as the checkpoint names them. ``dp_group_name_or_ranks``: the name of this
rank's data-parallel communication group — the group the distributed optimizer shards over,
i.e. with context parallelism the DP×CP group — resolved with
``mindspore.communication.get_process_group_ranks``, or that group's global ranks, ascending.
``bucket_size``: the bucket size the distributed-data-parallel buffers use (``None``: buckets never
close early — one bucket per buffer). ``args.save``: the folder the checkpoints are saved in; the JSON
goes to ``<args.save>/opt_shard_info/``. For ``Model.train`` scripts add
``OptShardInfoCallback(network, dp_group, output_dir, …)`` after the ``ModelCheckpoint`` instead.

The layout (our reading of MindSpeed's distributed data parallel, formats.md §1.2 and §3.4)
------------------------------------------------------------------------------------------
* Parameters: the trainable ones (``requires_grad``; a frozen ``Parameter`` is skipped) in
  registration order (``network.trainable_params()``), minus ``zero3_params`` (sharded ZeRO-3 style
  along dim 0, outside the buffers: listed under ``zero3_params`` only).
* Buffers: one per parameter dtype, numbered in order of the dtype's first appearance — the
  distributed data parallel groups parameters by (param dtype, grad dtype) in a dict filled in
  registration order, and with gradients accumulated in fp32 (the distributed optimizer's setting)
  the grad dtype is the same for every group. A bf16 + fp32 network has buffer 0 = the dtype of its
  first parameter.
* Inside a buffer, the rules' ``buckets mindspeed`` block (bundled: reverse registration order;
  every parameter followed by padding to a multiple of 512 bytes of the buffer's dtype; a bucket
  closes once its aligned fill reaches ``bucket_size`` elements; each bucket padded to a multiple
  of dp·512 bytes; a shared tied embedding in a bucket of its own when ``pp_size > 1`` and the
  embeddings are tied). A parameter is a shared embedding when a rule marked ``shared_embedding``
  names it, or when the ``Parameter`` carries ``shared_embedding = True`` (as Megatron marks it).
* Names are the parameters' own (``Parameter.name``), exactly the keys ``save_checkpoint`` writes and
  ``ckptmap combine`` restores.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from pathlib import Path

import attrs
from mindspore.train import Callback, ModelCheckpoint
from mindspore.train import serialization as _serialization

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import opt_shard_info as osi
from ckptmap.mapping import buckets
from ckptmap.mapping.rules import RuleSet, resolve_rules

__all__ = ["compute_opt_shard_info", "write_opt_shard_info", "OptShardInfoCallback", "install", "uninstall",
           "installed"]

BUCKET_BLOCK = "mindspeed"
DEFAULT_RULES = "megatron_legacy_gpt"
LAYOUTS = ("v1", "v2")
_NEVER_CLOSE = 2 ** 62          # bucket_size=None: a threshold no buffer reaches
_UNTIE = "untie_embeddings_and_output_weights"
_MARK = "__ckptmap_mindspeed_hook__"   # attribute of the installed wrapper: its _HookState


# -------------------------------------------------------------------------------------------------
# Parameters and the DP group


@attrs.frozen
class _Param:
    name: str
    shape: tuple[int, ...]
    dtype: str
    shared_embedding: bool


def _ruleset(rules) -> RuleSet:
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, (str, os.PathLike)):
        return resolve_rules(str(rules))
    raise CkptmapError(f"rules={rules!r}: expected the name of bundled rules (e.g. {DEFAULT_RULES!r}), the path "
                       f"of a .rules file, or a RuleSet")


def _param_list(params) -> list:
    if callable(getattr(params, "trainable_params", None)):   # a Cell
        return list(params.trainable_params())
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise CkptmapError(f"params is a {type(params).__name__}; expected a MindSpore network (Cell), an ordered "
                           f"list of its Parameters (network.trainable_params()) or (name, shape, dtype) triples")
    return list(params)


def _params(params, rules: RuleSet) -> list[_Param]:
    shared_patterns = [r.mindspore for r in rules.params if r.shared_embedding]
    out, seen = [], {}
    for i, p in enumerate(_param_list(params)):
        if all(hasattr(p, a) for a in ("name", "shape", "dtype")):
            if not getattr(p, "requires_grad", True):
                continue  # not in the distributed data parallel's buffers
            name, shape, dtype = p.name, p.shape, p.dtype
            marked = bool(getattr(p, "shared_embedding", False))
        elif isinstance(p, (tuple, list)) and len(p) == 3:
            (name, shape, dtype), marked = p, False
        else:
            raise CkptmapError(f"params[{i}] is {p!r}; expected a MindSpore Parameter or a (name, shape, dtype) "
                               f"triple")
        if not isinstance(name, str) or not name:
            raise CkptmapError(f"params[{i}] has name {name!r}; every parameter needs its non-empty checkpoint name")
        try:
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise CkptmapError(f"parameter {name}: shape {shape!r} is not a sequence of integers") from None
        if any(d < 0 for d in shape):
            raise CkptmapError(f"parameter {name}: shape {list(shape)} has a negative dimension")
        canonical = osi.canonical_dtype(dtype)
        if canonical not in dtypes.TABLE:
            raise CkptmapError(f"parameter {name}: dtype {dtype} is not one ckptmap knows "
                               f"({', '.join(dtypes.TABLE)})")
        if name in seen:
            raise CkptmapError(f"params[{i}] and params[{seen[name]}] are both named {name}; checkpoint names must "
                               f"be unique (pass network.trainable_params(), which lists a shared Parameter once)")
        seen[name] = i
        shared = marked or any(pat.match(name) is not None for pat in shared_patterns)
        out.append(_Param(name, shape, canonical, shared))
    if not out:
        raise CkptmapError("params holds no trainable parameter; pass the network (or network.trainable_params()) "
                           "whose checkpoint the distributed optimizer shards")
    return out


def _dp_ranks(dp_rank_list) -> tuple[int, ...]:
    if isinstance(dp_rank_list, str):  # a communication group name
        from mindspore.communication import get_process_group_ranks
        try:
            dp_rank_list = get_process_group_ranks(dp_rank_list)
        except (RuntimeError, ValueError, TypeError) as e:
            raise CkptmapError(f"cannot list the ranks of communication group {dp_rank_list!r} ({e}); call "
                               f"mindspore.communication.init() and create the group first, or pass the DP group's "
                               f"global ranks as a list") from None
    ranks = list(dp_rank_list) if hasattr(dp_rank_list, "__iter__") else None
    if (not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks)
            or any(a >= b for a, b in zip(ranks, ranks[1:]))):
        raise CkptmapError(f"dp_rank_list is {dp_rank_list!r}; expected the global ranks of this rank's data-parallel "
                           f"group as ascending distinct non-negative integers (DP rank k = position k), e.g. [0, 2]")
    return tuple(ranks)


# -------------------------------------------------------------------------------------------------
# The layout


def _build(rule, groups: dict[str, list[_Param]], values: dict) -> dict[int, buckets.BufferLayout]:
    env = buckets.layout_env(rule, values)
    env.setdefault("bucket_size", _NEVER_CLOSE)
    out = {}
    for i, group in enumerate(groups.values()):
        entries = [buckets.ParamEntry(p.name, p.shape, p.dtype, p.shared_embedding) for p in group]
        out[i] = buckets.build_buffer(rule, entries, env)
    return out


def _layout(params, dp_rank_list, *, bucket_size=None, zero3_params=(), rules=DEFAULT_RULES, pp_size=1,
            pp_rank=0, untie_embeddings_and_output_weights=None, env=None):
    """(dp ranks, {buffer index: BufferLayout}, zero3 names)."""
    ranks = _dp_ranks(dp_rank_list)
    ruleset = _ruleset(rules)
    rule = ruleset.bucket_layout(BUCKET_BLOCK)
    plist = _params(params, ruleset)
    if bucket_size is not None and (isinstance(bucket_size, bool) or not isinstance(bucket_size, int)
                                    or bucket_size < 1):
        raise CkptmapError(f"bucket_size={bucket_size!r}: give the distributed data parallel's bucket size in "
                           f"elements (a positive integer), or None when buckets never close early")
    for what, value, low in (("pp_size", pp_size, 1), ("pp_rank", pp_rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CkptmapError(f"{what}={value!r}: expected an integer >= {low}")
    if pp_rank >= pp_size:
        raise CkptmapError(f"pp_rank={pp_rank} is not below pp_size={pp_size}")

    zero3 = [zero3_params] if isinstance(zero3_params, str) else list(zero3_params)
    names = {p.name for p in plist}
    unknown = [z for z in zero3 if z not in names]
    if unknown:
        raise CkptmapError(f"zero3_params names {', '.join(map(str, unknown))}, which is not among the trainable "
                           f"parameters ({len(plist)} given); list each ZeRO-3 sharded parameter by its checkpoint "
                           f"name (Parameter.name)")
    if len(set(zero3)) != len(zero3):
        raise CkptmapError(f"zero3_params {zero3} lists a name twice; list each ZeRO-3 sharded parameter once")
    groups: dict[str, list[_Param]] = {}
    for p in plist:
        if p.name not in zero3:
            groups.setdefault(p.dtype, []).append(p)

    values = dict(env or {})
    values.update(dp=len(ranks), pp=pp_size, pp_rank=pp_rank, chunk=0, bucket_size=bucket_size,
                  overlap_grad_reduce=bucket_size is not None)
    values.setdefault("cp", 1)
    if untie_embeddings_and_output_weights is not None:
        values[_UNTIE] = bool(untie_embeddings_and_output_weights)
        layouts = _build(rule, groups, values)
    else:
        # the answer matters only if it changes the layout (a shared embedding with pp_size > 1)
        tied, untied = (_build(rule, groups, dict(values, **{_UNTIE: flag})) for flag in (False, True))
        if tied != untied:
            shared = [p.name for g in groups.values() for p in g if p.shared_embedding]
            raise CkptmapError(
                f"the bucket layout depends on whether the input and output embeddings are tied ({', '.join(shared)} "
                f"is a shared embedding and pp_size is {pp_size}); pass untie_embeddings_and_output_weights=True or "
                f"False as the training run's --untie-embeddings-and-output-weights says")
        layouts = tied
    for i, layout in layouts.items():
        for j, b in enumerate(layout.buckets):
            if b.numel % len(ranks):
                raise CkptmapError(
                    f"the rules' `buckets {BUCKET_BLOCK}` block pads bucket {j} of buffer {i} to {b.numel} elements, "
                    f"which the {len(ranks)} DP ranks cannot share equally; its bucket_pad must be a multiple of dp")
    return ranks, layouts, zero3


def compute_opt_shard_info(params, dp_rank_list, *, bucket_size=None, zero3_params=(), rules=DEFAULT_RULES,
                           pp_size=1, pp_rank=0, untie_embeddings_and_output_weights=None, env=None) -> dict:
    """The ``opt_shard_info`` JSON object (formats.md §3.4) of one DP group.

    ``params``: a MindSpore network (its ``trainable_params()``), or its parameters in registration
    order (``Parameter``s; frozen ones are skipped), or ``(name, shape, dtype)`` triples.
    ``dp_rank_list``: the DP group's global ranks, ascending, or a communication group name.
    ``bucket_size``: elements at which a bucket closes (None: never). ``zero3_params``: names kept out
    of the buffers. ``rules``: bundled rules name, path or RuleSet, whose ``buckets mindspeed`` block
    lays out the buffers. ``pp_size``/``pp_rank``/``untie_embeddings_and_output_weights``: what the
    block's conditions ask (the untie flag is needed only when it changes the layout). ``env``: more
    values for the conditions of a user's rules."""
    ranks, layouts, zero3 = _layout(params, dp_rank_list, bucket_size=bucket_size, zero3_params=zero3_params,
                                    rules=rules, pp_size=pp_size, pp_rank=pp_rank,
                                    untie_embeddings_and_output_weights=untie_embeddings_and_output_weights, env=env)
    return osi.opt_shard_info_dict(ranks, layouts, zero3)


# -------------------------------------------------------------------------------------------------
# Writing


@attrs.frozen
class _Writer:
    """One rank's shard-info file, computed once (the buffers are laid out when the model is built)."""

    output_dir: Path
    rank: int
    layout: str
    relpath: str
    ranks: tuple[int, ...]
    buffers: dict
    zero3: tuple[str, ...]

    @property
    def writes(self) -> bool:
        return self.rank == self.ranks[0]

    @property
    def path(self) -> Path:
        return self.output_dir / osi.STRATEGY_DIR_NAME / self.relpath

    def write(self) -> Path | None:
        if not self.writes:
            if self.layout == "v1":  # MindSpeed creates every rank's folder; only DP-rank 0 fills it
                (self.output_dir / osi.STRATEGY_DIR_NAME / osi.rank_dir_name(self.rank)).mkdir(
                    parents=True, exist_ok=True)
            return None
        try:
            osi.write_opt_shard_info(self.path, self.ranks, self.buffers, self.zero3)
        except OSError as e:
            raise CkptmapError(f"cannot write the shard-info file {self.path}: {e.strerror}; without it the "
                               f"distributed-optimizer checkpoint cannot be merged — make "
                               f"{self.output_dir / osi.STRATEGY_DIR_NAME} writable") from None
        return self.path


def _default_rank() -> int:
    from mindspore.communication import GlobalComm, get_rank
    return int(get_rank()) if GlobalComm.INITED else 0


def _writer(output_dir, rank, dp_rank_list, params, *, layout="v1", tp_rank=0, pp_rank=0, pp_size=1,
            **layout_options) -> _Writer:
    if layout not in LAYOUTS:
        raise CkptmapError(f"layout={layout!r}: use \"v1\" (opt_shard_info/rank_{{r}}/dist_opt_shard_info_rank_"
                           f"{{r}}-0_0.json) or \"v2\" (opt_shard_info/mp_rank_…/{osi.V2_SHARD_INFO_NAME})")
    if rank is None:
        rank = _default_rank()
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or tp_rank < 0:
        raise CkptmapError(f"tp_rank={tp_rank!r}: expected a non-negative integer")
    ranks, layouts, zero3 = _layout(params, dp_rank_list, pp_size=pp_size, pp_rank=pp_rank, **layout_options)
    if rank not in ranks:
        raise CkptmapError(f"rank {rank} is not in its DP group {list(ranks)}; pass this rank's own data-parallel "
                           f"group (the ranks holding the other shards of its buckets)")
    relpath = osi.shard_info_relpath(layout, rank=rank, tp=tp_rank, pp=pp_rank, pp_size=pp_size)
    return _Writer(Path(output_dir), rank, layout, relpath, ranks, layouts, tuple(zero3))


def write_opt_shard_info(output_dir, rank, dp_rank_list, params, *, layout="v1", tp_rank=0, pp_rank=0, pp_size=1,
                         bucket_size=None, zero3_params=(), rules=DEFAULT_RULES,
                         untie_embeddings_and_output_weights=None, env=None) -> Path | None:
    """Write this rank's ``opt_shard_info`` JSON under ``output_dir`` if it is its DP group's rank 0
    (``rank == dp_rank_list[0]``); return the path written, or None on the other ranks. ``rank``:
    this process's global rank (None: ``mindspore.communication.get_rank()``, 0 without
    communication). Other arguments as :func:`compute_opt_shard_info`; ``tp_rank``/``pp_rank``/
    ``pp_size`` also name the V2 ``mp_rank_…`` folder."""
    return _writer(output_dir, rank, dp_rank_list, params, layout=layout, tp_rank=tp_rank, pp_rank=pp_rank,
                   pp_size=pp_size, bucket_size=bucket_size, zero3_params=zero3_params, rules=rules,
                   untie_embeddings_and_output_weights=untie_embeddings_and_output_weights, env=env).write()


# -------------------------------------------------------------------------------------------------
# Model.train: a callback


class OptShardInfoCallback(Callback):
    """(Re)writes the shard-info JSON whenever a ``ModelCheckpoint`` of the run saved a checkpoint.

    Arguments as :func:`write_opt_shard_info` (``network`` = ``params``), plus ``ckpt_callback``: the
    ``ModelCheckpoint`` (or list of them) to watch; default: every ``ModelCheckpoint`` of the run.
    The layout is computed here, once, so mistakes show before training starts. Place it after the
    ``ModelCheckpoint``s in ``callbacks=[…]``: callbacks run in list order, and a save is noticed at the
    end of the step (epoch, training) in which it happened. ``writes`` counts the files written."""

    def __init__(self, network, dp_rank_list, output_dir, *, rank=None, ckpt_callback=None, layout="v1",
                 tp_rank=0, pp_rank=0, pp_size=1, **layout_options):
        super().__init__()
        self._writer = _writer(output_dir, rank, dp_rank_list, network, layout=layout, tp_rank=tp_rank,
                               pp_rank=pp_rank, pp_size=pp_size, **layout_options)
        if ckpt_callback is not None:
            watch = list(ckpt_callback) if isinstance(ckpt_callback, (list, tuple)) else [ckpt_callback]
            bad = [type(c).__name__ for c in watch if not isinstance(c, ModelCheckpoint)]
            if bad:
                raise CkptmapError(f"ckpt_callback holds {', '.join(bad)}; expected mindspore.train.ModelCheckpoint "
                                   f"callbacks (or leave it out to watch every ModelCheckpoint of the run)")
            self._watch = watch
        else:
            self._watch = None
        self._seen: dict[int, str] = {}
        self.writes = 0

    @property
    def path(self) -> Path:
        """The JSON this rank writes (written only on the DP group's rank 0)."""
        return self._writer.path

    def _watched(self, run_context) -> list:
        if self._watch is not None:
            return self._watch
        listed = getattr(run_context.original_args(), "list_callback", None) or []
        return [c for c in listed if isinstance(c, ModelCheckpoint)]

    def begin(self, run_context):
        listed = list(getattr(run_context.original_args(), "list_callback", None) or [])
        mine = next((i for i, c in enumerate(listed) if c is self), None)
        if mine is not None:
            later = [type(c).__name__ for c in listed[mine + 1:] if c in self._watched(run_context)]
            if later:
                raise CkptmapError(
                    f"OptShardInfoCallback comes before {', '.join(later)} in the callbacks, so it cannot see the "
                    f"checkpoints saved at the end of training; put it after: callbacks=[ModelCheckpoint(…), "
                    f"OptShardInfoCallback(…)]")
        for c in self._watched(run_context):  # a ModelCheckpoint reused from an earlier run: not a new save
            self._seen[id(c)] = c.latest_ckpt_file_name

    def _check(self, run_context):
        saved = False
        for c in self._watched(run_context):
            latest = c.latest_ckpt_file_name
            if latest and latest != self._seen.get(id(c)):
                self._seen[id(c)] = latest
                saved = True
        if saved and self._writer.write() is not None:
            self.writes += 1

    def step_end(self, run_context):
        self._check(run_context)

    def epoch_end(self, run_context):
        self._check(run_context)

    def end(self, run_context):
        self._check(run_context)


# -------------------------------------------------------------------------------------------------
# Any script: wrap mindspore.save_checkpoint


class _HookState:
    """Shared by the wrapper and (re-imported copies of) this module: found through the wrapper."""

    def __init__(self, original, writer: _Writer, output_dir: Path):
        self.original = original
        self.writer = writer
        self.output_dir = output_dir
        self.bound: list[tuple[object, str]] = []   # (module, attribute) the wrapper was set on
        self.local = threading.local()
        self.writes = 0

    def after_save(self, ckpt_file_name) -> None:
        try:
            target = Path(os.path.realpath(os.fspath(ckpt_file_name)))
        except TypeError:
            return  # not a path: MindSpore itself rejects it
        if target.is_relative_to(self.output_dir) and self.writer.write() is not None:
            self.writes += 1


def _wrapper():
    fn = vars(_serialization).get("save_checkpoint")
    return fn if getattr(fn, _MARK, None) is not None else None


def _rebind(old, new) -> list[tuple[object, str]]:
    """Set every module attribute ``save_checkpoint`` that is ``old`` to ``new``; return where."""
    changed = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("save_checkpoint") is old:
            setattr(module, "save_checkpoint", new)
            changed.append((module, "save_checkpoint"))
    return changed


def install(network, dp_rank_list, output_dir, *, rank=None, layout="v1", tp_rank=0, pp_rank=0, pp_size=1,
            **layout_options) -> Path:
    """Make every ``mindspore.save_checkpoint`` into ``output_dir`` also (re)write this rank's
    shard-info JSON (see the module docstring for what is patched). Arguments as
    :func:`write_opt_shard_info`; the layout is computed now, from the parameters as they are now.
    Returns the JSON's path (written only on DP-rank-0 ranks). Calling it again replaces the settings
    and keeps a single wrapper."""
    writer = _writer(output_dir, rank, dp_rank_list, network, layout=layout, tp_rank=tp_rank, pp_rank=pp_rank,
                     pp_size=pp_size, **layout_options)
    out = Path(os.path.realpath(output_dir))
    wrapper = _wrapper()
    if wrapper is not None:
        state = getattr(wrapper, _MARK)
        state.writer, state.output_dir = writer, out
        state.bound += _rebind(state.original, wrapper)  # modules that imported the original meanwhile
        return writer.path

    original = vars(_serialization)["save_checkpoint"]
    state = _HookState(original, writer, out)

    @functools.wraps(original)
    def save_checkpoint(save_obj, ckpt_file_name, *args, **kwargs):
        if getattr(state.local, "busy", False):
            return state.original(save_obj, ckpt_file_name, *args, **kwargs)
        state.local.busy = True
        try:
            result = state.original(save_obj, ckpt_file_name, *args, **kwargs)
        finally:
            state.local.busy = False
        state.after_save(ckpt_file_name)
        return result

    setattr(save_checkpoint, _MARK, state)
    state.bound = _rebind(original, save_checkpoint)
    return writer.path


def uninstall() -> bool:
    """Put the original ``save_checkpoint`` back wherever the wrapper is bound; False if not installed."""
    wrapper = _wrapper()
    if wrapper is None:
        return False
    state = getattr(wrapper, _MARK)
    _rebind(wrapper, state.original)
    state.bound = []
    return True


def installed() -> dict | None:
    """The installed hook's settings ({"path", "output_dir", "writes", "patched"}), or None."""
    wrapper = _wrapper()
    if wrapper is None:
        return None
    state = getattr(wrapper, _MARK)
    return {"path": state.writer.path if state.writer.writes else None, "output_dir": state.output_dir,
            "writes": state.writes,
            "patched": sorted(f"{getattr(m, '__name__', m)}.{a}" for m, a in state.bound)}
