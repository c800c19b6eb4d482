"""FjORD: ordered dropout with sampled nested widths.

Horváth et al., NeurIPS 2021, Sec. 3: ordered dropout with nested prefix widths
from ``WIDTHS``; a client of capacity ``p_max = 1 - r`` trains, each round, a
width drawn uniformly from those ``<= p_max`` (the paper draws per local batch; the simulator
trains one submodel per client and round, so it draws per round), and the server averages
each entry over the clients that trained it, weighted by their samples.
"""

from __future__ import annotations

from .method import Method

WIDTHS = (0.25, 0.5, 0.75, 1.0)
METHOD = Method("fjord", "prefix", ("overlap",), warmup=False, widths=WIDTHS)
