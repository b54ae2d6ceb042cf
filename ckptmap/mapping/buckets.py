"""Distributed-optimizer buffer layouts: where each parameter sits in a bucketed flat buffer.

Two sources of truth, one result type:
  * ``build_buffer`` runs a ``buckets`` block of the rules (parameter order, per-parameter
    alignment, bucket closing, shared-embedding buckets, bucket padding) over the parameters of
    one model chunk — the layout the training framework *would* have built;
  * ``buffer_from_param_map`` reads the layout a training run recorded (Megatron ``param_map``)
    and checks it against the bucket sizes of the checkpoint.
Offsets are element offsets in the whole buffer; bucket ``j`` starts at the sum of the padded
sizes of buckets ``0..j-1``.

Per-parameter alignment comes in two kinds. ``param_start_align`` (Megatron >= 0.8,
``_pad_start_of_param_if_needed``): each parameter *starts* at a multiple of the alignment, so the
gaps lie between parameters and a bucket closed by size ends (unpadded) at its last parameter's end;
a bucket closed because a shared embedding follows ends at that parameter's aligned start.
``param_align`` (MindSpeed's memory alignment, formats.md §3.4): every
parameter occupies its element count rounded *up* to the alignment, i.e. it is *followed* by
padding — the last parameter of a bucket included. So a bucket's unpadded size is the aligned end
of its last parameter, the bucket-closing threshold compares that aligned fill, and the bucket
padding (``bucket_pad``, MindSpeed: a multiple of dp·512 bytes) is added on top. ``bytes`` amounts
are converted to elements with the itemsize of the buffer's *parameter* dtype (a bf16 buffer aligns
to 256 elements, an fp32 buffer to 128), even though the optimizer shards that use the layout hold
fp32: offsets are element offsets, shared by the parameter buffer and every fp32 state. With an
alignment of 1 element (Megatron) this is exactly the unaligned layout. The example of formats.md
§3.4 (bf16, dp 2: unpadded 1280 = 5·256, padded 1536 = 3·512) is consistent with this reading and
not with a start-only alignment in fp32 elements.
"""

from __future__ import annotations

import itertools
import functools
import math

import attrs

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.mapping.rules import BucketLayout


@attrs.frozen
class ParamEntry:
    """A parameter as the layout engine sees it, in registration order."""

    name: str                 # DDP name (``module.…``)
    shape: tuple[int, ...]
    dtype: str
    shared_embedding: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@attrs.frozen
class ParamSlot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    bucket: int


@attrs.frozen
class Bucket:
    start: int           # offset of the bucket in the (padded) buffer
    numel: int           # padded size
    numel_unpadded: int


@attrs.frozen
class BufferLayout:
    dtype: str
    slots: tuple[ParamSlot, ...]
    buckets: tuple[Bucket, ...]
    origin: str = ""     # "derived" or the param_map path

    def slot(self, name: str) -> ParamSlot | None:
        for s in self.slots:
            if s.name == name:
                return s
        return None

    @property
    def per_bucket_numel(self) -> list[int]:
        return [b.numel for b in self.buckets]

    @property
    def per_bucket_numel_unpadded(self) -> list[int]:
        return [b.numel_unpadded for b in self.buckets]

    @property
    def numel_unpadded(self) -> int:
        return sum(b.numel_unpadded for b in self.buckets)

    @functools.cached_property
    def _unpadded_before(self) -> tuple[int, ...]:
        """Per bucket, the unpadded elements of the buckets before it (planning asks for every slot)."""
        return tuple(itertools.accumulate((b.numel_unpadded for b in self.buckets[:-1]), initial=0))

    def coalesced_offset(self, slot: ParamSlot) -> int:
        """Where ``slot`` starts in a coalesced state tensor (Megatron >= 0.7: every bucket's unpadded
        part, concatenated)."""
        return self._unpadded_before[slot.bucket] + slot.start - self.buckets[slot.bucket].start


class UnfaithfulLayout(CkptmapError):
    """The version's own DDP would build an inconsistent buffer for these parameters and sizes."""


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _elements(amount: tuple, env: dict, itemsize: int, what: str) -> int:
    expr, unit = amount
    value = expr.evaluate(env)
    if unit == "bytes":
        if value % itemsize:
            raise CkptmapError(f"bucket rule {what}: {value} bytes is not a whole number of {itemsize}-byte elements")
        value //= itemsize
    if value < 1:
        raise CkptmapError(f"bucket rule {what} evaluates to {value}; it must be at least 1")
    return value


def bucket_pad_elements(rule: BucketLayout, env: dict, itemsize: int) -> int:
    """The bucket-end padding multiple: the first ``bucket_pad`` whose conditions hold (1 if none)."""
    for pad in rule.bucket_pads:
        if all(c.holds(env) for c in pad.when):
            return _elements((pad.amount, pad.unit), env, itemsize, "bucket_pad")
    return 1


def layout_env(rule: BucketLayout, values: dict) -> dict:
    """The rule's defaults, overridden by the values known from the checkpoint (None = unknown)."""
    env = {name: expr.evaluate(values) for name, expr in rule.defaults}
    env.update({k: v for k, v in values.items() if v is not None})
    return env


def closes_buckets(rule: BucketLayout, env: dict) -> bool:
    return rule.bucket_close is not None and all(c.holds(env) for c in rule.close_when)


def build_buffer(rule: BucketLayout, params: list[ParamEntry], env: dict) -> BufferLayout:
    """Lay out ``params`` (registration order, one dtype) as the rule says."""
    if not params:
        raise CkptmapError("internal error: a buffer without parameters")
    dtype = params[0].dtype
    itemsize = dtypes.itemsize(dtype)
    align = _elements(rule.param_align, env, itemsize, "param_align") if rule.param_align else 1
    start_align = (_elements(rule.param_start_align, env, itemsize, "param_start_align")
                   if rule.param_start_align else 1)
    pad = bucket_pad_elements(rule, env, itemsize)
    close_at = rule.bucket_close.evaluate(env) if closes_buckets(rule, env) else None
    shared_active = rule.shared_embedding == "own_bucket" and all(c.holds(env) for c in rule.shared_when)
    ordered = params[::-1] if rule.order == "reverse_registration" else list(params)

    slots: list[ParamSlot] = []
    buckets: list[Bucket] = []
    bucket_start = start = 0
    open_params = 0

    def close(end_unpadded: int) -> int:
        nonlocal bucket_start, open_params
        padded = _round_up(end_unpadded, pad)
        buckets.append(Bucket(bucket_start, padded - bucket_start, end_unpadded - bucket_start))
        bucket_start, open_params = padded, 0
        return padded

    for p in ordered:
        shared = shared_active and p.shared_embedding
        start = _round_up(start, start_align)  # a new bucket's start is aligned already
        if shared and rule.shared_prepad is not None and all(c.holds(dict(env, start=start))
                                                              for c in rule.shared_prepad):
            start = _round_up(start, pad)       # the padding counts as the previous bucket's content
        if shared and open_params:
            bucket_start_at = close(start)
            if rule.shared_start == "bucket_start":
                start = bucket_start_at
            elif bucket_start_at != start:
                raise UnfaithfulLayout(
                    f"{rule.label}: the shared embedding {p.name} would start at element {start} while its bucket "
                    f"starts at {bucket_start_at} (the previous bucket padded to a multiple of {pad}); this "
                    f"Megatron version's DDP asserts here (0.6) or leaves the embedding's first "
                    f"{bucket_start_at - start} elements outside every optimizer shard (0.7 - 0.12), so no faithful "
                    f"checkpoint exists for this layout; choose another data-parallel size, or megatron-core >= 0.13")
        end = start + p.numel
        slots.append(ParamSlot(p.name, p.dtype, tuple(p.shape), start, end, len(buckets)))
        open_params += 1
        end = _round_up(end, align)  # the parameter is followed by its alignment padding
        if (close_at is not None and end - bucket_start >= close_at) or shared:
            end = close(end)
        start = end
    if open_params:
        close(start)
    return BufferLayout(dtype, tuple(slots), tuple(buckets), "derived")


def fit_buffer(rule: BucketLayout, params: list[ParamEntry], env: dict, padded: list[int],
               unpadded: list[int], close_symbol: str = "bucket_size") -> BufferLayout | None:
    """The rule's layout if it reproduces the checkpoint's bucket sizes exactly, else None.

    When the closing threshold (``bucket_size``) is not recorded in the checkpoint, any threshold
    in (largest partial bucket, smallest closed bucket] gives the same buckets, so the closed
    bucket sizes themselves are the only candidates worth trying."""
    layout = build_buffer(rule, params, env)
    if layout.per_bucket_numel == padded and layout.per_bucket_numel_unpadded == unpadded:
        return layout
    if not closes_buckets(rule, env) or len(unpadded) < 2:
        return None
    for candidate in sorted(set(unpadded[:-1])):
        layout = build_buffer(rule, params, dict(env, **{close_symbol: candidate}))
        if layout.per_bucket_numel == padded and layout.per_bucket_numel_unpadded == unpadded:
            return layout
    return None


def fit_coalesced(rule: BucketLayout, params: list[ParamEntry], env: dict, numel_unpadded: int,
                  close_symbol: str = "bucket_size") -> BufferLayout | None:
    """The rule's layout if its buckets' unpadded parts add up to ``numel_unpadded`` — all that a
    coalesced ``distrib_optim.pt`` records of a buffer. Weaker than :func:`fit_buffer`: the
    compiler backs it with the main-param rounding check (bf16 of the fp32 main param must be the
    model weight) for every parameter."""
    layout = build_buffer(rule, params, env)
    return layout if layout.numel_unpadded == numel_unpadded else None


def same_slots(a: BufferLayout, b: BufferLayout) -> bool:
    return [(s.name, s.start, s.end, s.bucket) for s in a.slots] == [(s.name, s.start, s.end, s.bucket)
                                                                       for s in b.slots] and \
        a.per_bucket_numel_unpadded == b.per_bucket_numel_unpadded


def buffer_from_param_map(entries: dict, padded: list[int], unpadded: list[int], origin: str,
                          contiguous: bool = True) -> BufferLayout:
    """``entries``: name -> (dtype, shape, start, end, bucket) in buffer order (a param_map file).

    Every range must lie inside its bucket (bucket ``j`` starts at the sum of the padded sizes
    before it) and, for a Megatron buffer (``contiguous``), parameters must tile each bucket's
    unpadded part exactly; the first parameter that does not is named."""
    starts = [sum(padded[:j]) for j in range(len(padded))]
    buckets = tuple(Bucket(s, n, u) for s, n, u in zip(starts, padded, unpadded))
    slots = []
    expected_next = {}
    dtype = None
    for name, (p_dtype, shape, start, end, bucket) in entries.items():
        dtype = dtype or p_dtype
        where = (f"{origin}: parameter {name} (range [{start}, {end}) in bucket {bucket})")
        if not 0 <= bucket < len(buckets):
            raise CkptmapError(f"{where}: the checkpoint's distrib_optim.pt has {len(buckets)} bucket(s) in this "
                               f"buffer; the param_map belongs to a different run (other --dp-size, bucket size "
                               f"or model) — use the param_map written with this checkpoint, or leave "
                               f"--param-map-path out to derive the layout from the checkpoint")
        b = buckets[bucket]
        numel = math.prod(shape)
        if end - start != numel:
            raise CkptmapError(f"{where}: the range holds {end - start} elements but the shape {list(shape)} needs "
                               f"{numel}; the param_map file is corrupt")
        want = expected_next.get(bucket, b.start)
        bad_start = start != want if contiguous else start < want
        if bad_start or end > b.start + b.numel_unpadded:
            raise CkptmapError(
                f"{where}: expected the parameter {'at' if contiguous else 'at or after'} element {want}, inside "
                f"bucket {bucket} = [{b.start}, {b.start + b.numel_unpadded}) (bucket sizes from distrib_optim.pt: "
                f"padded {padded}, unpadded {unpadded}); the param_map belongs to a different run (other "
                f"--dp-size, bucket size or model) — use the param_map written with this checkpoint, or leave "
                f"--param-map-path out to derive the layout from the checkpoint")
        expected_next[bucket] = end
        slots.append(ParamSlot(name, p_dtype, tuple(shape), start, end, bucket))
    if contiguous:
        for j, b in enumerate(buckets):
            filled = expected_next.get(j, b.start) - b.start
            if filled != b.numel_unpadded:
                raise CkptmapError(
                    f"{origin}: bucket {j} holds {filled} elements of parameters but distrib_optim.pt says "
                    f"{b.numel_unpadded}; the param_map belongs to a different run — use the param_map written "
                    f"with this checkpoint, or leave --param-map-path out to derive the layout")
    return BufferLayout(dtype or "", tuple(slots), buckets, origin)

