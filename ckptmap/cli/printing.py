"""How plans and run reports are printed (shared by every command and the demo)."""

from __future__ import annotations

import os
import sys
import textwrap


NOTES = ("param_map_ignored", "left_out")   # info entries printed one per line


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _tensor_row(t, common, prefix=""):
    first = _first_file(t)
    src_file = os.path.relpath(first, common) if first else "-"
    return (prefix + t.name, t.note or t.source_label, src_file, "x".join(map(str, t.shape)) or "scalar", t.dtype,
            ", ".join(map(str, t.ops)) or "-", str(t.nbytes))


def _first_file(task) -> str | None:
    if task.sources:
        return task.sources[0].file
    if task.reads:
        return task.reads[0].source.file
    return None


def _print_rows(rows, out) -> None:
    rows = [("tensor", "from", "file", "shape", "dtype", "ops", "bytes")] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def print_plan(plan, out=None, detail: bool = True) -> None:
    out = out or sys.stdout
    info = plan.info
    files = [x for f in plan.files for t in f.tensors if (x := _first_file(t))]
    files += [x for f in plan.files for s in f.storages for p in s.pieces if p.tensor and (x := _first_file(p.tensor))]
    common = os.path.commonpath(files or [plan.output_root])
    print(f"plan {plan.kind}: {info.get('source', '')} -> {plan.output_root}", file=out)
    print("  " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("source", "rules_path") + NOTES),
          file=out)
    for key in NOTES:
        for line in info.get(key, ()):
            print(f"  note: {line}", file=out)
    n_tensors = 0
    for f in plan.files:
        if f.format in ("ckpt", "safetensors"):
            print(f"\n{f.path}  ({f.format}, {len(f.tensors)} tensors, {human_bytes(f.nbytes)})", file=out)
            n_tensors += len(f.tensors)
            if detail:
                _print_rows([_tensor_row(t, common) for t in f.tensors], out)
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
                            rows.append(_tensor_row(p.tensor, common, f"[{s.key}@{p.offset}] "))
                        else:
                            rows.append((f"[{s.key}@{p.offset}] padding", p.padding.key,
                                         os.path.relpath(p.padding.file, common), "-", "bytes", "-",
                                         str(p.padding.shape[0])))
                _print_rows(rows, out)
        elif f.format == "copy":
            print(f"\n{f.path}  (copy of {f.source})", file=out)
        elif f.format == "torch_meta":
            print(f"\n{f.path}  (entries {', '.join(f.keys)} of {os.path.relpath(f.source, common)}"
                  f" + {', '.join(f.extra)} + layout skeletons)", file=out)
        else:
            print(f"\n{f.path}  ({f.format})", file=out)
    print(f"\ntotal: {len(plan.files)} files, {n_tensors} tensors, {human_bytes(plan.nbytes)} of tensor data "
          f"(source root {common})", file=out)


def print_report(report, out=None) -> None:
    out = out or sys.stdout
    width = max((len(r.path) for r in report.results), default=4)
    for r in report.results:
        status = "ok" if r.ok else "FAILED"
        print(f"  {r.path.ljust(width)}  {human_bytes(r.nbytes):>10}  {r.seconds:7.2f} s  {status}", file=out)
    for r in report.failed:
        print(f"\nFAILED {r.path}:\n" + textwrap.indent(r.error, "  "), file=out)
    rate = report.nbytes / report.seconds / 2**20 if report.seconds else 0
    print(f"\n{len(report.results) - len(report.failed)} of {len(report.results)} files written "
          f"successfully, {human_bytes(report.nbytes)} in {report.seconds:.2f} s ({rate:.0f} MiB/s)", file=out)
