"""The name part of torch's ``.data/serialization_id`` (interim: computed by torch's own writer)."""

from __future__ import annotations

from ckptmap.errors import CkptmapError


class _NullSink:
    def write(self, data):
        return len(data)

    def flush(self):
        pass


def name_hash_digits(names: list[str]) -> str:
    """The first 20 characters of the serialization id torch's writer computes for records written
    in the order ``names`` (``version`` and the id itself are added by write_end_of_file)."""
    import torch

    writer = torch._C.PyTorchFileWriter(_NullSink(), True, 64)
    for name in names:
        writer.write_record(name, b"", 0)
    writer.write_end_of_file()
    sid = writer.serialization_id()
    if len(sid) != 40 or not sid.isdigit():  # pragma: no cover - a torch that changed its format
        raise CkptmapError(f"torch {torch.__version__} writes a serialization id of an unknown form ({sid!r})")
    return sid[:20]
