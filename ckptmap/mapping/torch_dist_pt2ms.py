"""``pt2ms`` of a torch_dist checkpoint, every tensor byte written once.

pt2ms plans from legacy Megatron files (their object trees and bucket layouts: ``megatron_source``), and
torch_dist -> torch (``torch_dist_legacy``) plans such files piece by piece: most pieces of their storages
are byte copies of torch_dist chunks (``reshard.byte_copy_pieces``), the rest buffer padding (zeros) and,
at a new TP size, boxes assembled from several chunks. So the legacy files are written into a temporary
folder as *intermediates* (``execute.write_intermediate``): pickles and zip records, every tensor piece left
as a hole of a sparse file -- neither read nor written. pt2ms plans from them as from any legacy folder;
then every slice of its plan that lies in a byte-copied piece is replaced by the same elements of the chunk
that piece copies (:func:`direct`), so the executor reads the torch_dist files once and writes the
MindSpore files once. What still reads the intermediates reads real bytes: the pt_meta entries (object
trees, RNG states, zero padding -- a hole reads as zeros) and the assembled pieces the plan reads there,
which are written into their holes first (``execute.fill_hole``; pt2ms's default fp32 weights come from the
main params, so an assembled bf16 weight is written only for the main-param check).

pt2ms's checks are pt2ms's: the layout checks while planning, and the main-param spot check on the
rewritten plan (``megatron_source.spot_check_main_params``; while planning it saw the holes' zeros, which
prove nothing), then the executor's check of every element.
"""

from __future__ import annotations

import bisect
import math
import os
from pathlib import Path

import attrs

from ckptmap import dtypes
from ckptmap.errors import CkptmapError
from ckptmap.formats.torch_zip_reader import contiguous_stride
from ckptmap.mapping.plan import Plan, SourceSlice, TensorTask


@attrs.frozen
class Intermediate:
    """The legacy files written with holes: {file path: {record key: the plan's StorageTask}}."""

    root: Path
    storages: dict


def write_intermediates(legacy: Plan) -> Intermediate:
    """Write ``legacy`` (a torch_dist -> torch plan) into its output root as intermediates, in this
    process (they hold little data)."""
    from ckptmap import execute

    root = Path(legacy.output_root)
    storages = {}
    for f in legacy.files:
        if f.format in execute._MEGATRON_WRITERS:
            records = execute.write_intermediate(f, root)
            by_key = {st.key: st for st in f.storages}
            storages[os.path.realpath(root / f.path)] = {record: by_key[key] for key, record in records.items()}
        else:
            execute.write_file(f, root)
    return Intermediate(root, storages)


class _Rewriter:
    def __init__(self, inter: Intermediate):
        from ckptmap.formats.megatron_files import PtFile

        self.inter = inter
        self.files: dict = {}
        self.real: dict = {}
        self.fills: dict = {}   # (file, id(piece)) -> (file, byte offset, piece task): assembled pieces read there
        self.root = os.path.realpath(inter.root)
        self.offsets: dict = {}   # id(StorageTask) -> piece offsets (sorted: pieces tile the storage in order)
        self._open = PtFile

    def _file(self, path: str):
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = self._open(path)
        return f

    def _needs(self, s: SourceSlice, ref, st, piece) -> None:
        key = (s.file, id(piece))
        if key in self.fills:
            return
        rng = self._file(s.file).byte_range(s.key)
        if rng is None:
            raise CkptmapError(f"internal error: {s.file}: tensor {s.key} is not stored contiguously")
        size = dtypes.itemsize(st.dtype)
        self.fills[key] = (s.file, rng.offset + (piece.offset - ref.storage_offset) * size, piece.tensor)

    def slices(self, s: SourceSlice) -> tuple[SourceSlice, ...]:
        """``s`` as the slices its elements come from: those of byte-copied pieces as slices of the chunks
        they copy, the rest (assembled pieces, zeros) as before, in the intermediate."""
        from ckptmap.execute import hole_source, zero_constant

        real = self.real.get(s.file)
        if real is None:   # pt2ms names the files as it found them; the intermediates are keyed by real path
            real = self.real[s.file] = os.path.realpath(s.file)
        table = self.inter.storages.get(real)
        if table is None:
            if real.startswith(self.root + os.sep):   # never read an intermediate's holes as data
                raise CkptmapError(f"internal error: {s.file} (tensor {s.key}) is in the intermediate folder but was "
                                   f"not written as an intermediate file")
            return (s,)
        ref = self._file(s.file).entry(s.key)
        st = table.get(ref.storage) if ref is not None else None
        if st is None:
            return (s,)
        if ref.numel and tuple(ref.stride) != contiguous_stride(ref.shape):
            raise CkptmapError(f"internal error: {s.file}: tensor {s.key} is not a contiguous view of its storage")
        first, count = ref.storage_offset + s.start, s.count
        offsets = self.offsets.get(id(st))
        if offsets is None:
            offsets = self.offsets[id(st)] = [p.offset for p in st.pieces]
        out: list[SourceSlice] = []
        i = max(0, bisect.bisect_right(offsets, first) - 1)
        while i < len(st.pieces) and st.pieces[i].offset < first + count:
            piece = st.pieces[i]
            i += 1
            n = math.prod(piece.tensor.shape) if piece.tensor is not None else \
                piece.padding.count // dtypes.itemsize(st.dtype)   # raw bytes
            lo, hi = max(first, piece.offset), min(first + count, piece.offset + n)
            if lo >= hi:
                continue
            src = hole_source(piece.tensor) if piece.tensor is not None else None
            if src is None and piece.tensor is not None and not zero_constant(piece.tensor):
                self._needs(s, ref, st, piece)   # assembled: written into the intermediate, as it is read there
            if src is not None:
                start = src.start + lo - piece.offset
                whole = start == 0 and hi - lo == math.prod(src.shape)
                out.append(attrs.evolve(src, start=start, numel=None if whole else hi - lo))
            elif out and out[-1].file == s.file and out[-1].start + out[-1].count == s.start + lo - first:
                out[-1] = attrs.evolve(out[-1], numel=out[-1].count + hi - lo)   # one run of the intermediate
            else:
                out.append(attrs.evolve(s, start=s.start + lo - first, numel=hi - lo))
        if sum(x.count for x in out) != count:
            raise CkptmapError(f"internal error: {s.file}: tensor {s.key} [{s.start}:{s.start + count}] is not "
                               f"covered by the pieces of its storage in the torch_dist -> torch plan")
        if len(out) == 1 and out[0].file == s.file:
            return (s,)
        return tuple(out)

    def task(self, t: TensorTask) -> TensorTask:
        if not t.sources and not t.rounds_to and not t.replicas and not t.reads:
            return t
        if t.reads or t.replicas:
            touched = [r.source for r in t.reads] + list(t.replicas)
            if any(self.slices(x) != (x,) for x in touched):
                raise CkptmapError(f"internal error: {t.name} reads boxes or replicas of an intermediate legacy file's "
                                   f"byte-copied pieces; pt2ms of torch_dist does not plan those")
        sources = tuple(x for s in t.sources for x in self.slices(s))
        rounds_to = t.rounds_to
        if rounds_to is not None:
            runs = tuple(x for w in t.rounds_to_slices for x in self.slices(w))
            rounds_to = runs[0] if len(runs) == 1 else runs
        if sources == t.sources and rounds_to == t.rounds_to:
            return t
        return attrs.evolve(t, sources=sources, rounds_to=rounds_to)


def direct(plan: Plan, inter: Intermediate, source: str, main_param_check: bool = True) -> Plan:
    """``plan`` (pt2ms of the intermediates) reading the torch_dist chunks wherever the intermediates
    hold byte copies of them; the main-param spot check run again on what it now reads. ``source``: the
    torch_dist checkpoint (the plan's source as printed)."""
    from ckptmap.mapping.megatron_source import spot_check_main_params

    rw = _Rewriter(inter)
    try:
        files, seen = [], {}
        for f in plan.files:
            if not f.tensors:
                files.append(f)
                continue
            f = f.bound()   # slices naming the rank's files by input (@optim …) name them by path here
            tensors = []
            for t in f.tensors:
                new = seen.get(id(t))   # ranks share constant tasks
                if new is None or new[0] is not t:
                    new = seen[id(t)] = (t, rw.task(t))
                tensors.append(new[1])
            files.append(attrs.evolve(f, tensors=tuple(tensors)))
    finally:
        for pt in rw.files.values():
            pt.close()
    from ckptmap.execute import fill_hole
    written = 0
    for path, offset, task in rw.fills.values():   # what the plan reads of the intermediates, before the checks
        fill_hole(path, offset, task)
        written += task.nbytes
    if main_param_check:
        spot_check_main_params([t for f in files for t in f.tensors if t.rounds_to is not None])
    holes = sum(1 for table in inter.storages.values() for st in table.values() for p in st.pieces
                if p.tensor is not None) - len(rw.fills)
    direct_bytes = sum(s.count * dtypes.itemsize(s.dtype) for f in files for t in f.tensors for s in t.sources
                       if rw.real.get(s.file, s.file) not in inter.storages)
    info = dict(plan.info, source=source, source_format="torch_dist",
                intermediate=f"legacy object trees in {inter.root}, {holes} storage pieces left as holes, {written} "
                             f"tensor bytes written there (assembled pieces the plan reads there)",
                read_from_torch_dist=f"{direct_bytes} bytes")
    return attrs.evolve(plan, files=tuple(files), info=info)
