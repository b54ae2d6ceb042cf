"""Command-line flags and the options objects they become."""

from __future__ import annotations

import argparse
import os

from ckptmap.coordinate import DEFAULT_WAIT_TIMEOUT


def add_pt2ms_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("File Path/Location")
    g.add_argument("--megatron-path", required=True,
                   help="Megatron checkpoint: the --save directory (uses latest_checkpointed_iteration.txt) "
                        "or an iter_* directory.")
    g.add_argument("--ms-path", required=True, help="Directory for the MindSpore checkpoint.")
    g.add_argument("--param-map-path", help="Directory with param_map_*.json files (default: "
                                            "<save>/param_map when present).")
    d = p.add_argument_group("distributed")
    d.add_argument("--pp-size", type=int, help="Pipeline parallel size (default: from the mp_rank directories).")
    d.add_argument("--tp-size", type=int, help="Tensor parallel size (default: from the mp_rank directories).")
    d.add_argument("--ep-size", type=int, help="Expert parallel size (default: from the mp_rank directories and args).")
    d.add_argument("--dp-size", type=int, help="Data parallel size of the MindSpore run (default: from args).")
    d.add_argument("--cp-size", type=int, help="Context parallel size (default: from args, else 1).")
    d.add_argument("--parallel-init-order", default="tp-cp-ep-dp-pp",
                   help="Rank order, fastest first (default tp-cp-ep-dp-pp).")
    d.add_argument("--vpp-size", type=int, help="Virtual pipeline chunks per stage (default: from the checkpoint).")
    d.add_argument("--stage-list", nargs="+", help="Layers per pipeline stage (with VPP: per virtual stage, "
                                                   "PP*VPP values in execution order).")
    d.add_argument("--num-layers", type=int, help="Number of layers on the MindSpeed side, noop layers "
                                                  "included (default: args.num_layers + number of --noop).")
    d.add_argument("--noop", nargs="+", type=int, default=[],
                   help="MindSpeed global layer ids that are identity (noop) layers.")
    a = p.add_argument_group("Advanced feature")
    a.add_argument("--generate-all-dp-cp", action="store_true",
                   help="Write a copy for every (dp, cp) rank, not only dp = cp = 0.")
    a.add_argument("--convert-param-only", action="store_true",
                   help="Convert model weights only (no optimizer state).")
    a.add_argument("--file-prefix", default="network", help="File name prefix in V1 layout (default network).")
    a.add_argument("--format", choices=("ckpt", "safetensors"), default="ckpt")
    a.add_argument("--dist-opt-content", nargs="+", default=["param", "exp_avg", "exp_avg_sq"],
                   help="Optimizer states to write (optimizer mode).")
    a.add_argument("--debug", action="store_true", help="Show tracebacks and per-tensor detail.")
    add_run_flags(a)
    t = p.add_argument_group("target layout (reshard on the way; costs one extra write + read of the checkpoint)")
    add_target_flags(t)
    c = p.add_argument_group("ckptmap")
    c.add_argument("--rules", default="auto",
                   help="Bundled rules name or a .rules path (default: the bundled rules that fit the model).")
    c.add_argument("--layout", choices=("v1", "v2"), default="v1",
                   help="v1: rank_{g}/{prefix}.{fmt} (default); v2: iter_*/mp_rank_*/model_optim_rng.{fmt}.")
    c.add_argument("--dtype", default="float32",
                   help="Output dtype of floating-point weights: float32 (default, like the reference), "
                        "keep (the source dtype), bfloat16, float16.")
    c.add_argument("--crc", action="store_true",
                   help="Append MindSpore's CRC-32 trailer to .ckpt files (checked by load_checkpoint(crc_check=True)).")
    c.add_argument("--megatron-version",
                   help="Megatron-LM / megatron-core version that wrote the checkpoint (e.g. 0.12.1), when the files "
                        "alone do not tell which `buckets megatron` layout applies (default: detected).")
    c.add_argument("--no-main-param-check", dest="main_param_check", action="store_false",
                   help="Do not check that every fp32 main param rounds to its model weight (the check that catches "
                        "optimizer state laid out under the wrong parameter).")
    c.add_argument("--dry-run", action="store_true", help="Print the plan (a summary by pattern) and write nothing.")
    c.add_argument("--full", action="store_true", help="With --dry-run: list every file and tensor of the plan; when converting: list every file "
                        "written (default: by folder beyond 64 files).")
    add_planning_flag(c)


def add_planning_flag(c) -> None:
    c.add_argument("--planning-processes", type=int, default=None, metavar="N",
                   help="Processes reading the ranks while planning, each those of some pipeline stages (default: one "
                        "per CPU, up to 8 and --process-limit, from 1,024 ranks on; 1, or --multiprocess-off: plan in "
                        "this process).")


def add_run_flags(g) -> None:
    g.add_argument("--multiprocess-off", action="store_true", help="Run in this process only.")
    g.add_argument("--process-limit", type=int, default=min(8, os.cpu_count() or 1),
                   help="Maximum worker processes (default min(8, CPUs)).")
    g.add_argument("--process_timeout", "--process-timeout", dest="process_timeout", type=float, default=None,
                   help="Seconds allowed per output file; a file that takes longer fails.")
    g.add_argument("--no-progress", action="store_true", help="No progress bar.")
    g.add_argument("--fsync", action="store_true",
                   help="fsync every file before renaming it into place (durable against power loss; slower).")
    g.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="Machines sharing the work (default $WORLD_SIZE, as set by torchrun, else 1); each "
                        "writes a disjoint part of the plan into the same (shared) output folder.")
    g.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)),
                   help="This machine's rank among --world-size (default $RANK, else 0); rank 0 checks the output "
                        "folder before any rank writes and writes ckptmap_manifest.json when every rank has finished.")
    g.add_argument("--wait-timeout", type=float, default=DEFAULT_WAIT_TIMEOUT, metavar="SECONDS",
                   help=f"With --world-size > 1: how long a rank waits for another that shows no sign of life — "
                        f"ranks > 0 for rank 0 to check the output folder and start, rank 0 for the report of a rank "
                        f"whose heartbeat stopped or never started (default {DEFAULT_WAIT_TIMEOUT:g}).")
    g.add_argument("--overwrite", action="store_true",
                   help="Allow a non-empty output folder: replace the files this run writes and remove everything "
                        "else in it (listed), so that it holds exactly this conversion. Into a folder shared with "
                        "other data (combine into the shards' folder) only the run's own files are replaced.")


def add_ms2pt_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("distributed")
    d.add_argument("--num-layers", type=int, help="Layers on the MindSpeed side, noop layers included "
                                                  "(default: from pt_meta args + number of --noop).")
    d.add_argument("--dp-size", type=int, help="Data parallel size of the MindSpore checkpoint (rank numbering; "
                                               "default: from pt_meta args).")
    d.add_argument("--cp-size", type=int, help="Context parallel size (default: from pt_meta args).")
    d.add_argument("--tp-size", type=int, help="Tensor parallel size (checked against pt_meta).")
    d.add_argument("--pp-size", type=int, help="Pipeline parallel size (checked against pt_meta).")
    d.add_argument("--vpp-size", type=int, help="Virtual pipeline chunks per stage (checked against pt_meta).")
    d.add_argument("--src-model-format", choices=("ckpt", "safetensors"),
                   help="Format of the MindSpore files (default: whichever is present).")
    d.add_argument("--noop", nargs="+", type=int, default=[],
                   help="MindSpeed global layer ids that are identity (noop) layers; Megatron gets the rest.")
    d.add_argument("--stage-list", nargs="+", help="Layers per pipeline stage on the MindSpeed side.")
    d.add_argument("--parallel-init-order", default="tp-cp-ep-dp-pp")
    f = p.add_argument_group("File Path/Location")
    f.add_argument("--ms-path", required=True, help="MindSpore checkpoint folder (rank_*/ or iter_*/ inside).")
    f.add_argument("--param-map-path", help="The pt_meta folder written by pt2ms (default: <ms-path>/pt_meta).")
    f.add_argument("--megatron-path", required=True, help="Where to write the Megatron checkpoint.")
    f.add_argument("--convert-param-only", action="store_true",
                   help="Write model_optim_rng.pt only (weights in the training dtype), no distrib_optim.pt.")
    f.add_argument("--debug", action="store_true")
    add_run_flags(f)
    t = p.add_argument_group("target layout (reshard on the way; costs one extra write + read of the checkpoint)")
    add_target_flags(t)
    k = p.add_argument_group("Megatron checkpoint format (torch_dist: written through legacy files in a temporary "
                             "folder; costs one extra write + read of the checkpoint)")
    k.add_argument("--ckpt-format", choices=("torch", "torch_dist"), default="torch",
                   help="torch (default): legacy model_optim_rng.pt + distrib_optim.pt files; torch_dist: a Megatron "
                        "--ckpt-format torch_dist folder (what megatron-core 0.9+ saves by default).")
    k.add_argument("--sharding-type", default=None, metavar="TYPE",
                   help="torch_dist only: the distributed optimizer's sharding type, fully_reshardable (default; "
                        "megatron-core 0.15+) or fully_sharded_model_space (megatron-core 0.8 - 0.14).")
    c = p.add_argument_group("ckptmap")
    c.add_argument("--rules", default="auto", help="Bundled rules name or a .rules path (default: auto).")
    c.add_argument("--layout", choices=("auto", "v1", "v2"), default="auto",
                   help="Layout of the MindSpore checkpoint (default: detect).")
    c.add_argument("--file-prefix", default="network", help="File name prefix in V1 layout (default network).")
    c.add_argument("--dialect", choices=("source", "torch", "msadapter"), default="source",
                   help="torch zip dialect of the Megatron files: source (default) writes each file in the dialect "
                        "pt2ms read it in (stock PyTorch, or MindSpeed-Core-MS's MSAdapter); torch writes stock "
                        "PyTorch files from an MSAdapter checkpoint (RNG states: see --drop-rng).")
    from ckptmap.cli.convert import add_rng_flags
    add_rng_flags(c)
    c.add_argument("--cast-exact", action="store_true",
                   help="Accept MindSpore tensors of other dtypes than Megatron's or float32 (e.g. int32, float16 "
                        "for bfloat16) when every value survives the cast bit for bit; checked element by element.")
    c.add_argument("--allow-extra", action="store_true",
                   help="Leave out MindSpore tensors no rule reads back (listed in the plan) instead of refusing.")
    c.add_argument("--dry-run", action="store_true", help="Print the plan (a summary by pattern) and write nothing.")
    c.add_argument("--full", action="store_true", help="With --dry-run: list every file and tensor of the plan; when converting: list every file "
                        "written (default: by folder beyond 64 files).")
    add_planning_flag(c)


def ms2pt_options(ns):
    from ckptmap.cli.convert import rng_policy
    from ckptmap.mapping.layout import parse_stage_list
    from ckptmap.mapping.ms2pt import Ms2PtOptions

    return Ms2PtOptions(
        ms_path=ns.ms_path, megatron_path=ns.megatron_path, param_map_path=ns.param_map_path,
        num_layers=ns.num_layers, dp_size=ns.dp_size, cp_size=ns.cp_size, tp_size=ns.tp_size, pp_size=ns.pp_size,
        vpp_size=ns.vpp_size, src_model_format=ns.src_model_format, noop=tuple(ns.noop),
        stage_list=parse_stage_list(ns.stage_list) if ns.stage_list else None,
        parallel_init_order=ns.parallel_init_order, convert_param_only=ns.convert_param_only, rules=ns.rules,
        layout=ns.layout, file_prefix=ns.file_prefix, dialect=ns.dialect, rng=rng_policy(ns),
        cast_exact=ns.cast_exact, allow_extra=ns.allow_extra,
        planning_processes=getattr(ns, "planning_processes", None),
        planning_limit=1 if getattr(ns, "multiprocess_off", False) else getattr(ns, "process_limit", None))


def pt2ms_options(ns):
    from ckptmap.mapping.compiler import Pt2MsOptions
    from ckptmap.mapping.layout import parse_stage_list

    return Pt2MsOptions(
        megatron_path=ns.megatron_path, ms_path=ns.ms_path, param_map_path=ns.param_map_path,
        tp_size=ns.tp_size, pp_size=ns.pp_size, ep_size=ns.ep_size, dp_size=ns.dp_size, cp_size=ns.cp_size,
        parallel_init_order=ns.parallel_init_order, vpp_size=ns.vpp_size,
        stage_list=parse_stage_list(ns.stage_list) if ns.stage_list else None,
        num_layers=ns.num_layers, noop=tuple(ns.noop), generate_all_dp_cp=ns.generate_all_dp_cp,
        convert_param_only=ns.convert_param_only, file_prefix=ns.file_prefix, format=ns.format,
        dist_opt_content=tuple(ns.dist_opt_content), rules=ns.rules, layout=ns.layout, dtype=ns.dtype,
        crc=ns.crc, megatron_version=ns.megatron_version, main_param_check=ns.main_param_check,
        planning_processes=getattr(ns, "planning_processes", None),
        planning_limit=1 if getattr(ns, "multiprocess_off", False) else getattr(ns, "process_limit", None))


def add_target_flags(g) -> None:
    """--target-*: the layout to reshard to (each defaults to the source's)."""
    g.add_argument("--target-tp-size", type=int, help="Tensor parallel size to reshard to (default: the source's).")
    g.add_argument("--target-pp-size", type=int, help="Pipeline parallel size to reshard to (default: the source's).")
    g.add_argument("--target-vpp-size", type=int,
                   help="Model chunks per pipeline stage (default: the source's if PP is unchanged, else 1).")
    g.add_argument("--target-dp-size", type=int,
                   help="Data parallel size the optimizer state is bucketed for (default: the source's).")
    g.add_argument("--target-ep-size", type=int, help="Expert parallel size (default: the source's).")
    g.add_argument("--target-stage-list", nargs="+", help="Layers per pipeline stage of the target.")
    g.add_argument("--target-noop", nargs="*", type=int, default=None, metavar="LAYER",
                   help="Global ids of the target's noop layers (layers without weights; the real layers keep "
                        "their order around them). Default: the source's; give it with no ids for none.")
    g.add_argument("--target-megatron-version",
                   help="Megatron version whose bucket layout and distrib_optim.pt form the target uses (default: the "
                        "source's).")
    g.add_argument("--vocab-size", type=int,
                   help="The true (unpadded) vocabulary size, when the target TP pads it differently and args do not say.")


def add_reshard_flags(p) -> None:
    f = p.add_argument_group("File Path/Location")
    f.add_argument("--megatron-path", required=True, help="Megatron checkpoint (the --save directory or an iter_* one).")
    f.add_argument("--output-path", required=True, help="Where to write the resharded Megatron checkpoint.")
    f.add_argument("--param-map-path", help="The training run's param_map folder (default: found next to the "
                                            "checkpoint, else derived).")
    f.add_argument("--convert-param-only", action="store_true", help="Weights only (no distrib_optim.pt).")
    t = p.add_argument_group("target layout")
    add_target_flags(t)
    c = p.add_argument_group("ckptmap")
    c.add_argument("--rules", default="auto", help="Bundled rules name or a .rules path (default: auto).")
    c.add_argument("--megatron-version", help="Megatron version that wrote the source (default: detected).")
    c.add_argument("--no-main-param-check", dest="main_param_check", action="store_false",
                   help="Do not check that every fp32 main param rounds to its model weight.")
    c.add_argument("--parallel-init-order", default="tp-cp-ep-dp-pp")
    c.add_argument("--noop", nargs="+", type=int, default=[])
    c.add_argument("--dry-run", action="store_true", help="Print the plan (a summary by pattern) and write nothing.")
    c.add_argument("--full", action="store_true", help="With --dry-run: list every file and tensor of the plan; when converting: list every file "
                        "written (default: by folder beyond 64 files).")
    c.add_argument("--debug", action="store_true")
    add_run_flags(c)


def reshard_options(ns):
    from ckptmap.mapping.layout import parse_stage_list
    from ckptmap.mapping.reshard import ReshardOptions

    return ReshardOptions(
        megatron_path=ns.megatron_path, output_path=ns.output_path, target_tp_size=ns.target_tp_size,
        target_pp_size=ns.target_pp_size, target_vpp_size=ns.target_vpp_size, target_dp_size=ns.target_dp_size,
        target_ep_size=ns.target_ep_size,
        target_stage_list=parse_stage_list(ns.target_stage_list) if ns.target_stage_list else None,
        target_megatron_version=ns.target_megatron_version, vocab_size=ns.vocab_size,
        convert_param_only=ns.convert_param_only, param_map_path=ns.param_map_path, rules=ns.rules,
        megatron_version=ns.megatron_version, main_param_check=ns.main_param_check,
        parallel_init_order=ns.parallel_init_order, noop=tuple(ns.noop),
        target_noop=None if ns.target_noop is None else tuple(ns.target_noop))
