"""pickle_delta: a pickle that differs from one already read only in plain numbers is read from that
one's tree — and only then. Truth: the stock unpickler (pickle.loads / torch.load) of each pickle."""

import argparse
import glob
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptmap.formats import pickle_delta, torch_zip_reader
from ckptmap.formats.torch_zip_reader import TorchZipFile

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def _read(first_obj, second_obj, protocol=2):
    """(patched tree of the second pickle or None, stock unpickle of the second, first tree)."""
    first, second = pickle.dumps(first_obj, protocol=protocol), pickle.dumps(second_obj, protocol=protocol)
    assert len(first) == len(second)
    root = pickle.loads(first)
    slots = pickle_delta.scalar_slots(first)
    assert slots is not None
    return pickle_delta.patched(root, slots, first, second), pickle.loads(second), root


def _tree(rank, lr, step, pair_end, listed):
    return {"args": argparse.Namespace(rank=rank, lr=lr, name="gpt", sizes=[8, 2]),
            "iteration": step, "nested": {"pair": (1, pair_end), "listed": [4, listed, "x"]},
            "model": {"w": [1.0, 2.0]}}


@pytest.mark.parametrize("protocol", [2, 4])
def test_numbers_in_plain_places_are_read_from_the_first_tree(protocol):
    """args.rank, a float arg, a top-level int, a tuple item and a list item differ: the tree read from
    the first one's equals the second pickle's own, and what did not change is the first one's objects."""
    got, want, first = _read(_tree(3, 0.5, 7, 2, 5), _tree(200, -1.25, 9, 3, 6), protocol)
    assert got == want and got["args"].rank == 200 and got["nested"]["pair"] == (1, 3)
    assert type(got["args"]) is argparse.Namespace and type(got["nested"]["pair"]) is tuple
    assert got["model"] is first["model"] and got["args"].sizes is first["args"].sizes
    assert first == _tree(3, 0.5, 7, 2, 5)   # the first tree is not changed
    same, _, first = _read(_tree(3, 0.5, 7, 2, 5), _tree(3, 0.5, 7, 2, 5), protocol)
    assert same is first


class Opaque:
    def __init__(self, x):
        self.x = x


def _shared_and_constructed(n):
    t = [1, n]
    return {"a": t, "s": slice(0, t)}   # the shared list is also a constructor's argument


@pytest.mark.parametrize("make", [
    pytest.param(lambda n: {n: "key"}, id="dict key"),
    pytest.param(lambda n: {"a": 5, n: "key"}, id="dict key right after a slot"),
    pytest.param(lambda n: {"s": slice(1, n)}, id="constructor argument"),
    pytest.param(lambda n: {"c": complex(n, 1)}, id="constructor argument (complex)"),
    pytest.param(lambda n: {"o": Opaque(n)}, id="state of another class"),
    pytest.param(_shared_and_constructed, id="a shared container also fed to a constructor"),
    pytest.param(lambda n: {"big": n * 10 ** 12}, id="a long int (LONG1)"),
])
def test_numbers_feeding_anything_else_are_not_read_from_the_first_tree(make):
    first, second = pickle.dumps(make(5), protocol=2), pickle.dumps(make(6), protocol=2)
    if len(first) != len(second):
        pytest.skip("different lengths")   # never compared
    slots = pickle_delta.scalar_slots(first)
    assert slots is None or pickle_delta.patched(pickle.loads(first), slots, first, second) is None


def _shared_args(rank, local):
    args = argparse.Namespace(rank=rank, local_rank=local, sizes=[8, 2])
    pair = (1, rank)
    # pt_meta's shape: the args Namespace at the top and inside a skeleton; a tuple and a list twice
    return {"args": args, "skeleton": {"args": args, "pair": pair, "iteration": 3}, "pairs": [pair, pair],
            "rows": [args.sizes, args.sizes]}


@pytest.mark.parametrize("protocol", [2, 4])
def test_numbers_below_shared_containers_keep_them_shared(protocol):
    """A Namespace, a tuple and a list the tree holds in two places each, with numbers that differ below
    them: the tree read from the first one's equals the second's own, and each shared container is still
    one object in all its places (as the unpickler makes it: a re-pickle gives the same bytes)."""
    got, want, first = _read(_shared_args(300, 2), _shared_args(301, 5), protocol)
    assert got == want and got["args"].rank == 301 and got["skeleton"]["pair"] == (1, 301)
    assert got["args"] is got["skeleton"]["args"] and type(got["args"]) is argparse.Namespace
    assert got["pairs"][0] is got["pairs"][1] is got["skeleton"]["pair"]
    assert got["args"].sizes is first["args"].sizes   # unchanged below: the first tree's objects
    assert pickle.dumps(got, protocol=protocol) == pickle.dumps(want, protocol=protocol)
    assert first == _shared_args(300, 2)


@pytest.mark.parametrize("first_args, second_args", [((1, 2), (4, 2)), ((1, 2), (1, 3))])
def test_a_namespace_built_twice_is_not_followed(first_args, second_args):
    """BUILD twice on one Namespace (hand-made; the later state wins): neither state's numbers are
    slots, so a change in either is read by unpickling."""
    def made(a, b):
        state = lambda v: b"}X\x01\x00\x00\x00xK" + bytes([v]) + b"s"   # noqa: E731  {'x': v}
        return b"\x80\x02cargparse\nNamespace\n)\x81" + state(a) + b"b" + state(b) + b"b."
    first, second = made(*first_args), made(*second_args)
    assert pickle.loads(first).x == first_args[1] and pickle.loads(second).x == second_args[1]
    slots = pickle_delta.scalar_slots(first)
    assert slots is None or pickle_delta.patched(pickle.loads(first), slots, first, second) is None


def test_tensor_views_are_never_taken_from_another_file(tmp_path):
    """Two torch files of one layout whose pickles differ in a view's storage offset (a tensor rebuild's
    argument) and in a plain int: read inside shared_trees, the second still gets its own offset and
    its own int, as torch.load does."""
    base = torch.arange(8.0)
    paths = []
    for i, (start, rank) in enumerate([(1, 3), (2, 4)]):
        (tmp_path / f"r{i}").mkdir()   # one file name: one archive prefix, as a stage's rank files
        paths.append(tmp_path / f"r{i}" / "model_optim_rng.pt")
        torch.save({"w": base[start:start + 4], "rank": rank}, paths[-1])
    assert paths[0].stat().st_size == paths[1].stat().st_size
    followed = []
    real = pickle_delta.scalar_slots
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pickle_delta, "scalar_slots", lambda data: followed.append(1) or real(data))
        with torch_zip_reader.shared_trees({}):
            files = [TorchZipFile(p) for p in paths]
    assert followed == [1]   # the second was compared with the first (a near candidate), and not read from it
    for f, p in zip(files, paths):
        want = torch.load(p)
        assert f.root["rank"] == want["rank"] and f.root["w"].storage_offset == want["w"].storage_offset()
        assert np.array_equal(f.array(f.root["w"]), want["w"].numpy())


def _plain(ns) -> dict:
    return {k: v for k, v in vars(ns).items() if v is None or type(v) in (int, float, str, bool)}


def _read_in_order(files) -> tuple[list, list]:
    """(the trees of ``files`` read in order inside one shared_trees, the paths that were unpickled)."""
    unpickled = []
    real = torch_zip_reader._unpickle

    def counting(archive, *a, **kw):
        unpickled.append(archive.path)
        return real(archive, *a, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_zip_reader, "_unpickle", counting)
        with torch_zip_reader.shared_trees({}):
            return [TorchZipFile(f).root for f in files], unpickled


def test_real_megatron_rank_files_read_from_their_stage_neighbours():
    """Megatron core_r0.6.0 TP ranks of a stage write pickles of one length differing in args.rank: read
    in order inside shared_trees, each file after the first of its stage is read from that one's tree
    (not unpickled), and its args and step values are those torch.load gives."""
    files = sorted(glob.glob(str(FIXTURES / "megatron-r0.6.0/legacy_tp2pp2dp2/iter_*/mp_rank_*/model_optim_rng.pt")),
                   key=lambda f: (Path(f).parent.name.split("_")[3], f))   # stage first: mp_rank_TT_PPP
    assert len(files) == 4
    roots, unpickled = _read_in_order(files)
    assert len(unpickled) == 2, unpickled   # one per stage
    for root, f in zip(roots, files):
        want = torch.load(f, map_location="cpu", weights_only=False)
        assert _plain(root["args"]) == _plain(want["args"]) and root["iteration"] == want["iteration"]
        assert root["args"].rank == want["args"].rank
    assert sorted(r["args"].rank for r in roots) == [0, 1, 4, 5]


def test_pt_meta_files_of_a_stage_read_from_their_neighbour(tmp_path):
    """pt2ms's pt_meta files of one pipeline stage (archive prefixes args_tp00_pp000/ and args_tp01_pp000/,
    one per file; the args Namespace held twice: at the top and in the skeleton) differ in args.rank and
    local_rank: read in stage order inside shared_trees, one file per stage is unpickled and every tree
    is what torch.load gives — args values and the one Namespace in both places."""
    from ckptmap.cli import main
    ms = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(FIXTURES / "megatron-r0.6.0/legacy_tp2pp2dp2"), "--ms-path", str(ms),
                 "--no-progress"]) == 0
    files = sorted((ms / "pt_meta").glob("args_tp*_pp*.pt"), key=lambda f: (f.stem.split("_")[2], f.stem))
    assert [f.stem for f in files] == ["args_tp00_pp000", "args_tp01_pp000", "args_tp00_pp001", "args_tp01_pp001"]
    roots, unpickled = _read_in_order(files)
    assert [Path(p).stem for p in unpickled] == ["args_tp00_pp000", "args_tp00_pp001"]
    for root, f in zip(roots, files):
        want = torch.load(f, map_location="cpu", weights_only=False)
        assert root["args"] is root["ckptmap"]["model_optim_rng"]["args"]
        assert want["args"] is want["ckptmap"]["model_optim_rng"]["args"]
        assert _plain(root["args"]) == _plain(want["args"]) and root["iteration"] == want["iteration"]
    assert [r["args"].rank for r in roots] == [0, 1, 4, 5]   # TP 2 x DP 2: the stages start at ranks 0 and 4


def test_a_file_read_twice_in_a_row_is_patched_once(tmp_path, monkeypatch):
    """ms2pt writes a rank's two Megatron files from one pt_meta file, read once for each: the second read
    of the same bytes gets the tree the first one made from the template (patched once), and its values
    are still what torch.load gives."""
    from ckptmap.cli import main
    ms = tmp_path / "ms"
    assert main(["pt2ms", "--megatron-path", str(FIXTURES / "megatron-r0.6.0/legacy_tp2pp2dp2"), "--ms-path", str(ms),
                 "--no-progress"]) == 0
    first, second = ms / "pt_meta" / "args_tp00_pp001.pt", ms / "pt_meta" / "args_tp01_pp001.pt"
    patched = []
    real = pickle_delta.patched_at
    monkeypatch.setattr(pickle_delta, "patched_at", lambda *a: patched.append(1) or real(*a))
    roots, unpickled = _read_in_order([first, second, second])
    assert [Path(p).stem for p in unpickled] == ["args_tp00_pp001"]
    assert roots[2] is roots[1] and roots[1] is not roots[0] and len(patched) == 1
    want = torch.load(second, map_location="cpu", weights_only=False)
    assert _plain(roots[2]["args"]) == _plain(want["args"]) and roots[2]["args"].rank == 5


def test_a_file_differing_in_many_bytes_is_unpickled_without_following(tmp_path):
    """Following a pickle's opcodes costs more than unpickling it: a file whose pickle differs from the
    template's in more bytes than a few numbers (another stage's RNG state) is unpickled at once; the
    next file, differing from it in one number, is read from its tree. Values as torch.load gives."""
    paths = []
    for i, (base, rank) in enumerate([(1000, 3), (2000, 3), (2000, 4)]):
        (tmp_path / f"r{i}").mkdir()
        paths.append(tmp_path / f"r{i}" / "model_optim_rng.pt")
        torch.save({"rng": tuple(range(base, base + 100)), "rank": rank, "w": torch.zeros(2)}, paths[-1])
    assert len({p.stat().st_size for p in paths}) == 1
    followed, unpickled = [], []
    real_follow, real_unpickle = pickle_delta.scalar_slots, torch_zip_reader._unpickle
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pickle_delta, "scalar_slots", lambda data: followed.append(1) or real_follow(data))
        mp.setattr(torch_zip_reader, "_unpickle", lambda a, *x, **k: unpickled.append(a.path) or real_unpickle(a, *x, **k))
        with torch_zip_reader.shared_trees({}):
            roots = [TorchZipFile(p).root for p in paths]
    assert followed == [1] and [Path(p).parent.name for p in unpickled] == ["r0", "r1"]
    for root, p in zip(roots, paths):
        want = torch.load(p)
        assert root["rng"] == want["rng"] and root["rank"] == want["rank"]
