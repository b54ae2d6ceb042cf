"""Test-only stand-in for Megatron-LM core_r0.6.0's ``megatron.training.checkpointing``: only
``save_checkpoint``, with Megatron-LM's signature, writing the legacy (torch) format under
``get_args().save`` like the mcore harness does."""

from megatron.training import get_args


def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far):
    from mcore_harness.worker import save_legacy_checkpoint

    args = get_args()
    save_legacy_checkpoint(args.save, iteration, model if isinstance(model, list) else [model], optimizer,
                           opt_param_scheduler, args, num_floating_point_operations_so_far)
