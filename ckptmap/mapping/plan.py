"""The plan: plain, JSON round-trippable records of what to write and which bytes make it.

Like PyTorch DCP's ``ReadItem``, these records carry no behaviour and no file handles: the
compiler decides, the executor moves bytes. A plan is deterministic for the same inputs.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import attrs

from ckptmap import dtypes
from ckptmap.errors import CkptmapError

PLAN_VERSION = 3
READABLE_VERSIONS = (2, 3)   # 3 added FileTask.inputs; a version 2 plan has none and reads as before

INPUT_PREFIX = "@"   # SourceSlice.file naming one of its FileTask's inputs instead of a path


def _tuple(value) -> tuple:
    return tuple(value) if value is not None else ()


@attrs.frozen
class Op:
    """A concrete, invertible tensor op (see ``mapping/ops.py``)."""

    kind: str
    args: tuple = attrs.field(converter=_tuple, default=())

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(str(a) for a in self.args)})"


@attrs.frozen
class SourceSlice:
    """Elements ``[start, start + numel)`` of the flattened tensor ``key`` in ``file``
    (``numel`` None = the whole tensor). ``key`` is the file format's own flat key. ``file`` is a path,
    or ``@name``: the input ``name`` of the FileTask the slice belongs to (FileTask.inputs)."""

    file: str
    key: str
    dtype: str
    shape: tuple[int, ...] = attrs.field(converter=_tuple)
    start: int = 0
    numel: int | None = None

    @property
    def count(self) -> int:
        return math.prod(self.shape) - self.start if self.numel is None else self.numel


def concat_range(slices, start: int, count: int) -> tuple[SourceSlice, ...]:
    """Elements ``[start, start + count)`` of the concatenation of ``slices``, as slices."""
    out, pos = [], 0
    for s in slices:
        n = s.count
        lo, hi = max(start, pos), min(start + count, pos + n)
        if lo < hi:
            out.append(attrs.evolve(s, start=s.start + lo - pos, numel=hi - lo))
        pos += n
    return tuple(out)


@attrs.frozen
class Read:
    """Copy a box from a source to the assembly of a TensorTask (PyTorch DCP's ``ReadItem``): the
    elements of ``source`` viewed (C order) as ``view``, box ``offsets``/``lengths`` there, land at
    ``dst_offsets`` of the task's ``src_shape``. ``dst_lengths`` (default: ``lengths``) may be larger
    along dims where ``lengths`` is 1: the box is repeated (Megatron's new vocabulary padding rows
    copy the last row)."""

    source: SourceSlice
    view: tuple[int, ...] = attrs.field(converter=_tuple)
    offsets: tuple[int, ...] = attrs.field(converter=_tuple)
    lengths: tuple[int, ...] = attrs.field(converter=_tuple)
    dst_offsets: tuple[int, ...] = attrs.field(converter=_tuple)
    dst_lengths: tuple[int, ...] | None = attrs.field(default=None, converter=lambda v: None if v is None else tuple(v))

    @property
    def numel(self) -> int:
        return math.prod(self.dst_lengths or self.lengths)


@attrs.frozen
class TensorTask:
    """One output tensor: its sources' element ranges concatenated (``sources``) — or, when the
    tensor is assembled from boxes of several sources (resharding), ``reads`` placed into a zeroed
    array — viewed as ``src_shape`` / ``src_dtype``, then ``ops`` applied; or a constant ``value``.
    ``replicas``: sources that must hold exactly the bytes of the first source (a replicated
    tensor read from one of several ranks); the executor compares them. ``rounds_to``: the model
    weight a distributed optimizer's fp32 main param (this task's source) must round to — Megatron
    copies every main param into its bf16 weight after each step, so a mismatch means the layout
    placed another parameter's state here (checked by the executor for every element)."""

    name: str
    dtype: str
    shape: tuple[int, ...] = attrs.field(converter=_tuple)
    sources: tuple[SourceSlice, ...] = attrs.field(converter=_tuple, default=())
    src_dtype: str | None = None
    src_shape: tuple[int, ...] | None = attrs.field(default=None, converter=lambda v: None if v is None else tuple(v))
    ops: tuple[Op, ...] = attrs.field(converter=_tuple, default=())
    value: Any = None
    note: str = ""
    reads: tuple[Read, ...] = attrs.field(converter=_tuple, default=())
    replicas: tuple[SourceSlice, ...] = attrs.field(converter=_tuple, default=())
    # fp32 main param: rounded to this weight's dtype it must equal it (a tuple: the weight as consecutive runs)
    rounds_to: SourceSlice | tuple[SourceSlice, ...] | None = None

    @property
    def rounds_to_slices(self) -> tuple[SourceSlice, ...]:
        """The weight ``rounds_to`` names, as runs; the main param is the first that many elements of
        ``sources`` (a stacked tensor's first member)."""
        r = self.rounds_to
        return () if r is None else r if isinstance(r, tuple) else (r,)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)

    @property
    def source_label(self) -> str:
        if self.reads:
            files = {r.source.file for r in self.reads}
            return f"{len(self.reads)} boxes of {len(files)} file{'s' if len(files) > 1 else ''}"
        if not self.sources:
            return f"= {self.value!r}"
        if len(self.sources) == 1:
            s = self.sources[0]
            rng = "" if s.numel is None and s.start == 0 else f"[{s.start}:{s.start + s.count}]"
            return f"{s.key}{rng}"
        return f"{len(self.sources)} slices"


@attrs.frozen
class StoragePiece:
    """Elements ``[offset, offset + n)`` of a storage: a tensor's flattened elements, or raw bytes."""

    offset: int
    tensor: TensorTask | None = None
    padding: SourceSlice | None = None   # uint8 bytes kept in pt_meta


@attrs.frozen
class StorageTask:
    """One storage of a streamed torch file, assembled from pieces that tile ``[0, numel)``."""

    key: str
    dtype: str
    numel: int
    pieces: tuple[StoragePiece, ...] = attrs.field(converter=_tuple, default=())

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


@attrs.frozen
class FileTask:
    """One output file, relative to the plan's output root.

    format: ``ckpt`` / ``safetensors`` (tensors), ``torch_meta`` (the listed top-level objects of
    ``source`` plus ``extra``, re-pickled safely), ``torch_stream`` (the skeleton ``extra["skeleton"]``
    of the pt_meta file ``source`` with its placeholders bound to ``storages``, written like
    torch.save), ``copy`` (bytes of ``source``; an output-relative path when ``source_is_output``),
    ``text`` (``text``).

    ``inputs``: {``@name``: path} for the slices whose file is ``@name``. Ranks of one structure (the
    TP ranks of a pipeline stage and expert rank: equal pickles, equal bucket layouts) plan the same
    tensors from other files; naming the files through ``inputs`` lets their FileTasks share one
    ``tensors`` tuple, so a 16,384-rank plan holds one record per distinct rank, not per rank.
    ``bound()`` gives the task with paths in place (what the executor writes)."""

    path: str
    format: str
    tensors: tuple[TensorTask, ...] = attrs.field(converter=_tuple, default=())
    metadata: dict = attrs.field(factory=dict)
    source: str | None = None
    aux_source: str | None = None
    source_is_output: bool = False
    keys: tuple[str, ...] = attrs.field(converter=_tuple, default=())
    extra: dict = attrs.field(factory=dict)
    text: str | None = None
    crc: bool = False  # .ckpt: append MindSpore's CRC-32 trailer (load_checkpoint(crc_check=True))
    storages: tuple[StorageTask, ...] = attrs.field(converter=_tuple, default=())
    inputs: dict = attrs.field(factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) + sum(s.nbytes for s in self.storages)

    def source_path(self, file: str) -> str:
        """The path a slice's ``file`` names in this task (an input's, or ``file`` itself)."""
        if file.startswith(INPUT_PREFIX):
            path = self.inputs.get(file)
            if path is None:
                raise CkptmapError(f"plan file {self.path}: a tensor reads {file}, which is not one of this file's "
                                   f"inputs ({', '.join(sorted(self.inputs)) or 'none'}); the plan is damaged — "
                                   f"re-create it with `ckptmap plan`")
            return path
        return file

    def bound(self) -> "FileTask":
        """This task with every ``@name`` slice naming its input's path (itself when it has no inputs)."""
        if not self.inputs:
            return self
        def bind(s: SourceSlice | None):
            if s is None or not s.file.startswith(INPUT_PREFIX):
                return s
            return attrs.evolve(s, file=self.source_path(s.file))
        def task(t: TensorTask) -> TensorTask:
            rounds_to = t.rounds_to if t.rounds_to is None or isinstance(t.rounds_to, SourceSlice) else \
                tuple(bind(s) for s in t.rounds_to)   # several runs
            return attrs.evolve(t, sources=tuple(bind(s) for s in t.sources),
                                replicas=tuple(bind(s) for s in t.replicas),
                                rounds_to=bind(rounds_to) if isinstance(rounds_to, SourceSlice) else rounds_to,
                                reads=tuple(attrs.evolve(r, source=bind(r.source)) for r in t.reads))
        return attrs.evolve(self, tensors=tuple(task(t) for t in self.tensors), inputs={}, storages=tuple(
            attrs.evolve(st, pieces=tuple(attrs.evolve(p, tensor=task(p.tensor) if p.tensor else None,
                                                       padding=bind(p.padding)) for p in st.pieces))
            for st in self.storages))


def _nested_json(value, depth: int) -> str:
    """``json.dumps(value, indent=1)`` as it appears `depth` levels deep in an indented document
    (JSON strings escape newlines, so every newline of the text is a line break of the layout)."""
    return json.dumps(value, indent=1).replace("\n", "\n" + " " * depth)


_SHARED_FIELDS = ("tensors", "storages")   # tuples ranks of one structure share (FileTask.inputs)
_MARKS = {name: f"\0{name}\0" for name in _SHARED_FIELDS}   # no record holds a NUL: stands for the text


def _file_json(f: FileTask, shared_text: dict) -> str:
    """``_nested_json(attrs.asdict(f), 2)``, with the text of ``f.tensors`` and ``f.storages`` made once per
    tuple (``shared_text``: id -> (tuple, its text))."""
    shared = [name for name in _SHARED_FIELDS if getattr(f, name)]
    if not shared:
        return _nested_json(attrs.asdict(f, recurse=True), 2)
    texts = {}
    for name in shared:
        value = getattr(f, name)
        hit = shared_text.get(id(value))
        if hit is None or hit[0] is not value:
            hit = shared_text[id(value)] = (value, _nested_json([attrs.asdict(x) for x in value], 3))
        texts[name] = hit[1]
    fields = attrs.asdict(f, recurse=True, filter=lambda a, _: a.name not in texts)
    fields = {a.name: _MARKS[a.name] if a.name in texts else fields[a.name] for a in attrs.fields(FileTask)}
    text = _nested_json(fields, 2)
    for name, value_text in texts.items():
        text = text.replace(json.dumps(_MARKS[name]), value_text, 1)
    return text


def _tensor_task(raw: dict) -> TensorTask:
    t = dict(raw)
    t["sources"] = tuple(SourceSlice(**s) for s in t.get("sources", ()))
    t["replicas"] = tuple(SourceSlice(**s) for s in t.get("replicas", ()))
    t["reads"] = tuple(Read(**dict(r, source=SourceSlice(**r["source"]))) for r in t.get("reads", ()))
    t["ops"] = tuple(Op(**o) for o in t.get("ops", ()))
    if t.get("rounds_to"):
        r = t["rounds_to"]
        t["rounds_to"] = SourceSlice(**r) if isinstance(r, dict) else tuple(SourceSlice(**x) for x in r)
    return TensorTask(**t)


@attrs.frozen
class Plan:
    """``output_shared``: the output root also holds data that is not this plan's (combine writing
    next to the shards it reads), so only the plan's own files count when the executor checks the
    target (``ckptmap.target``); otherwise the root belongs to the plan."""

    kind: str
    output_root: str
    files: tuple[FileTask, ...] = attrs.field(converter=_tuple)
    info: dict = attrs.field(factory=dict)
    version: int = PLAN_VERSION
    output_shared: bool = False

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def to_json(self) -> str:
        buf = io.StringIO()
        self.write_json(buf)
        return buf.getvalue()

    def write_json(self, fp) -> None:
        """Write the plan as JSON to the text stream `fp`, one file record at a time: never the
        whole plan as one string or one dict tree (a 16,384-rank plan holds tens of thousands of
        records). The text is exactly ``json.dumps(attrs.asdict(plan), indent=1)``."""
        fields = attrs.fields(type(self))
        rest = attrs.asdict(self, recurse=True, filter=lambda a, _: a is not fields.files)
        for n, field in enumerate(fields):
            fp.write(("{" if n == 0 else ",") + "\n " + json.dumps(field.name) + ": ")
            if field.name != "files":
                fp.write(_nested_json(rest[field.name], 1))
                continue
            if not self.files:
                fp.write("[]")
                continue
            fp.write("[")
            shared_text: dict = {}   # id(tensors/storages tuple) -> (tuple, its JSON): ranks of one structure share one
            for i, f in enumerate(self.files):
                fp.write(("\n  " if i == 0 else ",\n  ") + _file_json(f, shared_text))
            fp.write("\n ]")
        fp.write("\n}")

    @classmethod
    def from_json(cls, text: str, origin: str = "plan") -> "Plan":
        try:
            raw = json.loads(text)
            if raw.get("version") not in READABLE_VERSIONS:
                raise CkptmapError(f"{origin}: plan version {raw.get('version')!r}; this ckptmap reads "
                                   f"versions {' and '.join(map(str, READABLE_VERSIONS))}; re-create the plan with `ckptmap plan`")
            files = []
            for f in raw["files"]:
                f = dict(f)
                f["tensors"] = tuple(_tensor_task(t) for t in f.get("tensors", ()))
                f["storages"] = tuple(
                    StorageTask(**dict(st, pieces=tuple(
                        StoragePiece(p["offset"], _tensor_task(p["tensor"]) if p.get("tensor") else None,
                                     SourceSlice(**p["padding"]) if p.get("padding") else None)
                        for p in st.get("pieces", ()))))
                    for st in f.get("storages", ()))
                files.append(FileTask(**f))
            return cls(kind=raw["kind"], output_root=raw["output_root"], files=tuple(files),
                       info=raw.get("info", {}), version=PLAN_VERSION,
                       output_shared=bool(raw.get("output_shared", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise CkptmapError(f"{origin} is not a valid ckptmap plan ({type(e).__name__}: {e}); "
                               f"re-create it with `ckptmap plan … -o FILE`") from None
