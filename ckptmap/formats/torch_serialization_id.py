"""The record-name half of the ``.data/serialization_id`` record torch.save writes, in pure Python.

What: torch's zip writer (caffe2 ``PyTorchStreamWriter``) ends every archive with a 40-digit record
``.data/serialization_id``. Its first 20 digits are a 64-bit value, zero-padded in decimal, obtained
by folding ``hash_combine`` (below), starting from 0, over ``std::hash<std::string>`` of every record
name the writer has written, in the iteration order of the ``std::unordered_set<std::string>`` that
holds those names. The second 20 digits (the same fold over the records' CRC32s in write order) are
computed by the writer in ``torch_zip``. Nothing here depends on the archive name or the data.

Why here: ckptmap writes torch zip archives byte for byte without torch on its hot path, and the set's
iteration order is a property of libstdc++'s hash table, not of the names alone; so this module
replays that table. torch links the C++ runtime dynamically: ``std::_Hash_bytes`` and the rehash
policy (``_Prime_rehash_policy::_M_next_bkt`` / ``_M_need_rehash``) are resolved from the system's
``libstdc++.so.6`` at run time, and the node linking is inlined from the headers torch was built with.
What follows is the rehash policy of libstdc++'s sources from 2020 to 2024 and of the GCC 12.2 runtime
the torch 2.13.0 CPU wheel runs on here (the wheel itself was built with GCC 13.3 and needs only
GLIBCXX_3.4.22, so it also loads on older runtimes). Runtimes with the older policy of the 2013 and
2017 sources size the table differently, and torch running on them writes another id for the same names.

1. The string hash (``hash_bytes``): ``std::_Hash_bytes(bytes, len, seed=0xc70f6907)``, libstdc++'s
   MurmurHash2-derived 64-bit hash. With ``M = 0xc6a4a7935bd1e995``, arithmetic mod 2**64 and
   ``mix(v) = v ^ (v >> 47)``:
   ``h = seed ^ (len * M)``; for each whole 8-byte little-endian word ``w``:
   ``h = (h ^ (mix(w * M) * M)) * M``; if 1-7 bytes remain, they are read as a little-endian integer
   ``t`` (the last byte most significant) and ``h = (h ^ t) * M`` -- the tail is not premixed;
   finally ``h = mix(mix(h) * M)``. A record name is hashed as its UTF-8 bytes (what pybind11 hands
   torch for a Python ``str``).

2. The fold: ``hash_combine(seed, v) = seed ^ (v + 0x9e3779b9 + (seed << 6) + (seed >> 2))`` mod
   2**64 (c10/util/hash.h, from Boost).

3. The iteration order of the set. The table is one singly linked list of all nodes plus an array of
   ``B`` buckets; a name's bucket is ``hash % B``; each bucket's nodes are contiguous in the list and the
   bucket keeps a pointer to the node *before* its run. Iteration walks the list from the front.
   Inserting a name whose bucket is empty puts its node at the front of the whole list; inserting into
   a non-empty bucket puts the node at the front of that bucket's run. Before each insertion the
   policy may rehash to a new bucket count; rehashing walks the old list front to back and relinks every
   node into the new array with the same two rules (so runs of old buckets are reversed / regrouped).

4. The growth policy, with max load factor 1.0 and growth factor 2. The empty set has 1 bucket and a
   resize threshold ``R = 0``. Inserting into a set of ``n`` names: if ``n + 1 > R``, let
   ``m = max(n + 1, 11 if R == 0 else 0)``; if ``m >= B`` the table is rehashed to
   ``next_bkt(max(m + 1, 2 * B))``, else only ``R = B``. ``next_bkt(k)``: for ``k < 14`` it is
   ``(1, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13)[k]`` (``k == 0`` leaves ``R`` alone), otherwise
   the first entry ``>= k`` of libstdc++'s fixed prime table (``std::__detail::__prime_list``, searched
   from its 7th entry, 17); ``R`` becomes the chosen count. So the first insertion makes 13 buckets and
   the table then grows at 14, 30, 60, 128, ... names to 29, 59, 127, 257, ... buckets.

5. Which names are in the set: the names written, in write order, then -- as torch's
   ``writeEndOfFile`` does -- ``version`` unless ``version`` or ``.data/version`` was written, and
   ``byteorder`` unless it was written. ``.data/serialization_id`` itself is never in the set when the
   id is computed (torch's writer skips a caller's record of that name).
"""

from __future__ import annotations

import bisect
import struct

__all__ = ["hash_bytes", "hash_combine", "iteration_order", "name_hash_digits", "rehash_points"]

_MASK = (1 << 64) - 1
_MUL = 0xC6A4A7935BD1E995
STRING_HASH_SEED = 0xC70F6907  # the seed std::hash<std::string> passes to std::_Hash_bytes

_SERIALIZATION_ID = ".data/serialization_id"

# The fast path of libstdc++'s _Prime_rehash_policy::_M_next_bkt for small requests (index = request).
_FAST_BUCKETS = (1, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13)

# std::__detail::__prime_list (libstdc++.so.6, GLIBCXX_3.4.10), its first 256 entries: the part up to
# the largest prime below 2**32. The 64-bit table goes on past 2**32; a set of names whose bucket count
# would need those entries has over 2 billion records, which no supported archive has.
PRIME_LIST = (
    2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53,
    59, 61, 67, 71, 73, 79, 83, 89, 97, 103, 109, 113, 127, 137, 139, 149,
    157, 167, 179, 193, 199, 211, 227, 241, 257, 277, 293, 313, 337, 359, 383, 409,
    439, 467, 503, 541, 577, 619, 661, 709, 761, 823, 887, 953, 1031, 1109, 1193, 1289,
    1381, 1493, 1613, 1741, 1879, 2029, 2179, 2357, 2549, 2753, 2971, 3209, 3469, 3739, 4027, 4349,
    4703, 5087, 5503, 5953, 6427, 6949, 7517, 8123, 8783, 9497, 10273, 11113, 12011, 12983, 14033, 15173,
    16411, 17749, 19183, 20753, 22447, 24281, 26267, 28411, 30727, 33223, 35933, 38873, 42043, 45481,
    49201, 53201, 57557, 62233, 67307, 72817, 78779, 85229, 92203, 99733, 107897, 116731, 126271,
    136607, 147793, 159871, 172933, 187091, 202409, 218971, 236897, 256279, 277261, 299951, 324503,
    351061, 379787, 410857, 444487, 480881, 520241, 562841, 608903, 658753, 712697, 771049, 834181,
    902483, 976369, 1056323, 1142821, 1236397, 1337629, 1447153, 1565659, 1693859, 1832561, 1982627,
    2144977, 2320627, 2510653, 2716249, 2938679, 3179303, 3439651, 3721303, 4026031, 4355707, 4712381,
    5098259, 5515729, 5967347, 6456007, 6984629, 7556579, 8175383, 8844859, 9569143, 10352717,
    11200489, 12117689, 13109983, 14183539, 15345007, 16601593, 17961079, 19431899, 21023161,
    22744717, 24607243, 26622317, 28802401, 31160981, 33712729, 36473443, 39460231, 42691603,
    46187573, 49969847, 54061849, 58488943, 63278561, 68460391, 74066549, 80131819, 86693767,
    93793069, 101473717, 109783337, 118773397, 128499677, 139022417, 150406843, 162723577,
    176048909, 190465427, 206062531, 222936881, 241193053, 260944219, 282312799, 305431229,
    330442829, 357502601, 386778277, 418451333, 452718089, 489790921, 529899637, 573292817,
    620239453, 671030513, 725980837, 785430967, 849749479, 919334987, 994618837, 1076067617,
    1164186217, 1259520799, 1362662261, 1474249943, 1594975441, 1725587117, 1866894511, 2019773507,
    2185171673, 2364114217, 2557710269, 2767159799, 2993761039, 3238918481, 3504151727, 3791104843,
    4101556399, 4294967291,
)
_PRIME_SEARCH_FROM = 6  # the lookup skips 2..13, which the fast path covers


def hash_bytes(data: bytes, seed: int = STRING_HASH_SEED) -> int:
    """libstdc++'s 64-bit ``std::_Hash_bytes(data, len(data), seed)``; with the default seed, the value
    of ``std::hash<std::string>`` for a string of these bytes (see the module docstring, step 1)."""
    return _hash_all([data], seed)[0]


def _hash_all(datas, seed: int = STRING_HASH_SEED) -> list[int]:
    """hash_bytes of each of ``datas`` (one loop, for speed: ~2 us a short name)."""
    mul, mask, from_bytes = _MUL, _MASK, int.from_bytes
    unpackers: dict[int, object] = {}
    out = []
    for data in datas:
        n = len(data)
        h = (seed ^ (n * mul)) & mask
        whole = n & ~7
        if whole:
            unpack = unpackers.get(whole)
            if unpack is None:
                unpack = unpackers[whole] = struct.Struct(f"<{whole >> 3}Q").unpack_from
            for w in unpack(data):
                k = (w * mul) & mask
                h = ((h ^ (((k ^ (k >> 47)) * mul) & mask)) * mul) & mask
        if n & 7:
            h = ((h ^ from_bytes(data[whole:], "little")) * mul) & mask
        h = ((h ^ (h >> 47)) * mul) & mask
        out.append(h ^ (h >> 47))
    return out


def hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _MASK) + (seed >> 2)) & _MASK)) & _MASK


def _next_bucket_count(request: int) -> tuple[int, int | None]:
    """(bucket count, new resize threshold or None to keep it) for a request of ``request`` buckets."""
    if request < len(_FAST_BUCKETS):
        return _FAST_BUCKETS[request], (_FAST_BUCKETS[request] if request else None)
    i = bisect.bisect_left(PRIME_LIST, request, _PRIME_SEARCH_FROM)
    if i >= len(PRIME_LIST) - 1:  # pragma: no cover - over 2**31 names
        raise OverflowError(f"a hash table for {request} buckets is past the prime table kept here")
    return PRIME_LIST[i], PRIME_LIST[i]


def rehash_points(count: int) -> list[tuple[int, int]]:
    """(n, new bucket count) for each rehash while ``count`` distinct elements are inserted one by one
    into an empty set: the table is rehashed just before the element of index n goes in (step 4)."""
    buckets, resize_at = 1, 0
    points = []
    n = 0
    while n < count:
        if n + 1 > resize_at:  # the policy is consulted for this insertion
            wanted = max(n + 1, 0 if resize_at else 11)
            if wanted >= buckets:
                buckets, new_resize = _next_bucket_count(max(wanted + 1, 2 * buckets))
                if new_resize is not None:
                    resize_at = new_resize
                points.append((n, buckets))
            else:  # pragma: no cover - not reached while the load factor is 1.0 and nothing is erased
                resize_at = buckets
        n = max(n + 1, resize_at)  # the next insertion that can need a rehash
    return points


def _relink(codes: list[int], buckets: int) -> list[int]:
    """Insert ``codes`` in order into an empty table of ``buckets`` buckets by the two linking rules;
    the resulting list. A bucket first met later lands nearer the front, and a run holds its codes
    newest first."""
    runs: dict[int, list[int]] = {}  # first met first: dicts keep insertion order
    for code in codes:
        runs.setdefault(code % buckets, []).append(code)
    return [code for run in reversed(runs.values()) for code in reversed(run)]


def iteration_order(codes: list[int]) -> list[int]:
    """The iteration order of a libstdc++ ``std::unordered_set`` (default max load factor, default
    constructed, no reserve) after inserting distinct elements with hash codes ``codes`` in that order,
    as the list of their codes (module docstring, steps 3 and 4).

    A rehash relinks the old list front to back by the same two rules an insertion uses, so each
    stretch between rehashes is one pass of those rules over (the list so far + the stretch's new
    elements) into the stretch's bucket array."""
    order: list[int] = []
    points = rehash_points(len(codes))
    for i, (start, buckets) in enumerate(points):
        stop = points[i + 1][0] if i + 1 < len(points) else len(codes)
        order = _relink(order + codes[start:stop], buckets)
    return order


_NAME_DIGITS: dict = {}   # files of one structure (thousands of rank files) have the same record names
_NAME_DIGITS_KEPT = 64


def name_hash_digits(names: list[str]) -> str:
    """The first 20 characters of the serialization id torch's writer computes for records written in
    the order ``names`` (``version`` and ``byteorder``, when missing, are added as torch's
    ``writeEndOfFile`` adds them; the id's own record is not one of the names)."""
    key = tuple(names)
    digits = _NAME_DIGITS.get(key)
    if digits is None:
        digits = _NAME_DIGITS[key] = _name_hash_digits(key)
        if len(_NAME_DIGITS) > _NAME_DIGITS_KEPT:
            del _NAME_DIGITS[next(iter(_NAME_DIGITS))]
    return digits


def _name_hash_digits(names: tuple[str, ...]) -> str:
    seen = set()
    keys = []
    for name in names:
        if name in seen:
            raise ValueError(f"record {name!r} written twice (torch refuses: 'Tried to serialize file twice')")
        if name == _SERIALIZATION_ID:
            continue  # torch's writer drops a caller's record of this name
        seen.add(name)
        keys.append(name)
    if "version" not in seen and ".data/version" not in seen:
        keys.append("version")
    if "byteorder" not in seen:
        keys.append("byteorder")
    combined = 0
    for code in iteration_order(_hash_all([k.encode("utf-8") for k in keys])):
        combined = hash_combine(combined, code)
    return f"{combined:020d}"
