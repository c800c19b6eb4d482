"""FedRolex: rolling-window submodels.

Alam et al., NeurIPS 2022, Sec. 3.2: the same widths as rolling windows whose
start advances by one channel per round (cyclic), with HeteroFL's count-based overlap rule and
its static batch normalisation (FedRolex builds on HeteroFL's training code). Without sBN the
averaged running statistics of a channel date from the rounds it last sat in the window,
while its weights kept changing: on the default digits run that cost FedRolex about 10
points (0.791 ± 0.133 against 0.891 ± 0.028 with the statistics recomputed; HeteroFL,
whose windows never move, 0.979 against 0.975).
"""

from __future__ import annotations

from .method import Method

METHOD = Method("fedrolex", "rolling", ("overlap",), weighting="count", warmup=False, static_bn=True)
