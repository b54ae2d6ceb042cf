"""pt2ms on edited copies of real fixtures: tied embeddings, stand-in args, and bad input
(clear error, exit code 2, nothing written under --ms-path)."""

import os
import pickle
import pickletools
import shutil
import sys
import textwrap

import mindspore as ms
import numpy as np
import pytest
import torch

from ckptmap.cli import main
from conftest import fixture_dir


def copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(fixture_dir(name), dst, ignore=shutil.ignore_patterns("truth"))
    return dst


def run(argv, capsys):
    code = main(argv + ["--no-progress"])
    return code, capsys.readouterr().err


def test_tied_embeddings_with_pp(tmp_path, capsys):
    """Megatron with tied embeddings and PP > 1 saves the last stage's copy as
    word_embeddings_for_head (and no output_layer); MindSpore calls it word_embeddings.weight."""
    ck = copy_fixture("legacy_tp2pp2dp2", tmp_path)
    heads = {}
    for tp in range(2):
        first = torch.load(ck / f"iter_0000001/mp_rank_{tp:02d}_000/model_optim_rng.pt", weights_only=False)
        last_path = ck / f"iter_0000001/mp_rank_{tp:02d}_001/model_optim_rng.pt"
        last = torch.load(last_path, weights_only=False)
        del last["model"]["language_model"]["output_layer"]
        head = first["model"]["language_model"]["embedding"]["word_embeddings"]["weight"].clone() + 1
        last["model"]["word_embeddings_for_head"] = {"weight": head}
        torch.save(last, last_path)
        heads[tp] = head
    out = tmp_path / "ms"
    code, err = run(["pt2ms", "--megatron-path", str(ck), "--ms-path", str(out), "--convert-param-only"], capsys)
    assert code == 0, err
    for tp in range(2):
        last = ms.load_checkpoint(str(out / f"rank_{1 * 2 * 2 + tp}" / "network.ckpt"))
        assert "language_model.output_layer.weight" not in last
        got = last["word_embeddings.weight"].asnumpy()
        assert np.array_equal(got, heads[tp].float().numpy())
        first = ms.load_checkpoint(str(out / f"rank_{tp}" / "network.ckpt"))
        assert "language_model.embedding.word_embeddings.weight" in first


FAKE_MODULE = textwrap.dedent("""
    import enum
    class Kind(enum.Enum):
        a = 1
        b = 2
    class Settings:
        def __init__(self, x):
            self.x = x
        def __eq__(self, other):
            return type(other) is Settings and other.x == self.x
""")


def test_args_with_unimportable_object_converts_and_repickles(tmp_path, capsys):
    ck = copy_fixture("legacy_tp1pp1dp1", tmp_path)
    moddir = tmp_path / "mods"
    (moddir / "ckptmap_fake_pkg").mkdir(parents=True)
    (moddir / "ckptmap_fake_pkg" / "__init__.py").write_text("")
    (moddir / "ckptmap_fake_pkg" / "config.py").write_text(FAKE_MODULE)
    sys.path.insert(0, str(moddir))
    try:
        import ckptmap_fake_pkg.config as fake
        path = ck / "iter_0000001/mp_rank_00/model_optim_rng.pt"
        state = torch.load(path, weights_only=False)
        state["args"].kind = fake.Kind.b
        state["args"].settings = fake.Settings([1, 2])
        torch.save(state, path)
    finally:
        sys.path.remove(str(moddir))
        for m in [m for m in sys.modules if m.startswith("ckptmap_fake_pkg")]:
            del sys.modules[m]
    out = tmp_path / "ms"
    code, err = run(["pt2ms", "--megatron-path", str(ck), "--ms-path", str(out), "--convert-param-only"], capsys)
    assert code == 0, err
    meta = out / "pt_meta" / "args_tp00_pp000.pt"
    import zipfile
    with zipfile.ZipFile(meta) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    globals_ = {arg for op, arg, _ in pickletools.genops(pkl) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    assert "ckptmap_fake_pkg.config Kind" in globals_ and "ckptmap_fake_pkg.config Settings" in globals_
    assert "megatron.core.enums ModelType" in globals_
    sys.path.insert(0, str(moddir))
    try:
        import ckptmap_fake_pkg.config as fake
        back = torch.load(meta, weights_only=False)
        assert back["args"].kind is fake.Kind.b
        assert back["args"].settings == fake.Settings([1, 2])
        assert back["iteration"] == 1 and back["args"].num_layers == 4
        assert "param_name_list" in back
    finally:
        sys.path.remove(str(moddir))
        for m in [m for m in sys.modules if m.startswith("ckptmap_fake_pkg")]:
            del sys.modules[m]


def assert_refused(tmp_path, capsys, argv, *words):
    out = tmp_path / "ms_out"
    code, err = run(["pt2ms", "--ms-path", str(out), "--convert-param-only"] + argv, capsys)
    assert code == 2
    assert err.startswith("ckptmap pt2ms: error: ") and err.count("\n") == 1, err  # one paragraph
    for w in words:
        assert w in err, err
    assert not out.exists()
    return err


def test_path_missing(tmp_path, capsys):
    assert_refused(tmp_path, capsys, ["--megatron-path", str(tmp_path / "nope")], "does not exist")


def test_no_mp_rank_dirs(tmp_path, capsys):
    empty = tmp_path / "iter_0000005"
    empty.mkdir()
    assert_refused(tmp_path, capsys, ["--megatron-path", str(empty)], "no mp_rank_* directories", str(empty))


def test_sizes_disagree_with_directories(tmp_path, capsys):
    fx = str(fixture_dir("legacy_tp2pp2dp2"))
    assert_refused(tmp_path, capsys, ["--megatron-path", fx, "--tp-size", "4"], "--tp-size 4", "folders for TP 2")
    assert_refused(tmp_path, capsys, ["--megatron-path", fx, "--pp-size", "1"], "--pp-size 1", "folders for PP 2")


def test_layers_inconsistent(tmp_path, capsys):
    fx = str(fixture_dir("legacy_tp2pp2dp2"))
    assert_refused(tmp_path, capsys, ["--megatron-path", fx, "--num-layers", "6"], "expects 3 layers",
                   "--num-layers")
    assert_refused(tmp_path, capsys, ["--megatron-path", fx, "--stage-list", "1", "3"], "--stage-list 1 3",
                   "holds local layers 0..1")
    assert_refused(tmp_path, capsys, ["--megatron-path", fx, "--num-layers", "4", "--noop", "9"], "--noop")


def test_tensor_without_rule_is_listed(tmp_path, capsys):
    rules = tmp_path / "partial.rules"
    from ckptmap.mapping.rules import bundled_rules
    full = bundled_rules()["megatron_legacy_gpt"].read_text()
    start = full.index("param language_model.encoder.final_norm")
    end = full.index("# Untied output layer")
    rules.write_text(full[:start] + full[end:])
    err = assert_refused(tmp_path, capsys, ["--megatron-path", str(fixture_dir("legacy_tp1pp1dp1")),
                                            "--rules", str(rules)],
                         "no rule in", "language_model.encoder.final_norm.weight", "nothing was written")
    assert "layers.0" not in err


def test_truncated_pt(tmp_path, capsys):
    ck = copy_fixture("legacy_tp1pp1dp1", tmp_path)
    path = ck / "iter_0000001/mp_rank_00/model_optim_rng.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path, capsys, ["--megatron-path", str(ck)], str(path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ.get("CKPTMAP_EVIL_MARKER", "/tmp/ckptmap-pwned"),))


def test_pickle_that_executes_code(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CKPTMAP_EVIL_MARKER", str(marker))
    ck = copy_fixture("legacy_tp1pp1dp1", tmp_path)
    path = ck / "iter_0000001/mp_rank_00/model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["args"].hook = _Evil()
    torch.save(state, path)
    assert_refused(tmp_path, capsys, ["--megatron-path", str(ck)], str(path), "system")
    assert not marker.exists()


@pytest.mark.parametrize("extra, flags, words", [
    ("mp_rank_02", [], ["TP size disagrees", "folders for TP 3", "args of 3 rank(s) say 2"]),
    (None, ["--tp-size", "4"], ["TP size disagrees", "--tp-size 4 was given"]),
])
def test_folders_args_and_flags_must_agree(tmp_path, capsys, extra, flags, words):
    """A folder copied in from elsewhere (folders say TP 3, every args says TP 2), or a flag that
    contradicts both, is refused with all three named — never converted."""
    from ckptmap.demo import DemoModel, build_megatron_checkpoint
    root = tmp_path / "megatron"
    build_megatron_checkpoint(root, DemoModel(tp=2, pp=1, dp=1, layers=2, hidden=16, heads=2, groups=2, kv=8, ffn=24,
                                              vocab=64), iteration=3, keep_truth=False)
    if extra:
        shutil.copytree(root / "iter_0000003" / "mp_rank_01", root / "iter_0000003" / extra)
    assert main(["pt2ms", "--megatron-path", str(root), "--ms-path", str(tmp_path / "ms"), "--no-progress",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "ms").exists()
