"""Test-only stand-in for the part of Megatron-LM core_r0.6.0's ``megatron/training/training.py``
that saves: it imports ``save_checkpoint`` *by name* at import time (so a hook that patches
``checkpointing.save_checkpoint`` later must rebind this name too) and calls it from
``save_checkpoint_and_time`` (timers and logging left out)."""

from .checkpointing import save_checkpoint


def save_checkpoint_and_time(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far):
    save_checkpoint(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far)
