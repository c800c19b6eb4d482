"""A per-round layout's index tables as one value (a leaf module: the layout, the operators
and every backend import it).

The registered ``torch.ops.cahfp`` layout operators take the five tables as separate tensor
arguments (an operator schema has no named tuples); everywhere else they travel as one
:class:`LayoutTables`: ``cahfp_ops.layout`` builds it, each operator's body re-packs its
arguments into it, and the backends read it.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LayoutTables(NamedTuple):
    """The tables a layout kernel reads (on the data's device).

    ``meta`` ``(N, 5)`` int64: per tensor its ``(R, Cin, T)`` view and the start of its
    channel spaces in ``row_inv`` / ``col_keep``; ``row_inv`` ``(K, SR)`` int32: client k's
    compact row of each full row (-1: pruned); ``col_keep`` ``(K, SC)`` int32: client k's kept
    columns, in order; ``counts`` ``(K, N, 2)`` int64: kept rows and columns per (client,
    tensor); ``offsets`` ``(K, N)`` int64: where client k's tensor n starts in its packed
    buffer (``slice_packed``: in the one output buffer, absolute).
    """

    meta: Tensor
    row_inv: Tensor
    col_keep: Tensor
    counts: Tensor
    offsets: Tensor
