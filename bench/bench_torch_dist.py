"""Benchmark: `ckptmap convert --from torch_dist --to torch` (weights + distributed optimizer state) on a
multi-GB Megatron torch_dist checkpoint, against `cp -r` of the same folder. Peak memory as
bench_pt2ms.py measures it (proportional anonymous memory and RSS of the whole process tree).

The source is built by scaling up a real megatron-core 0.12.1 save of the harness's standard `dense`
case (TP 2 x PP 2 x VPP 2 x DP 2, SwiGLU, GQA, bias, tied embeddings; `--template`, default: the
harness cache): the same sharded keys, fragment grids, objects and common.pt, with hidden / FFN /
vocabulary / layer sizes raised (args updated to match) and random values, written by ckptmap's own
torch_dist writer -- fully_sharded_model_space (0.8 - 0.14 default, nd-flattened), one chunk per stacked
layer / fragment spread over the 8 ranks' files. `--sharding-type dp_reshardable` then also upgrades it
offline (ckptmap) and times the bucket-space source.

    .venv/bin/python bench/bench_torch_dist.py [--workdir DIR] [--layers 8] [--hidden 1536] [--keep]
"""

import argparse
import copy
import glob
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pt2ms import du, run_measured  # noqa: E402

import zlib  # noqa: E402

from ckptmap.formats import megatron_dist as M  # noqa: E402
from ckptmap.formats import torch_dist as td  # noqa: E402
from ckptmap.mapping import ops  # noqa: E402
from ckptmap.mapping.sharding import Box  # noqa: E402

FILES = [f"__{r}_0.distcp" for r in range(8)]


def _template() -> Path:
    hits = sorted(glob.glob(str(Path(sys.prefix) / "mcore-cache" / "0.12.1-dense-*" / "ckpt" /
                                "torch_dist_fully_sharded_model_space" / "iter_0000001")))
    if not hits:
        sys.exit("no cached 0.12.1 dense run: run tests/test_torch_dist.py once, or pass --template")
    return Path(hits[-1])


def build(template: Path, dst: Path, layers: int, hidden: int, ffn: int, vocab: int) -> None:
    md = M.MegatronDist(template)
    a = md.common["args"]
    old = {a.num_layers: layers, a.hidden_size: hidden, a.ffn_hidden_size: ffn, 2 * a.ffn_hidden_size: 2 * ffn,
           2 * a.hidden_size: 2 * hidden, a.padded_vocab_size: vocab}
    assert len(old) == 6, "template sizes must be distinct numbers"
    # qkv rows: (heads + 2 * groups) * kv_channels = 2 * hidden for 4 heads / 2 groups (kept)
    assert (a.num_attention_heads + 2 * a.num_query_groups) * a.kv_channels == 2 * a.hidden_size

    def scale(shape):
        return tuple(old[d] for d in shape)

    tensors, mcore, fills = [], {}, {}
    n_file = 0
    for t in md.tensors():
        shape = scale(t.shape)
        if t.nd_flattened:
            frags = list(t.stored_shape[:-1])
            if t.shape[0] == a.num_layers and len(frags) == len(t.shape):
                frags[0] = layers
            stored = tuple(frags) + (math.prod(shape) // math.prod(frags),)
            chunks = []
            for idx in np.ndindex(*frags):
                chunks.append(td.OutChunk(Box(idx + (0,), (1,) * len(idx) + (stored[-1],)), FILES[n_file % 8]))
                n_file += 1
            mcore[t.key] = {"nd_reformulated_orig_global_shape": shape}
        else:
            stored = shape
            stacked = t.state == "weight" and t.shape[0] == a.num_layers and len(t.shape) > 1
            items = shape[0] if stacked else 1
            chunks = []
            for i in range(items):
                off = (i,) + (0,) * (len(shape) - 1) if stacked else (0,) * len(shape)
                ln = (1,) + shape[1:] if stacked else shape
                chunks.append(td.OutChunk(Box(off, ln), FILES[n_file % 8]))
                n_file += 1
        tensors.append(td.OutTensor(t.key, t.dtype, stored, tuple(chunks)))
        fills[t.key] = t.dtype
    objects, obj_bytes = [], {}
    for key in md.other_objects:
        name, _, shard = key.rpartition("/shard_")
        if name.endswith("._extra_state"):   # one per stacked layer: shard_<layer>_<layers>
            for i in range(layers):
                k = f"{name}/shard_{i}_{layers}"
                if k not in obj_bytes:
                    objects.append(td.OutObject(k, FILES[i % 8]))
                    obj_bytes[k] = bytes(md.reader.object_bytes(key))
        else:
            objects.append(td.OutObject(key, md.reader.meta.objects[key].file))
            obj_bytes[key] = bytes(md.reader.object_bytes(key))
    common = td.tzr.read_objects(md.reader.common().path)
    args = copy.copy(common["args"])
    args.num_layers = args.encoder_num_layers = layers
    args.hidden_size, args.ffn_hidden_size, args.kv_channels = hidden, ffn, hidden // a.num_attention_heads
    args.vocab_size = args.padded_vocab_size = vocab
    args.num_layers_per_virtual_pipeline_stage = layers // (a.pipeline_model_parallel_size *
                                                            a.virtual_pipeline_model_parallel_size)
    args.ddp_bucket_size = 40_000_000   # Megatron's default order of magnitude (the template's 600 is for tests)
    common["args"] = args
    block = np.random.default_rng(0).standard_normal(1 << 20, dtype=np.float32)

    def read_box(key, box):   # random values: a random block tiled, shifted per chunk
        n = box.numel
        start = zlib.crc32(f"{key}{box.offsets}".encode()) % len(block)
        vals = np.resize(np.roll(block, start), n).reshape(box.lengths)
        return ops.cast(vals, "float32", fills[key]) if fills[key] != "float32" else vals

    def common_fill(storage_key):
        yield md.reader.common().storage_bytes(storage_key)

    td.write_checkpoint(dst / "iter_0000001", tensors, objects, read_box=read_box, read_object=obj_bytes.__getitem__,
                        common=common, common_fill=common_fill, mcore_data=mcore, backend=md.reader.backend)
    (dst / "latest_checkpointed_iteration.txt").write_text("1")
    md.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--template", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--sharding-type", choices=("fully_sharded_model_space", "dp_reshardable"),
                    default="fully_sharded_model_space")
    ap.add_argument("--keep", action="store_true")
    ns = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tdist-", dir=ns.workdir))
    py = sys.executable
    try:
        src = work / "src"
        t0 = time.perf_counter()
        build(ns.template or _template(), src, ns.layers, ns.hidden, ns.ffn, ns.vocab)
        print(f"built {du(src) / 1e9:.2f} GB fully_sharded_model_space in {time.perf_counter() - t0:.1f} s")
        if ns.sharding_type == "dp_reshardable":
            up = work / "src_dp"
            r = run_measured([py, "-m", "ckptmap", "convert", "--from", "torch_dist", "--to", "torch_dist",
                              "--sharding-type", "dp_reshardable", "--src", str(src), "--dst", str(up),
                              "--no-progress"])
            print(f"upgrade to dp_reshardable: {r['seconds']:.1f} s, peak anon {r['anon'] / 1024:.0f} MiB")
            shutil.rmtree(src)
            src = up
        size = du(src)
        subprocess.run(["sync"], check=True)
        cp = run_measured(["cp", "-r", str(src), str(work / "copy")])
        shutil.rmtree(work / "copy")
        subprocess.run(["sync"], check=True)
        cmd = [py, "-m", "ckptmap", "convert", "--from", "torch_dist", "--to", "torch", "--src", str(src),
               "--dst", str(work / "out"), "--no-progress"]
        r = run_measured(cmd)
        out = du(work / "out")
        print(f"source {size / 1e9:.2f} GB ({ns.sharding_type}), output {out / 1e9:.2f} GB")
        print(f"cp -r:   {cp['seconds']:.1f} s, peak anon {cp['anon'] / 1024:.0f} MiB, rss {cp['rss'] / 1024:.0f} MiB")
        print(f"ckptmap: {r['seconds']:.1f} s ({size / r['seconds'] / 1e6:.0f} MB/s read), peak anon "
              f"{r['anon'] / 1024:.0f} MiB, rss {r['rss'] / 1024:.0f} MiB, {r['procs']} processes")
        print("command:", " ".join(cmd[1:]))
    finally:
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print("kept", work)


if __name__ == "__main__":
    main()
