"""FedProx: FedAvg plus a proximal term and variable local work.

Li et al., MLSys 2020, Sec. 3-4: FedAvg plus ``mu/2 * ||w - w_global||^2`` in
the local loss (``mu = 0.01``), and the variable local work of Sec. 5.2 (stragglers do fewer
local steps): a client of the heterogeneity rank's pruning ratio ``r`` runs ``(1 - r)`` of the
local steps (at least one) on the full model; sample-weighted FedAvg aggregation.
"""

from __future__ import annotations

from .method import Method

METHOD = Method("fedprox", None, prox_mu=0.01, rank_local_work=True)
