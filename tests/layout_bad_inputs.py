"""Bad input to the per-round layout API, run by ``test_layout_contract.py`` in a subprocess
per backend and validation setting (``CAHFP_OPS_BACKEND``, ``CAHFP_OPS_VALIDATE``).

Every tensor a call reads or writes (weights, client buffers and tensors, coefficients,
partial sums, outputs, and the layout's own index tables) is a fresh copy placed against a
``PROT_NONE`` guard page, once ending at one and once starting after one: a stray read or
write is a segmentation fault, which ends the process and fails the test, naming the case
(printed to stderr before it runs). Prints one JSON object: case -> outcome (``ok``, or the
exception's class names and message) and whether the inputs were left untouched.

Kinds of case: ``bad`` (with validation on: a ValueError or TypeError whose message matches
the pattern, nothing modified); ``ok`` (must succeed either way); ``any`` (tampered tables,
lying client lists: may raise or return garbage, must not touch memory outside its tensors).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guard_pages import guarded  # noqa: E402

import cahfp_ops  # noqa: E402
from cahfp_ops import (  # noqa: E402
    PackedModel,
    RoundLayout,
    accumulate_packed,
    aggregate_packed,
    finish_partials,
    fold_packed,
    slice_packed,
)

t = torch.tensor
F64 = torch.float64


class Case:
    """A 3-client layout of 3 tensors (a conv, its bias, a linear reading its channels), or
    of one tensor (``one=True``), and every input of its ops, each against a guard page."""

    def __init__(self, at: str, one: bool = False):
        gen = torch.Generator().manual_seed(0)
        self.g = lambda x: guarded(x, at)
        if one:
            self.layout = RoundLayout.from_groups(
                [(6, 5)], [(0, 1)], [None], [6], [[t([0, 2]), t([1, 2, 5]), t([4])]], 3, names=["w"], reuse=False
            )
        else:
            self.layout = RoundLayout.from_groups(
                [(4, 3, 2, 2), (4,), (5, 4)], [(0, 1), (0, 1), None], [None, None, (0, 1)], [4],
                [[t([0, 2]), t([1, 2, 3]), t([3])]], 3, names=["conv", "bias", "fc"], reuse=False,
            )  # fmt: skip
        L = self.layout
        self.K, self.N = L.num_clients, L.num_tensors
        # the layout's own tables, guarded too (what the kernels read)
        own, col_inv = L._tables_and_col_inv("cpu")
        self.tables = {key: self.g(t) for key, t in own._asdict().items()}
        L._tables["cpu"] = (type(own)(**self.tables), self.g(col_inv))
        self.weights = [self.g(torch.randn(s, generator=gen)) for s in L.shapes]
        with cahfp_ops.use_backend("torch"):  # set-up, not under test (and fast on every backend)
            plain = L.slice([w.clone() for w in self.weights])
        self.packed = [self.g(b + 0.1 * torch.randn(b.shape, generator=gen)) for b in plain]
        self.separate = [[self.g(v) for v in PackedModel(b.clone(), L, k).values()] for k, b in enumerate(self.packed)]
        self.coef = self.g(torch.full((self.K,), 1 / self.K, dtype=F64))
        total = sum(w.numel() for w in self.weights)
        cover = sum(w.shape[0] if w.dim() == 1 else w.shape[0] * w.shape[1] for w in self.weights)
        self.total, self.cover_n = total, cover
        self.packed_n = int(L.numels.sum())
        self.sums = self.g(torch.randn(total, generator=gen))
        self.cover = self.g(torch.rand(cover, generator=gen))
        self.sums_out = self.g(torch.zeros(total))
        self.cover_out = self.g(torch.zeros(cover))
        self.out = self.g(torch.zeros(total))

    def inputs(self) -> list[torch.Tensor]:
        return [*self.weights, *self.packed, *(x for c in self.separate for x in c), self.coef, self.sums,
                self.cover, *self.tables.values()]  # fmt: skip

    # the calls, with every argument defaulting to a well-formed one
    def agg(self, clients=None, coef=None, mode="reconstruct", weights=None, out=None, layout=None):
        return aggregate_packed(
            self.layout if layout is None else layout, self.weights if weights is None else weights,
            self.packed if clients is None else clients, self.coef if coef is None else coef, mode, out=out,
        )  # fmt: skip

    def fold(self, clients=None, coef=None, weights=None, sums=None, cover=None, out="default"):
        out = (self.sums_out, self.cover_out) if out == "default" else out
        return fold_packed(
            self.layout, self.weights if weights is None else weights, self.packed if clients is None else clients,
            self.coef * 3 if coef is None else coef, "reconstruct", self.sums if sums is None else sums,
            self.cover if cover is None else cover, out=out,
        )  # fmt: skip

    def acc(self, client=None, weight=1.0, sums=None, layout=None, k=1):
        layout = self.layout.client(k) if layout is None else layout
        return accumulate_packed(
            layout, self.weights, self.packed[k] if client is None else client, weight, "overlap",
            self.sums if sums is None else sums, self.cover,
        )  # fmt: skip

    def finish(self, weight_sum=2.0, cover=None, out=None):
        return finish_partials(self.weights, self.sums, self.cover if cover is None else cover, weight_sum,
                               "reconstruct", out=out)  # fmt: skip

    def op_aggregate(self, clients, parts):
        """The registered operator itself, on the layout's (tampered) tables."""
        tb = self.tables
        stats = torch.empty(self.K, 2, dtype=F64)
        torch.ops.cahfp.aggregate_packed(
            self.weights, clients, parts, tb["meta"], tb["row_inv"], tb["col_keep"], tb["counts"], tb["offsets"],
            self.coef, "reconstruct", self.out, stats,
        )  # fmt: skip

    def tamper(self, key: str, index: tuple, value: int) -> Case:
        self.tables[key][index] = value
        return self


def _with(seq: list, i: int, value) -> list:
    seq = list(seq)
    seq[i] = value
    return seq


def _transposed(c: Case) -> list:
    return _with(c.weights, 2, c.g(c.weights[2].t().contiguous()))


def _longer(x: torch.Tensor, c: Case) -> torch.Tensor:
    return c.g(torch.cat([x, x[:1]]))


def _every_table_op(c: Case) -> None:
    """Slicing (the offsets standing in for the starts), aggregation (packed and separate),
    folding and accumulation on the layout's tables, writing into guarded buffers."""
    tb = c.tables

    def slice_op():
        out = c.g(torch.zeros(int(c.layout.numels.sum())))
        torch.ops.cahfp.slice_packed(c.weights, tb["meta"], tb["row_inv"], tb["col_keep"], tb["counts"],
                                     tb["offsets"], out)  # fmt: skip

    for call in (slice_op, lambda: c.agg(out=c.out), lambda: c.agg(c.separate, out=c.out), lambda: c.fold(),
                 lambda: c.acc(layout=c.layout.client(1))):  # fmt: skip
        try:
            call()
        except Exception:  # raising is allowed here; touching memory outside is not
            pass


BIG = 2**63 - 5
CASES = {
    # ---- bad arguments: a clear error with validation on --------------------------------
    "slice: one weight short": ("bad", r"slice_packed: 2 weights for a layout of 3",
                                lambda c: slice_packed(c.layout, c.weights[:2])),
    "slice: transposed weight": ("bad", r"slice_packed: weights\[2\] \('fc'\) has shape \(4, 5\)",
                                 lambda c: slice_packed(c.layout, _transposed(c))),
    "slice: weight on meta": ("bad", r"slice_packed: weights\[1\] \('bias'\) is on the meta device",
                              lambda c: slice_packed(c.layout, _with(c.weights, 1, torch.empty(4, device="meta")))),
    "slice: short out": ("bad", r"slice_packed: out must be a contiguous",
                         lambda c: slice_packed(c.layout, c.weights, out=c.g(torch.zeros(c.packed_n - 1)))),
    "aggregate: buffer one short": ("bad", r"aggregate_packed: clients\[1\] has shape \(\d+,\), but the layout packs",
                                    lambda c: c.agg(_with(c.packed, 1, c.g(c.packed[1][:-1])))),
    "aggregate: buffer one long": ("bad", r"aggregate_packed: clients\[1\] has shape",
                                   lambda c: c.agg(_with(c.packed, 1, _longer(c.packed[1], c)))),
    "aggregate: buffer reshaped": ("bad", r"aggregate_packed: clients\[0\] has shape \(1, \d+\)",
                                   lambda c: c.agg(_with(c.packed, 0, c.packed[0].view(1, -1)))),
    "aggregate: empty buffer": ("bad", r"aggregate_packed: clients\[2\] has shape \(0,\)",
                                lambda c: c.agg(_with(c.packed, 2, torch.zeros(0)))),
    "aggregate: tensor with extra rows": (
        "bad", r"aggregate_packed: clients\[2\]\[0\] \('conv'\) has shape \(2, 3, 2, 2\)",
        lambda c: c.agg(_with(c.packed, 2, _with(c.separate[2], 0, c.g(torch.zeros(2, 3, 2, 2)))))),
    "aggregate: transposed client tensor": (
        "bad", r"aggregate_packed: clients\[0\]\[2\] \('fc'\) has shape",
        lambda c: c.agg(_with(c.packed, 0, _with(c.separate[0], 2, c.g(c.separate[0][2].t().contiguous()))))),
    "aggregate: client on meta": ("bad", r"aggregate_packed: clients\[1\] is on the meta device",
                                  lambda c: c.agg(_with(c.packed, 1, torch.empty(c.packed[1].shape, device="meta")))),
    "aggregate: fewer clients": ("bad", r"aggregate_packed: 2 clients for a layout of 3",
                                 lambda c: c.agg(c.packed[:2])),
    "aggregate: more clients": ("bad", r"aggregate_packed: 4 clients for a layout of 3",
                                lambda c: c.agg([*c.packed, c.packed[0]])),
    "aggregate: integer buffer": ("bad", r"aggregate_packed: clients\[0\] is a torch.int64 buffer",
                                  lambda c: c.agg(_with(c.packed, 0, c.g(c.packed[0].long())))),
    "aggregate: mixed client dtypes": ("bad", r"aggregate_packed: clients\[2\] is torch.float64 but the other",
                                       lambda c: c.agg(_with(c.packed, 2, c.g(c.packed[2].double())))),
    "aggregate: clients not a list": ("bad", r"aggregate_packed: clients must be a list",
                                      lambda c: c.agg(dict(enumerate(c.packed)))),
    "aggregate: not a layout": ("bad", r"aggregate_packed: layout must be a RoundLayout",
                                lambda c: c.agg(layout=c.tables)),
    "aggregate: NaN coef": ("bad", r"aggregate_packed: coef\[1\] = nan is negative or not finite",
                            lambda c: c.agg(coef=c.g(t([0.5, math.nan, 0.5], dtype=F64)))),
    "aggregate: negative coef": ("bad", r"coef\[0\] = -0.5 is negative",
                                 lambda c: c.agg(coef=c.g(t([-0.5, 1.0, 0.5], dtype=F64)))),
    "aggregate: infinite coef": ("bad", r"coef\[2\] = inf is negative or not finite",
                                 lambda c: c.agg(coef=c.g(t([0.5, 0.5, math.inf], dtype=F64)))),
    "aggregate: all-zero coef": ("bad", r"aggregate_packed: coef sums to zero",
                                 lambda c: c.agg(coef=c.g(torch.zeros(3, dtype=F64)))),
    "aggregate: sample counts as coef": ("ok", None, lambda c: c.agg(coef=c.g(t([30.0, 0.0, 10.0], dtype=F64)))),
    "aggregate: float32 coef": ("bad", r"aggregate_packed: coef must be float64",
                                lambda c: c.agg(coef=c.g(torch.full((3,), 1 / 3)))),
    "aggregate: short coef": ("bad", r"aggregate_packed: coef must hold 3 values",
                              lambda c: c.agg(coef=c.g(t([0.5, 0.5], dtype=F64)))),
    "aggregate: bad mode": ("bad", r"aggregate_packed: mode must be one of", lambda c: c.agg(mode="median")),
    "aggregate: short out": ("bad", r"aggregate_packed: out must be a contiguous",
                             lambda c: c.agg(out=c.g(torch.zeros(c.total - 1)))),
    "aggregate: transposed weight": ("bad", r"aggregate_packed: weights\[2\] \('fc'\) has shape",
                                     lambda c: c.agg(weights=_transposed(c))),
    "aggregate: weight on meta": ("bad", r"aggregate_packed: weights\[0\] is on the meta device",
                                  lambda c: c.agg(weights=_with(c.weights, 0, torch.empty(4, 3, 2, 2, device="meta")))),
    "accumulate: layout of three clients": ("bad", r"accumulate_packed: the layout holds 3 clients",
                                            lambda c: c.acc(layout=c.layout)),
    "accumulate: NaN weight": ("bad", r"accumulate_packed: weight must be a finite number >= 0",
                               lambda c: c.acc(weight=math.nan)),
    "accumulate: negative weight": ("bad", r"accumulate_packed: weight must be", lambda c: c.acc(weight=-1.0)),
    "accumulate: short sums": ("bad", r"accumulate_packed: sums must be a contiguous",
                               lambda c: c.acc(sums=c.g(torch.zeros(c.total - 1)))),
    "accumulate: short buffer": ("bad", r"accumulate_packed: client has shape",
                                 lambda c: c.acc(client=c.g(c.packed[1][:-1]))),
    "fold: short cover_out": ("bad", r"fold_packed: cover_out must be a contiguous",
                              lambda c: c.fold(out=(c.sums_out, c.g(torch.zeros(c.cover_n - 1))))),
    "fold: negative coef": ("bad", r"fold_packed: coef\[1\] = -1.0 is negative",
                            lambda c: c.fold(coef=c.g(t([1.0, -1.0, 1.0], dtype=F64)))),
    "fold: fewer clients": ("bad", r"fold_packed: 2 clients for a layout of 3", lambda c: c.fold(c.packed[:2])),
    "fold: transposed weight": ("bad", r"fold_packed: weights\[2\] \('fc'\) has shape",
                                lambda c: c.fold(weights=_transposed(c))),
    "fold: long buffer": ("bad", r"fold_packed: clients\[0\] has shape",
                          lambda c: c.fold(_with(c.packed, 0, _longer(c.packed[0], c)))),
    "finish: negative weight_sum": ("bad", r"finish_partials: weight_sum must be a finite number >= 0",
                                    lambda c: c.finish(weight_sum=-1.0)),
    "finish: short cover": ("bad", r"finish_partials: cover must be a contiguous",
                            lambda c: c.finish(cover=c.g(torch.zeros(c.cover_n - 1)))),
    "finish: out of another dtype": ("bad", r"finish_partials: out must be a contiguous",
                                     lambda c: c.finish(out=c.g(torch.zeros(c.total, dtype=F64)))),
    "from_groups: group past the groups": (
        "bad", r"RoundLayout.from_groups: rows\[0\] names group 3, but there are 1 groups",
        lambda c: RoundLayout.from_groups([(4, 3)], [(3, 1)], [None], [4], [[t([0])]], 1)),
    "from_groups: block that does not divide its dim": (
        "bad", r"RoundLayout.from_groups: cols\[0\]: dim 1 of shapes\[0\] \(4, 5\) has 5 entries",
        lambda c: RoundLayout.from_groups([(4, 5)], [None], [(0, 2)], [2], [[t([0])]], 1)),
    "from_groups: no clients": ("bad", r"RoundLayout.from_groups: num_clients must be an int >= 1",
                                lambda c: RoundLayout.from_groups([(4,)], [(0, 1)], [None], [4], [[]], 0)),
    # ---- well-formed calls the old C++ kernels refused: one-tensor layouts ----------------
    "one tensor: separate clients": ("ok", None, lambda c: c.agg(c.separate)),
    "one tensor: mixed forms": ("ok", None, lambda c: c.agg([c.separate[0], c.packed[1], c.separate[2]])),
    "one tensor: fold separate": ("ok", None, lambda c: c.fold(c.separate)),
    "one tensor: accumulate separate": ("ok", None, lambda c: c.acc(client=c.separate[1])),
    # ---- tampered tables and lying client lists: no access outside any tensor ------------
    "tampered: offsets near 2**63": ("any", None, lambda c: _every_table_op(c.tamper("offsets", (1, 0), BIG))),
    "tampered: offsets -1": ("any", None, lambda c: _every_table_op(c.tamper("offsets", (1, 1), -1))),
    "tampered: meta row offset near 2**63": ("any", None, lambda c: _every_table_op(c.tamper("meta", (0, 3), BIG))),
    "tampered: meta column offset -7": ("any", None, lambda c: _every_table_op(c.tamper("meta", (-1, 4), -7))),
    "tampered: meta sizes that overflow": (
        "any", None, lambda c: _every_table_op(c.tamper("meta", (0, 0), 2**32).tamper("meta", (0, 1), 2**32))),
    "tampered: huge counts": ("any", None, lambda c: _every_table_op(c.tamper("counts", (1, 0, 1), 2**40))),
    "tampered: negative counts": ("any", None, lambda c: _every_table_op(c.tamper("counts", (0, 0, 0), -3))),
    "tampered: row_inv past the rows": ("any", None, lambda c: _every_table_op(c.tamper("row_inv", (1, 0), 2**31 - 1))),
    "tampered: row_inv -5": ("any", None, lambda c: _every_table_op(c.tamper("row_inv", (2, 1), -5))),
    "tampered: col_keep past the columns": ("any", None,
                                            lambda c: _every_table_op(c.tamper("col_keep", (0, 0), 2**31 - 1))),
    "tampered: col_keep -3": ("any", None, lambda c: _every_table_op(c.tamper("col_keep", (1, 0), -3))),
    "lying: fewer client buffers than clients": ("any", None, lambda c: c.op_aggregate(c.packed[:2], [0, 0])),
    "lying: buffers said to be separate tensors": ("any", None,
                                                   lambda c: c.op_aggregate(c.packed * 3, [c.N] * 3)),
    "lying: separate tensors said to be buffers": (
        "any", None, lambda c: c.op_aggregate([c.separate[0][0], c.packed[1], c.separate[2][0]], [0, 0, 0])),
    "lying: client count over the tensors given": ("any", None, lambda c: c.op_aggregate(c.packed, [0, 0, 0, 0])),
}
ONE_TENSOR = {name for name in CASES if name.startswith("one tensor") or name.startswith("lying: separate")}


def main() -> None:
    """``python layout_bad_inputs.py [PLACEMENTS [KINDS]]``: comma-separated placements
    (``end``, ``start``; both by default) and case kinds (``bad``, ``ok``, ``any``; all)."""
    places = (sys.argv[1] if len(sys.argv) > 1 else "end,start").split(",")
    kinds = set((sys.argv[2] if len(sys.argv) > 2 else "bad,ok,any").split(","))
    results = {}
    for at in places:
        for name, (kind, _pattern, call) in CASES.items():
            if kind not in kinds:
                continue
            print(f"CASE {at}: {name}", file=sys.stderr, flush=True)
            case = Case(at, one=name in ONE_TENSOR)
            before = [x.clone() for x in case.inputs()]
            t0 = time.perf_counter()
            try:
                call(case)
                outcome = {"ok": True}
            except Exception as e:  # noqa: BLE001 (the outcome is what is recorded)
                outcome = {"raised": [cls.__name__ for cls in type(e).__mro__], "message": str(e)[:400]}
            outcome["seconds"] = round(time.perf_counter() - t0, 3)
            outcome["untouched"] = all(torch.equal(a, b) for a, b in zip(before, case.inputs()))
            results[f"{at}: {name}"] = outcome
    print(json.dumps({"validation": cahfp_ops.validation_enabled(), "results": results}))


if __name__ == "__main__":
    main()
