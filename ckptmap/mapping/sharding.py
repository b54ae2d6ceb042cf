"""Tensor-parallel sharding as boxes: where each rank's shard of a parameter sits in the global tensor.

The *global* tensor is a parameter's unsharded value in Megatron's own global layout (the one its
distributed checkpoints store): a fused QKV weight grouped per query group, a SwiGLU ``linear_fc1``
as ``[all gate rows; all up rows]``, a vocabulary table padded for its tensor-parallel size. A rank's
*shard* is made of *fragments*: boxes that are contiguous both in the global tensor and in the shard.
A plain ``split(dim)`` shard is one fragment; a SwiGLU shard ``[gate_r; up_r]`` is two. Any
re-partitioning (other TP size, other padded vocabulary, a stacked or chunked storage) is then box
intersection, like PyTorch DCP's ``ReadItem``s: :func:`transfer` says which box of which source
shard lands where in a target shard. Pure arithmetic; no data, no names.
"""

from __future__ import annotations

import math

import attrs

from ckptmap.errors import CkptmapError


@attrs.frozen
class Box:
    offsets: tuple[int, ...] = attrs.field(converter=tuple)
    lengths: tuple[int, ...] = attrs.field(converter=tuple)

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)

    def intersect(self, other: "Box") -> "Box | None":
        offs, lens = [], []
        for a, la, b, lb in zip(self.offsets, self.lengths, other.offsets, other.lengths):
            lo, hi = max(a, b), min(a + la, b + lb)
            if hi <= lo:
                return None
            offs.append(lo)
            lens.append(hi - lo)
        return Box(offs, lens)

    def shifted(self, delta) -> "Box":
        return Box(tuple(o + d for o, d in zip(self.offsets, delta)), self.lengths)

    def run_start(self, shape) -> int | None:
        """The flat C-order index where the box starts in an array of ``shape`` when its elements are
        consecutive there (length 1 on the leading axes, any range on one, whole after it), else None."""
        k = 0
        while k < len(shape) and self.lengths[k] == 1:
            k += 1
        if any(self.lengths[j] != shape[j] for j in range(k + 1, len(shape))):
            return None
        flat = 0
        for o, n in zip(self.offsets, shape):
            flat = flat * n + o
        return flat


def whole(shape) -> Box:
    return Box((0,) * len(shape), tuple(shape))


@attrs.frozen
class Fragment:
    """``global_box`` of the global tensor is stored at ``local_offsets`` of the shard."""

    global_box: Box
    local_offsets: tuple[int, ...] = attrs.field(converter=tuple)


@attrs.frozen
class Sharding:
    """A resolved ``tp:`` clause. ``replicated``: every rank holds the whole tensor. ``split``: cut
    along ``dim`` into ``tp`` equal parts, each of the ``halves`` consecutive blocks of the global
    dim cut separately (SwiGLU ``[gate; up]``: halves 2); ``groups``: that many row groups along
    ``dim`` (query groups) must stay whole; ``vocab_padded``: the dim is a vocabulary padded for
    the tensor-parallel size."""

    kind: str = "replicated"
    dim: int = 0
    halves: int = 1
    groups: int | None = None
    vocab_padded: bool = False

    def global_shape(self, shard_shape, tp: int) -> tuple[int, ...]:
        if self.kind == "replicated":
            return tuple(shard_shape)
        out = list(shard_shape)
        out[self.dim] *= tp
        return tuple(out)

    def shard_shape(self, global_shape, tp: int, where: str = "") -> tuple[int, ...]:
        self.check(global_shape, tp, where)
        if self.kind == "replicated":
            return tuple(global_shape)
        out = list(global_shape)
        out[self.dim] //= tp
        return tuple(out)

    def check(self, global_shape, tp: int, where: str = "") -> None:
        if self.kind == "replicated":
            return
        if not 0 <= self.dim < len(global_shape):
            raise CkptmapError(f"{where}: split(dim={self.dim}) of a tensor of shape {list(global_shape)}")
        n = global_shape[self.dim]
        if n % (self.halves * tp):
            what = f"{self.halves} halves x " if self.halves > 1 else ""
            raise CkptmapError(f"{where}: dimension {self.dim} of size {n} cannot be split into {what}tensor-parallel "
                               f"size {tp}; choose a TP size that divides it")
        if self.groups is not None:
            if self.groups < 1 or n % self.groups:
                raise CkptmapError(f"{where}: dimension {self.dim} of size {n} is not made of {self.groups} groups")
            if self.groups % tp:
                raise CkptmapError(f"{where}: the {self.groups} query groups cannot be divided among tensor-parallel "
                                   f"size {tp}; choose a TP size that divides the number of query groups")

    def fragments(self, global_shape, tp: int, rank: int, where: str = "") -> list[Fragment]:
        """The fragments of ``rank``'s shard."""
        self.check(global_shape, tp, where)
        if self.kind == "replicated":
            return [Fragment(whole(global_shape), (0,) * len(global_shape))]
        n = global_shape[self.dim]
        block = n // self.halves
        part = block // tp
        out = []
        for k in range(self.halves):
            offs = [0] * len(global_shape)
            lens = list(global_shape)
            offs[self.dim] = k * block + rank * part
            lens[self.dim] = part
            local = [0] * len(global_shape)
            local[self.dim] = k * part
            out.append(Fragment(Box(offs, lens), local))
        return out


@attrs.frozen
class Piece:
    """Copy ``src_box`` of source shard ``source`` (an index into the caller's list of source
    shards) to ``dst_offsets`` of the target shard."""

    source: int
    src_box: Box
    dst_offsets: tuple[int, ...] = attrs.field(converter=tuple)


def transfer(target: list[Fragment], sources: list[list[Fragment]]) -> tuple[list[Piece], list[Box]]:
    """The pieces that assemble a target shard (its fragments) from source shards (each a list of
    fragments), and the target-local boxes that no source covers (to be filled by the caller, e.g.
    new vocabulary padding). A global element held by several sources is taken from the first."""
    pieces: list[Piece] = []
    missing: list[Box] = []
    for t in target:
        todo = [t.global_box]
        for s_index, frags in enumerate(sources):
            for f in frags:
                rest = []
                for box in todo:
                    hit = box.intersect(f.global_box)
                    if hit is None:
                        rest.append(box)
                        continue
                    src = Box(tuple(h - g + l for h, g, l in zip(hit.offsets, f.global_box.offsets,
                                                                f.local_offsets)), hit.lengths)
                    dst = tuple(h - g + l for h, g, l in zip(hit.offsets, t.global_box.offsets, t.local_offsets))
                    pieces.append(Piece(s_index, src, dst))
                    rest.extend(_subtract(box, hit))
                todo = rest
            if not todo:
                break
        missing.extend(Box(tuple(o - g + l for o, g, l in zip(b.offsets, t.global_box.offsets, t.local_offsets)),
                           b.lengths) for b in todo)
    return pieces, missing


def _subtract(box: Box, hole: Box) -> list[Box]:
    """``box`` minus ``hole`` (``hole`` inside ``box``) as disjoint boxes."""
    out = []
    offs, lens = list(box.offsets), list(box.lengths)
    for d in range(len(offs)):
        lo, hi = hole.offsets[d], hole.offsets[d] + hole.lengths[d]
        if lo > offs[d]:
            o, l_ = list(offs), list(lens)
            l_[d] = lo - offs[d]
            out.append(Box(o, l_))
        if hi < offs[d] + lens[d]:
            o, l_ = list(offs), list(lens)
            o[d] = hi
            l_[d] = offs[d] + lens[d] - hi
            out.append(Box(o, l_))
        offs[d], lens[d] = lo, hi - lo
    return out


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's ``_vocab_size_with_padding``: the vocabulary rounded up to divisible_by x TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
