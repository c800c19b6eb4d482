"""Whether Triton kernels run through Triton's CPU interpreter. A leaf module."""

from __future__ import annotations

import os


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
