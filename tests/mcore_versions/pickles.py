"""Reading Megatron's pickles without that Megatron version importable.

``model_optim_rng.pt`` and torch_dist's ``common.pt`` pickle ``args`` (an argparse.Namespace with
megatron enums: ``ModelType``; from 0.12 ``AttnBackend``; 0.16 also ``signal.Signals``), and
torch_dist's ``.metadata`` pickles megatron.core classes (``MCoreSavePlan``-era metadata). The test
process has megatron-core 0.6.0 on its path, which lacks some of them: :func:`load` resolves
what it can and replaces the rest with named placeholders, and reports every global it met.
"""
from __future__ import annotations

import pickle
import types


class Placeholder:
    """Stands for a class the reading process cannot import; keeps what the pickle gave it."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{type(self).__module__}.{type(self).__name__} {self.args}>"


def load(path):
    """``(object, {"module.name": resolved_or_placeholder})`` for a ``torch.save`` file."""
    import torch

    seen = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                cls = super().find_class(module, name)
                seen[f"{module}.{name}"] = "resolved"
            except (ImportError, AttributeError):
                cls = type(name, (Placeholder,), {"__module__": module})
                seen[f"{module}.{name}"] = "placeholder"
            return cls

    mod = types.ModuleType("pickle_with_placeholders")
    mod.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    mod.Unpickler = Unpickler
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=mod)
    return obj, seen
