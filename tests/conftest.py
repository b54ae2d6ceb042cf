import os
from pathlib import Path

import pytest

# CI clones the repo next to a copy of shared/; the fixtures are never copied into the project.
FIXTURE_ROOT = Path(os.environ.get(
    "CKPTMAP_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "megatron-r0.6.0"))
FIXTURE_NAMES = ["legacy_tp1pp1dp1", "legacy_tp2pp2dp2", "legacy_tp1pp3vpp2dp1", "mcore_tp2pp1dp2_buckets"]


def fixture_dir(name: str) -> Path:
    path = FIXTURE_ROOT / name
    if not path.is_dir():  # fail, never skip: a missing fixture must not turn the suite green
        pytest.fail(f"fixture {path} is missing; set CKPTMAP_FIXTURES to shared/fixtures/megatron-r0.6.0")
    return path


@pytest.fixture
def byte_runs(monkeypatch) -> list:
    """The sizes of the byte runs the executor copies, in order: ``copy_file_range`` (byte_io.copy_range) or, for
    the CRC'd records of a .pt file, one read into a reused buffer with the CRC taken there
    (byte_io.copy_range_crc), or for a small run, one read into the file's write buffer
    (torch_zip_writer._small_run) -- bytes moved as they are, never assembled element by element."""
    from ckptmap.formats import byte_io, torch_zip_writer

    sizes: list = []
    for name in ("copy_range", "copy_range_crc"):
        real = getattr(byte_io, name)
        monkeypatch.setattr(byte_io, name, lambda rng, fd, *a, real=real: (sizes.append(rng.nbytes), real(rng, fd, *a))[1])
    real_small = torch_zip_writer._small_run
    monkeypatch.setattr(torch_zip_writer, "_small_run", lambda rng: (sizes.append(rng.nbytes), real_small(rng))[1])
    return sizes


@pytest.fixture
def forks(monkeypatch) -> list:
    """The stages each forked planning process was given (mapping/planning_split.py), in order: so that a
    test of the split knows it happened."""
    from ckptmap.mapping import planning_split

    made: list = []
    real = planning_split.Forked

    class Recorded(real):
        def __init__(self, work, what):
            made.append(what)
            super().__init__(work, what)
    monkeypatch.setattr(planning_split, "Forked", Recorded)
    return made


def pt2ms_into(b: Path, megatron: Path, *extra) -> Path:
    """``ckptmap pt2ms`` of the Megatron checkpoint ``megatron`` into the MindSpore folder ``b``."""
    from ckptmap.cli import main

    assert main(["pt2ms", "--megatron-path", str(megatron), "--ms-path", str(b), "--no-progress", *extra]) == 0
    return b


def refused_ms2pt(argv, capsys, out, *words):
    """``argv`` (ms2pt / plan ms2pt) writing to ``out`` exits 2 with one error line holding ``words``, and
    writes nothing."""
    from ckptmap.cli import main

    assert main(argv + ["--megatron-path", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    assert not out.exists()
