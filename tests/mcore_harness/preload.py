"""Imported once by the harness's fork server (``multiprocessing`` "forkserver" preload): the
stand-ins and megatron.core 0.6.0, so each rank is forked with them already imported instead of
importing torch + megatron.core itself (seconds of CPU per rank on a 2-core machine)."""
from . import stubs

stubs.install()

import torch  # noqa: E402,F401
# torch.optim.Optimizer.__init__ imports torch._dynamo on first use: seconds, once here
import torch._dynamo  # noqa: E402,F401

import megatron.core  # noqa: E402,F401
import megatron.core.distributed  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.models.gpt.gpt_layer_specs  # noqa: E402,F401
import megatron.core.optimizer  # noqa: E402,F401
import megatron.core.pipeline_parallel  # noqa: E402,F401
import megatron.core.transformer.custom_layers.transformer_engine  # noqa: E402,F401

from . import worker  # noqa: E402,F401
