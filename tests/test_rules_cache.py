"""The parse cache of `.rules` files (``mapping/rules_cache.py``): a hit needs no lark, any change of
the text is a miss, and a corrupt or tampered entry is ignored, never trusted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptmap.errors import CkptmapError
from ckptmap.mapping import rules_cache
from ckptmap.mapping.rules import bundled_rules, load_rules

REPO = Path(__file__).resolve().parent.parent

RULES = """\
rules cache_test "a rules file for the cache tests"
param a.{layer}.w => b.{layer}.w  tp: replicated
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CKPTMAP_NO_CACHE", raising=False)
    return tmp_path / "xdg" / "ckptmap"


def _entries(cache):
    return sorted(cache.glob("rules-*.pickle"))


def _parses(monkeypatch) -> list:
    """Record every lark parse (a cache miss)."""
    from ckptmap.mapping import rules_grammar

    calls = []
    real = rules_grammar.parse_items
    monkeypatch.setattr(rules_grammar, "parse_items", lambda text, path: calls.append(path) or real(text, path))
    return calls


def test_hit_gives_the_same_rules_without_parsing(cache, tmp_path, monkeypatch):
    f = tmp_path / "a.rules"
    f.write_text(RULES)
    calls = _parses(monkeypatch)
    first = load_rules(f)
    assert calls == [str(f)] and len(_entries(cache)) == 1
    second = load_rules(f)
    assert calls == [str(f)]   # from the cache
    assert second == first and second.params[0].loc.file == str(f)


def test_changed_text_is_a_miss(cache, tmp_path, monkeypatch):
    f = tmp_path / "a.rules"
    f.write_text(RULES)
    calls = _parses(monkeypatch)
    assert str(load_rules(f).params[0].mindspore) == "b.{layer}.w"
    f.write_text(RULES.replace("b.{layer}.w", "c.{layer}.w"))
    assert str(load_rules(f).params[0].mindspore) == "c.{layer}.w"
    assert len(calls) == 2 and len(_entries(cache)) == 1   # the entry was replaced, not added to
    # one character, same length: still a miss
    f.write_text(RULES.replace("b.{layer}.w", "d.{layer}.w"))
    assert str(load_rules(f).params[0].mindspore) == "d.{layer}.w"
    assert len(calls) == 3


def test_changed_include_is_a_miss(cache, tmp_path, monkeypatch):
    (tmp_path / "inc.rules").write_text('rules inc "x"\nparam x.w => y.w  tp: replicated\n')
    f = tmp_path / "a.rules"
    f.write_text(RULES + "include inc\n")
    assert [str(p.mindspore) for p in load_rules(f).params] == ["b.{layer}.w", "y.w"]
    (tmp_path / "inc.rules").write_text('rules inc "x"\nparam x.w => z.w  tp: replicated\n')
    assert [str(p.mindspore) for p in load_rules(f).params] == ["b.{layer}.w", "z.w"]


def test_same_text_elsewhere_keeps_its_own_locations(cache, tmp_path):
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "a.rules").write_text(RULES)
        assert load_rules(tmp_path / d / "a.rules").params[0].loc.file == str(tmp_path / d / "a.rules")
    assert load_rules(tmp_path / "one" / "a.rules").params[0].loc.file == str(tmp_path / "one" / "a.rules")


def test_errors_are_not_cached(cache, tmp_path):
    f = tmp_path / "bad.rules"
    f.write_text(RULES + "param oops\n")
    for _ in range(2):
        with pytest.raises(CkptmapError, match=r"bad.rules:3:"):
            load_rules(f)
    assert _entries(cache) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "wrong_magic"])
def test_corrupt_entry_is_ignored_and_rewritten(cache, tmp_path, monkeypatch, damage):
    f = tmp_path / "a.rules"
    f.write_text(RULES)
    good = load_rules(f)
    (entry,) = _entries(cache)
    data = entry.read_bytes()
    bad = {"truncate": data[:len(data) // 2], "flip": data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:],
           "garbage": os.urandom(len(data)), "empty": b"", "wrong_magic": b"X" + data[1:]}[damage]
    entry.write_bytes(bad)
    calls = _parses(monkeypatch)
    assert load_rules(f) == good
    assert calls == [str(f)]            # parsed again
    assert entry.read_bytes() == data   # and the entry rewritten
    assert load_rules(f) == good and calls == [str(f)]


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_tampered_entry_with_a_valid_digest_is_not_unpickled(cache, tmp_path, monkeypatch):
    """Whoever can write the cache can also fix the digest: the unpickler still resolves nothing but
    the rules' attrs classes, so the entry is a miss and no code runs."""
    f = tmp_path / "a.rules"
    f.write_text(RULES)
    good = load_rules(f)
    (entry,) = _entries(cache)
    rules_cache.store(RULES, str(f), [("header", "x", "y"), _Boom()])   # a well-formed entry, hostile payload
    assert b"system" in entry.read_bytes()
    ran = []
    monkeypatch.setattr(os, "system", lambda cmd: ran.append(cmd) or 0)
    calls = _parses(monkeypatch)
    assert rules_cache.load(RULES, str(f)) is None
    assert load_rules(f) == good and calls == [str(f)] and ran == []


def test_wrong_shape_is_ignored(cache, tmp_path, monkeypatch):
    f = tmp_path / "a.rules"
    f.write_text(RULES)
    rules_cache.store(RULES, str(f), {"not": "a parse"})
    assert rules_cache.load(RULES, str(f)) is None


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a folder")
    f = tmp_path / "a.rules"
    f.write_text(RULES)
    assert load_rules(f).name == "cache_test"
    monkeypatch.setenv("CKPTMAP_NO_CACHE", "1")
    assert load_rules(f).name == "cache_test"


def test_bundled_rules_load_without_lark_once_cached(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    env.pop("CKPTMAP_NO_CACHE", None)
    code = ("import sys; from ckptmap.mapping.rules import bundled_rules, load_rules\n"
            "r = [load_rules(p) for p in bundled_rules().values()]\n"
            "print(sum(len(x.params) for x in r), 'lark' in sys.modules)")
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert first.split()[0] == second.split()[0]
    assert first.split()[1] == "True" and second.split()[1] == "False"
    assert len(list((tmp_path / "ckptmap").glob("rules-*.pickle"))) == len(bundled_rules()) + 1   # + common/


def test_entries_are_bounded(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(rules_cache, "MAX_ENTRIES", 3)
    for i in range(6):
        f = tmp_path / f"r{i}.rules"
        f.write_text(RULES)
        load_rules(f)
        assert len(_entries(cache)) == min(i + 1, 3)
    assert rules_cache.load(RULES, str(tmp_path / "r5.rules")) is not None   # the newest stays
    assert rules_cache.load(RULES, str(tmp_path / "r0.rules")) is None
