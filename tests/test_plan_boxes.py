"""`plan reshard --dry-run --full` shows, per target tensor, which box of which source file makes it
(issue 13). Checked on the real core_r0.6.0 TP 2 PP 2 fixture resharded to TP 1: Megatron's
RowParallelLinear splits dense_4h_to_h along its input dim (1), ColumnParallelLinear splits
query_key_value along dim 0, so the two TP ranks' shards sit side by side (boxes assembled) / one above
the other (runs of the target: byte copies of each source shard)."""

from ckptmap.cli import main
from conftest import fixture_dir


def test_dry_run_full_lists_the_source_boxes_of_each_target_tensor(tmp_path, capsys):
    src = fixture_dir("legacy_tp2pp2dp2")
    assert main(["plan", "reshard", "--megatron-path", str(src), "--output-path", str(tmp_path / "out"),
                 "--target-tp-size", "1", "--target-megatron-version", "0.6", "--dry-run", "--full"]) == 0
    text = capsys.readouterr().out
    key = "model/language_model/encoder/layers.1.mlp.dense_4h_to_h.weight"
    assert f"<- mp_rank_00_000/model_optim_rng.pt {key} [0:32, 0:32] of [32, 32] -> [0:32, 0:32]" in text
    assert f"<- mp_rank_01_000/model_optim_rng.pt {key} [0:32, 0:32] of [32, 32] -> [0:32, 32:64]" in text
    # query_key_value's shards lie one above the other: each is a run of the target, a byte copy of its
    # source (a piece of the target's storage per source file, no box to assemble)
    qkv = "language_model.encoder.layers.1.self_attention.query_key_value.weight"
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == [qkv]]   # first stage first
    assert [(r[1], r[-5]) for r in rows[:2]] == [("[0:1024]", "mp_rank_00_000/model_optim_rng.pt"),
                                             ("[1024:2048]", "mp_rank_01_000/model_optim_rng.pt")], rows
    # the optimizer's fp32 main params are assembled the same way, from distrib_optim.pt
    assert "distrib_optim.pt  (megatron_optim:" in text
    assert not (tmp_path / "out").exists()
    # the default is a summary by pattern, without the boxes
    assert main(["plan", "reshard", "--megatron-path", str(src), "--output-path", str(tmp_path / "out"),
                 "--target-tp-size", "1", "--target-megatron-version", "0.6", "--dry-run"]) == 0
    assert "<- " not in capsys.readouterr().out
