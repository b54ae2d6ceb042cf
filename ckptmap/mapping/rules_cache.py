"""A cache of parsed `.rules` files in the user's cache folder (``~/.cache/ckptmap``).

Parsing the bundled rules with lark (its import included) was a fifth of pt2ms's start-up. An entry
holds the parse of one file: the items ``rules_grammar.parse_items`` returns, before includes are
resolved and before validation (both run on every load). One entry per rules path, keyed inside by
a SHA-256 of the text, the path, the grammar, the code that builds and defines the items
(``rules_grammar.py``, ``rules.py``), attrs' pickling code and Python's version: any change of those is a miss,
and the entry is rewritten.

An entry is never trusted: a digest of the payload must match, the payload is unpickled with an
unpickler that only resolves the attrs classes of ``ckptmap.mapping.rules`` and ``torch_dist_rules`` (no other global, so a
tampered file cannot run code), and the result must look like a parse. Anything else is a miss.
Writes go through a temporary file and ``os.replace``, so concurrent runs never read half an entry.
``CKPTMAP_NO_CACHE=1`` turns the cache off.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import sys

MAGIC = b"ckptmap-rules-cache 1\n"
MAX_ENTRIES = 64   # one per rules path ever loaded: the oldest go when a new one is written
_DIGEST = hashlib.sha256().digest_size


def cache_dir() -> str | None:
    """The user's ckptmap cache folder (created 0700), or None if it cannot be made or is disabled."""
    if os.environ.get("CKPTMAP_NO_CACHE"):
        return None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(root, "ckptmap")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return folder


@functools.cache
def _code_key() -> bytes | None:
    import attr._make   # how attrs pickles its classes (attrs.__version__ costs an importlib.metadata import)

    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256(f"{sys.version}\0".encode())
    try:
        for name in [os.path.join(here, n) for n in ("rules.py", "rules_grammar.py", "torch_dist_rules.py",
                                                             "grammar.lark")] + [
                attr._make.__file__]:
            with open(name, "rb") as f:
                h.update(f.read())
                h.update(b"\0")
    except OSError:   # not installed as plain files: no cache
        return None
    return h.digest()


def _key(text: str, path: str) -> bytes | None:
    code = _code_key()
    if code is None:
        return None
    return hashlib.sha256(code + path.encode("utf-8", "surrogatepass") + b"\0"
                          + text.encode("utf-8", "surrogatepass")).digest()


def _entry_path(path: str) -> str | None:
    folder = cache_dir()
    if folder is None:
        return None
    name = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return os.path.join(folder, f"rules-{name}.pickle")


class _RulesUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in ("ckptmap.mapping.rules", "ckptmap.mapping.torch_dist_rules"):
            import importlib

            import attrs

            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type) and attrs.has(cls):
                return cls
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a rules cache entry")


def _looks_parsed(items) -> bool:
    return (isinstance(items, list) and bool(items) and isinstance(items[0], tuple) and len(items[0]) == 3
            and items[0][0] == "header" and all(isinstance(x, str) for x in items[0]))


def load(text: str, path: str):
    """The cached parse of ``text`` read from ``path``, or None (no entry, stale, corrupt, disabled)."""
    entry, key = _entry_path(path), _key(text, path)
    if entry is None or key is None:
        return None
    try:
        with open(entry, "rb") as f:
            data = f.read()
        head = len(MAGIC)
        if data[:head] != MAGIC or data[head:head + len(key)] != key:
            return None
        digest, payload = data[head + len(key):head + len(key) + _DIGEST], data[head + len(key) + _DIGEST:]
        if hashlib.sha256(payload).digest() != digest:
            return None
        items = _RulesUnpickler(io.BytesIO(payload)).load()
    except Exception:   # unreadable or corrupt: parse again (and rewrite the entry)
        return None
    return items if _looks_parsed(items) else None


def store(text: str, path: str, items) -> None:
    """Best effort: a cache that cannot be written costs the next run a parse, nothing else."""
    entry, key = _entry_path(path), _key(text, path)
    if entry is None or key is None:
        return
    tmp = f"{entry}.{os.getpid()}.tmp"
    try:
        payload = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
        with open(tmp, "wb") as f:
            f.write(MAGIC + key + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, entry)
    except Exception:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return
    _prune(os.path.dirname(entry), keep=entry)


def _prune(folder: str, keep: str) -> None:
    try:
        names = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("rules-") and n.endswith(".pickle")]
        if len(names) <= MAX_ENTRIES:
            return
        aged = sorted((os.stat(n).st_mtime_ns, n) for n in names if n != keep)
        for _, name in aged[:len(names) - MAX_ENTRIES]:
            os.unlink(name)
    except OSError:   # another run pruning at the same time
        pass
