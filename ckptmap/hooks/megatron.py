"""Megatron hooks: a training run records its distributed-optimizer buffer layout (``param_map``)
itself, and a resume refuses a checkpoint whose layout does not fit the model.

Enable them with one line at the top of a Megatron training script (``pretrain_gpt.py``, …)::

    import ckptmap.hooks.megatron

Nothing else changes: no patch to Megatron, no new flag, the same signatures. What it does
(formats.md §1.4 for the file format):

* **at model construction** — ``megatron.core.distributed.DistributedDataParallel.__init__`` is
  wrapped: after Megatron built the buffers, each rank writes
  ``<--save>/param_map/param_map_buffer{B}_dp{d}tp{t}pp{p}vpp{v}.json`` (what the MindSpeed-Core-MS
  ``param_map.patch`` wrote), atomically. ``v`` is the model chunk: the per-process construction
  order of the DDP instances modulo the virtual-pipeline size (Megatron's ``get_model`` wraps the
  chunks in order), never a count of files already on disk.
* **at checkpoint save** — ``megatron.training.checkpointing.save_checkpoint`` (Megatron-LM's own
  tree; the megatron-core wheel has no ``megatron.training``) is wrapped: before Megatron writes
  ``iter_*``, each rank writes the same files into ``<--save>/iter_NNNNNNN/param_map/``, with ``v``
  the position of the chunk in the model list Megatron saves. ``ckptmap pt2ms`` finds them there.
* **at checkpoint load** — ``DistributedOptimizer.load_parameter_state(filename)`` (and
  ``ChainedOptimizer``'s) is wrapped: if ``filename``'s iteration directory carries a
  ``param_map``, every rank compares it with its live buffers before Megatron reads a byte, and a
  mismatch (other model, bucket size, parallel layout) raises :class:`~ckptmap.errors.CkptmapError`
  naming the first differing parameter.

Ranks come from ``megatron.core.parallel_state``: ``d`` is the data-parallel rank *without*
context parallelism (as the patch and the MindSpeed converters number it; the context-parallel
copies of a rank hold the same layout, so only context-parallel rank 0 writes), ``t`` / ``p`` the
tensor / pipeline rank. ``B`` numbers the buffers of one chunk as the rank folder's
``distrib_optim.pt`` holds them: dense buffers (one per dtype), then expert-parallel buffers. Under
expert parallelism (EP > 1, Megatron's ``mp_rank_TT[_PPP]_EEE`` folders) the name carries ``ep{e}``
after the pipeline rank, as ckptmap's conversions name them: only expert rank 0's folder holds
dense optimizer state, so every rank writes its dense buffers as ``ep0`` (``d`` its data-parallel
rank) and its expert buffers as ``ep{e}`` — after the dense numbers on expert rank 0, from 0 on the
others — with ``d`` the expert-data-parallel rank. The ``--save`` directory is ``megatron.training.get_args().save``, or
what :func:`configure` was given (it takes precedence at construction). Without either, the hook
warns once and writes nothing.

The load check compares, parameter by parameter in buffer order: name, dtype, TP-local shape, bucket
and offsets. By default (``"exact"``) the absolute offsets and the data-parallel size must match
what the checkpoint was saved with, so any other layout is refused before a byte is loaded.
Bucket padding is the only thing a different dp size changes, and megatron-core 0.6's loader moves
whole buckets and cuts parameters at bucket-relative offsets, so such a checkpoint does load
correctly (tested against the real library); ``configure(load_check="layout")`` allows it by
comparing offsets relative to each bucket. ``"off"`` skips the check.

Versions: tested against the real megatron-core 0.6.0 (``tests/test_hooks_megatron.py``) and
0.8.0, 0.12.1, 0.16.1 (``tests/test_hooks_mcore_versions.py``: dense TP/PP/VPP/DP with several
buckets and tied embeddings, and MoE with EP 2). The hook reads ``DistributedDataParallel.module`` /
``buffers`` / ``expert_parallel_buffers`` / ``buffers[*].param_index_map``,
``DistributedOptimizer.per_model_buffers`` / ``load_parameter_state(filename, **kw)`` (and
``ChainedOptimizer``'s) and ``parallel_state``'s expert ranks (``expert_data_parallel`` from 0.12,
``data_modulo_expert_parallel`` before); it checks them on every instance and, if they are missing,
warns naming the megatron-core version and writes nothing. From 0.8 the distributed optimizer
starts every parameter at a 64-element boundary: the param_map records those offsets as they are.
With another data-parallel size at load, ``load_check="layout"`` relies on megatron-core re-padding
buckets on load — tested with 0.6 only. Versions
before 0.6 (no ``ParamAndGradBuffer``) are refused with a warning at install.
If a rank's layout differs at load, that rank raises; ranks whose layout agrees go on into
Megatron's collectives and stop when the launcher ends the job (as with Megatron's own asserts).
"""
from __future__ import annotations

import functools
import logging
import re
import sys
import threading
import warnings
import weakref
from pathlib import Path

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats import megatron_folders
from ckptmap.formats import param_map
from ckptmap.mapping.buckets import ParamSlot

__all__ = ["install", "uninstall", "configure", "installed", "save_param_maps", "check_checkpoint",
           "megatron_core_version", "HookWarning", "TESTED_VERSIONS", "LOAD_CHECKS"]

log = logging.getLogger(__name__)

TESTED_VERSIONS = ("0.6", "0.8", "0.12", "0.16")
MIN_VERSION = (0, 6)
LOAD_CHECKS = ("layout", "exact", "off")
_UNSET = object()
_MISSING = object()


class HookWarning(UserWarning):
    """Something the hook could not do; training goes on."""


class _Unsupported(Exception):
    """The megatron-core objects lack the attributes the hook reads."""


class _NotReady(Exception):
    """megatron.core.parallel_state is not initialised, so the ranks are unknown."""


_lock = threading.RLock()
_guard = threading.local()
_config = {"save_dir": None, "load_check": "exact"}
_patches: list[tuple[object, str, object]] = []   # (owner, attribute, original or _MISSING)
_installed = False
_warned: set = set()
_construct_count = 0
_chunk_at_construction: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_buffer_owner: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # buffer -> (ddp ref, index, kind)


# ------------------------------------------------------------------------------------------ public


def configure(save_dir=_UNSET, load_check=_UNSET) -> None:
    """``save_dir``: the ``--save`` directory (needed when ``megatron.training`` is not there, e.g. with
    the megatron-core wheel; ``None`` forgets it). ``load_check``: ``"exact"`` (default),
    ``"layout"`` (also accepts another data-parallel size) or ``"off"`` — see the module docstring."""
    with _lock:
        if save_dir is not _UNSET:
            _config["save_dir"] = None if save_dir is None else str(save_dir)
        if load_check is not _UNSET:
            if load_check not in LOAD_CHECKS:
                raise CkptmapError(f"ckptmap.hooks.megatron.configure: load_check={load_check!r}; expected one of "
                                   f"{', '.join(map(repr, LOAD_CHECKS))}")
            _config["load_check"] = load_check


def installed() -> bool:
    return _installed


def megatron_core_version() -> str | None:
    try:
        from megatron.core import package_info
        return str(package_info.__version__)
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        pass
    try:
        import importlib.metadata as md
        return md.version("megatron-core")
    except Exception:  # noqa: BLE001
        return None


def install() -> bool:
    """Wrap Megatron's DDP constructor, ``save_checkpoint`` and ``load_parameter_state``. Calling it
    again (or importing the module again) changes nothing. Returns whether the hooks are active."""
    global _installed
    with _lock:
        if _installed:
            return True
        version = megatron_core_version()
        try:
            from megatron.core.distributed import DistributedDataParallel
        except ImportError as e:
            _warn("no-megatron", f"ckptmap: megatron.core is not importable ({e}); the Megatron hooks are not "
                                 f"installed and no param_map is written")
            return False
        parsed = _version_tuple(version)
        if parsed is not None and parsed < MIN_VERSION:
            _warn("old-version", f"ckptmap: megatron-core {version} is not supported by ckptmap.hooks.megatron (it "
                                 f"needs the ParamAndGradBuffer of megatron-core 0.6 or later; tested: "
                                 f"{', '.join(TESTED_VERSIONS)}); nothing is patched and no param_map is written")
            return False
        _patch(DistributedDataParallel, "__init__", _wrap_ddp_init)
        try:
            from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
            _patch(DistributedOptimizer, "load_parameter_state", _wrap_load)
            from megatron.core.optimizer.optimizer import ChainedOptimizer
            if "load_parameter_state" in vars(ChainedOptimizer):
                _patch(ChainedOptimizer, "load_parameter_state", _wrap_load)
        except Exception as e:  # noqa: BLE001 - never break the training script's start
            _warn("no-optimizer", f"ckptmap: cannot hook megatron-core {version}'s DistributedOptimizer."
                                  f"load_parameter_state ({type(e).__name__}: {e}); checkpoints are not checked "
                                  f"against their param_map at load")
        _install_save_hook()
        _installed = True
        log.debug("ckptmap Megatron hooks installed (megatron-core %s)", version)
        return True


def uninstall() -> None:
    """Restore everything :func:`install` patched."""
    global _installed
    with _lock:
        while _patches:
            owner, attr, original = _patches.pop()
            if original is _MISSING:
                try:
                    delattr(owner, attr)
                except AttributeError:
                    pass
            else:
                setattr(owner, attr, original)
        _installed = False


def save_param_maps(model, directory) -> list[Path]:
    """Write the param_map files of this rank's model chunks (a DDP instance or Megatron's list of
    them, chunk ``v`` = list position) into ``directory``; for training loops that save without
    ``megatron.training``. Returns the files written (none on context-parallel ranks > 0)."""
    paths: list[Path] = []
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for v, m in enumerate(chunks):
        ddp = _find_ddp(m)
        if ddp is None:
            raise CkptmapError(f"ckptmap.hooks.megatron.save_param_maps: model chunk {v} is a "
                               f"{type(m).__name__}, not a megatron.core DistributedDataParallel; pass the "
                               f"DDP-wrapped model chunks")
        try:
            paths += _write(_layout(ddp), v, Path(directory))
        except _Unsupported as e:
            raise CkptmapError(f"ckptmap.hooks.megatron.save_param_maps: megatron-core {megatron_core_version()} "
                               f"is not supported: {e}") from None
        except _NotReady as e:
            raise CkptmapError(str(e)) from None
    return paths


# ----------------------------------------------------------------------------------------- patching


def _warn(key, message: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, HookWarning, stacklevel=3)


def _version_tuple(version: str | None):
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _patch(owner, attr: str, make_wrapper) -> None:
    current = getattr(owner, attr)
    if getattr(current, "_ckptmap_hook", False):
        return  # wrapped already (e.g. by a reloaded copy of this module)
    original = vars(owner).get(attr, _MISSING) if isinstance(owner, type) else current
    wrapper = make_wrapper(current)
    wrapper._ckptmap_hook = True
    setattr(owner, attr, wrapper)
    _patches.append((owner, attr, original))


def _install_save_hook() -> None:
    try:
        import megatron.training.checkpointing as checkpointing
    except ModuleNotFoundError as e:
        if e.name in ("megatron.training", "megatron.training.checkpointing"):
            log.debug("megatron.training is not there (megatron-core wheel); param_map is written at model "
                      "construction only")
            return
        _warn("no-training", f"ckptmap: importing megatron.training.checkpointing failed ({e}); param_map files "
                             f"are not written into the iter_* directories")
        return
    except Exception as e:  # noqa: BLE001 - never break the training script's start
        _warn("no-training", f"ckptmap: importing megatron.training.checkpointing failed ({type(e).__name__}: {e}); "
                             f"param_map files are not written into the iter_* directories")
        return
    original = getattr(checkpointing, "save_checkpoint", None)
    if original is None:
        _warn("no-save-checkpoint", f"ckptmap: megatron.training.checkpointing has no save_checkpoint (megatron-core "
                                    f"{megatron_core_version()}); param_map files are not written into the iter_* "
                                    f"directories")
        return
    _patch(checkpointing, "save_checkpoint", _wrap_save_checkpoint)
    wrapped = checkpointing.save_checkpoint
    # Modules that did `from megatron.training.checkpointing import save_checkpoint` before us
    # (megatron.training.training does, at import) hold the original: rebind them too.
    for name, module in list(sys.modules.items()):
        if module is None or module is checkpointing or not name.startswith("megatron"):
            continue
        if vars(module).get("save_checkpoint") is original:
            setattr(module, "save_checkpoint", wrapped)
            _patches.append((module, "save_checkpoint", original))


def _wrap_ddp_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        try:
            _on_ddp_built(self)
        except Exception as e:  # noqa: BLE001 - the hook never stops a training run
            _warn(("ddp", type(e).__name__), f"ckptmap: recording the param_map of a DistributedDataParallel failed "
                                             f"({type(e).__name__}: {e}); training goes on without it")
    return __init__


def _wrap_save_checkpoint(original):
    @functools.wraps(original)
    def save_checkpoint(iteration, model, *args, **kwargs):
        try:
            _before_save(iteration, model, kwargs)
        except Exception as e:  # noqa: BLE001
            _warn(("save", type(e).__name__), f"ckptmap: writing param_map into the checkpoint of iteration "
                                              f"{iteration} failed ({type(e).__name__}: {e}); the checkpoint is "
                                              f"saved without it")
        return original(iteration, model, *args, **kwargs)
    return save_checkpoint


def _wrap_load(original):
    @functools.wraps(original)
    def load_parameter_state(self, filename, *args, **kwargs):
        if getattr(_guard, "active", False):   # a chained optimizer checked already
            return original(self, filename, *args, **kwargs)
        _guard.active = True
        try:
            if _config["load_check"] != "off":
                check_checkpoint(self, filename)
            return original(self, filename, *args, **kwargs)
        finally:
            _guard.active = False
    return load_parameter_state


# ------------------------------------------------------------------------------------ megatron state


def _megatron_args():
    """``megatron.training.get_args()`` if Megatron-LM's training package is there and initialised."""
    for module_name in ("megatron.training", "megatron.training.global_vars"):
        try:
            module = __import__(module_name, fromlist=["get_args"])
            get_args = module.get_args
        except (ImportError, AttributeError):
            continue
        try:
            return get_args()
        except Exception:  # noqa: BLE001 - AssertionError "args is not initialized"
            return None
    return None


def _save_dir_at_construction():
    if _config["save_dir"]:
        return _config["save_dir"]
    args = _megatron_args()
    return getattr(args, "save", None) if args is not None else None


def _parallel_state():
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        raise _NotReady("ckptmap: megatron.core.parallel_state is not initialised (Megatron calls "
                        "initialize_model_parallel before building the model), so this rank's data / tensor / "
                        "pipeline ranks are unknown; no param_map is written and checkpoints are not checked")
    return parallel_state


def _ranks() -> tuple[int, int, int, int]:
    """(dp rank without context parallelism, tp rank, pp rank, cp rank)."""
    ps = _parallel_state()
    try:
        dp = ps.get_data_parallel_rank(with_context_parallel=False)
    except TypeError:  # versions without the argument have no context parallelism
        dp = ps.get_data_parallel_rank()
    cp = ps.get_context_parallel_rank() if hasattr(ps, "get_context_parallel_rank") else 0
    return dp, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), cp


def _dp_size() -> int:
    ps = _parallel_state()
    try:
        return ps.get_data_parallel_world_size(with_context_parallel=False)
    except TypeError:
        return ps.get_data_parallel_world_size()


def _first(ps, names):
    for name in names:
        fn = getattr(ps, name, None)
        if fn is not None:
            return fn()
    raise _Unsupported(f"megatron.core.parallel_state has none of {', '.join(names)}")


def _expert_ranks() -> tuple[int, int, int, int]:
    """(expert-parallel rank, its size, expert-data-parallel rank, its size). The expert-data-parallel
    group is the data-parallel group of the expert buffers (data-parallel / EP): 0.12+ name it
    ``expert_data_parallel``, 0.6-0.11 ``data_modulo_expert_parallel``."""
    ps = _parallel_state()
    size = getattr(ps, "get_expert_model_parallel_world_size", lambda: 1)() or 1
    if size == 1:
        return 0, 1, _ranks()[0], _dp_size()
    rank = ps.get_expert_model_parallel_rank()
    edp = _first(ps, ("get_expert_data_parallel_rank", "get_data_modulo_expert_parallel_rank"))
    if hasattr(ps, "get_expert_data_parallel_world_size"):
        return rank, size, edp, ps.get_expert_data_parallel_world_size()
    return rank, size, edp, _dp_size() // size   # before 0.12 expert parallelism is carved out of DP


def _file_fields(kind: str, index: int, n_dense: int) -> tuple[int, int, int, int | None]:
    """(buffer number, dp, data-parallel size, ep or None) in the name of the param_map file of
    buffer ``index`` of ``kind`` ("dense" / "expert") of a chunk with ``n_dense`` dense buffers,
    on this rank. The names ckptmap's conversions write (pt2ms's pt_meta, reshard): buffers are
    numbered as the rank folder's distrib_optim.pt holds them, per chunk — dense buffers first,
    then expert buffers; under expert parallelism (EP > 1, when Megatron's folders get the
    ``_{ep:03d}`` suffix) the name carries ``ep{e}``, only expert rank 0's folder holds dense state
    (ChainedOptimizer saves ``[dense, expert]`` there and ``[None, expert]`` elsewhere), so dense
    buffers are named ``ep0`` by every rank (same layout on every expert rank, ``dp`` the
    data-parallel rank) and expert buffers ``ep{e}`` numbered from 0 on e > 0, ``dp`` the
    expert-data-parallel rank (the rank within that buffer's data-parallel group)."""
    dp, _tp, _pp, _cp = _ranks()
    ep, ep_size, edp, edp_size = _expert_ranks()
    ep_name = (lambda e: e) if ep_size > 1 else (lambda e: None)
    if kind == "dense":
        return index, dp, _dp_size(), ep_name(0)
    return index + (n_dense if ep == 0 else 0), edp, edp_size, ep_name(ep)


def _vpp_size() -> int:
    try:
        from megatron.core import parallel_state
        size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    except Exception:  # noqa: BLE001
        size = None
    return size if isinstance(size, int) and size > 0 else 1


def _find_ddp(model):
    from megatron.core.distributed import DistributedDataParallel
    node = model
    for _ in range(4):
        if isinstance(node, DistributedDataParallel):
            return node
        node = getattr(node, "module", None)
        if node is None:
            break
    return None


def _layout(ddp) -> list[tuple[str, int, list[ParamSlot]]]:
    """Per buffer of ``ddp`` — its dense buffers (``buffers``), then its expert-parallel ones
    (``expert_parallel_buffers``, 0.6+) — ``(kind, index within the kind, parameters in buffer
    order)``, as the param_map records them: the name inside ``ddp.module`` (``module.`` + model
    name under Megatron's Float16Module), dtype, TP-local shape, start/end in the whole buffer (from
    0.8 every start is 64-aligned and the gaps stay visible as jumps), bucket id."""
    buffers = getattr(ddp, "buffers", None)
    module = getattr(ddp, "module", None)
    if not isinstance(buffers, (list, tuple)) or module is None:
        raise _Unsupported("DistributedDataParallel has no `buffers` list / `module`")
    expert = getattr(ddp, "expert_parallel_buffers", None) or []
    if not isinstance(expert, (list, tuple)):
        raise _Unsupported("DistributedDataParallel.expert_parallel_buffers is not a list")
    names = {}
    for name, param in module.named_parameters():
        names.setdefault(param, name)
    out = []
    for kind, group in (("dense", buffers), ("expert", expert)):
        for b, buf in enumerate(group):
            index_map = getattr(buf, "param_index_map", None)
            if not isinstance(index_map, dict):
                raise _Unsupported(f"{kind} buffer {b} ({type(buf).__name__}) has no param_index_map")
            slots = []
            for param, index in index_map.items():
                if len(index) != 3:
                    raise _Unsupported(f"param_index_map entries are {index!r}, not (start, end, bucket_id)")
                if param not in names:
                    raise _Unsupported(f"a parameter of {kind} buffer {b} (shape {list(param.shape)}) is not a "
                                       f"parameter of DistributedDataParallel.module")
                start, end, bucket = (int(x) for x in index)
                slots.append(ParamSlot(names[param], dtypes.name_of(param.dtype), tuple(param.shape), start, end,
                                       bucket))
            slots.sort(key=lambda s: s.start)   # buffer order, whatever the dict's insertion order
            out.append((kind, b, slots))
    return out


def _unsupported_warning(reason) -> None:
    _warn(("unsupported", str(reason)),
          f"ckptmap: megatron-core {megatron_core_version()} is not supported by ckptmap.hooks.megatron: {reason} "
          f"(tested: megatron-core {', '.join(TESTED_VERSIONS)}); no param_map is written and checkpoints are not "
          f"checked at load")


def _write(layout, chunk: int, directory: Path) -> list[Path]:
    _dp, tp, pp, cp = _ranks()
    if cp != 0:
        return []   # the context-parallel copies of this rank have the same layout and file name
    n_dense = sum(1 for kind, _, _ in layout if kind == "dense")
    paths = []
    for kind, index, slots in layout:
        b, d, _size, ep = _file_fields(kind, index, n_dense)
        paths.append(param_map.write_param_map(directory / param_map.param_map_file_name(b, d, tp, pp, chunk, ep),
                                               slots))
    return paths


def _register(ddp, chunk: int) -> None:
    ref = weakref.ref(ddp)
    _chunk_at_construction[ddp] = chunk
    for b, buf in enumerate(getattr(ddp, "buffers", ()) or ()):
        _buffer_owner[buf] = (ref, b, "dense")
    for b, buf in enumerate(getattr(ddp, "expert_parallel_buffers", ()) or ()):
        _buffer_owner[buf] = (ref, b, "expert")


def _on_ddp_built(ddp) -> None:
    global _construct_count
    with _lock:
        index = _construct_count
        _construct_count += 1
    try:
        layout = _layout(ddp)
        _parallel_state()
    except _Unsupported as e:
        _unsupported_warning(e)
        return
    except _NotReady as e:
        _warn("not-ready", str(e))
        return
    chunk = index % _vpp_size()
    _register(ddp, chunk)
    save_dir = _save_dir_at_construction()
    if not save_dir:
        _warn("no-save", "ckptmap: no --save directory is known (megatron.training.get_args().save is unset and "
                         "ckptmap.hooks.megatron.configure(save_dir=...) was not called); param_map files are not "
                         "written at model construction")
        return
    _write(layout, chunk, Path(save_dir) / megatron_folders.PARAM_MAP_DIR)


def _legacy_format(args) -> bool:
    fmt_name = getattr(args, "ckpt_format", None)
    if isinstance(fmt_name, str):
        return fmt_name == "torch"
    return not getattr(args, "use_dist_ckpt", False)


def _before_save(iteration, model, kwargs) -> None:
    args = _megatron_args()
    save = (getattr(args, "save", None) if args is not None else None) or _config["save_dir"]
    if not save:
        _warn("no-save-at-save", f"ckptmap: save_checkpoint(iteration={iteration}) without a --save directory; "
                                 f"no param_map written")
        return
    if kwargs.get("non_persistent_ckpt"):
        return   # a temporary checkpoint outside --save (later Megatron-LM versions)
    if args is not None and not _legacy_format(args):
        _warn("dist-ckpt", "ckptmap: the checkpoint is saved in a distributed format (--use-dist-ckpt / "
                           "--ckpt-format other than torch), which keeps no bucket-ordered distrib_optim.pt; "
                           "param_map is not written into the iter_* directories")
        return
    directory = Path(save) / megatron_folders.iter_dir_name(iteration) / megatron_folders.PARAM_MAP_DIR
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for v, m in enumerate(chunks):
        ddp = _find_ddp(m)
        if ddp is None:
            _warn(("not-ddp", type(m).__name__), f"ckptmap: model chunk {v} passed to save_checkpoint is a "
                                                 f"{type(m).__name__}, not a megatron.core DistributedDataParallel; "
                                                 f"no param_map is written for it")
            continue
        try:
            layout = _layout(ddp)
        except _Unsupported as e:
            _unsupported_warning(e)
            return
        at_construction = _chunk_at_construction.get(ddp)
        if at_construction is not None and at_construction != v:
            _warn(("chunk", at_construction, v), f"ckptmap: the model chunk built as number {at_construction} is "
                                                 f"saved as chunk {v}; the files in <save>/param_map name it "
                                                 f"vpp{at_construction}, the checkpoint's own param_map vpp{v}")
        _write(layout, v, directory)


# ------------------------------------------------------------------------------------------ loading


def check_checkpoint(optimizer, filename) -> None:
    """Compare the param_map saved in ``filename``'s iteration directory (``filename`` =
    ``<iter>/mp_rank_…/distrib_optim.pt``) with the live buffers of ``optimizer`` (a
    DistributedOptimizer, or a ChainedOptimizer of them); raise :class:`CkptmapError` naming the first
    differing parameter. Nothing to compare (no param_map saved) is fine."""
    directory = Path(filename).parent.parent / megatron_folders.PARAM_MAP_DIR
    if not directory.is_dir():
        log.info("ckptmap: %s has no param_map; the checkpoint's layout is not checked", directory.parent)
        return
    files = param_map.find_param_maps(directory)
    if not files:
        return
    mode = _config["load_check"]
    try:
        _dp, tp, pp, _cp = _ranks()
    except _NotReady as e:
        _warn("not-ready", str(e))
        return
    members = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for member in members:
        per_model = getattr(member, "per_model_buffers", None)
        if per_model is None:
            continue  # not a DistributedOptimizer: no bucket-ordered state
        for chunk, buffers in per_model.items():
            for buf in buffers:
                owner = _buffer_owner.get(buf)
                if owner is None:
                    _warn("unknown-buffer", "ckptmap: the model was built before ckptmap.hooks.megatron was "
                                            "imported; the checkpoint's param_map is not checked (import the hook "
                                            "at the top of the training script)")
                    return
                ref, index, kind = owner
                ddp = ref()
                if ddp is None:
                    continue
                try:
                    layout = _layout(ddp)
                    n_dense = sum(1 for k, _, _ in layout if k == "dense")
                    live_slots = next(slots for k, i, slots in layout if (k, i) == (kind, index))
                    b, _d, live_dp, ep = _file_fields(kind, index, n_dense)
                except _Unsupported as e:
                    _unsupported_warning(e)
                    return
                _check_buffer(filename, directory, files, live_slots, b, chunk, tp, pp, ep, kind, live_dp, mode)


def _bucket_sizes(entries: dict) -> list[int]:
    """Unpadded elements per bucket (what megatron-core 0.6's loader compares with the checkpoint)."""
    sizes: dict[int, int] = {}
    for _dtype, _shape, start, end, bucket in entries.values():
        sizes[bucket] = sizes.get(bucket, 0) + end - start
    return [sizes[k] for k in sorted(sizes)]


def _dp_change_message(filename, directory, saved_dp, live_dp, first_moved) -> str:
    moved = (f" (the first parameter whose absolute offsets moved with the padding is {first_moved})"
             if first_moved else "")
    return (f"ckptmap: refusing to load {filename}: it was saved with data-parallel size {saved_dp}, this run has "
            f"{live_dp} (param_map files dp0..dp{saved_dp - 1} in {directory}). Only the bucket padding differs"
            f"{moved}: every parameter sits at the same offset within its bucket, and megatron-core (0.6, tested) "
            f"re-pads buckets on load, so this checkpoint loads correctly. The default check (load_check='exact') "
            f"refuses any change of layout: if the new data-parallel size is intended, call "
            f"ckptmap.hooks.megatron.configure(load_check='layout') before loading; otherwise resume with "
            f"data-parallel size {saved_dp}.")


def _check_buffer(filename, directory, files, live_slots, b, chunk, tp, pp, ep, kind, live_dp, mode) -> None:
    todo = ("Resume with the model, DDP bucket size (--overlap-grad-reduce) and parallel sizes the checkpoint was "
            "saved with, or convert the checkpoint (ckptmap); ckptmap.hooks.megatron.configure(load_check='off') "
            "skips this check")
    mine = [f for f in files if (f.buffer, f.tp, f.pp, f.vpp, f.ep) == (b, tp, pp, chunk, ep)]
    ep_text = "" if ep is None else f"ep{ep}"
    if not mine:
        have = sorted({(f.tp, f.pp, f.vpp, f.buffer) + (() if f.ep is None else (f"ep{f.ep}",)) for f in files},
                      key=str)
        raise CkptmapError(
            f"ckptmap: cannot load {filename}: its param_map folder {directory} has no "
            f"param_map_buffer{b}_dp*tp{tp}pp{pp}{ep_text}vpp{chunk}.json for this rank's model chunk {chunk}, "
            f"{kind} buffer {b} (tensor-parallel rank {tp}, pipeline rank {pp}"
            f"{'' if ep is None else f', expert-parallel folder {ep}'}); it describes (tp, pp, chunk, buffer"
            f"{', ep' if any(f.ep is not None for f in files) else ''}) = "
            f"{', '.join(map(str, have[:8]))}{' …' if len(have) > 8 else ''}, so the checkpoint was saved with a "
            f"different tensor / pipeline / virtual-pipeline / expert-parallel layout or model. {todo}.")
    saved_file = min(mine, key=lambda f: f.dp)
    saved = param_map.read_param_map(saved_file.path)
    live = {s.name: (s.dtype, s.shape, s.start, s.end, s.bucket) for s in live_slots}
    diff = param_map.param_map_difference(saved, live, relative=(mode != "exact"))
    saved_dp = 1 + max(f.dp for f in mine)   # of this buffer's data-parallel group (expert-DP for experts)
    where = (f"model chunk {chunk}, {kind} buffer (param_map buffer {b}), tensor-parallel rank {tp}, pipeline "
             f"rank {pp}{'' if ep is None else f', expert-parallel folder {ep}'}")
    if diff is not None and mode == "exact" and saved_dp != live_dp \
            and param_map.param_map_difference(saved, live, relative=True) is None:
        first = diff.saved[0] if diff.saved is not None else diff.live[0]
        raise CkptmapError(_dp_change_message(filename, directory, saved_dp, live_dp, first))
    if diff is not None:
        if diff.saved is None:
            found = f"the checkpoint has no entry {diff.index} (it describes {len(saved)} parameters)"
        else:
            found = f"the checkpoint has {diff.saved[0]}: {param_map.describe_param_map_entry(diff.saved[1])}"
        if diff.live is None:
            want = f"the live model has no entry {diff.index} (it has {len(live)} parameters)"
        else:
            want = f"the live model has {diff.live[0]}: {param_map.describe_param_map_entry(diff.live[1])}"
        first = diff.saved[0] if diff.saved is not None else diff.live[0]
        saved_sizes, live_sizes = _bucket_sizes(saved), _bucket_sizes(live)
        if (_version_tuple(megatron_core_version()) or MIN_VERSION) >= (0, 7):
            # 0.7+ store buckets coalesced and compare only a buffer's total numel_unpadded
            consequence = ("megatron-core checks only the buffer's total unpadded size: where that agrees it "
                           "loads the fp32 main parameters and Adam moments of one parameter into another without "
                           "an error, otherwise it stops at its assertion without naming a parameter.")
        elif saved_sizes == live_sizes:
            consequence = ("megatron-core's own check compares only the per-bucket sizes, which agree here "
                           f"({saved_sizes}), so it would load the fp32 main parameters and Adam moments of one "
                           "parameter into another without an error.")
        else:
            consequence = (f"megatron-core would stop at its own assertion on the per-bucket sizes (checkpoint "
                           f"{saved_sizes}, live {live_sizes}), without naming a parameter.")
        dp_note = (f" The checkpoint was saved with data-parallel size {saved_dp}, this run has {live_dp}."
                   if saved_dp != live_dp else "")
        raise CkptmapError(
            f"ckptmap: refusing to load {filename}: the checkpoint's param_map {saved_file.path} and the live "
            f"DistributedDataParallel buffers ({where}) first differ at parameter {first} (entry {diff.index} in "
            f"buffer order): {found}; {want}"
            f"{' (offsets compared relative to their bucket)' if mode != 'exact' else ''}. Without this check, "
            f"{consequence}{dp_note} {todo}.")
    if saved_dp != live_dp:
        if mode == "exact":
            raise CkptmapError(_dp_change_message(filename, directory, saved_dp, live_dp, None))
        log.info("ckptmap: %s was saved with data-parallel size %d, this run has %d; its buckets hold the same "
                 "parameters at the same bucket offsets (%s), so Megatron re-pads them on load", filename, saved_dp,
                 live_dp, where)


install()
