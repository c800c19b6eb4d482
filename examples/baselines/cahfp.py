"""CA-HFP: the curvature-aware scores of the paper (``cahfp_ops.fl.CurvatureImportance``) choose
each client's channels; reconstruction aggregation (default) or overlap.
"""

from __future__ import annotations

from .method import Method

METHOD = Method("cahfp", "curvature", ("reconstruct", "overlap"))
