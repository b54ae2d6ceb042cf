"""`ckptmap combine` (MindSpeed distributed-optimizer shards -> named tensors): flags and command."""


def register(sub) -> None:
    """Add the `combine` sub-command to the ckptmap argument parser (filled in by the combine work)."""
