"""Invertible ops: each concrete op's inverse restores the input bit-exactly, and casts equal torch's."""

import numpy as np
import pytest
import torch

from ckptmap.errors import CkptmapError
from ckptmap.mapping import ops
from torch_views import as_torch


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def _roundtrip(spec, args, array, dtype):
    op, shape, out_dtype = ops.resolve(spec, args, tuple(array.shape), dtype, {"hidden": 4}, "test")
    out = ops.apply(op, array)
    assert tuple(out.shape) == shape
    back = ops.apply(ops.inverse(op, shape), out)
    return out, back


def test_chunk_interleave_by_hand():
    a = np.arange(6, dtype=np.float32).reshape(6, 1)
    op, _, _ = ops.resolve("chunk_interleave", (0, 2), (6, 1), "float32", {}, "t")
    assert ops.apply(op, a).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert ops.apply(ops.inverse(op, (6, 1)), ops.apply(op, a)).flatten().tolist() == list(range(6))


@pytest.mark.parametrize("spec, args", [("transpose", (0, 1)), ("reshape", (-1, "hidden")), ("reshape", (-1,)),
                                        ("chunk_interleave", (0, 3)), ("chunk_interleave", (1, 2)),
                                        ("cast", ("float32",))])
def test_inverse_restores_bits(spec, args):
    bits = bf16_bits(torch.randn(6, 4).to(torch.bfloat16))
    out, back = _roundtrip(spec, args, bits, "bfloat16")
    assert back.dtype == bits.dtype and np.array_equal(back, bits)


def test_invert_all_reverses_a_chain():
    a = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    chain, shape, shapes = [], (6, 4), []
    for spec, args in [("transpose", (0, 1)), ("reshape", (2, 12)), ("chunk_interleave", (1, 4))]:
        op, shape, _ = ops.resolve(spec, args, shape, "float32", {}, "t")
        chain.append(op)
        shapes.append(shape)
    back = ops.apply_all(ops.invert_all(chain, shapes), ops.apply_all(chain, a))
    assert np.array_equal(back, a)


def _awkward_floats() -> torch.Tensor:
    """Random magnitudes plus the rounding and special cases: ties, near-max, subnormals, inf."""
    g = torch.Generator().manual_seed(3)
    values = torch.randn(20000, generator=g) * torch.exp(torch.randn(20000, generator=g) * 20)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x80008000,
                         0x7F800000, 0xFF800000, 0x00000000, 0x80000000], dtype=torch.int64).to(torch.int32)
    return torch.cat([values, ties.view(torch.float32)])


@pytest.mark.parametrize("src, dst", [("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "float16"),
                                      ("float16", "float32"), ("bfloat16", "float16"), ("float64", "bfloat16"),
                                      ("float32", "float64"), ("float64", "float32")])
def test_cast_equals_torch(src, dst):
    """Every cast gives exactly the bits torch's Tensor.to gives (torch is the independent truth)."""
    t = _awkward_floats().to(getattr(torch, src))
    source = bf16_bits(t) if src == "bfloat16" else t.numpy()
    got = ops.cast(source, src, dst)
    want = t.to(getattr(torch, dst))
    assert as_torch(got, dst).view(torch.uint8).equal(want.contiguous().view(torch.uint8))


def test_cast_of_nan_is_a_nan():
    out = ops.cast(np.array([np.nan, -np.nan], dtype=np.float32), "float32", "bfloat16")
    assert np.isnan(ops.cast(out, "bfloat16", "float32")).all()


def test_bad_op_arguments():
    with pytest.raises(CkptmapError, match="cannot reshape"):
        ops.resolve("reshape", (5, -1), (6, 4), "float32", {}, "r.rules:3:1")
    with pytest.raises(CkptmapError, match="dimension 2 does not exist"):
        ops.resolve("transpose", (0, 2), (6, 4), "float32", {}, "r.rules:3:1")
    with pytest.raises(CkptmapError, match="not divisible"):
        ops.resolve("chunk_interleave", (0, 4), (6, 4), "float32", {}, "r.rules:3:1")
