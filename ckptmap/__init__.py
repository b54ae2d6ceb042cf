"""ckptmap: move training checkpoints between Megatron-LM and MindSpeed-Core-MS, bit-exactly."""

__version__ = "0.1.0"
