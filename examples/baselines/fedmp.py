"""FedMP: structured pruning by L1 filter norm.

Jiang et al., ICDE 2022: structured pruning by L1 filter norm of the global model
at the client's ratio; the CA-HFP paper's Table I pairs it with reconstruction (default),
``/overlap`` is available. ``magnitude`` is kept as an alias.
"""

from __future__ import annotations

from .method import Method

METHOD = Method("fedmp", "l1", ("reconstruct", "overlap"))
