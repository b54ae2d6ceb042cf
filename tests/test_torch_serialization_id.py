"""torch_serialization_id: the name half of torch's .data/serialization_id without torch, checked
against torch's own zip writer (and, below it, against the libstdc++ torch runs on)."""

import ctypes
import ctypes.util
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ckptmap.formats import torch_serialization_id as sid

CHECKPOINT_NAMES = ["data.pkl", ".format_version", ".storage_alignment", "byteorder"]


class _Sink:
    def write(self, data):
        return len(data)

    def flush(self):
        pass


def torch_digits(names):
    """What ckptmap asked torch for before: its writer fed the names with empty contents."""
    writer = torch._C.PyTorchFileWriter(_Sink(), True, 64)
    for name in names:
        writer.write_record(name, b"", 0)
    writer.write_end_of_file()
    ident = writer.serialization_id()
    assert len(ident) == 40 and ident.isdigit()
    return ident[:20]


def check(names):
    assert sid.name_hash_digits(names) == torch_digits(names), names[:5]


def checkpoint_names(n):
    """The records of a torch.save with n storages, in torch.save's write order (version and the id are
    added by the writer)."""
    return CHECKPOINT_NAMES + [f"data/{i}" for i in range(n)]


def random_names(rng, count, max_len=80, alphabet="abcdefghijklmnopqrstuvwxyz0123456789_./-"):
    names = set()
    while len(names) < count:
        names.add("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, max_len + 1))))
    out = sorted(names)
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("n", range(41))
def test_first_counts_plain(n):
    check([f"n{i}" for i in range(n)])


@pytest.mark.parametrize("n", range(41))
def test_first_counts_checkpoint(n):
    check(checkpoint_names(n))


# Around every rehash up to 85229 buckets (the writer adds version, so the table holds n + 5 names).
@pytest.mark.parametrize("n", sorted({b + d for b in (13, 29, 59, 127, 257, 541, 1109, 2357) for d in (-7, -6, -5, -4)}))
def test_counts_across_rehashes(n):
    check(checkpoint_names(n))


def test_rehash_points():
    assert sid.rehash_points(0) == []
    assert sid.rehash_points(1) == [(0, 13)]
    assert sid.rehash_points(13) == [(0, 13)]
    assert sid.rehash_points(14) == [(0, 13), (13, 29)]
    assert [b for _, b in sid.rehash_points(50_000)] == [13, 29, 59, 127, 257, 541, 1109, 2357, 5087, 10273,
                                                          20753, 42043, 85229]


@pytest.mark.parametrize("seed", range(12))
def test_random_names(seed):
    rng = random.Random(seed)
    count = [0, 1, 2, 3, 7, 50, 300, 1000, 2500, 4000, 5000, rng.randrange(5001)][seed]
    check(random_names(rng, count))


@pytest.mark.parametrize("seed", range(4))
def test_random_unicode_names(seed):
    rng = random.Random(100 + seed)
    check(random_names(rng, rng.randrange(1, 800), 40, "aé日本語/ß🙂\u0301x.0Ω\u00a0"))


def test_unicode_names():
    check(CHECKPOINT_NAMES + ["données/é", "日本語", "🙂", "e\u0301", "é", "\u00a0", "Ω" * 33, "data/0"])


@pytest.mark.parametrize("tail", range(8))
def test_long_names_every_tail_length(tail):
    rng = random.Random(tail)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_./"
    names = ["".join(rng.choice(alphabet) for _ in range(72 + 8 * k + tail)) for k in range(60)]
    names += ["x" * (72 + 8 * k + tail) for k in range(5)]
    assert all(len(n.encode()) > 64 and len(n.encode()) % 8 == tail for n in names)
    check(CHECKPOINT_NAMES + names)


def test_names_torch_adds_or_skips():
    # the writer adds version unless version or .data/version was written, byteorder unless written,
    # and never takes a caller's .data/serialization_id into the set
    check(["data.pkl"])
    check(["data.pkl", "version"])
    check(["version", "data.pkl"])
    check(["data.pkl", ".data/version"])
    check(["byteorder"])
    check(["data.pkl", ".data/serialization_id", "data/0"])
    check([".data/serialization_id"])


def test_duplicate_name_is_refused_as_torch_refuses():
    with pytest.raises(ValueError, match="twice"):
        sid.name_hash_digits(["data.pkl", "data/0", "data.pkl"])
    with pytest.raises(RuntimeError, match="twice"):
        torch_digits(["data.pkl", "data/0", "data.pkl"])


def test_writer_needs_no_torch(tmp_path):
    """A file the streaming writer makes in a process without torch carries torch's serialization id:
    byte-identical to torch.save of the same tensors."""
    code = ("import sys, numpy as np\n"
            "from ckptmap.formats.torch_zip_reader import HeldTensor\n"
            "from ckptmap.formats.torch_zip_writer import save\n"
            f"save({{f'w{{i}}': HeldTensor('float32', np.arange(i + 1, dtype=np.float32)) for i in range(40)}}, "
            f"{str(tmp_path / 'ours' / 'm.pt')!r})\n"
            "sys.exit('torch' in sys.modules)")
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    torch.save({f"w{i}": torch.arange(i + 1, dtype=torch.float32) for i in range(40)}, tmp_path / "theirs" / "m.pt")
    assert (tmp_path / "ours" / "m.pt").read_bytes() == (tmp_path / "theirs" / "m.pt").read_bytes()


def test_module_imports_no_torch():
    code = "import sys, ckptmap.formats.torch_serialization_id as m; m.name_hash_digits(['a']); " \
           "sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
def test_fifty_thousand_names():
    rng = random.Random(50_000)
    names = checkpoint_names(30_000) + random_names(rng, 20_000 - len(CHECKPOINT_NAMES), 100,
                                                    "abcdefgh0123456789/._é")
    names = list(dict.fromkeys(names))
    assert len(names) >= 49_900
    check(names)


# Below torch: the libstdc++ pieces themselves, from the runtime library torch resolves them from.

def _libstdcxx():
    try:
        return ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
    except OSError:
        pytest.skip("no libstdc++ shared library to compare with")


def test_hash_bytes_matches_libstdcxx():
    fn = _libstdcxx()._ZSt11_Hash_bytesPKvmm
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t]
    rng = random.Random(7)
    samples = [b"", b"a", b"data.pkl", b"version", b"byteorder", "日本語".encode()]
    samples += [bytes(rng.randrange(256) for _ in range(n)) for n in range(0, 200)]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(200, 5000))) for _ in range(20)]
    for data in samples:
        for seed in (0xC70F6907, 0, 1, 2**64 - 1):
            assert sid.hash_bytes(data, seed) == fn(data, len(data), seed), (data[:16], len(data), seed)


def test_prime_table_matches_libstdcxx():
    table = (ctypes.c_ulong * len(sid.PRIME_LIST)).in_dll(_libstdcxx(), "_ZNSt8__detail12__prime_listE")
    assert tuple(table) == sid.PRIME_LIST


def test_iteration_order_matches_a_compiled_unordered_set(tmp_path):
    """Hash codes and order straight from a std::unordered_set<std::string> built with g++ here."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "order.cc").write_text(textwrap.dedent("""\
        #include <iostream>
        #include <string>
        #include <unordered_set>
        int main() {
          std::unordered_set<std::string> names;
          std::string line;
          while (std::getline(std::cin, line)) names.insert(line);
          for (const auto& name : names) std::cout << std::hash<std::string>{}(name) << '\\n';
        }
        """))
    subprocess.run([gxx, "-O1", "-o", str(tmp_path / "order"), str(tmp_path / "order.cc")], check=True)
    rng = random.Random(3)
    for count in (0, 1, 13, 14, 100, 3000):
        names = random_names(rng, count, 30, "ab/é0123456789")
        out = subprocess.run([str(tmp_path / "order")], input="".join(n + "\n" for n in names).encode(),
                             capture_output=True, check=True).stdout.split()
        codes = [sid.hash_bytes(n.encode()) for n in names]
        assert sid.iteration_order(codes) == [int(c) for c in out]
