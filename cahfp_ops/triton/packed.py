"""The per-round layout ops on the Triton backend.

Not yet Triton kernels: these run the pure-PyTorch definitions (:mod:`cahfp_ops.reference`)
on the data's device, so the layout API, the Server and the Flower strategy work on CUDA
tensors with the same results. They cost a Python loop over tensors and clients and
synchronise with the host; the fused Triton versions (a constant number of launches per
round, capturable in a CUDA graph) are still to be written.
"""

from __future__ import annotations

from ..reference import accumulate_packed, aggregate_packed, slice_packed

__all__ = ["accumulate_packed", "aggregate_packed", "slice_packed"]
