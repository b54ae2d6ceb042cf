"""ckptmap.hooks.megatron on the real megatron-core 0.8.0 / 0.12.1 / 0.16.1 (``mcore_versions``
runs with the hook imported, ``mcore_versions.hooked``): the param_map files it writes equal the
live ``param_index_map`` of every dense and expert-parallel buffer (64-element gaps as they are),
under the names ckptmap's conversions read; ``ckptmap pt2ms`` with them gives the live optimizer's
values, as with derived layouts; the load check lets the matching checkpoint through (loaded values
= live) and refuses a param_map that does not fit the live buffers before megatron reads a byte."""
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch

from ckptmap.cli import main
from mcore_versions import STANDARD_CASES, VERSIONS, Case, HarnessError, source_hash
from mcore_versions.hooked import run_hooked
from test_versions_legacy import STATES, ms_name, ms_rank

pytestmark = [pytest.mark.mcore_versions, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
ITER = "iter_0000001"
KEYS = [(v, n) for v in VERSIONS for n in STANDARD_CASES]
IDS = [f"{v}-{n}" for v, n in KEYS]


def _hash() -> str:
    h = hashlib.sha256(source_hash().encode())
    for path in sorted((REPO / "tests" / "mcore_versions" / "hooked").glob("*.py")) + [
            REPO / "ckptmap" / "hooks" / "megatron.py", REPO / "ckptmap" / "formats" / "param_map.py"]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def hooked(tmp_path_factory):
    """version -> {case name: (case, save dir, truth)}: both standard cases trained one step with the
    hook active (one launcher per version), cached in <venv>/mcore-cache/hooked-* by harness + hook
    source."""
    import os
    import sys

    env = os.environ.get("MCORE_VERSIONS_CACHE")
    root = tmp_path_factory.mktemp("hooked") if env == "off" else Path(env or Path(sys.prefix) / "mcore-cache")
    made = {}

    def get(version):
        if version in made:
            return made[version]
        d = root / f"hooked-{version}-{_hash()}"
        cases = {n: Case(version=version, **kw) for n, kw in STANDARD_CASES.items()}
        if not (d / "complete.json").exists():
            for stale in root.glob(f"hooked-{version}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            truths = run_hooked(version, [("generate", c, d / n) for n, c in cases.items()])
            for (n, _), t in zip(cases.items(), truths):
                torch.save(t, d / n / "truth.pt")
            (d / "complete.json").write_text(json.dumps({n: t["seconds"] for (n, _), t in zip(cases.items(), truths)}))
        made[version] = {n: (c, d / n / "legacy", torch.load(d / n / "truth.pt", weights_only=False))
                         for n, c in cases.items()}
        return made[version]
    return get


def expected_files(case, truth) -> dict:
    """{file name: (truth buffer, chunk)} by ckptmap's naming (the pt_meta names of
    test_versions_legacy): per chunk dense buffers then expert ones; under EP > 1 ``ep{e}``, dense
    files under ep0 for every data-parallel rank, expert files per expert rank numbered from 0 on
    e > 0, for every expert-data-parallel rank."""
    out = {}
    for (tp, pp, ep), rank in truth["ranks"].items():
        for v, ch in enumerate(rank["chunks"]):
            n_dense = sum(1 for b in ch["buffers"] if b["kind"] == "dense")
            for buf in ch["buffers"]:
                dense = buf["kind"] == "dense"
                number = buf["index"] + (0 if dense or ep > 0 else n_dense)
                tag = "" if case.ep == 1 else f"ep{0 if dense else ep}"
                assert buf["dp_size"] == (case.dp if dense else case.dp // case.ep)
                for d in range(buf["dp_size"]):
                    out[f"param_map_buffer{number}_dp{d}tp{tp}pp{pp}{tag}vpp{v}.json"] = (buf, ch)
    return out


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_param_maps_equal_live_param_index_map(hooked, key):
    version, name = key
    case, save, truth = hooked(version)[name]
    want = expected_files(case, truth)
    assert any("ep1" in f for f in want) == (name == "moe")
    gaps = 0
    for folder in (save / "param_map", save / ITER / "param_map"):   # at construction, and before the save
        assert sorted(p.name for p in folder.iterdir()) == sorted(want), folder
        for fname, (buf, ch) in want.items():
            got = json.loads((folder / fname).read_text())
            live = sorted(buf["param_index_map"].items(), key=lambda kv: kv[1][0])   # buffer order
            assert list(got) == [n for n, _ in live], fname
            for n, (start, end, bucket) in live:
                assert got[n] == ["torch.bfloat16", list(ch["shapes"][n]), start, end, bucket], (fname, n)
            ends = [e for _, (_, e, _) in live]
            gaps += sum(1 for (_, (s, _, _)), e in zip(live[1:], ends) if s != e)   # 0.8+: 64-element alignment
    assert gaps > 0


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_pt2ms_with_the_hooks_param_maps(hooked, key, tmp_path):
    """pt2ms reading the iteration's param_map (the training run's) gives the live values and the
    same files as pt2ms deriving the layout from a copy without it."""
    version, name = key
    case, save, truth = hooked(version)[name]
    bare = tmp_path / "bare"
    shutil.copytree(save, bare, ignore=shutil.ignore_patterns("param_map"))
    for src, out in ((save, tmp_path / "with_map"), (bare, tmp_path / "derived")):
        assert main(["pt2ms", "--megatron-path", str(src), "--ms-path", str(out), "--no-progress"]) == 0
    hook_maps = save / ITER / "param_map"
    for out in ("with_map", "derived"):   # the training run's files, no more (an expert buffer: one per expert-DP rank)
        assert sorted(p.name for p in (tmp_path / out / "pt_meta").glob("param_map_*.json")) == \
            sorted(p.name for p in hook_maps.iterdir()), out
    for pm in (tmp_path / "with_map" / "pt_meta").glob("param_map_*.json"):
        if case.ep == 1:   # pt2ms used (and copied) the training run's files
            assert pm.read_bytes() == (hook_maps / pm.name).read_bytes(), pm.name
        elif "_dp0" in pm.name:
            # under EP, pt2ms derives the layout (MegatronSource reads no param_map with EP > 1); its
            # names and contents are the hook's
            assert json.loads(pm.read_text()) == json.loads((hook_maps / pm.name).read_text()), pm.name
    compared = 0
    for (tp, pp, ep), rank in truth["ranks"].items():
        g = ms_rank(case, tp, pp, ep)
        got = ms.load_checkpoint(str(tmp_path / "with_map" / f"rank_{g}" / "network.ckpt"))
        derived = ms.load_checkpoint(str(tmp_path / "derived" / f"rank_{g}" / "network.ckpt"))
        assert sorted(got) == sorted(derived)
        for k in got:
            assert np.array_equal(got[k].asnumpy(), derived[k].asnumpy()), k
        for chunk, ch in enumerate(rank["chunks"]):
            for ddp, live in ch["live"].items():
                n = ms_name(case, pp, chunk, ep, ddp)
                for state, prefix in zip(STATES, ("", "exp_avg.", "exp_avg_sq.")):
                    assert np.array_equal(got[prefix + n].asnumpy(), live[state].numpy()), (state, n)
                compared += 1
    assert compared > 50


def _swap_first_same_shape(path: Path, contains: str = "") -> tuple[str, str]:
    """Swap the names of the first two entries of equal shape (``contains`` in both names): another
    model whose buffer sizes agree — megatron's own checks let its state load into the wrong
    parameters."""
    entries = json.loads(path.read_text())
    names = [n for n in entries if contains in n]
    a, b = next((x, y) for i, x in enumerate(names) for y in names[i + 1:] if entries[x][1] == entries[y][1])
    swapped = {(b if n == a else a if n == b else n): v for n, v in entries.items()}
    path.write_text(json.dumps(swapped))
    return a, b


@pytest.mark.parametrize("version", VERSIONS)
def test_load_check_on_real_megatron(hooked, version, tmp_path):
    runs = hooked(version)
    jobs, planted = [], []
    for name in ("dense", "moe"):
        case, save, _ = runs[name]
        jobs.append(("load", case, save))
    # dense: tp0 pp0 chunk 0 buffer 0 (every dp file: the check reads the dp0 one); MoE: an expert
    # buffer of expert rank 1 (numbered 0 there)
    for name, pattern, contains in (("dense", "param_map_buffer0_dp*tp0pp0vpp0.json", ""),
                                     ("moe", "param_map_buffer0_dp*tp0pp0ep1vpp0.json", "local_experts")):
        case, save, _ = runs[name]
        copy = tmp_path / f"{name}-planted"
        shutil.copytree(save, copy)
        files = sorted((copy / ITER / "param_map").glob(pattern))
        assert files
        swapped = [_swap_first_same_shape(f, contains) for f in files]
        planted.append((files[0], swapped[0]))
        jobs.append(("load", case, copy))
    results = run_hooked(version, jobs, raise_errors=False)
    for (name, (case, _, truth)), got in zip(runs.items(), results[:2]):
        assert not isinstance(got, Exception), str(got)[-3000:]
        for key, rank in truth["ranks"].items():
            for chunk, ch in enumerate(rank["chunks"]):
                for n, live in ch["live"].items():
                    back = got["ranks"][key]["chunks"][chunk]["live"][n]
                    for state in STATES + ("weight",):
                        a, b = back[state], live[state]
                        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b), (name, n, state)
    for (path, (a, b)), got in zip(planted, results[2:]):
        assert isinstance(got, HarnessError)
        text = str(got)
        assert "CkptmapError: ckptmap: refusing to load" in text, text[-3000:]
        assert f"the checkpoint's param_map {path} and the live" in text, text[-3000:]   # the dp0 file
        # the entry where the swap begins: the checkpoint names b there, the live buffer a
        assert f"first differ at parameter {b}" in text and f"the live model has {a}" in text, text[-3000:]
