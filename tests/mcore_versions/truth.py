"""The truth, read from the live objects of every rank (never from saved files) and gathered on
global rank 0. See ``README.md`` for the structure."""
from __future__ import annotations

from . import training as T


def sub_optimizers(optimizer):
    """The DistributedOptimizers inside a ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _flatten(d, prefix=""):
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}")
    return out


def _sharded_meta(obj):
    """ShardedTensor / ShardedObject / ShardedTensorFactory metadata as plain python."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    if isinstance(obj, ShardedTensor):
        fr = obj.flattened_range
        return {"type": "ShardedTensor", "key": obj.key, "dtype": str(obj.dtype).replace("torch.", ""),
                "local_shape": tuple(obj.local_shape), "global_shape": tuple(obj.global_shape),
                "global_offset": tuple(int(x) for x in obj.global_offset),
                "axis_fragmentations": tuple(obj.axis_fragmentations) if obj.axis_fragmentations else None,
                "replica_id": obj.replica_id if isinstance(obj.replica_id, int) else tuple(obj.replica_id),
                "prepend_axis_num": obj.prepend_axis_num,
                "flattened_range": None if fr is None else (fr.start, fr.stop)}
    if isinstance(obj, ShardedObject):
        return {"type": "ShardedObject", "key": obj.key, "global_shape": tuple(obj.global_shape),
                "global_offset": tuple(obj.global_offset),
                "replica_id": obj.replica_id if isinstance(obj.replica_id, int) else tuple(obj.replica_id)}
    if isinstance(obj, ShardedTensorFactory):
        built = obj.build()
        pieces = []

        def walk(x):
            if isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)
            else:
                m = _sharded_meta(x)
                if m is not None:
                    pieces.append(m)
        walk(built)
        return {"type": "ShardedTensorFactory", "key": obj.key, "pieces": pieces}
    return None


def _sharded_view(version, model, chunk, nchunks):
    from megatron.core import parallel_state as mpu

    v = T.vtuple(version)
    if nchunks > 1 and v < (0, 16):
        mpu.set_virtual_pipeline_model_parallel_rank(chunk)
    kwargs = {"metadata": T.sharded_sd_metadata(version, "dp_reshardable")} if v >= (0, 16) else {}
    sd = model.sharded_state_dict(**kwargs)
    out = {}

    def walk(key, x):
        if isinstance(x, dict):
            for k, val in x.items():
                walk(f"{key}.{k}" if key else str(k), val)
        else:
            m = _sharded_meta(x)
            if m is not None:
                out[key] = m

    walk("", sd)
    if nchunks > 1 and v < (0, 16):
        mpu.set_virtual_pipeline_model_parallel_rank(0)
    return out


GROUP_SETTINGS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr", "weight_decay", "max_lr", "min_lr")


def param_groups(ddps, optimizer):
    """Per DistributedOptimizer, its param groups as this rank holds them: the settings
    (GROUP_SETTINGS) and the "chunk:name" of the model params whose shard this DP rank optimizes
    (model_float16_groups[i] is optimizer.param_groups[i]'s params)."""
    names = {p: f"{ci}:{n}" for ci, d in enumerate(ddps) for n, p in d.module.named_parameters()}
    out = []
    for opt in sub_optimizers(optimizer):
        groups = []
        for i, g in enumerate(opt.optimizer.param_groups):
            members = list(opt.model_float16_groups[i]) + list(opt.model_fp32_groups[i])
            groups.append({"settings": {k: g[k] for k in GROUP_SETTINGS if k in g},
                           "params": sorted(names[p] for p in members)})
        out.append(groups)
    return out


def _merged_groups(per_rank):
    """A (tp, pp, ep)'s groups: every DP rank's settings must agree; the params are their union."""
    merged = None
    for groups in per_rank:
        if merged is None:
            merged = [[{"settings": dict(g["settings"]), "params": set(g["params"])} for g in opt] for opt in groups]
            continue
        for mo, go in zip(merged, groups):
            if [m["settings"] for m in mo] != [g["settings"] for g in go]:
                raise RuntimeError("param group settings differ between the DP ranks of one (tp, pp, ep)")
            for m, g in zip(mo, go):
                m["params"] |= set(g["params"])
    return [[{"settings": g["settings"], "params": sorted(g["params"])} for g in opt] for opt in merged or []]


def collect(version, c, models, ddps, optimizer, extra=None, built_groups=None):
    """Gather every rank's live view on global rank 0 and stitch it; None on the other ranks."""
    import torch
    from megatron.core import parallel_state as mpu

    v = T.vtuple(version)
    coords = {
        "rank": torch.distributed.get_rank(),
        "tp": mpu.get_tensor_model_parallel_rank(), "pp": mpu.get_pipeline_model_parallel_rank(),
        "ep": mpu.get_expert_model_parallel_rank(), "dp": mpu.get_data_parallel_rank(),
        "edp": (mpu.get_data_modulo_expert_parallel_rank() if v < (0, 12) else mpu.get_expert_data_parallel_rank()),
    }
    names_of = [{p: n for n, p in d.module.named_parameters()} for d in ddps]
    where = {}  # param -> (chunk, kind, buffer index)
    chunks = []
    for ci, (d, model) in enumerate(zip(ddps, models)):
        bufs = []
        for kind, blist in (("dense", d.buffers), ("expert", d.expert_parallel_buffers)):
            for bi, buf in enumerate(blist):
                bufs.append({
                    "kind": kind, "index": bi,
                    "param_dtype": str(buf.param_dtype).replace("torch.", ""),
                    "grad_dtype": str(buf.grad_dtype).replace("torch.", ""),
                    "dp_size": int(buf.data_parallel_world_size),
                    "param_index_map": {names_of[ci][p]: tuple(int(x) for x in idx)
                                        for p, idx in buf.param_index_map.items()},
                    "bucket_indices": [(int(s), int(e)) for s, e in buf.bucket_indices],
                    "bucket_numel_unpadded": [int(b.numel_unpadded) for b in buf.buckets],
                    "numel": int(buf.numel), "numel_unpadded": int(buf.numel_unpadded),
                })
                for p in buf.param_index_map:
                    where[p] = (ci, kind, bi)
        params = dict(d.module.named_parameters())
        chunks.append({
            "registration_order": [names_of[ci][p] for p in d.module.parameters()],
            "shapes": {n: tuple(p.shape) for n, p in params.items()},
            "dtypes": {n: str(p.dtype).replace("torch.", "") for n, p in params.items()},
            "expert": {n: not getattr(p, "allreduce", True) for n, p in params.items()},
            "buffers": bufs,
            "state_dict_keys": None,
            "sharded": _sharded_view(version, model, ci, len(models)),
        })
    for ci, model in enumerate(models):
        if len(models) > 1 and v < (0, 16):
            mpu.set_virtual_pipeline_model_parallel_rank(ci)
        chunks[ci]["state_dict_keys"] = _flatten(model.state_dict_for_save_checkpoint())
    if len(models) > 1 and v < (0, 16):
        mpu.set_virtual_pipeline_model_parallel_rank(0)

    opts, pieces = [], []
    for oi, opt in enumerate(sub_optimizers(optimizer)):
        opts.append({
            "buffers": [where_buf(where, buf) for buf in opt.buffers],
            "dp_size": int(opt.data_parallel_group.size()),
            "dp_rank": int(opt.data_parallel_group.rank()),
            "per_bucket_numel": [{k: list(map(int, val)) for k, val in d.items()} for d in opt.per_bucket_numel],
            "per_bucket_numel_unpadded": [{k: list(map(int, val)) for k, val in d.items()}
                                          for d in opt.per_bucket_numel_unpadded],
        })
        if getattr(opt, "model_fp32_groups", None) and any(opt.model_fp32_groups):
            raise RuntimeError("unexpected fp32 model params (the harness trains bf16)")
        for mgroup, sgroup in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups):
            for model_param, main in zip(mgroup, sgroup):
                sub = opt._get_model_param_range_map(model_param)["param"]
                state = opt.optimizer.state.get(main, {})
                ci, kind, _ = where[model_param]
                pieces.append((oi, ci, names_of[ci][model_param], sub.start, sub.end, main.detach().clone(),
                               state["exp_avg"].detach().clone() if "exp_avg" in state else None,
                               state["exp_avg_sq"].detach().clone() if "exp_avg_sq" in state else None))
    weights = None
    if coords["edp"] == 0:
        weights = [{n: p.detach().clone() for n, p in d.module.named_parameters()} for d in ddps]

    world = torch.distributed.get_world_size()
    gathered = [None] * world if coords["rank"] == 0 else None
    groups = (param_groups(ddps, optimizer), built_groups)
    torch.distributed.gather_object((coords, chunks, opts, pieces, weights, groups), gathered, dst=0)
    if coords["rank"] != 0:
        return None
    return _stitch(version, c, gathered, extra or {})


def where_buf(where, buf):
    for p in buf.param_index_map:
        ci, kind, bi = where[p]
        return (ci, kind, bi)
    return None


def _stitch(version, c, gathered, extra):
    import torch

    ranks = {}
    by_coord = {}
    groups_of = {}
    for coords, _, _, _, _, groups in gathered:
        groups_of.setdefault((coords["tp"], coords["pp"], coords["ep"]), []).append(groups)
    gathered = [g[:5] for g in gathered]
    for coords, chunks, opts, pieces, weights in gathered:
        key = (coords["tp"], coords["pp"], coords["ep"])
        by_coord.setdefault(key, []).append(coords["rank"])
        if coords["edp"] == 0:
            ranks[key] = {"coords": coords, "chunks": chunks, "optimizers": opts, "weights": weights}
    for key, r in ranks.items():   # optimizer param groups: as loaded / saved, and as built before a load
        r["param_groups"] = _merged_groups([g[0] for g in groups_of[key]])
        if all(g[1] is not None for g in groups_of[key]):
            r["built_param_groups"] = _merged_groups([g[1] for g in groups_of[key]])
    # each (tp, pp, ep) has one expert-data-parallel rank 0: its layout is the reference; every
    # other rank of the same (tp, pp, ep) must agree
    for coords, chunks, opts, _, _ in gathered:
        ref = ranks[(coords["tp"], coords["pp"], coords["ep"])]
        for a, b in zip(chunks, ref["chunks"]):
            for k in ("registration_order", "shapes", "dtypes", "buffers"):
                if a[k] != b[k]:
                    raise RuntimeError(f"rank {coords['rank']}: {k} differs from its expert-DP rank 0")

    # stitch the fp32 shards: dense params over (tp, pp), expert params over (tp, pp, ep)
    acc = {}
    for coords, chunks, opts, pieces, _ in gathered:
        for oi, ci, name, start, end, main, m, s in pieces:
            expert = chunks[ci]["expert"][name]
            k = (coords["tp"], coords["pp"], coords["ep"] if expert else None, ci, name)
            if k not in acc:
                shape = chunks[ci]["shapes"][name]
                n = 1
                for x in shape:
                    n *= x
                acc[k] = {"param": torch.full((n,), float("nan")), "exp_avg": torch.full((n,), float("nan")),
                          "exp_avg_sq": torch.full((n,), float("nan")), "_count": torch.zeros(n, dtype=torch.int32),
                          "_shape": shape}
            slot = acc[k]
            for key, t in (("param", main), ("exp_avg", m), ("exp_avg_sq", s)):
                if t is not None:
                    assert t.numel() == end - start, (name, start, end, t.shape)
                    slot[key][start:end] = t.float()
            slot["_count"][start:end] += 1

    for key, r in ranks.items():
        tp, pp, ep = key
        for ci, ch in enumerate(r["chunks"]):
            live = {}
            for name, shape in ch["shapes"].items():
                k = (tp, pp, ep if ch["expert"][name] else None, ci, name)
                if k not in acc:
                    raise RuntimeError(f"{key} chunk {ci} {name}: no rank holds a shard of it")
                slot = acc[k]
                count = slot["_count"]
                if not bool((count == 1).all()):
                    bad = (count != 1).nonzero().flatten()[:10].tolist()
                    raise RuntimeError(f"{key} chunk {ci} {name}: elements {bad} covered "
                                       f"{count[bad].tolist()} times, not once")
                live[name] = {s: slot[s].view(shape) for s in ("param", "exp_avg", "exp_avg_sq")}
                live[name]["weight"] = r["weights"][ci][name]
            ch["live"] = live
        del r["weights"]
    sizes = {"tp": c["tp"], "pp": c["pp"], "vpp": c["vpp"], "dp": c["dp"], "ep": c["ep"],
             "world": len(gathered)}
    return {"version": version, "case": dict(c), "sizes": sizes, "ranks": ranks,
            "rank_coords": [g[0] for g in gathered], "extra": extra}
