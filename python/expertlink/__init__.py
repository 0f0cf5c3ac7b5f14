"""ExpertLink: MoE dispatch/combine over NCCL symmetric memory, from PyTorch.

- ``expertlink.Buffer``: the simple front end (``dispatch(x, topk_idx, topk_weights, num_experts)``,
  ``combine(x, handle)``, ``low_latency_dispatch(...)``, ``low_latency_combine(...)``).
- ``expertlink.deep_ep``: the DeepEP V1 ``Buffer`` surface (``import expertlink.deep_ep as deep_ep``).
- ``expertlink.reference``: the CPU oracle on numpy arrays (no GPU, no torch).
- ``expertlink._C``: the torch-free binding of the C++ API (raw pointers, dtypes, shapes, strides, streams).

torch is imported lazily: ``import expertlink`` works without it; constructing a Buffer needs it.
tests/python/test_gpu.py (2 GPUs) checks every call against the oracle.
"""

from . import _C
from ._C import Error, ErrorCode, TensorView
from ._C import reference
from .buffer import Buffer, EventOverlap, HtHandle, LlHandle

__version__ = "0.1.0"

__all__ = ["Buffer", "EventOverlap", "HtHandle", "LlHandle", "Error", "ErrorCode", "TensorView", "reference",
           "__version__"]
