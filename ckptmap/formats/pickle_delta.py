"""Reading a pickle that differs from one already read only in a few plain numbers.

Thousands of Megatron rank files hold pickles of one length that differ in two or three bytes: the
ranks of a stage write the same objects but for ``args.rank`` / ``args.local_rank``. Unpickling each
costs ~0.5 ms; this module reads such a file in ~30 us from the tree of the first one:

* :func:`scalar_slots` follows a pickle's opcodes once (no objects made) and finds the numbers
  (``BININT1`` / ``BININT2`` / ``BININT`` / ``BINFLOAT``) that land, untouched, in plain places of the
  result: values of plain dicts, items of lists or tuples, attributes of an ``argparse.Namespace`` —
  reached from the root only through such places. A container memoised and fetched again (an args
  Namespace a file holds twice) is followed when every fetch puts it in such a place too: the number
  then has a path through each. A number fed to anything else (a constructor's arguments, a tensor
  rebuild, a persistent id, a dict key, a state of another class), or below a container that is, is
  not a slot.
* :func:`patched` takes another pickle of the same length: if every byte that differs lies inside
  such a number's argument bytes, the opcode sequence is the same and only those values differ, so the
  result is the first tree with those values replaced — the containers on their paths copied (a shared
  one once, so that it stays one object wherever it is, as the unpickler makes it), every other object
  shared with the first tree (which callers must treat as read-only). Otherwise None: unpickle it.

For writers (``pt_meta._Written``): :func:`slot_bytes` / :func:`number_value` / :func:`with_numbers` read
and put a slot's number as bytes, and :func:`pickled_as` says whether CPython's pickler would write a
value with the opcode another writer used — a pickle re-written from a tree is patched only then.

Any opcode this module does not follow makes :func:`scalar_slots` give up (None), never guess.
"""

from __future__ import annotations

import argparse
import pickletools
import struct

import numpy as np

_NUMBER_FORMATS = {"BININT1": (1, "<B"), "BININT2": (2, "<H"), "BININT": (4, "<i"), "BINFLOAT": (8, ">d")}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_STRINGS = frozenset({"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"})   # the only dict keys followed
_PLAIN_ARGS = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "LONG1", "LONG4", "BINSTRING", "SHORT_BINSTRING"})
_NAMESPACE = ("argparse", "Namespace")


class _Node:
    """One object the pickle makes, as far as slots go: where it lands (places), how often it is
    referred to, and for a number its opcode position, for a constant its value."""

    __slots__ = ("kind", "value", "places", "refs", "items")

    def __init__(self, kind, value=None):
        self.kind = kind          # number, key (a str), const, dict, list, tuple, global, namespace, other
        self.value = value        # number: (position, opcode name); key, const: the value; global: (module, name)
        # [(parent, step)], step ("key", k) | ("index", i) | ("attrs",): the BUILD state of a namespace
        self.places: list = []
        self.refs = 1             # made once + fetched from the memo: on a slot's path each is a place
        self.items = set() if kind == "dict" else 0   # dict: its keys; list: items so far; namespace: BUILDs


_MARK = object()


class _GiveUp(Exception):
    pass


def _link(child, parent, step) -> None:
    child.places.append((parent, step))


def _pop_to_mark(stack) -> list:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise _GiveUp


def _set_items(target, pairs) -> None:
    for k, v in pairs:
        if target.kind != "dict" or k.kind != "key":
            continue   # a stand-in's SETITEMS, or a key not a plain string: the value is not a slot
        if k.value in target.items:
            raise _GiveUp   # a key set twice: the first value is not in the result
        target.items.add(k.value)
        _link(v, target, ("key", k.value))


# opcode byte -> (name, argument): "" none; 1/2/4/8 a fixed-width field (memo indices, skipped numbers);
# "s1"/"s4"/"s8" a length-prefixed string (decoded: dict keys), "b1"/"b4"/"b8" length-prefixed bytes
# (skipped); "line2" GLOBAL's two lines. Only binary opcodes: a text (protocol 0) one gives up.
_OPCODES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
_ARGUMENTS = {"PROTO": 1, "FRAME": 8, "BININT1": 1, "BININT2": 2, "BININT": 4, "BINFLOAT": 8, "LONG1": "b1",
              "LONG4": "b4", "BINUNICODE": "s4", "SHORT_BINUNICODE": "s1", "BINUNICODE8": "s8", "SHORT_BINBYTES": "b1",
              "BINBYTES": "b4", "BINBYTES8": "b8", "BINSTRING": "b4", "SHORT_BINSTRING": "b1", "BINPUT": 1,
              "LONG_BINPUT": 4, "BINGET": 1, "LONG_BINGET": 4, "GLOBAL": "line2"}
_NO_ARGUMENT = frozenset({"STOP", "MARK", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE",
                          "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "LIST", "DICT", "APPEND", "APPENDS", "SETITEM",
                          "SETITEMS", "MEMOIZE", "STACK_GLOBAL", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "BUILD",
                          "BINPERSID", "POP", "POP_MARK"})
_TABLE = {code: (name, _ARGUMENTS.get(name, "")) for code, name in _OPCODES.items()
          if name in _ARGUMENTS or name in _NO_ARGUMENT}
_WIDTH_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def _opcodes(data: bytes):
    """(name, argument, position) of each opcode — pickletools.genops at a fraction of its cost (it
    decodes every argument), for the binary opcodes only. Numbers come in runs: (``"NUMBERS"``,
    [(position, opcode name) of each number, or None for a plain constant (``LONG1``) between them],
    position of the first): an RNG state's 625 values are most of a Megatron rank's pickle."""
    pos, end = 0, len(data)
    unpack = struct.unpack_from
    table, numbers, memo_ops = _TABLE, _NUMBER_WIDTHS, _MEMO_OPS
    while pos < end:
        entry = table.get(data[pos])
        if entry is None:
            raise _GiveUp
        name, kind = entry
        if name in numbers or name == "LONG1":
            run, first = [], pos
            while True:   # the run: numbers and LONG1 constants, each skipped by its width
                if name == "LONG1":
                    if pos + 2 > end:
                        raise _GiveUp
                    run.append(None)
                    pos += 2 + data[pos + 1]
                else:
                    run.append((pos, name))
                    pos += 1 + numbers[name]
                if pos >= end:
                    raise _GiveUp
                entry = table.get(data[pos])
                if entry is None:
                    raise _GiveUp
                name, kind = entry
                if not (name in numbers or name == "LONG1"):
                    break
            yield "NUMBERS", run, first
        at = pos + 1
        arg = None
        if kind == "":
            nxt = at
        elif type(kind) is int:
            nxt = at + kind
            if name in memo_ops:
                arg = unpack(_WIDTH_FORMATS[kind], data, at)[0]
        elif kind == "line2":
            first = data.index(b"\n", at)
            second = data.index(b"\n", first + 1)
            arg = data[at:first].decode("utf-8") + " " + data[first + 1:second].decode("utf-8")
            nxt = second + 1
        else:
            width = int(kind[1])
            n = unpack(_WIDTH_FORMATS[width], data, at)[0]
            nxt = at + width + n
            if kind[0] == "s":
                arg = data[at + width:nxt].decode("utf-8", "surrogatepass")
        if nxt > end:
            raise _GiveUp
        yield name, arg, pos
        if name == "STOP":
            return
        pos = nxt
    raise _GiveUp   # no STOP


_NUMBER_WIDTHS = {name: width for name, (width, _) in _NUMBER_FORMATS.items()}
_MEMO_OPS = frozenset({"BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"})


# opcode name -> the branch of _follow that takes it, most frequent first
(_NUMBERS, _PUT, _GET, _KEY, _SETITEMS, _MARK_OP, _EMPTY, _CONST, _TUPLE, _APPENDS, _SKIP, _STOP, _DICT, _MEMOIZE,
 _GLOBAL, _STACK_GLOBAL, _NEWOBJ, _CONSUMES, _BUILD, _POP, _POP_MARK) = range(21)
_BRANCH = {"NUMBERS": _NUMBERS, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "BINGET": _GET, "LONG_BINGET": _GET,
           **{name: _KEY for name in _STRINGS}, "SETITEM": _SETITEMS, "SETITEMS": _SETITEMS, "MARK": _MARK_OP,
           "EMPTY_DICT": _EMPTY, "EMPTY_LIST": _EMPTY, "EMPTY_TUPLE": _EMPTY,
           **{name: _CONST for name in _CONSTANTS}, **{name: _CONST for name in _PLAIN_ARGS},
           "TUPLE1": _TUPLE, "TUPLE2": _TUPLE, "TUPLE3": _TUPLE, "TUPLE": _TUPLE, "LIST": _TUPLE,
           "APPEND": _APPENDS, "APPENDS": _APPENDS, "PROTO": _SKIP, "FRAME": _SKIP, "STOP": _STOP, "DICT": _DICT,
           "MEMOIZE": _MEMOIZE, "GLOBAL": _GLOBAL, "STACK_GLOBAL": _STACK_GLOBAL, "NEWOBJ": _NEWOBJ,
           "REDUCE": _CONSUMES, "NEWOBJ_EX": _CONSUMES, "BINPERSID": _CONSUMES, "BUILD": _BUILD, "POP": _POP,
           "POP_MARK": _POP_MARK}
_TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_CONSUMED = {"REDUCE": 2, "NEWOBJ_EX": 3, "BINPERSID": 1}


def _follow(data: bytes):
    """The root node and every number node of ``data``; raises _GiveUp on an opcode not followed."""
    stack: list = []
    push = stack.append
    memo: dict = {}
    numbers = []
    const = _Node("const")   # every constant (None, a flag, bytes, a LONG1): a leaf, never on a number's path
    branch_of = _BRANCH
    for name, arg, pos in _opcodes(data):
        branch = branch_of.get(name)
        if branch == _NUMBERS:
            for item in arg:
                if item is None:
                    push(const)
                else:
                    node = _Node("number", item)
                    numbers.append(node)
                    push(node)
        elif branch == _PUT:
            memo[arg] = stack[-1]
        elif branch == _GET:
            node = memo[arg]
            node.refs += 1
            push(node)
        elif branch == _KEY:
            push(_Node("key", arg))
        elif branch == _SETITEMS:
            if name == "SETITEM":
                v, k = stack.pop(), stack.pop()
                pairs = [(k, v)]
            else:
                items = _pop_to_mark(stack)
                pairs = list(zip(items[::2], items[1::2]))
            _set_items(stack[-1], pairs)
        elif branch == _MARK_OP:
            push(_MARK)
        elif branch == _EMPTY:
            push(_Node(name[6:].lower()))
        elif branch == _CONST:
            push(const)
        elif branch == _TUPLE:
            n = _TUPLE_SIZES.get(name)
            if n is None:
                items = _pop_to_mark(stack)
            else:
                if len(stack) < n or any(x is _MARK for x in stack[-n:]):
                    raise _GiveUp
                items = stack[-n:]
                del stack[-n:]
            node = _Node("list" if name == "LIST" else "tuple")
            for i, item in enumerate(items):
                _link(item, node, ("index", i))
            node.items = len(items)
            push(node)
        elif branch == _APPENDS:
            items = [stack.pop()] if name == "APPEND" else _pop_to_mark(stack)
            target = stack[-1]
            for item in items:
                if target.kind == "list":
                    _link(item, target, ("index", target.items))
                    target.items += 1
                # else a stand-in's append: the item is not a slot (it keeps no parent)
        elif branch == _SKIP:
            continue
        elif branch == _STOP:
            break
        elif branch == _DICT:
            items = _pop_to_mark(stack)
            node = _Node("dict")
            _set_items(node, zip(items[::2], items[1::2]))
            push(node)
        elif branch == _MEMOIZE:
            memo[len(memo)] = stack[-1]
        elif branch == _GLOBAL:
            module, _, qualname = arg.partition(" ")
            push(_Node("global", (module, qualname)))
        elif branch == _STACK_GLOBAL:
            qualname, module = stack.pop(), stack.pop()
            push(_Node("global", (module.value, qualname.value)))   # strings: "key" nodes
        elif branch == _NEWOBJ:
            args, cls = stack.pop(), stack.pop()
            namespace = cls.kind == "global" and cls.value == _NAMESPACE and args.kind == "tuple" and args.items == 0
            push(_Node("namespace" if namespace else "other"))
        elif branch == _CONSUMES:
            # whatever a constructor, a tensor rebuild or a persistent id consumes is not a slot
            consumed = _CONSUMED[name]
            if len(stack) < consumed or any(x is _MARK for x in stack[len(stack) - consumed:]):
                raise _GiveUp
            del stack[len(stack) - consumed:]
            push(_Node("other"))
        elif branch == _BUILD:
            state, target = stack.pop(), stack[-1]
            if target.kind == "namespace":
                if target.items:   # built again: the later state may overwrite the first's, follow neither
                    if target.value is not None:
                        target.value.refs += 1
                elif state.kind == "dict":
                    # the state dict's items become the object's attributes (a copy of them: another
                    # place of the state dict is another object)
                    _link(state, target, ("attrs",))
                    target.value = state
                target.items = 1
        elif branch == _POP:
            stack.pop()
        elif branch == _POP_MARK:
            _pop_to_mark(stack)
        else:   # DUP, EXT*, BYTEARRAY8, NEXT_BUFFER, …: not followed
            raise _GiveUp
    if len(stack) != 1 or stack[0] is _MARK:
        raise _GiveUp
    return stack[0], numbers


_MAX_PATHS = 16   # a number reached through more places than this (nested shared containers) is no slot


def _paths(node, root, known: dict):
    """Every sequence of steps from the root to ``node``, or None if a node on the way is referred to
    anywhere but in a plain place (``known``: the answer per node id, None while being worked out)."""
    if node is root:
        return ((),) if root.refs == 1 and not root.places else None
    key = id(node)
    if key in known:
        return known[key]   # None also for a node on its own way down (a cycle)
    known[key] = None
    if not node.places or node.refs != len(node.places):
        return None
    out = []
    for parent, step in node.places:
        above = _paths(parent, root, known)
        if above is None or len(out) + len(above) > _MAX_PATHS:
            return None
        out.extend(p + (step,) for p in above)
    known[key] = out = tuple(out)
    return out


class ScalarSlots:
    """The numbers of one pickle: ``slots[i]`` = (position, opcode name), in pickle order; ``starts`` /
    ``ends`` the byte range of each one's argument (kept as ranges, not a table per byte: a template is
    kept per stage, and pickles can be large). Whether a number lands in plain places only, and their
    paths, is worked out for the numbers that differ in some file (:meth:`paths`): an RNG state's 625
    values rarely do, and the walk up from each costs as much as the opcodes."""

    def __init__(self, root, numbers: list):
        self._root, self._nodes, self._known = root, numbers, {}
        self.slots = [node.value for node in numbers]
        self.starts = np.array([pos + 1 for pos, _ in self.slots], dtype=np.int64)
        self.ends = self.starts + np.array([_NUMBER_FORMATS[name][0] for _, name in self.slots], dtype=np.int64)

    def paths(self, i: int) -> tuple | None:
        """The steps from the root to each place number ``i`` lands in, or None if it is no slot."""
        return _paths(self._nodes[i], self._root, self._known) or None

    def owners(self, positions: np.ndarray) -> list | None:
        """The slots whose arguments hold every byte of ``positions``, or None if one lies outside them."""
        if not positions.size:
            return []
        i = np.searchsorted(self.starts, positions, side="right") - 1
        if (i < 0).any() or (positions >= self.ends[np.maximum(i, 0)]).any():
            return None
        found = sorted(set(i.tolist()))
        return found if all(self.paths(k) for k in found) else None


def scalar_slots(data: bytes) -> ScalarSlots | None:
    """The numbers of ``data`` (see the module doc), or None if it holds an opcode not followed here."""
    try:
        root, numbers = _follow(data)
    except (_GiveUp, KeyError, IndexError, AttributeError, ValueError):
        return None
    return ScalarSlots(root, numbers)


class _Value:
    """A number to put at a place (a leaf of the steps' trie)."""

    __slots__ = ("number",)

    def __init__(self, number):
        self.number = number


def _rebuilt(obj, trie: dict, memo: dict):
    """``obj`` with the places below it that ``trie`` ({step: trie or _Value}) names set: the containers on
    the way copied, each once (``memo``: id -> (original, copy)), so a container the tree holds in two
    places is one copy in both."""
    done = memo.get(id(obj))
    if done is not None:
        return done[1]
    kind = type(obj)
    if kind is argparse.Namespace:
        if list(trie) != [("attrs",)]:
            raise TypeError(kind.__name__)
        out = argparse.Namespace()
        out.__dict__.update(_rebuilt(obj.__dict__, trie[("attrs",)], memo))
    elif kind is dict or kind is list or kind is tuple:
        out = obj.copy() if kind is not tuple else list(obj)
        expected = "key" if kind is dict else "index"
        for (step, at), below in trie.items():
            if step != expected:
                raise TypeError(kind.__name__)
            out[at] = below.number if type(below) is _Value else _rebuilt(obj[at], below, memo)
        if kind is tuple:
            out = tuple(out)
    else:
        raise TypeError(kind.__name__)
    memo[id(obj)] = (obj, out)   # the original kept: its id is not reused while the memo lives
    return out


def differing_bytes(first: bytes, data: bytes) -> np.ndarray | None:
    """The positions where two pickles of one length differ, or None when their lengths differ."""
    if len(data) != len(first):
        return None
    if data == first:
        return np.empty(0, np.int64)
    return np.flatnonzero(np.frombuffer(first, np.uint8) != np.frombuffer(data, np.uint8))


def changed_slots(slots: ScalarSlots, first: bytes, data: bytes) -> list | None:
    """The indices of the slots whose numbers differ between ``first`` and ``data`` (pickles of one
    length), or None when they differ anywhere else."""
    positions = differing_bytes(first, data)
    return None if positions is None else slots.owners(positions)


def patched(root, slots: ScalarSlots, first: bytes, data: bytes):
    """The tree ``data`` unpickles to, from ``root`` (what ``first`` unpickled to) — or None when
    ``data`` differs from ``first`` anywhere but in the numbers of ``slots``."""
    owners = changed_slots(slots, first, data)
    return None if owners is None else patched_at(root, slots, owners, data)


def patched_at(root, slots: ScalarSlots, owners: list, data: bytes):
    """``root`` with the numbers of the slots ``owners`` (:func:`changed_slots`) as ``data`` holds them,
    or None when the tree is not what the opcodes built."""
    if not owners:
        return root
    trie: dict = {}
    for i in owners:
        value = _Value(number_value(slot_bytes(slots.slots[i], data)))
        paths = slots.paths(i)
        if paths is None:
            return None   # no slot: the number is not only in plain places
        for path in paths:
            node = trie
            for step in path[:-1]:
                node = node.setdefault(step, {})
            node[path[-1]] = value
    try:
        return _rebuilt(root, trie, {})
    except (TypeError, KeyError, IndexError, AttributeError):   # the tree is not what the opcodes built: do not guess
        return None


def slot_bytes(slot: tuple, data: bytes) -> bytes:
    """The opcode and argument bytes of ``slot`` (an entry of ``ScalarSlots.slots``) in ``data``."""
    pos, name = slot
    return data[pos:pos + 1 + _NUMBER_FORMATS[name][0]]


def number_value(held: bytes):
    """The number a number opcode and its argument bytes (:func:`slot_bytes`) stand for."""
    return struct.unpack_from(_NUMBER_FORMATS[_OPCODES[held[0]]][1], held, 1)[0]


def with_numbers(first: bytes, slots: ScalarSlots, changes: dict) -> bytes:
    """``first`` with the numbers of some slots replaced: ``changes`` {slot index: opcode and argument
    bytes}, each of the slot's own opcode."""
    out = bytearray(first)
    for i, held in changes.items():
        pos, name = slots.slots[i]
        if len(held) != 1 + _NUMBER_FORMATS[name][0] or held[0] != first[pos]:
            raise ValueError(f"slot {i} is a {name}; got {held!r}")
        out[pos:pos + len(held)] = held
    return bytes(out)


def pickled_as(value, name: str) -> bool:
    """Whether CPython's pickler (protocols 2 - 5) writes ``value`` with the number opcode ``name``: a
    number another writer encoded otherwise (300 as ``BININT``) is not re-pickled to its bytes."""
    if name == "BINFLOAT":
        return type(value) is float
    if type(value) is not int:
        return False
    if name == "BININT1":
        return 0 <= value <= 0xFF
    if name == "BININT2":
        return 0x100 <= value <= 0xFFFF
    return name == "BININT" and -0x80000000 <= value <= 0x7FFFFFFF and not 0 <= value <= 0xFFFF
