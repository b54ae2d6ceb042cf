"""`import ckptmap.hooks.megatron` against the real megatron-core 0.6.0 (DDP buffers,
DistributedOptimizer save/load, in-process over gloo through tests/mcore_harness).

Truth is always the live Megatron objects the harness reports (ParamAndGradBuffer.param_index_map,
parameter shapes and dtypes, the optimizer state stitched from every rank), never ckptmap's output.
``megatron.training`` (Megatron-LM's tree; not in the wheel) is emulated by the test-only package
tests/fake_megatron_training: ``get_args()`` and ``checkpointing.save_checkpoint`` with Megatron-LM's
signature."""
import functools
import json
import shutil

import numpy as np
import pytest

from ckptmap.cli import main
from ckptmap.errors import CkptmapError
from ckptmap.formats import param_map
from ckptmap.mapping.buckets import ParamSlot
from mcore_harness import Case, HarnessError, run_case

ITER = "iter_0000001"
STATES = ("param", "exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------- what every rank runs


def hook_setup(rank, out_dir, case, save_dir=None, load_check=None, check_install=False):
    """Runs in each rank before the model exists: the one line a training script adds."""
    import ckptmap.hooks.megatron as hook  # noqa: F401 - the import installs the hooks
    if check_install:
        _check_install_is_idempotent(hook)
    if save_dir is not None:
        hook.configure(save_dir=save_dir)
    if load_check is not None:
        hook.configure(load_check=load_check)


def _check_install_is_idempotent(hook):
    import importlib
    import inspect

    import megatron.training.checkpointing as checkpointing
    import megatron.training.training as training
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    wrapped = DDP.__init__
    original = wrapped.__wrapped__
    assert wrapped._ckptmap_hook and not getattr(original, "_ckptmap_hook", False)
    assert inspect.signature(wrapped) == inspect.signature(original)  # the constructor's signature is kept
    assert "bucket_size" in inspect.signature(wrapped).parameters
    importlib.import_module("ckptmap.hooks.megatron")  # importing again installs nothing more
    assert hook.install() and DDP.__init__ is wrapped
    assert DistributedOptimizer.load_parameter_state._ckptmap_hook
    assert checkpointing.save_checkpoint._ckptmap_hook
    assert training.save_checkpoint is checkpointing.save_checkpoint   # the by-name import is rebound
    hook.uninstall()
    assert DDP.__init__ is original and not hasattr(DistributedOptimizer.load_parameter_state, "_ckptmap_hook")
    assert not hasattr(checkpointing.save_checkpoint, "_ckptmap_hook")
    assert training.save_checkpoint is checkpointing.save_checkpoint
    assert hook.install() and DDP.__init__.__wrapped__ is original
    assert not getattr(DDP.__init__.__wrapped__, "_ckptmap_hook", False)
    try:
        hook.configure(load_check="strict")
    except CkptmapError as e:
        assert "'layout', 'exact', 'off'" in str(e)
    else:
        raise AssertionError("configure accepted an unknown load_check")


# ------------------------------------------------------------------------------------- the runs

SAVE_CASES = {
    "dp1": Case(dp=1),
    "dp2_buckets": Case(dp=2, hidden=17, ffn=33, overlap_grad_reduce=True, bucket_size=300, seed=3),
    "dp2cp2_buckets": Case(dp=2, cp=2, hidden=17, overlap_grad_reduce=True, bucket_size=300, seed=11),
    "dp3_chunks2": Case(dp=3, num_layers=4, chunks=2, hidden=12, overlap_grad_reduce=True, bucket_size=200,
                        swiglu=True, bias=False, seed=5),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(key):
        if key not in cache:
            out = tmp_path_factory.mktemp(key) / "save"
            setup = functools.partial(hook_setup, check_install=(key == "dp1"))
            cache[key] = (SAVE_CASES[key], out, run_case(SAVE_CASES[key], out, rank_setup=setup,
                                                         megatron_training=True))
        return cache[key]

    return get


def _patch_file_names(dp, n_chunks, n_buffers=1):
    """The names the MindSpeed param_map.patch gives (formats.md §1.4), tp = pp = 0 here."""
    return {f"param_map_buffer{b}_dp{d}tp0pp0vpp{v}.json"
            for d in range(dp) for v in range(n_chunks) for b in range(n_buffers)}


def assert_param_maps_are_live_layout(directory, case, truth):
    n_chunks = len(truth["chunks"])
    assert {p.name for p in directory.iterdir()} == _patch_file_names(case.dp, n_chunks)  # no temp files left
    for v, chunk in enumerate(truth["chunks"]):
        assert len(chunk["param_index_map"]) == 1   # one dtype: buffer 0 only
        live = chunk["param_index_map"][0]
        texts = {(directory / f"param_map_buffer0_dp{d}tp0pp0vpp{v}.json").read_text() for d in range(case.dp)}
        assert len(texts) == 1                       # every DP rank wrote the same file
        text = texts.pop()
        data = json.loads(text)
        assert text == json.dumps(data)              # the patch's compact json.dumps form
        assert list(data) == list(live)              # names (with module.) in buffer order
        assert all(name.startswith("module.") for name in data)
        for name, (dtype, shape, start, end, bucket) in data.items():
            assert dtype == "torch." + chunk["param_dtype"][name] == "torch.bfloat16"
            assert tuple(shape) == chunk["shapes"][name]
            assert (start, end, bucket) == live[name], name


@pytest.mark.parametrize("key", list(SAVE_CASES))
def test_param_maps_equal_live_buffers(saved, key):
    case, out, truth = saved(key)
    assert truth["warnings"] == []
    # at DDP construction, into <--save>/param_map, as the patch did
    assert_param_maps_are_live_layout(out / "param_map", case, truth)
    # at save_checkpoint, into the iteration directory that Megatron's save wrote
    assert_param_maps_are_live_layout(out / ITER / "param_map", case, truth)
    assert (out / ITER / "mp_rank_00" / "distrib_optim.pt").is_file()
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_vpp_chunks_and_buckets_are_real(saved):
    """The two-chunk case really has two chunks with different parameters, and bucketing only in
    chunk 0 (Megatron's get_model disables it from chunk 1 on)."""
    case, _, truth = saved("dp3_chunks2")
    c0, c1 = truth["chunks"]
    assert "module.embedding.word_embeddings.weight" in c0["shapes"] and "module.output_layer.weight" in c1["shapes"]
    assert len(c0["bucket_indices"][0]) > 1 and len(c1["bucket_indices"][0]) == 1
    assert truth["buffer_chunk"] == [0, 1]


def test_second_run_into_same_save_keeps_chunk_numbers(saved, tmp_path):
    """The patch counted the files already in param_map/ to number chunks; a second run into the
    same --save would have written vpp2, vpp3. The hook takes the real chunk index."""
    case, out, _ = saved("dp3_chunks2")
    again = tmp_path / "save"
    shutil.copytree(out, again)
    before = {p.name: p.read_bytes() for p in (again / "param_map").iterdir()}
    truth = run_case(case, again, rank_setup=hook_setup, megatron_training=True)
    after = {p.name: p.read_bytes() for p in (again / "param_map").iterdir()}
    assert set(after) == set(before) == _patch_file_names(case.dp, 2)
    assert after == before
    assert_param_maps_are_live_layout(again / "param_map", case, truth)
    assert_param_maps_are_live_layout(again / ITER / "param_map", case, truth)


def test_pt2ms_uses_the_iteration_directorys_param_map(saved, tmp_path, capsys):
    import mindspore as ms

    case, out, truth = saved("dp2_buckets")
    assert len(truth["bucket_indices"][0]) > 1 and truth["per_bucket_numel"] != truth["per_bucket_numel_unpadded"]
    # only the iteration directory: no <save>/param_map to fall back on
    src = tmp_path / "megatron"
    shutil.copytree(out / ITER, src / ITER)
    shutil.copy(out / "latest_checkpointed_iteration.txt", src)
    ms_dir = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(ms_dir), "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "bucket_layout param_map" in report and f"param_maps {case.dp}" in report
    assert (ms_dir / "pt_meta" / "param_map_buffer0_dp0tp0pp0vpp0.json").read_bytes() == \
        (out / ITER / "param_map" / "param_map_buffer0_dp0tp0pp0vpp0.json").read_bytes()
    got = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(ms_dir / "rank_0" / "network.ckpt")).items()}
    for ddp_name, states in truth["live"].items():
        name = ddp_name[len("module."):]
        for state, prefix in zip(STATES, ("", "exp_avg.", "exp_avg_sq.")):
            want = states[state].numpy()
            assert np.array_equal(got[prefix + name].view(np.uint32), want.view(np.uint32)), (state, name)


def test_configure_save_dir_without_megatron_training(tmp_path):
    """The megatron-core wheel has no megatron.training: configure(save_dir=...) gives --save; the
    files are written at construction, none into iter_* (no save_checkpoint to wrap)."""
    case = Case(dp=8, hidden=17, seed=9)   # the one dp-8 run
    out = tmp_path / "save"
    truth = run_case(case, out, rank_setup=functools.partial(hook_setup, save_dir=str(out)))
    assert truth["warnings"] == []
    assert_param_maps_are_live_layout(out / "param_map", case, truth)
    assert (out / ITER / "mp_rank_00" / "distrib_optim.pt").is_file() and not (out / ITER / "param_map").exists()


@pytest.mark.parametrize("training", [True, False], ids=["megatron_training", "wheel"])
def test_no_save_dir_warns_and_writes_nothing(tmp_path, training):
    out = tmp_path / "save"
    # with megatron.training: get_args().save is None and nothing is saved; with the wheel: the
    # harness saves its checkpoint, but the hook was never told where --save is
    truth = run_case(Case(dp=2), out, save=not training, rank_setup=hook_setup, megatron_training=training)
    assert any("no --save directory is known" in w for w in truth["warnings"]), truth["warnings"]
    assert truth["live"]  # trained and finished: no crash
    assert not list(tmp_path.rglob("param_map*"))


# ------------------------------------------------------------------------------------------ load


def _assert_same_state(loaded, truth):
    for name, states in truth["live"].items():
        for state in STATES:
            assert np.array_equal(loaded["live"][name][state].numpy().view(np.uint32),
                                  states[state].numpy().view(np.uint32)), (state, name)


def _first_difference(saved_map, live_map, absolute):
    """First parameter (buffer order) whose record differs between two real param_index_maps."""
    def rel(m):
        base = {}
        for s, _, b in m.values():
            base[b] = 0 if absolute else min(s, base.get(b, s))
        return [(n, (s - base[b], e - base[b], b)) for n, (s, e, b) in m.items()]
    for (n1, r1), (n2, r2) in zip(rel(saved_map), rel(live_map)):
        if n1 != n2 or r1 != r2:
            return n1
    return None


def test_load_accepts_the_matching_checkpoint(saved, tmp_path):
    case, out, truth = saved("dp2_buckets")
    loaded = run_case(case, tmp_path / "unused", load_from=out / ITER / "mp_rank_00" / "distrib_optim.pt",
                      rank_setup=hook_setup, megatron_training=True)
    _assert_same_state(loaded, truth)


def test_load_with_another_dp_size(saved, tmp_path):
    """Saved with dp 2, loaded with dp 3: the bucket padding (and so every absolute offset after the
    first bucket) changes, but megatron-core 0.6 moves whole buckets and cuts parameters at
    bucket-relative offsets — the real load_parameter_state restores every value exactly. The
    default check ('exact') refuses it, naming the first parameter whose recorded offsets moved;
    load_check='layout' lets it load."""
    case, out, truth = saved("dp2_buckets")
    dp3 = Case(**{**case.__dict__, "dp": 3})
    ckpt = out / ITER / "mp_rank_00" / "distrib_optim.pt"
    loaded = run_case(dp3, tmp_path / "unused", load_from=ckpt, megatron_training=True,
                      rank_setup=functools.partial(hook_setup, load_check="layout"))
    _assert_same_state(loaded, truth)
    shifted = _first_difference(truth["param_index_map"][0], loaded["param_index_map"][0], absolute=True)
    assert shifted is not None   # the padding really differs between dp 2 and dp 3 here
    assert _first_difference(truth["param_index_map"][0], loaded["param_index_map"][0], absolute=False) is None

    with pytest.raises(HarnessError) as err:
        run_case(dp3, tmp_path / "unused2", load_from=ckpt, megatron_training=True, rank_setup=hook_setup)
    text = str(err.value)
    assert "CkptmapError" in text and "refusing to load" in text
    assert "saved with data-parallel size 2, this run has 3" in text
    assert shifted in text   # the first parameter whose absolute offsets moved with the padding
    # what is true: megatron-core 0.6 loads it correctly, the refusal is the 'exact' policy's
    assert "one parameter into another" not in text and "would put" not in text
    assert "loads correctly" in text and "load_check='layout'" in text


def test_load_refuses_another_model_that_megatron_would_load_silently(saved, tmp_path):
    """A model with other shapes but the same bucket sizes: Megatron's own check (unpadded bucket
    sizes) passes and it loads shifted values without a word; the hook refuses, naming the first
    differing parameter."""
    case, out, truth = saved("dp1")
    other = Case(dp=1, ffn=8, vocab=70)   # 66 * ffn + 32 * vocab elements unchanged (2 layers, hidden 16)
    ckpt = out / ITER / "mp_rank_00" / "distrib_optim.pt"
    silent = run_case(other, tmp_path / "unused", load_from=ckpt)     # no hook: Megatron loads it
    assert silent["per_bucket_numel_unpadded"] == truth["per_bucket_numel_unpadded"]
    first = _first_difference(truth["param_index_map"][0], silent["param_index_map"][0], absolute=True)
    assert first == "module.output_layer.weight"
    with pytest.raises(HarnessError) as err:
        run_case(other, tmp_path / "unused2", load_from=ckpt, rank_setup=hook_setup, megatron_training=True)
    text = str(err.value)
    assert f"refusing to load {ckpt}" in text and f"first differ at parameter {first} " in text
    assert f"torch.bfloat16 {list(truth['shapes'][first])}" in text
    assert f"torch.bfloat16 {list(silent['shapes'][first])}" in text
    assert "param_map_buffer0_dp0tp0pp0vpp0.json" in text
    assert "megatron-core's own check compares only the per-bucket sizes" in text


def umask_setup(rank, out_dir, case, umask):
    """A training script that sets its umask after the hook's import (which imports ckptmap.atomic)."""
    import os

    import ckptmap.hooks.megatron  # noqa: F401
    os.umask(umask)


def test_param_map_files_get_plain_file_permissions_under_the_umask(tmp_path):
    """Others sharing the checkpoint read the param_map like any file the run writes: mode 0666 minus
    the umask in effect when the file is written (0644 under the usual 022; 0640 under 027)."""
    import stat

    out = tmp_path / "save"
    run_case(Case(dp=2), out, rank_setup=functools.partial(umask_setup, umask=0o027), megatron_training=True)
    files = sorted((out / "param_map").iterdir()) + sorted((out / ITER / "param_map").iterdir())
    assert len(files) == 4
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o640)}


# ------------------------------------------------------------------- format functions, in process


def _slots(*rows):
    return [ParamSlot(n, "bfloat16", shape, s, e, b) for n, shape, s, e, b in rows]


def test_write_param_map_is_atomic_and_reads_back(tmp_path):
    slots = _slots(("module.b", (3,), 0, 3, 0), ("module.a", (2, 2), 3, 7, 0), ("module.c", (5,), 8, 13, 1))
    path = param_map.write_param_map(tmp_path / "d" / param_map.param_map_file_name(0, 1, 2, 3, 4), slots)
    assert path.name == "param_map_buffer0_dp1tp2pp3vpp4.json"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert path.read_text() == ('{"module.b": ["torch.bfloat16", [3], 0, 3, 0], "module.a": ["torch.bfloat16", '
                                '[2, 2], 3, 7, 0], "module.c": ["torch.bfloat16", [5], 8, 13, 1]}')
    assert list(param_map.read_param_map(path)) == ["module.b", "module.a", "module.c"]


def test_atomic_files_follow_the_umask_in_effect(tmp_path):
    import os
    import stat

    from ckptmap import atomic

    old = os.umask(0o077)
    try:
        atomic.write_text(tmp_path / "a.json", "{}")
        path = param_map.write_param_map(tmp_path / "d" / param_map.param_map_file_name(0, 0, 0, 0, 0),
                                         _slots(("module.b", (3,), 0, 3, 0)))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_param_map_difference():
    def m(*rows):
        return {n: ("bfloat16", shape, s, e, b) for n, shape, s, e, b in rows}

    saved = m(("a", (4,), 0, 4, 0), ("b", (3,), 4, 7, 0), ("c", (5,), 8, 13, 1), ("d", (2,), 13, 15, 1))
    repadded = m(("a", (4,), 0, 4, 0), ("b", (3,), 4, 7, 0), ("c", (5,), 12, 17, 1), ("d", (2,), 17, 19, 1))
    assert param_map.param_map_difference(saved, dict(saved)) is None
    assert param_map.param_map_difference(saved, repadded) is None                  # only the bucket padding moved
    assert param_map.param_map_difference(saved, repadded, relative=False).saved[0] == "c"
    rebucketed = m(("a", (4,), 0, 4, 0), ("b", (3,), 4, 7, 1), ("c", (5,), 7, 12, 1), ("d", (2,), 12, 14, 1))
    assert param_map.param_map_difference(saved, rebucketed).index == 1             # other bucket size
    reshaped = m(("a", (2, 2), 0, 4, 0), ("b", (3,), 4, 7, 0), ("c", (5,), 8, 13, 1), ("d", (2,), 13, 15, 1))
    assert param_map.param_map_difference(saved, reshaped).live == ("a", ("bfloat16", (2, 2), 0, 4, 0))
    shorter = dict(list(saved.items())[:3])
    diff = param_map.param_map_difference(saved, shorter)
    assert (diff.index, diff.saved[0], diff.live) == (3, "d", None)


def test_importing_the_hooks_package_installs_nothing():
    import sys

    import ckptmap.hooks  # noqa: F401
    assert "ckptmap.hooks.megatron" not in sys.modules or pytest.fail("ckptmap.hooks imported the Megatron hook")

