"""Training-time hooks. Importing this package does nothing; import a framework's module to
enable its hooks, e.g. ``import ckptmap.hooks.megatron`` at the top of a Megatron training script
(writes param_map at model construction and checkpoint save, checks it at load)."""
