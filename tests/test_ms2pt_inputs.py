"""ms2pt never casts a dtype it does not expect and never drops a tensor silently (issue 9): a MindSpore
tensor in another dtype than Megatron's or float32 is refused unless --cast-exact is given, and then
each element must survive the cast; a tensor no rule reads back is refused unless --allow-extra.

The MindSpore files are edited with MindSpore itself; expected Megatron values come from torch's own
casts."""

import filecmp

import mindspore as ms
import numpy as np
import pytest
import torch

from ckptmap.cli import main
from conftest import fixture_dir

FIXTURE = "legacy_tp1pp1dp1"
WEIGHT = "language_model.encoder.layers.0.mlp.projection.weight"
MEGATRON_WEIGHT = "language_model.encoder.layers.0.mlp.dense_4h_to_h.weight"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ms") / "ms"
    assert main(["pt2ms", "--megatron-path", str(fixture_dir(FIXTURE)), "--ms-path", str(out),
                 "--no-progress"]) == 0
    return out


def edited_copy(converted, tmp_path, edit=None, add=None):
    """A copy of the converted folder whose rank file has ``edit`` {key: MindSpore tensor} replaced and
    ``add`` {key: tensor} appended, re-saved by mindspore.save_checkpoint."""
    import shutil

    copy = tmp_path / "ms"
    shutil.copytree(converted, copy)
    path = copy / "rank_0" / "network.ckpt"
    params = ms.load_checkpoint(str(path))
    assert WEIGHT in params, sorted(params)[:20]
    params.update(edit or {})
    params.update(add or {})
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], str(path))
    return copy


def ms2pt(src, dst, *flags):
    return main(["ms2pt", "--ms-path", str(src), "--megatron-path", str(dst), "--no-progress", *flags])


def megatron_weight(dst):
    state = torch.load(dst / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    return state["model"]["language_model"]["encoder"][MEGATRON_WEIGHT.removeprefix("language_model.encoder.")]


def weight_shape(converted):
    return tuple(ms.load_checkpoint(str(converted / "rank_0" / "network.ckpt"))[WEIGHT].shape)


def test_an_int32_weight_is_refused_and_nothing_is_written(converted, tmp_path, capsys):
    shape = weight_shape(converted)
    src = edited_copy(converted, tmp_path, {WEIGHT: ms.Tensor(np.ones(shape, np.int32))})
    dst = tmp_path / "pt"
    assert ms2pt(src, dst) != 0
    err = capsys.readouterr().err
    assert f"tensor {WEIGHT} is int32" in err and "bfloat16" in err and "--cast-exact" in err
    assert str(src / "rank_0" / "network.ckpt") in err
    assert not dst.exists()


def test_float16_is_cast_only_when_asked_and_exact(converted, tmp_path, capsys):
    shape = weight_shape(converted)
    n = int(np.prod(shape))
    # small multiples of 1/8: exact in float16 and in bfloat16
    values = ((np.arange(n) % 64 - 32) / 8).astype(np.float16).reshape(shape)
    src = edited_copy(converted, tmp_path, {WEIGHT: ms.Tensor(values)})

    assert ms2pt(src, tmp_path / "refused") != 0
    assert f"tensor {WEIGHT} is float16" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    dst = tmp_path / "pt"
    assert ms2pt(src, dst, "--cast-exact") == 0
    got = megatron_weight(dst)
    want = torch.from_numpy(values).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_an_inexact_cast_fails_naming_the_element(converted, tmp_path, capsys):
    shape = weight_shape(converted)
    values = np.full(shape, 0.5, np.float16)
    values.reshape(-1)[5] = 1 + 2 ** -10     # float16 holds it, bfloat16 (8 bits of mantissa) does not
    src = edited_copy(converted, tmp_path, {WEIGHT: ms.Tensor(values)})
    dst = tmp_path / "pt"
    assert ms2pt(src, dst, "--cast-exact") != 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "not exact: element 5 is 1.0009765625" in text and "1 of" in text
    assert MEGATRON_WEIGHT in text
    final = dst / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    assert not final.exists()


def test_unread_tensors_are_refused_or_left_out_when_allowed(converted, tmp_path, capsys):
    src = edited_copy(converted, tmp_path, add={"lora_a.weight": ms.Tensor(np.ones((4, 8), np.float32))})
    dst = tmp_path / "pt"
    assert ms2pt(src, dst) != 0
    err = capsys.readouterr().err
    assert "lora_a.weight" in err and "--allow-extra" in err and "no rule reads back" in err
    assert not dst.exists()

    assert main(["plan", "ms2pt", "--ms-path", str(src), "--megatron-path", str(dst), "--dry-run",
                 "--allow-extra"]) == 0
    assert "note: " in (text := capsys.readouterr().out) and "left out (--allow-extra): lora_a.weight" in text

    assert ms2pt(src, dst, "--allow-extra") == 0
    # everything else comes back as it was: the round trip is byte-identical to the source
    for name in ("model_optim_rng.pt", "distrib_optim.pt"):
        assert filecmp.cmp(dst / "iter_0000001" / "mp_rank_00" / name,
                           fixture_dir(FIXTURE) / "iter_0000001" / "mp_rank_00" / name, shallow=False), name
