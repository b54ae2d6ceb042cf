"""MindSpeed's distributed-optimizer buffer layout written straight from formats.md §3.4, for tests:
independent of ckptmap's bucket engine, so it can serve as truth for combine and the MindSpeed hook."""

import math

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def round_up(n, m):
    return -(-n // m) * m


def key_of(state, name):
    """The MindSpeed key of a state of a tensor ("" = the parameter itself)."""
    return f"{state}.{name}" if state else name


def reference_layout(params, dp, bucket_size=None, zero3=()):
    """{buffer: ([(name, shape, dtype, start, end, bucket)], [(padded, unpadded)])} for params
    [(name, shape, dtype)] in registration order: one buffer per dtype (first appearance), reverse
    order, every parameter followed by padding to 512 bytes, a bucket closing once it holds
    ``bucket_size`` elements, each bucket padded to a multiple of dp * 512 bytes."""
    params = [p for p in params if p[0] not in zero3]
    out = {}
    for i, dtype in enumerate(dict.fromkeys(d for _, _, d in params)):
        align, pad = 512 // ITEMSIZE[dtype], dp * 512 // ITEMSIZE[dtype]
        slots, buckets = [], []
        pos = bucket_start = 0
        open_ = False
        for name, shape, _ in reversed([p for p in params if p[2] == dtype]):
            start, end = pos, pos + math.prod(shape)
            slots.append((name, tuple(shape), dtype, start, end, len(buckets)))
            pos = round_up(end, align)
            open_ = True
            if bucket_size is not None and pos - bucket_start >= bucket_size:
                padded = round_up(pos, pad)
                buckets.append((padded - bucket_start, pos - bucket_start))
                bucket_start = pos = padded
                open_ = False
        if open_:
            padded = round_up(pos, pad)
            buckets.append((padded - bucket_start, pos - bucket_start))
        out[i] = (slots, buckets)
    return out
