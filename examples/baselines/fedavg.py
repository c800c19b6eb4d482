"""FedAvg: every client trains the full model; sample-weighted averaging.
"""

from __future__ import annotations

from .method import Method

METHOD = Method("fedavg", None)
