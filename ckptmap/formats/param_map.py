"""Megatron param_map files: where each parameter sits in the distributed optimizer's bucketed buffer.

One JSON object per (buffer, dp, tp, pp, model chunk), written by MindSpeed-Core-MS's
``param_map.patch`` and by ``ckptmap.hooks.megatron``, in buffer order::

    param_map_buffer{B}_dp{d}tp{t}pp{p}vpp{v}.json
    {"module.decoder.layers.0.mlp.linear_fc2.weight": ["torch.bfloat16", [16, 24], start, end, bucket], ...}
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import attrs

from ckptmap import atomic, dtypes
from ckptmap.errors import CkptmapError

def param_map_file_name(buffer: int, dp: int, tp: int, pp: int, vpp: int, ep: int | None = None) -> str:
    """The patch's name; under expert parallelism (``ep`` not None) ckptmap adds ``ep{e}`` after the
    pipeline rank (the patch predates expert folders)."""
    return f"param_map_buffer{buffer}_dp{dp}tp{tp}pp{pp}{'' if ep is None else f'ep{ep}'}vpp{vpp}.json"


@attrs.frozen
class ParamMapFile:
    path: Path
    buffer: int
    dp: int
    tp: int
    pp: int
    vpp: int
    ep: int | None = None


_NAME = re.compile(r"param_map_buffer(\d+)_dp(\d+)tp(\d+)pp(\d+)(?:ep(\d+))?vpp(\d+)\.json")


def parse_param_map_name(name: str) -> tuple | None:
    """(buffer, dp, tp, pp, vpp, ep or None) of a param_map file name; None if it is not one."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    buffer, dp, tp, pp, ep, vpp = m.groups()
    values = (int(buffer), int(dp), int(tp), int(pp), int(vpp), None if ep is None else int(ep))
    if param_map_file_name(values[0], values[1], values[2], values[3], values[4], values[5]) != name:
        return None  # leading zeros: not a name Megatron or ckptmap writes
    return values


def find_param_maps(directory) -> list[ParamMapFile]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CkptmapError(f"--param-map-path {directory} is not a directory; point it at the param_map "
                           f"folder written during training (<save>/param_map) or a pt_meta folder")
    out = []
    # names sorted as strings: the order of sorted(iterdir()) for one folder's children, without a Path
    # per entry (a 16,384-rank pt_meta folder holds 49,152 files)
    for name in sorted(os.listdir(directory)):
        parsed = parse_param_map_name(name)
        if parsed:
            out.append(ParamMapFile(directory / name, *parsed))
    return out


def read_param_map(path) -> dict:
    """name -> (dtype, shape, start, end, bucket) in file (= buffer) order."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CkptmapError(f"cannot read param_map {path}: {e}") from None
    if not isinstance(raw, dict):
        raise CkptmapError(f"{path}: holds a JSON {type(raw).__name__}, not a param_map (an object of "
                           f"name: [dtype, shape, start, end, bucket])")
    out = {}
    for name, entry in raw.items():
        try:
            dtype, shape, start, end, bucket = entry
            out[name] = (_dtype_from_string(dtype), tuple(shape), int(start), int(end),
                         int(bucket))
        except (TypeError, ValueError) as e:
            raise CkptmapError(f"{path}: entry {name!r} = {entry!r} is not [dtype, shape, start, end, "
                               f"bucket]: {e}") from None
    return out


def param_map_text(slots) -> str:
    """A param_map JSON file for slots with (name, dtype, shape, start, end, bucket), buffer order."""
    return json.dumps({s.name: [f"torch.{s.dtype}", list(s.shape), s.start, s.end, s.bucket] for s in slots})


def write_param_map(path, slots) -> Path:
    """Write one param_map JSON file (``param_map_text``) atomically, with the permissions of a plain
    new file (others sharing the checkpoint can read it), creating the directory; concurrent writers
    of the same name (identical content) cannot interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, param_map_text(slots), fsync=True)
    return path


@attrs.frozen
class ParamMapDifference:
    """The first entry where two param_maps disagree. ``saved``/``live`` are (name, (dtype, shape,
    start, end, bucket)) or None when that side has no entry at ``index``."""

    index: int
    saved: tuple | None
    live: tuple | None


def _bucket_bases(entries: dict) -> dict[int, int]:
    bases: dict[int, int] = {}
    for _dtype, _shape, start, _end, bucket in entries.values():
        bases[bucket] = min(start, bases.get(bucket, start))
    return bases


def param_map_difference(saved: dict, live: dict, relative: bool = True) -> ParamMapDifference | None:
    """Compare two param_maps (``read_param_map`` form: name -> (dtype, shape, start, end, bucket) in
    buffer order) entry by entry; None if they describe the same layout.

    ``relative``: offsets are compared relative to the start of their bucket (the smallest start in
    it), which is what Megatron's ``load_parameter_state`` relies on — it moves each bucket as a whole
    and cuts parameters out at bucket-relative offsets, so bucket *padding* (which depends on the
    data-parallel size) may differ. Otherwise start and end must be equal as recorded."""
    saved_items, live_items = list(saved.items()), list(live.items())
    saved_bases, live_bases = _bucket_bases(saved), _bucket_bases(live)

    def key(entry, bases):
        dtype, shape, start, end, bucket = entry
        base = bases[bucket] if relative else 0
        return dtype, tuple(shape), bucket, start - base, end - base

    for i in range(max(len(saved_items), len(live_items))):
        s = saved_items[i] if i < len(saved_items) else None
        v = live_items[i] if i < len(live_items) else None
        if s is None or v is None or s[0] != v[0] or key(s[1], saved_bases) != key(v[1], live_bases):
            return ParamMapDifference(i, s, v)
    return None


def describe_param_map_entry(entry) -> str:
    """``torch.bfloat16 [37, 16], elements [0, 592) of bucket 0`` for a (dtype, shape, start, end, bucket)."""
    dtype, shape, start, end, bucket = entry
    return f"torch.{dtype} {list(shape)}, elements [{start}, {end}) of the buffer, bucket {bucket}"


def _dtype_from_string(text: str) -> str:
    name = text[len("torch."):] if text.startswith("torch.") else text
    if name not in dtypes.TABLE:
        raise ValueError(f"unknown dtype {text!r}")
    return name
