"""Test-only stand-in for Megatron-LM core_r0.6.0's ``megatron.training`` (see ../../README.md):
the global-args accessors of ``megatron/training/global_vars.py`` and, like the real package,
``training`` imported at package import (it binds ``save_checkpoint`` by name)."""

_GLOBAL_ARGS = None


def get_args():
    """Return arguments (Megatron-LM asserts they were set, with this message)."""
    assert _GLOBAL_ARGS is not None, "args is not initialized."
    return _GLOBAL_ARGS


def set_args(args):
    global _GLOBAL_ARGS
    _GLOBAL_ARGS = args


from .training import save_checkpoint_and_time  # noqa: E402,F401 - as Megatron-LM's __init__ imports .training
