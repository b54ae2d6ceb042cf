"""ckptmap.hooks.mindspeed: the opt_shard_info JSON of a real MindSpore network drives `ckptmap combine`
to bit-exact results; the file is written atomically, by DP-rank-0 ranks only; the save_checkpoint
hook installs once; the callback writes on real ModelCheckpoint saves of a Model.train run.

Truth is built here, independently of ckptmap's bucket engine, from formats.md §3.4:

* the expected layout (``expected_layout``): one buffer per parameter dtype in order of first
  appearance among the trainable parameters, parameters in reverse registration order, each
  followed by padding to a multiple of 512 bytes of its dtype, a bucket closing once its aligned
  fill reaches bucket_size elements, each bucket padded to a multiple of dp·512 bytes;
* the shards (``build_shards``): straight from the JSON — bucket j of buffer i starts at the sum of
  the padded sizes before it; DP rank k holds [k·n/dp, (k+1)·n/dp) of it; everything not covered by
  a parameter holds a sentinel, so a merge that reads padding fails;
* the values: the network's own parameters (bf16 ones upcast to fp32, which is exact) and
  Adam-like moments drawn here, saved with the real mindspore.save_checkpoint and read back with
  the real mindspore.load_checkpoint.
"""

import importlib
import json
from pathlib import Path

import mindspore as ms
import mindspore.dataset as mds
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn
from mindspore.train import CheckpointConfig, Model, ModelCheckpoint
from mindspore.train import serialization

from ckptmap.cli import main
from mindspeed_reference import key_of, reference_layout
from ckptmap.errors import CkptmapError
from ckptmap.formats import opt_shard_info as osi
from ckptmap.hooks import mindspeed as hook

ORIGINAL_SAVE = serialization.save_checkpoint
SENTINEL = np.float32(-7.0)
STATES = ("", "exp_avg", "exp_avg_sq")
H, VOCAB, FFN = 16, 40, 64


# ------------------------------------------------------------------------------------------------
# A small MindSpeed-style GPT as a real MindSpore network: fp32 embeddings and norms, bf16 linears


class Attention(nn.Cell):
    def __init__(self):
        super().__init__()
        self.qkv_proj = nn.Dense(H, 3 * H, dtype=ms.bfloat16)
        self.out_proj = nn.Dense(H, H, has_bias=False, dtype=ms.bfloat16)


class MLP(nn.Cell):
    def __init__(self):
        super().__init__()
        self.mapping = nn.Dense(H, FFN, dtype=ms.bfloat16)
        self.projection = nn.Dense(FFN, H, dtype=ms.bfloat16)


class Layer(nn.Cell):
    def __init__(self):
        super().__init__()
        self.input_norm = nn.LayerNorm((H,))
        self.attention = Attention()
        self.post_attention_norm = nn.LayerNorm((H,))
        self.mlp = MLP()


class Embedding(nn.Cell):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, H)
        self.position_embeddings = nn.Embedding(8, H)
        self.position_embeddings.embedding_table.requires_grad = False  # frozen: in no buffer


class Encoder(nn.Cell):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.CellList([Layer() for _ in range(layers)])
        self.final_norm = nn.LayerNorm((H,))


class LanguageModel(nn.Cell):
    def __init__(self, layers):
        super().__init__()
        self.embedding = Embedding()
        self.encoder = Encoder(layers)
        self.output_layer = nn.Dense(H, VOCAB, has_bias=False, dtype=ms.bfloat16)


class GPT(nn.Cell):
    def __init__(self, layers=2, seed=0):
        super().__init__()
        self.language_model = LanguageModel(layers)
        rng = np.random.default_rng(seed)
        for p in self.get_parameters():  # distinct, non-trivial values everywhere (norms start at 1/0)
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32), p.dtype))


def fp32_values(network):
    """{name: fp32 value} of the trainable parameters: what the distributed optimizer's fp32 main copy holds."""
    return {p.name: Tensor(p).astype(ms.float32).asnumpy() for p in network.trainable_params()}


def registration(network):
    return [(p.name, tuple(p.shape), str(p.dtype).lower()) for p in network.trainable_params()]


def test_network_is_what_the_test_claims():
    net = GPT()
    params = registration(net)
    assert {d for _, _, d in params} == {"float32", "bfloat16"}
    assert params[0] == ("language_model.embedding.word_embeddings.embedding_table", (VOCAB, H), "float32")
    assert params[-1] == ("language_model.output_layer.weight", (VOCAB, H), "bfloat16")
    assert "language_model.embedding.position_embeddings.embedding_table" not in dict(
        (n, s) for n, s, _ in params)
    values = fp32_values(net)
    raw = {p.name: p for p in net.trainable_params()}
    qkv = "language_model.encoder.layers.0.attention.qkv_proj.weight"
    assert raw[qkv].dtype == ms.bfloat16 and values[qkv].dtype == np.float32
    # bf16 -> fp32 keeps the value: the fp32 bits are the bf16 bits followed by 16 zero bits
    assert not np.any(values[qkv].view(np.uint32) & 0xFFFF)
    assert np.all(values["language_model.encoder.layers.1.input_norm.gamma"] != 1.0)


# ------------------------------------------------------------------------------------------------
# Independent truth


def expected_layout(params, dp, bucket_size=None, zero3=()):
    """{buffer: ([(name, shape, dtype, start, end, bucket)], [(padded, unpadded)])}, formats.md §3.4."""
    layout = reference_layout(params, dp, bucket_size, zero3)
    return {i: ([(n, list(shape), *rest) for n, shape, *rest in slots], buckets)
            for i, (slots, buckets) in layout.items()}


def assert_json_is_layout(info, dp_ranks, layout, zero3=()):
    assert info["dp_rank_list"] == list(dp_ranks)
    assert info["zero3_params"] == list(zero3)
    want_params = {}
    for i, (slots, _) in layout.items():
        for name, shape, dtype, start, end, bucket in slots:
            want_params[name] = {"range_map": [i, bucket, start, end], "shape": shape, "dtype": dtype}
    assert list(info["param_info"]) == list(want_params)          # buffer order: reverse registration
    assert info["param_info"] == want_params
    assert info["buffer_info"] == {
        str(i): {"buckets": {str(j): list(b) for j, b in enumerate(buckets)},
                 "buffer_size": sum(b[0] for b in buckets),
                 "buffer_numel_unpadded": sum(b[1] for b in buckets), "bucket_num": len(buckets)}
        for i, (_, buckets) in layout.items()}


def test_formats_md_example():
    """formats.md §3.4: a bf16 buffer for dp 2 with unpadded 1280 = 5·256 and padded 1536 = 3·512."""
    params = [("a", (40, 8), "bfloat16"), ("n", (8,), "float32"), ("b", (20, 8), "bfloat16"),
              ("c", (300,), "bfloat16")]
    info = hook.compute_opt_shard_info(params, [0, 2])
    assert info["buffer_info"]["0"] == {"buckets": {"0": [1536, 1280]}, "buffer_size": 1536,
                                        "buffer_numel_unpadded": 1280, "bucket_num": 1}
    # reverse order, each parameter followed by padding to 512 bytes = 256 bf16 / 128 fp32 elements
    assert [info["param_info"][n]["range_map"] for n in ("c", "b", "a", "n")] == [
        [0, 0, 0, 300], [0, 0, 512, 672], [0, 0, 768, 1088], [1, 0, 0, 8]]
    assert info["buffer_info"]["1"]["buckets"] == {"0": [256, 128]}
    # MindSpore/torch/short dtype spellings are one dtype; the JSON says "bfloat16"
    again = hook.compute_opt_shard_info([("a", (40, 8), ms.bfloat16), ("n", (8,), "fp32"),
                                         ("b", (20, 8), "BFloat16"), ("c", (300,), "bf16")], [0, 2])
    assert again == info


def bucket_starts(buckets):
    return np.cumsum([0] + [b[0] for b in buckets])[:-1]


def build_shards(info, values, moments, zero3_values=None):
    """Per DP rank {key: fp32 1-D shard (or ZeRO-3 dim-0 slice)}, straight from the JSON."""
    dp = len(info["dp_rank_list"])
    shards = [dict() for _ in range(dp)]
    for i, binfo in info["buffer_info"].items():
        table = [binfo["buckets"][str(j)] for j in range(binfo["bucket_num"])]
        starts = bucket_starts(table)
        for s in STATES:
            src = values if s == "" else moments[s]
            for j, (padded, unpadded) in enumerate(table):
                full = np.full(padded, SENTINEL, np.float32)
                for name, entry in info["param_info"].items():
                    b, bucket, start, end = entry["range_map"]
                    if str(b) == i and bucket == j:
                        assert start >= starts[j] and end <= starts[j] + unpadded
                        full[start - starts[j]:end - starts[j]] = src[name].reshape(-1)
                assert padded % dp == 0
                n = padded // dp
                for k in range(dp):
                    shards[k][key_of(s, f"buffer_{i}_bucket_{j}")] = full[k * n:(k + 1) * n].copy()
    for name in info["zero3_params"]:
        for s in STATES:
            src = values if s == "" else moments[s]
            for k, part in enumerate(np.array_split(src[name], dp, axis=0)):
                shards[k][key_of(s, name)] = np.ascontiguousarray(part)
    return shards


def scalars(rank, step):
    rng = np.random.default_rng(100 + rank)
    return {"state_step": np.array([step], np.float32), "learning_rate_group_0": np.float32(1e-4),
            "weight_decay_group_0": np.float32(0.1), "step_num": np.int64(step), "epoch_num": np.int64(0),
            "rng_state": rng.integers(0, 255, 8, dtype=np.uint8)}


def adam_like_moments(values, seed):
    rng = np.random.default_rng(seed)
    m = {n: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in values.items()}
    v = {n: np.square(rng.standard_normal(v.shape)).astype(np.float32) * np.float32(1e-3) for n, v in values.items()}
    return {"exp_avg": m, "exp_avg_sq": v}


def save_ms(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint({k: Parameter(Tensor(v), name=k) for k, v in tensors.items()}, str(path))


def load_ms(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def combine(src, out, *extra):
    return main(["combine", "--strategy-dir", str(Path(src) / "opt_shard_info"), "--checkpoint-dir", str(src),
                 "--output-dir", str(out), "--no-progress", "--multiprocess-off", *extra])


def expected_merged(values, moments, rank0):
    out = {}
    for name, v in values.items():
        out[name] = v
        for s in ("exp_avg", "exp_avg_sq"):
            out[key_of(s, name)] = moments[s][name]
    out.update(scalars(rank0, 1))
    return out


def assert_merged(path, expected):
    got = load_ms(path)
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for k, v in expected.items():
        assert bits_equal(got[k], v), k


# ------------------------------------------------------------------------------------------------
# The hook's JSON drives `ckptmap combine` to exact results


TP = 2  # two tensor-parallel ranks = two DP groups, each with its own network values and JSON


@pytest.mark.parametrize("bucket_size", [None, 1000], ids=["one-bucket", "several-buckets"])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_hook_json_drives_combine_bit_exact(dp, bucket_size, tmp_path):
    run, merged = tmp_path / "run", tmp_path / "merged"
    nets = [GPT(seed=tp) for tp in range(TP)]
    groups = [[tp + TP * d for d in range(dp)] for tp in range(TP)]      # order tp-dp: g = tp + TP·dp_rank
    truth = {}
    for tp, (net, ranks) in enumerate(zip(nets, groups)):
        for d, g in enumerate(ranks):
            written = hook.write_opt_shard_info(run, g, ranks, net.trainable_params(), bucket_size=bucket_size,
                                                tp_rank=tp)
            assert written == (run / f"opt_shard_info/rank_{g}/dist_opt_shard_info_rank_{g}-0_0.json"
                               if d == 0 else None)
        info = json.loads((run / f"opt_shard_info/rank_{ranks[0]}/dist_opt_shard_info_rank_{ranks[0]}-0_0.json")
                          .read_text())
        layout = expected_layout(registration(net), dp, bucket_size)
        assert_json_is_layout(info, ranks, layout)
        n_buckets = [len(b) for _, b in layout.values()]
        assert n_buckets == ([1, 1] if bucket_size is None else [2, 7])  # fp32 buffer, bf16 buffer
        assert set(info["param_info"]) == set(fp32_values(net))

        values = fp32_values(net)
        moments = adam_like_moments(values, seed=10 + tp)
        shards = build_shards(info, values, moments)
        for k, g in enumerate(ranks):
            save_ms(run / f"rank_{g}/network_rank_{g}-0_1.ckpt", {**shards[k], **scalars(g, 1)})
        truth[ranks[0]] = expected_merged(values, moments, ranks[0])

    # the other ranks' strategy folders exist (as MindSpeed leaves them) and are empty
    for ranks in groups:
        for g in ranks[1:]:
            assert list((run / f"opt_shard_info/rank_{g}").iterdir()) == []

    assert combine(run, merged) == 0
    written = sorted(str(p.relative_to(merged)) for p in merged.rglob("*") if p.is_file())
    assert written == sorted(f"rank_{g}/network_rank_{g}-0_1_dp_merged.ckpt" for g in truth)
    for g, expected in truth.items():
        assert_merged(merged / f"rank_{g}/network_rank_{g}-0_1_dp_merged.ckpt", expected)


def test_v2_layout_and_zero3_params(tmp_path):
    """V2 names (opt_shard_info/mp_rank_00_001/…, iter_*/mp_rank_00_001/model_optim_rng_{k:03d}) and a
    ZeRO-3 parameter kept out of the buffers; dp 2, several buckets."""
    run, merged = tmp_path / "run", tmp_path / "merged"
    net = GPT(seed=5)
    zero3 = ["language_model.encoder.layers.1.mlp.mapping.weight"]
    ranks = [4, 6]
    kw = dict(layout="v2", tp_rank=0, pp_rank=1, pp_size=2, bucket_size=1500, zero3_params=zero3,
              untie_embeddings_and_output_weights=True)
    assert hook.write_opt_shard_info(run, 6, ranks, net, **kw) is None
    path = hook.write_opt_shard_info(run, 4, ranks, net, **kw)
    assert path == run / "opt_shard_info/mp_rank_00_001/dist_opt_shard_info_model_optim_rng.json"
    assert sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file()) == [path.relative_to(run)]
    info = json.loads(path.read_text())
    assert_json_is_layout(info, ranks, expected_layout(registration(net), 2, 1500, zero3), zero3)
    assert zero3[0] not in info["param_info"]

    values = fp32_values(net)
    moments = adam_like_moments(values, seed=3)
    shards = build_shards(info, values, moments)
    assert shards[0][zero3[0]].shape == (FFN // 2, H)
    for k in range(2):
        save_ms(run / f"iter_0000001/mp_rank_00_001/model_optim_rng_{k:03d}.ckpt",
                {**shards[k], **scalars(ranks[k], 1)})
    assert combine(run, merged) == 0
    assert_merged(merged / "iter_0000001/mp_rank_00_001/model_optim_rng.ckpt", expected_merged(values, moments, 4))
    assert (merged / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_shared_embedding_gets_its_own_bucket_when_tied_across_stages():
    """The bundled rules mark language_model.embedding.word_embeddings.weight as the shared embedding:
    with tied embeddings and PP > 1 it closes the bucket before it and sits in a bucket of its own."""
    emb = "language_model.embedding.word_embeddings.weight"
    params = [(emb, (VOCAB, H), "bfloat16"), ("language_model.encoder.layers.0.input_norm.weight", (H,), "bfloat16"),
              ("language_model.encoder.layers.0.attention.qkv_proj.weight", (3 * H, H), "bfloat16")]
    with pytest.raises(CkptmapError, match="untie_embeddings_and_output_weights"):
        hook.compute_opt_shard_info(params, [0, 1], pp_size=2)
    tied = hook.compute_opt_shard_info(params, [0, 1], pp_size=2, untie_embeddings_and_output_weights=False)
    # reverse order: qkv [0, 768) -> 768, norm [768, 784) -> 1024 = bucket 0 (already a multiple of 2·256);
    # the embedding: bucket 1 = [1024, 1664), aligned 1664 - 1024 = 640 -> padded to 1024
    assert tied["param_info"][emb]["range_map"] == [0, 1, 1024, 1664]
    assert tied["buffer_info"]["0"]["buckets"] == {"0": [1024, 1024], "1": [1024, 768]}
    untied = hook.compute_opt_shard_info(params, [0, 1], pp_size=2, untie_embeddings_and_output_weights=True)
    assert untied["buffer_info"]["0"]["buckets"] == {"0": [2048, 1792]}
    # PP 1: the flag does not matter and is not asked for
    assert hook.compute_opt_shard_info(params, [0, 1]) == untied
    # a Parameter carrying shared_embedding = True (as Megatron marks it) counts too
    p = Parameter(Tensor(np.zeros((VOCAB, H), np.float32)), name="embedding.weight")
    p.shared_embedding = True
    q = Parameter(Tensor(np.zeros((H,), np.float32)), name="norm.weight")
    own = hook.compute_opt_shard_info([p, q], [0, 1], pp_size=2, untie_embeddings_and_output_weights=False)
    assert own["buffer_info"]["0"]["bucket_num"] == 2


# ------------------------------------------------------------------------------------------------
# Writing: atomic, no stale tail, only DP-rank-0 ranks


def test_shorter_json_leaves_no_stale_tail(tmp_path):
    big, small = GPT(layers=3, seed=1), nn.Dense(4, 2)
    path = hook.write_opt_shard_info(tmp_path, 0, [0, 1], big)
    long_text = path.read_text()
    # a longer, different file in place (as an earlier run with a larger model would leave it)
    path.write_text(long_text + " " * 4096 + '{"stale": true}')
    assert hook.write_opt_shard_info(tmp_path, 0, [0, 1], small) == path
    text = path.read_text()
    assert len(text) < len(long_text)
    parsed = json.loads(text)  # the whole file is one JSON document
    assert parsed == hook.compute_opt_shard_info(small, [0, 1])
    assert list(parsed["param_info"]) == ["bias", "weight"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    # and ckptmap's own reader accepts it
    assert osi.read_opt_shard_info(path).dp_ranks == (0, 1)


def test_only_dp_rank_0_writes(tmp_path):
    net = nn.Dense(4, 2)
    group = [1, 3, 5, 7]
    results = {g: hook.write_opt_shard_info(tmp_path, g, group, net) for g in group}
    assert results == {1: tmp_path / "opt_shard_info/rank_1/dist_opt_shard_info_rank_1-0_0.json",
                       3: None, 5: None, 7: None}
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["opt_shard_info/rank_1/dist_opt_shard_info_rank_1-0_0.json"]
    assert sorted(p.name for p in (tmp_path / "opt_shard_info").iterdir()) == ["rank_1", "rank_3", "rank_5", "rank_7"]
    # V2: one file per mp_rank folder, also only from the DP group's rank 0
    assert hook.write_opt_shard_info(tmp_path / "v2", 3, group, net, layout="v2", tp_rank=1) is None
    assert not (tmp_path / "v2").exists()
    with pytest.raises(CkptmapError, match="rank 2 is not in its DP group"):
        hook.write_opt_shard_info(tmp_path, 2, group, net)


def test_dp_group_by_name(monkeypatch, tmp_path):
    import mindspore.communication as comm
    monkeypatch.setattr(comm, "get_process_group_ranks", lambda group: {"dp-0": [0, 4]}[group])
    assert hook.compute_opt_shard_info(nn.Dense(4, 2), "dp-0")["dp_rank_list"] == [0, 4]


@pytest.mark.parametrize("kwargs,match", [
    (dict(dp_rank_list=[2, 0]), "ascending"),
    (dict(dp_rank_list=[]), "ascending"),
    (dict(bucket_size=0), "bucket_size"),
    (dict(zero3_params=["nope"]), "zero3_params names nope"),
    (dict(rules="no_such_rules"), "no such file"),
])
def test_errors(kwargs, match):
    args = dict(dp_rank_list=[0, 1])
    args.update(kwargs)
    with pytest.raises(CkptmapError, match=match):
        hook.compute_opt_shard_info(nn.Dense(4, 2), **args)


def test_parameter_names_must_be_unique():
    with pytest.raises(CkptmapError, match="both named w"):
        hook.compute_opt_shard_info([("w", (2,), "float32"), ("w", (3,), "float32")], [0])


# ------------------------------------------------------------------------------------------------
# install(): wraps mindspore.save_checkpoint once


@pytest.fixture
def no_hook():
    hook.uninstall()
    yield
    hook.uninstall()
    assert serialization.save_checkpoint is ORIGINAL_SAVE


class FP32Net(nn.Cell):
    """Trainable on CPU (MindSpore's CPU MatMul and Adam have no bf16 kernels)."""

    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(10, 8)
        self.input_norm = nn.LayerNorm((8,))
        self.dense = nn.Dense(8, 1)

    def construct(self, x):
        return self.dense(self.input_norm(self.word_embeddings(x).mean(1)))


def tiny_train(network, callbacks, steps=4):
    data = {"x": np.random.default_rng(0).integers(0, 10, (2 * steps, 3)).astype(np.int32),
            "y": np.random.default_rng(1).random((2 * steps, 1)).astype(np.float32)}
    dataset = mds.NumpySlicesDataset(data=data, shuffle=False).batch(2)
    model = Model(network, loss_fn=nn.MSELoss(), optimizer=nn.Adam(network.trainable_params(), 1e-3))
    model.train(1, dataset, callbacks=callbacks, dataset_sink_mode=False)


def count_writes(monkeypatch):
    calls = []
    real = osi.write_opt_shard_info

    def spy(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(osi, "write_opt_shard_info", spy)
    return calls


def test_install_writes_on_save_into_output_dir(no_hook, tmp_path, monkeypatch):
    import mindspore.train.callback._checkpoint as ckpt_module
    calls = count_writes(monkeypatch)
    net = GPT(seed=2)
    out = tmp_path / "out"
    path = hook.install(net, [0, 2], out, rank=0, bucket_size=1500)
    assert path == out / "opt_shard_info/rank_0/dist_opt_shard_info_rank_0-0_0.json"
    assert not path.exists()                           # nothing before the first save
    (out / "rank_0").mkdir(parents=True)
    # one wrapper, bound everywhere the original was (ModelCheckpoint's own import included)
    assert ms.save_checkpoint is serialization.save_checkpoint is ms.train.save_checkpoint
    assert ckpt_module.save_checkpoint is ms.save_checkpoint is not ORIGINAL_SAVE
    assert ms.save_checkpoint.__wrapped__ is ORIGINAL_SAVE
    assert {"mindspore.save_checkpoint", "mindspore.train.callback._checkpoint.save_checkpoint"} <= set(
        hook.installed()["patched"])

    ms.save_checkpoint(net, str(out / "rank_0/network_rank_0-0_1.ckpt"))
    assert calls == [path]
    assert json.loads(path.read_text()) == hook.compute_opt_shard_info(net, [0, 2], bucket_size=1500)
    assert set(load_ms(out / "rank_0/network_rank_0-0_1.ckpt")) == {p.name for p in net.get_parameters()}

    # a save elsewhere does not touch it
    ms.save_checkpoint(net, str(tmp_path / "elsewhere.ckpt"))
    assert len(calls) == 1

    # installing twice (and re-importing the module) keeps one wrapper: one save, one write
    hook.install(net, [0, 2], out, rank=0, bucket_size=1500)
    importlib.reload(hook)
    hook.install(net, [0, 2], out, rank=0, bucket_size=1500)
    assert ms.save_checkpoint.__wrapped__ is ORIGINAL_SAVE
    ms.save_checkpoint(net, str(out / "rank_0/network_rank_0-0_2.ckpt"))
    assert len(calls) == 2 and hook.installed()["writes"] == 2

    assert hook.uninstall() is True
    assert ms.save_checkpoint is ORIGINAL_SAVE and ckpt_module.save_checkpoint is ORIGINAL_SAVE
    assert ms.train.save_checkpoint is ORIGINAL_SAVE and hook.installed() is None
    ms.save_checkpoint(net, str(out / "rank_0/network_rank_0-0_3.ckpt"))
    assert len(calls) == 2
    assert hook.uninstall() is False


def test_install_non_dp0_rank_writes_nothing(no_hook, tmp_path):
    net = FP32Net()
    hook.install(net, [0, 2], tmp_path, rank=2)
    (tmp_path / "rank_2").mkdir()
    ms.save_checkpoint(net, str(tmp_path / "rank_2/network_rank_2-0_1.ckpt"))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "rank_2/network_rank_2-0_1.ckpt"]
    assert hook.installed()["writes"] == 0


def test_install_catches_model_checkpoint_saves(no_hook, tmp_path):
    """Model.train with a plain ModelCheckpoint: its saves go through the wrapped save_checkpoint."""
    net = FP32Net()
    hook.install(net, [0], tmp_path, rank=0)
    ckpt = ModelCheckpoint(prefix="network_rank_0", directory=str(tmp_path / "rank_0"),
                           config=CheckpointConfig(save_checkpoint_steps=2))
    tiny_train(net, [ckpt])
    assert sorted(p.name for p in (tmp_path / "rank_0").glob("*.ckpt")) == ["network_rank_0-1_2.ckpt",
                                                                            "network_rank_0-1_4.ckpt"]
    assert hook.installed()["writes"] == 2
    info = json.loads((tmp_path / "opt_shard_info/rank_0/dist_opt_shard_info_rank_0-0_0.json").read_text())
    assert_json_is_layout(info, [0], expected_layout(registration(net), 1))


# ------------------------------------------------------------------------------------------------
# The callback on a real Model.train run


def test_callback_writes_on_model_checkpoint_saves(tmp_path, monkeypatch):
    calls = count_writes(monkeypatch)
    net = FP32Net()
    path = tmp_path / "opt_shard_info/rank_0/dist_opt_shard_info_rank_0-0_0.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"stale": "x" * 10000}))   # a longer file from an earlier run
    ckpt = ModelCheckpoint(prefix="network_rank_0", directory=str(tmp_path / "rank_0"),
                           config=CheckpointConfig(save_checkpoint_steps=2))
    cb = hook.OptShardInfoCallback(net, [0], tmp_path)      # rank: 0 without communication
    assert cb.path == path and calls == []
    tiny_train(net, [ckpt, cb], steps=5)
    # saves at steps 2 and 4, and the final one at step 5 (ModelCheckpoint.end)
    assert sorted(p.name for p in (tmp_path / "rank_0").glob("*.ckpt")) == [
        "network_rank_0-1_2.ckpt", "network_rank_0-1_4.ckpt", "network_rank_0-1_5.ckpt"]
    assert cb.writes == 3 and calls == [path] * 3
    info = json.loads(path.read_text())
    assert_json_is_layout(info, [0], expected_layout(registration(net), 1))


def test_callback_must_come_after_model_checkpoint(tmp_path):
    net = FP32Net()
    ckpt = ModelCheckpoint(prefix="network_rank_0", directory=str(tmp_path / "rank_0"),
                           config=CheckpointConfig(save_checkpoint_steps=2))
    with pytest.raises(CkptmapError, match="put it after"):
        tiny_train(net, [hook.OptShardInfoCallback(net, [0], tmp_path), ckpt])


def test_callback_watches_the_given_model_checkpoint_only(tmp_path):
    """The callback's step_end/end called directly with a real RunContext, after real saves by two
    ModelCheckpoints (their own step_end with the same context): only the watched one's save writes."""
    from mindspore.train.callback import RunContext
    from mindspore.train.callback import _InternalCallbackParam

    net = FP32Net()
    watched, other = (ModelCheckpoint(prefix=p, directory=str(tmp_path / "rank_0"),
                                      config=CheckpointConfig(save_checkpoint_steps=1)) for p in ("a", "b"))
    cb = hook.OptShardInfoCallback(net, [0, 1], tmp_path, rank=0, ckpt_callback=watched)
    params = _InternalCallbackParam()
    params.train_network, params.cur_epoch_num, params.batch_num = net, 1, 10
    params.list_callback = [watched, other, cb]
    ctx = RunContext(params)
    cb.begin(ctx)

    params.cur_step_num = 1
    other.step_end(ctx)
    cb.step_end(ctx)
    assert (tmp_path / "rank_0/b-1_1.ckpt").is_file()
    assert cb.writes == 0 and not cb.path.exists()

    params.cur_step_num = 2
    watched.step_end(ctx)
    cb.step_end(ctx)
    assert (tmp_path / "rank_0/a-1_2.ckpt").is_file()
    assert cb.writes == 1
    assert json.loads(cb.path.read_text()) == hook.compute_opt_shard_info(net, [0, 1])
    cb.end(ctx)  # no new save since
    assert cb.writes == 1
