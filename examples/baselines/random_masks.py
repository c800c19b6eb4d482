"""Random masks: random channels at the client's ratio, the control (reconstruction by default,
or overlap).
"""

from __future__ import annotations

from .method import Method

METHOD = Method("random", "random", ("reconstruct", "overlap"))
