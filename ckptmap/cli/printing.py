"""How plans and run reports are printed (shared by every command and the demo)."""

from __future__ import annotations

import os
import re
import sys
import textwrap


NOTES = ("param_map_ignored", "left_out")   # info entries printed one per line


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _tensor_row(t, common, prefix="", f=None):
    """``f``: the FileTask of ``t`` (its slices may name the file's inputs)."""
    first = _first_file(t)
    if first and f is not None:
        first = f.source_path(first)
    src_file = os.path.relpath(first, common) if first else "-"
    return (prefix + t.name, t.note or t.source_label, src_file, "x".join(map(str, t.shape)) or "scalar", t.dtype,
            ", ".join(map(str, t.ops)) or "-", str(t.nbytes))


def _first_file(task) -> str | None:
    if task.sources:
        return task.sources[0].file
    if task.reads:
        return task.reads[0].source.file
    return None


def _box(offsets, lengths) -> str:
    return "[" + ", ".join(f"{o}:{o + n}" for o, n in zip(offsets, lengths)) + "]"


def _print_rows(rows, out, after=None) -> None:
    """A table of tensor rows; ``after[i]``: lines printed under row i."""
    rows = [("tensor", "from", "file", "shape", "dtype", "ops", "bytes")] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        for line in (after[i - 1] if after and i else ()):
            print(line, file=out)


_DIGITS = re.compile(r"\d+")
_DIGITS_AS_ZERO = str.maketrans("0123456789", "0000000000")


def _pattern(text: str) -> str:
    """A name with its numbers (layers, ranks, buckets) as N: rows that differ only there are one pattern."""
    return _DIGITS.sub("N", text)


def _how(t) -> str:
    """How the executor makes a tensor's bytes: kernel-side byte copies (of one or several source runs), a
    cast streamed in chunks, or the tensor computed (ops that move elements, sources of several dtypes,
    boxes assembled), or a constant."""
    from ckptmap.execute import _elementwise

    if not t.sources and not t.reads:
        return "constant"
    kinds = _elementwise(t)
    if kinds is None:
        return "computed"
    return "byte copy" if kinds[0] == kinds[1] else f"cast {kinds[0]}->{kinds[1]}"


def _all_tensors(f):
    """(tensor task or None, storage key, piece) of a file: its tensors, or its storages' pieces."""
    for t in f.tensors:
        yield t, None, None
    for s in f.storages:
        for p in s.pieces:
            yield p.tensor, s.key, p


class _Tally:
    """One pass over a plan's tensors for the summary: the names' patterns, how each is made and its
    bytes. A 4,096-rank plan has ~150,000 tensors but few distinct names (ranks repeat them) and few
    distinct op lists, so those are worked out once each."""

    def __init__(self):
        self.patterns: dict = {}
        self.by_mask: dict = {}
        self.hows: dict = {}
        self.sizes: dict = {}

    def pattern(self, text: str) -> str:
        p = self.patterns.get(text)
        if p is None:
            # names whose numbers have the same numbers of digits have one pattern: found by a translate
            # (ranks' file names are all distinct: a regex substitution each was most of their cost)
            masked = text.translate(_DIGITS_AS_ZERO)
            p = self.by_mask.get(masked)
            if p is None:
                p = self.by_mask[masked] = _pattern(text)
            self.patterns[text] = p
        return p

    def nbytes(self, t) -> int:   # TensorTask.nbytes, by (dtype, shape): the stages repeat their shapes
        key = (t.dtype, t.shape)
        n = self.sizes.get(key)
        if n is None:
            n = self.sizes[key] = t.nbytes
        return n

    def how(self, t) -> str:
        if not t.sources and not t.reads:
            return "constant"
        if t.reads or t.value is not None:
            return _how(t)
        sources = t.sources
        # the ops tuple by identity (ranks of one structure share it; hashing its ops per tensor was most
        # of the summary), kept in the value so that its id is not reused meanwhile
        key = (t.src_dtype, sources[0].dtype if len(sources) == 1 else frozenset(s.dtype for s in sources),
               t.dtype, id(t.ops))
        hit = self.hows.get(key)
        if hit is None or hit[0] is not t.ops:
            hit = self.hows[key] = (t.ops, _how(t))
        return hit[1]


def print_summary(plan, common: str, out, tally: _Tally | None = None) -> None:
    """The plan by pattern: files and tensors grouped by their names with numbers as N, with counts,
    bytes and one full example row each — a size that does not grow with the ranks."""
    tally = tally or _Tally()
    files: dict = {}
    tensors: dict = {}
    how_total: dict = {}
    n_tensors = 0
    # id(tensors or storages tuple) -> [the tuple, its tally, its bytes, files after the first]: ranks of
    # one structure share one tuple; its rows are added as it is first met (the order of the listing)
    # and, times the number of its other files, at the end
    of_tuple: dict = {}
    for f in plan.files:
        key = (tally.pattern(f.path), f.format)
        entry = files.get(key)
        if entry is None:
            entry = files[key] = [0, 0, f]
        entry[0] += 1
        shared = f.tensors if not f.storages else f.storages if not f.tensors else None   # both: its own
        hit = of_tuple.get(id(shared)) if shared is not None else None
        if hit is not None and hit[0] is shared:
            entry[1] += hit[2]
            hit[3] += 1
            continue
        if f.storages:
            rows = _tally_rows(_all_tensors(f), tally)
            nbytes = sum(s.nbytes for s in f.storages)
        else:
            rows = _tally_rows(((t, None, None) for t in f.tensors), tally)
            nbytes = sum(row[1] for row in rows.values())
        if shared is not None:
            of_tuple[id(shared)] = [shared, rows, nbytes, 0]
        entry[1] += nbytes
        n_tensors += _add_rows(rows, 1, f, tensors, how_total)
    for _, rows, _, more in of_tuple.values():
        if more:
            n_tensors += _add_rows(rows, more, None, tensors, how_total)
    tally.n_tensors = n_tensors
    tally.nbytes_total = sum(e[1] for e in files.values())
    print(f"\nfiles by pattern ({len(plan.files)} files):", file=out)
    rows = [("pattern", "format", "files", "bytes", "example")]
    for (pattern, fmt), (count, nbytes, f) in files.items():
        rows.append((pattern, fmt, str(count), human_bytes(nbytes), f.path))
    _print_table(rows, out)
    print(f"\ntensors by pattern ({n_tensors} tensors):", file=out)
    rows = [("pattern", "how", "count", "bytes")]
    examples = []
    for (pattern, how), (count, nbytes, f, t, storage, piece) in tensors.items():
        rows.append((pattern, how, str(count), human_bytes(nbytes)))
        if t is None:
            examples.append((f"[{storage}@{piece.offset}] padding", piece.padding.key,
                             os.path.relpath(f.source_path(piece.padding.file), common), "-", "bytes", "-",
                             str(piece.padding.shape[0])))
        else:
            examples.append(_tensor_row(t, common, f"[{storage}@{piece.offset}] " if storage else "", f))
    _print_table(rows, out)
    print("\none example per tensor pattern (file: the example's output file):", file=out)
    rows = [("tensor", "from", "file", "shape", "dtype", "ops", "bytes")] + examples
    _print_table(rows, out)
    print("\nhow the bytes are made: " + "; ".join(
        f"{how} {count} tensors, {human_bytes(nbytes)}" for how, (count, nbytes) in sorted(how_total.items()))
        + "\n(--full lists every file and tensor)", file=out)


def _add_rows(rows: dict, times: int, f, tensors: dict, how_total: dict) -> int:
    """Add a file's tally rows ``times`` times to the totals by pattern and by how; the tensors added.
    ``f``: the file, the example of a pattern first met here (None: every pattern was met before)."""
    n = 0
    for k, (count, nbytes, t, storage, piece) in rows.items():
        e = tensors.get(k)
        if e is None:
            e = tensors[k] = [0, 0, f, t, storage, piece]
        e[0] += count * times
        e[1] += nbytes * times
        h = how_total.get(k[1])
        if h is None:
            h = how_total[k[1]] = [0, 0]
        h[0] += count * times
        h[1] += nbytes * times
        if t is not None:
            n += count * times
    return n


def _tally_rows(items, tally: _Tally) -> dict:
    """{(name pattern, how): [count, bytes, first tensor, its storage, its piece]} of a file's (tensor,
    storage, piece) items (_all_tensors), in their order; a padding piece has no tensor."""
    out: dict = {}
    known_pattern, pattern, how, sizes = tally.patterns.get, tally.pattern, tally.how, tally.sizes.get
    for t, storage, piece in items:   # ~130,000 tensors at 16,384 MoE ranks: the lookups are inlined
        if t is None:
            k, nbytes = (pattern(f"[{storage}] padding"), "padding"), piece.padding.shape[0]
        else:
            name = t.name
            k = (known_pattern(name) or pattern(name), how(t))
            nbytes = sizes((t.dtype, t.shape)) or tally.nbytes(t)
        e = out.get(k)
        if e is None:
            out[k] = [1, nbytes, t, storage, piece]
        else:
            e[0] += 1
            e[1] += nbytes
    return out


def _print_table(rows, out) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def _source_root(plan) -> str:
    """The common path of every tensor's first source file (the plan's output root if none)."""
    from ckptmap.mapping.plan import INPUT_PREFIX   # not at import: --help stays without attrs

    files = set()
    seen: dict = {}   # ranks of one structure share their tensors (storages) tuple: id -> the tuple
    for f in plan.files:
        if f.inputs:
            files.update(f.inputs.values())
        if seen.get(id(f.tensors)) is not f.tensors:
            seen[id(f.tensors)] = f.tensors
            for t in f.tensors:
                if t.sources:
                    files.add(t.sources[0].file)
                elif t.reads:
                    files.add(t.reads[0].source.file)
        if seen.get(id(f.storages)) is f.storages:
            continue
        seen[id(f.storages)] = f.storages
        for s in f.storages:
            for p in s.pieces:
                if p.tensor and (x := _first_file(p.tensor)):
                    files.add(x)
    files = {x for x in files if x and not x.startswith(INPUT_PREFIX)}
    if len(files) > 1 and all(x[0] == "/" and x[1:2] != "/" and "\0" not in x and x == os.path.normpath(x)
                              for x in files):
        # commonpath compares the split paths' min and max only: found without splitting every path (a
        # separator sorts below every other character, so whole-string order is component order)
        lo = min(files, key=_component_order)
        hi = max(files, key=_component_order)
        return os.path.commonpath([lo, hi])
    return os.path.commonpath(sorted(files) or [plan.output_root])


def _component_order(path: str) -> str:
    return path.replace("/", "\0")


def print_plan(plan, out=None, detail: bool = True, summary: bool = False) -> None:
    """The plan's header, then (``detail``) every file with a row per tensor, or (``summary``) the
    plan by pattern (:func:`print_summary`), or one line per file."""
    out = out or sys.stdout
    info = plan.info
    common = _source_root(plan)
    print(f"plan {plan.kind}: {info.get('source', '')} -> {plan.output_root}", file=out)
    print("  " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("source", "rules_path") + NOTES),
          file=out)
    for key in NOTES:
        for line in info.get(key, ()):
            print(f"  note: {line}", file=out)
    if summary and not detail:
        tally = _Tally()
        print_summary(plan, common, out, tally)
        print(f"\ntotal: {len(plan.files)} files, {tally.n_tensors} tensors, {human_bytes(tally.nbytes_total)} of "
              f"tensor data (source root {common})", file=out)
        return
    n_tensors = 0
    sizes: dict = {}
    for f in plan.files:
        if f.format in ("ckpt", "safetensors"):
            print(f"\n{f.path}  ({f.format}, {len(f.tensors)} tensors, {human_bytes(_file_nbytes(f, sizes))})",
                  file=out)
            n_tensors += len(f.tensors)
            if detail:
                _print_rows([_tensor_row(t, common, f=f) for t in f.tensors], out)
        elif f.format == "torch_stream":
            pieces = [p for s in f.storages for p in s.pieces]
            n_tensors += sum(1 for p in pieces if p.tensor)
            print(f"\n{f.path}  (torch file: {len(f.storages)} storages, {sum(1 for p in pieces if p.tensor)} "
                  f"tensors, {human_bytes(f.nbytes)})", file=out)
            if detail:
                rows = []
                for s in f.storages:
                    for p in s.pieces:
                        if p.tensor:
                            rows.append(_tensor_row(p.tensor, common, f"[{s.key}@{p.offset}] ", f))
                        else:
                            rows.append((f"[{s.key}@{p.offset}] padding", p.padding.key,
                                         os.path.relpath(f.source_path(p.padding.file), common), "-", "bytes", "-",
                                         str(p.padding.shape[0])))
                _print_rows(rows, out)
        elif f.format == "copy":
            print(f"\n{f.path}  (copy of {f.source})", file=out)
        elif f.format == "torch_meta":
            print(f"\n{f.path}  (entries {', '.join(f.keys)} of {_relative(f.source, common)}"
                  f" + {', '.join(f.extra)} + layout skeletons)", file=out)
        elif f.storages:   # Megatron files a reshard / torch_dist conversion assembles
            tensors = [p.tensor for st in f.storages for p in st.pieces if p.tensor]
            n_tensors += len(tensors)
            print(f"\n{f.path}  ({f.format}: {len(f.storages)} storages, {len(tensors)} tensors, "
                  f"{human_bytes(f.nbytes)})", file=out)
            if detail:   # each tensor, then which box of which source lands where (DCP ReadItem-like)
                boxes = [[f"    <- {os.path.relpath(r.source.file, common)} {r.source.key} "
                          f"{_box(r.offsets, r.lengths)} of {list(r.view)} -> "
                          f"{_box(r.dst_offsets, r.dst_lengths or r.lengths)}" for r in t.reads] for t in tensors]
                _print_rows([_tensor_row(t, common) for t in tensors], out, boxes)
        else:
            print(f"\n{f.path}  ({f.format})", file=out)
    total = sum(_file_nbytes(f, sizes) for f in plan.files)
    print(f"\ntotal: {len(plan.files)} files, {n_tensors} tensors, {human_bytes(total)} of tensor data "
          f"(source root {common})", file=out)


def _file_nbytes(f, sizes: dict) -> int:
    """``f.nbytes``, summed once per tensors tuple (``sizes``: by its id): the ranks of one structure share
    theirs, and summing every rank's tensors was most of listing a 16,384-rank plan."""
    if f.storages:
        return f.nbytes
    hit = sizes.get(id(f.tensors))
    if hit is None or hit[0] is not f.tensors:
        hit = sizes[id(f.tensors)] = (f.tensors, f.nbytes)
    return hit[1]


def _relative(path: str, common: str) -> str:
    """``os.path.relpath(path, common)``; for a normalized absolute path under ``common`` (every file of a
    plan, against its source root), the part after it, without relpath's splitting of both."""
    root = common.rstrip("/")
    if common.startswith("/") and path.startswith(root + "/") and path == os.path.normpath(path) \
            and common == os.path.normpath(common):
        return path[len(root) + 1:]
    return os.path.relpath(path, common)


LISTED_FILES = 64   # a run writing more files prints them by folder (--full: every file)


def print_report(report, out=None, full: bool = False) -> None:
    out = out or sys.stdout
    results = report.results
    if len(results) > LISTED_FILES and not full:
        # thousands of ranks: one line per folder pattern (numbers as N), not a line per file
        groups: dict = {}
        for r in results:
            folder = os.path.dirname(r.path) or "."
            g = groups.setdefault(re.sub(r"\d+", "N", folder), [set(), 0, 0, 0])
            g[0].add(folder)
            g[1] += 1
            g[2] += r.nbytes
            g[3] += not r.ok
        width = max(len(k) for k in groups) + 1
        for pattern, (folders, n, b, bad) in sorted(groups.items(), key=lambda kv: (-kv[1][3], -kv[1][2], kv[0])):
            print(f"  {(pattern + '/').ljust(width)}  {len(folders):6d} folder{'s' if len(folders) > 1 else ' '}  "
                  f"{n:7d} files  {human_bytes(b):>10}  {'ok' if not bad else f'{bad} FAILED'}", file=out)
        slow = sorted(results, key=lambda r: -r.seconds)[:3]
        print("  slowest: " + ", ".join(f"{r.path} {r.seconds:.2f} s" for r in slow)
              + "  (--full lists every file)", file=out)
    else:
        width = max((len(r.path) for r in results), default=4)
        for r in results:
            status = "ok" if r.ok else "FAILED"
            print(f"  {r.path.ljust(width)}  {human_bytes(r.nbytes):>10}  {r.seconds:7.2f} s  {status}", file=out)
    for r in report.failed:
        print(f"\nFAILED {r.path}:\n" + textwrap.indent(r.error, "  "), file=out)
    rate = report.nbytes / report.seconds / 2**20 if report.seconds else 0
    print(f"\n{len(report.results) - len(report.failed)} of {len(report.results)} files written "
          f"successfully, {human_bytes(report.nbytes)} in {report.seconds:.2f} s ({rate:.0f} MiB/s)", file=out)
