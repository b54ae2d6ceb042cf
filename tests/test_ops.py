"""Invertible ops: each concrete op's inverse restores the input bit-exactly."""

import pytest
import torch

from ckptmap.errors import CkptmapError
from ckptmap.mapping import ops


def _roundtrip(spec, args, t):
    op, shape, dtype = ops.resolve(spec, args, tuple(t.shape), "bfloat16" if t.dtype == torch.bfloat16 else "float32",
                                   {"hidden": 4}, "test")
    out = ops.apply(op, t)
    assert tuple(out.shape) == shape
    back = ops.apply(ops.inverse(op, shape), out)
    return out, back


def test_chunk_interleave_by_hand():
    t = torch.arange(6).float().reshape(6, 1)
    op, _, _ = ops.resolve("chunk_interleave", (0, 2), (6, 1), "float32", {}, "t")
    assert ops.apply(op, t).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert ops.apply(ops.inverse(op, (6, 1)), ops.apply(op, t)).flatten().tolist() == list(range(6))


@pytest.mark.parametrize("spec, args", [("transpose", (0, 1)), ("reshape", (-1, "hidden")), ("reshape", (-1,)),
                                        ("chunk_interleave", (0, 3)), ("chunk_interleave", (1, 2)),
                                        ("cast", ("float32",))])
def test_inverse_restores_bits(spec, args):
    t = torch.randn(6, 4).to(torch.bfloat16)
    out, back = _roundtrip(spec, args, t)
    assert back.dtype == t.dtype and torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_invert_all_reverses_a_chain():
    t = torch.randn(6, 4)
    chain, shape, shapes = [], (6, 4), []
    for spec, args in [("transpose", (0, 1)), ("reshape", (2, 12)), ("chunk_interleave", (1, 4))]:
        op, shape, _ = ops.resolve(spec, args, shape, "float32", {}, "t")
        chain.append(op)
        shapes.append(shape)
    back = ops.apply_all(ops.invert_all(chain, shapes), ops.apply_all(chain, t))
    assert torch.equal(back, t)


def test_bad_op_arguments():
    with pytest.raises(CkptmapError, match="cannot reshape"):
        ops.resolve("reshape", (5, -1), (6, 4), "float32", {}, "r.rules:3:1")
    with pytest.raises(CkptmapError, match="dimension 2 does not exist"):
        ops.resolve("transpose", (0, 2), (6, 4), "float32", {}, "r.rules:3:1")
    with pytest.raises(CkptmapError, match="not divisible"):
        ops.resolve("chunk_interleave", (0, 4), (6, 4), "float32", {}, "r.rules:3:1")
