"""A megatron.core GPT run with several query groups per TP shard (test_rules_parts): the real
megatron-core 0.12.1 trains one step (tests/mcore_versions), cached like the harness's standard cases."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys

# TP 2 x DP 2, 8 heads in 4 query groups (2 groups, 4 heads per TP shard), kv_channels 6 (RoPE: even), SwiGLU,
# biases (1-D parts), 3 layers, overlap-grad-reduce with small buckets (several buckets per buffer)
CASE = dict(version="0.12.1", tp=2, pp=1, dp=2, num_layers=3, hidden=48, ffn=24, heads=8, query_groups=4,
            swiglu=True, bias=True, overlap_grad_reduce=True, bucket_size=900)


def gqa_run(cache_root: pathlib.Path | None = None) -> tuple[pathlib.Path, dict]:
    """(directory with legacy/ and truth.pt, truth) of CASE, generated once."""
    import torch
    from mcore_versions import Case, generate, source_hash

    case = Case(**CASE)
    if cache_root is None:
        env = os.environ.get("MCORE_VERSIONS_CACHE")
        cache_root = pathlib.Path(env) if env and env != "off" else pathlib.Path(sys.prefix) / "mcore-cache"
    blob = json.dumps([dataclasses.asdict(case), source_hash()], sort_keys=True)
    d = cache_root / f"hfrules-gqa-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    if not (d / "truth.pt").is_file():
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        generate(case, tmp)
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    return d, torch.load(d / "truth.pt", weights_only=False)
