"""Sharding boxes against shards cut with plain numpy (np.split of the global tensor, halves first)."""

import itertools

import numpy as np
import pytest

from ckptmap.errors import CkptmapError
from ckptmap.mapping.sharding import Box, Sharding, padded_vocab_size, transfer


def numpy_shard(global_array, sh: Sharding, tp: int, rank: int) -> np.ndarray:
    """The shard Megatron holds, cut independently: each of the `halves` blocks split into tp parts,
    rank r takes part r of every block, concatenated."""
    if sh.kind == "replicated":
        return global_array
    blocks = np.split(global_array, sh.halves, axis=sh.dim)
    return np.concatenate([np.split(b, tp, axis=sh.dim)[rank] for b in blocks], axis=sh.dim)


def assemble(sh_dst, tp_dst, rank, shape_dst, sh_src, tp_src, shape_src, shards):
    target = sh_dst.fragments(shape_dst, tp_dst, rank)
    sources = [sh_src.fragments(shape_src, tp_src, r) for r in range(tp_src)]
    pieces, missing = transfer(target, sources)
    out = np.full(sh_dst.shard_shape(shape_dst, tp_dst), -1.0)
    for p in pieces:
        src = shards[p.source][tuple(slice(o, o + n) for o, n in zip(p.src_box.offsets, p.src_box.lengths))]
        out[tuple(slice(o, o + n) for o, n in zip(p.dst_offsets, p.src_box.lengths))] = src
    return out, missing, pieces


CASES = [Sharding("split", 0), Sharding("split", 1), Sharding("split", 0, halves=2),
         Sharding("split", 0, groups=4), Sharding("replicated")]


@pytest.mark.parametrize("sh", CASES, ids=lambda s: f"{s.kind}{s.dim}h{s.halves}g{s.groups}")
@pytest.mark.parametrize("tp_src,tp_dst", [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4), (4, 1), (2, 2)])
def test_reshard_equals_numpy(sh, tp_src, tp_dst):
    shape = (16, 8)
    g = np.random.default_rng(0).standard_normal(shape)
    shards = [numpy_shard(g, sh, tp_src, r) for r in range(tp_src)]
    for rank in range(tp_dst):
        out, missing, pieces = assemble(sh, tp_dst, rank, shape, sh, tp_src, shape, shards)
        assert not missing
        assert np.array_equal(out, numpy_shard(g, sh, tp_dst, rank))
        covered = sum(p.src_box.numel for p in pieces)
        assert covered == out.size  # every element exactly once


def test_same_layout_is_one_whole_piece_per_fragment():
    sh = Sharding("split", 0, halves=2)
    for rank in range(2):
        pieces, missing = transfer(sh.fragments((8, 3), 2, rank), [sh.fragments((8, 3), 2, r) for r in range(2)])
        assert not missing and [p.source for p in pieces] == [rank, rank]


def test_swiglu_tp2_to_tp1_interleaves_halves():
    # rank r holds [gate_r; up_r]; the TP1 tensor is [gate_0; gate_1; up_0; up_1]
    sh = Sharding("split", 0, halves=2)
    shards = [np.array([[0], [1], [10], [11]]), np.array([[2], [3], [12], [13]])]
    out, missing, _ = assemble(sh, 1, 0, (8, 1), sh, 2, (8, 1), shards)
    assert out.ravel().tolist() == [0, 1, 2, 3, 10, 11, 12, 13]


def test_vocabulary_growing_leaves_rows_to_fill():
    sh = Sharding("split", 0, vocab_padded=True)
    src_rows, dst_rows = padded_vocab_size(50, 8, 1), padded_vocab_size(50, 8, 4)  # 56, 64
    g = np.arange(src_rows * 2, dtype=float).reshape(src_rows, 2)
    out, missing, _ = assemble(sh, 4, 3, (dst_rows, 2), sh, 1, (src_rows, 2), [g])
    assert np.array_equal(out[:8], g[48:56])
    assert missing == [Box((8, 0), (8, 2))]  # rows 56..63 of the global table, local rows 8..15


def test_padded_vocab_size():
    assert [padded_vocab_size(50257, 128, t) for t in (1, 2, 8)] == [50304, 50432, 51200]


@pytest.mark.parametrize("tp", [3, 8])
def test_indivisible_sizes_are_named(tp):
    with pytest.raises(CkptmapError, match="query groups|cannot be split"):
        Sharding("split", 0, groups=4).fragments((16, 2), tp, 0, "qkv")


def test_n_dimensional_boxes():
    # a [L, rows, cols] stacked tensor stored as 4 chunks, read back as one layer's TP-1 shard
    g = np.random.default_rng(1).standard_normal((3, 4, 6))
    chunks = []
    for i, j in itertools.product(range(2), range(2)):
        box = Box((0, 2 * i, 3 * j), (3, 2, 3))
        chunks.append((box, g[:, 2 * i:2 * i + 2, 3 * j:3 * j + 3]))
    from ckptmap.mapping.sharding import Fragment
    target = [Fragment(Box((1, 0, 0), (1, 4, 6)), (0, 0, 0))]
    pieces, missing = transfer(target, [[Fragment(b, (0, 0, 0))] for b, _ in chunks])
    out = np.zeros((1, 4, 6))
    for p in pieces:
        data = chunks[p.source][1][tuple(slice(o, o + n) for o, n in zip(p.src_box.offsets, p.src_box.lengths))]
        out[tuple(slice(o, o + n) for o, n in zip(p.dst_offsets, p.src_box.lengths))] = data
    assert not missing and np.array_equal(out[0], g[1])
