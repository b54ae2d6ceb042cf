"""Invertible tensor ops. Rules name them (``ops: transpose(0, 1)``); the compiler resolves them
against the actual shape and dtype into concrete ``plan.Op`` records, each of which knows its
exact inverse, so the reverse direction is the forward op list read backwards.

Concrete ops:
  cast(src, dst)                 dtype change (bf16 -> fp32 is exact; its inverse is exact on such values)
  cast_exact(src, dst)           a dtype change the user asked for (ms2pt --cast-exact): refused, naming an
                                 element, unless every value survives it bit for bit
  transpose(a, b)                swap two dims; its own inverse
  reshape(in_shape, out_shape)   inverse swaps the shapes
  chunk_interleave(dim, n)       view ``dim`` as (n, size/n), swap, flatten: interleaves n chunks row
                                 by row; inverse is chunk_interleave(dim, size/n)

Parts (rules ``parts:``, one Megatron tensor <-> several MindSpore tensors) are not array ops but
element ranges: ``resolve_parts`` turns a rule's parts into, per part, the flat (C-order) element
ranges of the TP-local Megatron tensor it is made of. pt2ms reads a part as those ranges
concatenated; ms2pt writes the part's elements back to the same ranges — one resolution, read in
both directions, so the inverse (interleaving the parts into the fused rows) is never written twice.

Ops run on numpy arrays of the dtypes' storage types (``ckptmap.dtypes``); casts follow torch's
``Tensor.to`` bit for bit: bfloat16 -> float32 is a 16-bit shift, float32 -> bfloat16 rounds to
nearest even (NaN -> 0x7FC0, as c10::BFloat16), other float casts are IEEE round-to-nearest-even.
"""

from __future__ import annotations

import math

import numpy as np

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.mapping.plan import Op


def resolve(spec_name: str, spec_args: tuple, shape: tuple[int, ...], dtype: str,
            env: dict[str, int], where: str) -> tuple[Op, tuple[int, ...], str]:
    """Turn a rules op (``spec_name(spec_args)``) into a concrete Op for this input."""
    if spec_name == "cast":
        (dst,) = spec_args
        dtypes.get(dst)
        return Op("cast", (dtype, dst)), shape, dst
    if spec_name == "transpose":
        a, b = (_dim(d, shape, where) for d in spec_args)
        out = list(shape)
        out[a], out[b] = out[b], out[a]
        return Op("transpose", (a, b)), tuple(out), dtype
    if spec_name == "reshape":
        dims = [env[a] if isinstance(a, str) and a in env else a for a in spec_args]
        if any(isinstance(d, str) for d in dims):
            raise CkptmapError(f"{where}: reshape({', '.join(map(str, spec_args))}) names a value the "
                               f"model config does not have; known: {', '.join(sorted(env))}")
        if dims.count(-1) > 1:
            raise CkptmapError(f"{where}: reshape() may infer at most one dimension (-1)")
        known = math.prod(d for d in dims if d != -1)
        total = math.prod(shape)
        if -1 in dims:
            if known == 0 or total % known:
                raise CkptmapError(f"{where}: cannot reshape {list(shape)} to {dims}")
            dims[dims.index(-1)] = total // known
        if math.prod(dims) != total:
            raise CkptmapError(f"{where}: cannot reshape {list(shape)} ({total} elements) to {dims}")
        return Op("reshape", (tuple(shape), tuple(dims))), tuple(dims), dtype
    if spec_name == "chunk_interleave":
        dim, n = spec_args
        dim = _dim(dim, shape, where)
        if shape[dim] % n:
            raise CkptmapError(f"{where}: chunk_interleave: dim {dim} of size {shape[dim]} is not divisible by {n}")
        return Op("chunk_interleave", (dim, n)), shape, dtype
    raise CkptmapError(f"{where}: unknown op {spec_name}()")


def resolve_parts(parts, shape: tuple[int, ...], env: dict, local_groups_divisor: int, where: str) -> list:
    """[(part name, part shape, ((start, numel), ...))] of a TP-local tensor of ``shape``: dim 0 holds
    ``groups / local_groups_divisor`` blocks (the TP size when the rule cuts dim 0 across ranks, else 1),
    each block the parts' rows in order. Refuses sizes that do not tile dim 0 exactly."""
    try:
        groups = parts.groups.evaluate(env) if parts.groups is not None else local_groups_divisor
        sizes = [(name, e.evaluate(env)) for name, e in parts.entries]
    except CkptmapError as e:
        raise CkptmapError(f"{where}: parts: {e}; the checkpoint's args must give every value the sizes use") from None
    if groups <= 0 or groups % local_groups_divisor:
        raise CkptmapError(f"{where}: parts(groups={parts.groups}) is {groups}, which does not divide into "
                           f"{local_groups_divisor} tensor-parallel shards; check the groups expression")
    local = groups // local_groups_divisor
    block = sum(n for _, n in sizes)
    if not shape or any(n <= 0 for _, n in sizes) or local * block != shape[0]:
        listed = ", ".join(f"{name} = {e} = {n}" for (name, e), (_, n) in zip(parts.entries, sizes))
        raise CkptmapError(
            f"{where}: the parts ({listed} rows, {local} block{'s' if local != 1 else ''} per TP shard) cover "
            f"{local * block} rows, but the tensor has shape {list(shape)}; the parts must tile dim 0 exactly — fix "
            f"the sizes in the rules (or the groups), or use rules written for this model")
    row = math.prod(shape[1:])
    out, offset = [], 0
    for name, n in sizes:
        ranges = tuple(((g * block + offset) * row, n * row) for g in range(local))
        out.append((name, (local * n,) + tuple(shape[1:]), ranges))
        offset += n
    return out


def _dim(d, shape, where) -> int:
    if not isinstance(d, int) or not -len(shape) <= d < len(shape):
        raise CkptmapError(f"{where}: dimension {d} does not exist in a tensor of shape {list(shape)}")
    return d % len(shape)


class InexactCast(CkptmapError):
    """A cast_exact that would change a value; the executor adds which tensor and file."""


def inverse(op: Op, shape_after: tuple[int, ...]) -> Op:
    """The op that undoes ``op``; ``shape_after`` is the shape ``op`` produced."""
    if op.kind in ("cast", "cast_exact"):
        return Op(op.kind, (op.args[1], op.args[0]))
    if op.kind == "transpose":
        return op
    if op.kind == "reshape":
        return Op("reshape", (op.args[1], op.args[0]))
    if op.kind == "chunk_interleave":
        dim, n = op.args
        return Op("chunk_interleave", (dim, shape_after[dim] // n))
    raise CkptmapError(f"unknown op {op.kind}")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    out = bits.astype(np.uint32)
    out <<= 16   # in place: one array allocated, not two
    return out.view(np.float32)


def f32_to_bf16(values: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns, as c10::BFloat16: (u + ((u >> 16) & 1) +
    0x7FFF) >> 16 in wrapping uint32, NaN -> 0x7FC0. ``out`` (uint16) and ``scratch`` (uint32), of the
    values' shape, are filled in place when given: a streamed cast reuses them chunk after chunk."""
    f = np.asarray(values, dtype=np.float32, order="C")
    u = f.view(np.uint32)
    t = np.right_shift(u, 16, out=scratch)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(t, u, out=t)
    np.right_shift(t, 16, out=t)
    if out is None:
        out = t.astype(np.uint16)
    else:
        np.copyto(out, t, casting="unsafe")
    if f.size and np.isnan(f.max()):   # max propagates a NaN: one pass and no mask on NaN-free data
        out[np.isnan(f)] = 0x7FC0
    return out


def cast(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    if src == dst:
        return array
    if src == "bfloat16":
        return cast(bf16_to_f32(array), "float32", dst)
    if dst == "bfloat16":
        return f32_to_bf16(array if src == "float32" else array.astype(np.float32))
    with np.errstate(over="ignore"):  # out of range becomes inf, as in torch
        return array.astype(dtypes.storage(dst))


def cast_exact(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """``cast``, refused when any element does not come back bit for bit (an int32 beyond 2**24 in
    float32, a float16 in bfloat16, a NaN payload)."""
    out = cast(array, src, dst)
    back = cast(out, dst, src)
    flat = np.ascontiguousarray(array).reshape(-1)
    unsigned = f"u{flat.dtype.itemsize}"
    changed = np.flatnonzero(flat.view(unsigned) != np.ascontiguousarray(back).reshape(-1).view(unsigned))
    if changed.size:
        i = int(changed[0])
        raise InexactCast(f"the cast {src} -> {dst} is not exact: element {i} is {_shown(flat[i], src)}, which "
                          f"{dst} holds as {_shown(np.ascontiguousarray(out).reshape(-1)[i], dst)} "
                          f"({changed.size} of {flat.size} elements change)")
    return out


def _shown(value, dtype: str):
    return float(bf16_to_f32(np.array([value]))[0]) if dtype == "bfloat16" else value.item()


def apply(op: Op, array: np.ndarray) -> np.ndarray:
    if op.kind == "cast":
        return cast(array, *op.args)
    if op.kind == "cast_exact":
        return cast_exact(array, *op.args)
    if op.kind == "transpose":
        return np.swapaxes(array, *op.args)
    if op.kind == "reshape":
        return array.reshape(op.args[1])
    if op.kind == "chunk_interleave":
        dim, n = op.args
        shape = array.shape
        split = array.reshape(*shape[:dim], n, shape[dim] // n, *shape[dim + 1:])
        return np.swapaxes(split, dim, dim + 1).reshape(shape)
    raise CkptmapError(f"unknown op {op.kind}")


def apply_all(ops, array: np.ndarray) -> np.ndarray:
    for op in ops:
        array = apply(op, array)
    return array


def invert_all(ops, shapes_after) -> list[Op]:
    """Inverse op list; ``shapes_after[i]`` is the shape after ``ops[i]``."""
    return [inverse(op, shp) for op, shp in zip(reversed(ops), reversed(shapes_after))]
