"""Compile every Triton kernel for an H100 (sm_90) ahead of time, without a GPU.

Run as a script (with TRITON_INTERPRET unset): the interpreter runs kernels as
Python and cannot catch what the real compiler rejects; this does. Prints one
line per variant and exits non-zero on the first failure.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cahfp_ops.triton.aggregate import _aggregate_kernel  # noqa: E402
from cahfp_ops.triton.masks import _topk_kernel  # noqa: E402
from cahfp_ops.triton.packed import (  # noqa: E402
    _accumulate_packed_kernel,
    _aggregate_packed_kernel,
    _finish_partials_kernel,
    _fold_packed_kernel,
    _slice_packed_kernel,
)
from cahfp_ops.triton.scores import _scores_kernel  # noqa: E402
from cahfp_ops.triton.slice import _slice_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def variants():
    for wt, ct, acc in [
        ("fp32", "fp32", "fp32"),
        ("fp32", "fp16", "fp32"),
        ("bf16", "bf16", "fp32"),
        ("fp64", "fp64", "fp64"),
        ("fp16", "fp32", "fp32"),
    ]:
        for overlap in (False, True):
            sig = {
                "w_base": f"*{wt}",
                "out_base": f"*{wt}",
                "c_base": f"*{ct}",
                "t_meta": "*i64",
                "c_meta": "*i64",
                "work": "*i32",
                "inv_rows": "*i32",
                "inv_cols": "*i32",
                "p_ptr": f"*{acc}",
                "K": "i32",
                "R_total": "i32",
                "C_total": "i32",
                "OVERLAP": "constexpr",
                "ACC64": "constexpr",
                "BLOCK": "constexpr",
            }
            yield (
                f"aggregate w={wt} c={ct} overlap={overlap}",
                _aggregate_kernel,
                sig,
                {"OVERLAP": overlap, "ACC64": acc == "fp64", "BLOCK": 1024},
            )
    for wt in ("fp32", "bf16", "fp64"):
        sig = {
            "w_base": f"*{wt}",
            "out_ptr": f"*{wt}",
            "keep_base": "*i64",
            "seg": "*i64",
            "work": "*i64",
            "BLOCK": "constexpr",
        }
        yield f"slice w={wt}", _slice_kernel, sig, {"BLOCK": 1024}
    for st in ("fp32", "fp16", "fp64"):
        sig = {
            "s_ptr": f"*{st}",
            "keep_ptr": "*i64",
            "mask_ptr": "*i1",
            "idx_ptr": "*i64",
            "C": "i32",
            "max_keep": "i32",
            "ACC64": "constexpr",
            "BLOCK_C": "constexpr",
            "CHUNK": "constexpr",
        }
        yield f"topk s={st}", _topk_kernel, sig, {"ACC64": st == "fp64", "BLOCK_C": 512, "CHUNK": 16}
    for wt in ("fp32", "bf16", "fp64"):
        for has_g, has_h in ((True, True), (True, False), (False, True)):
            sig = {
                "w_ptr": f"*{wt}",
                "g_ptr": f"*{wt}",
                "h_ptr": f"*{wt}",
                "out_ptr": "*fp64" if wt == "fp64" else "*fp32",
                "wk": "i64",
                "gk": "i64",
                "hk": "i64",
                "C": "i32",
                "pre": "i32",
                "post": "i32",
                "HAS_G": "constexpr",
                "HAS_H": "constexpr",
                "ACC64": "constexpr",
                "BLOCK": "constexpr",
            }
            yield (
                f"scores w={wt} g={has_g} h={has_h}",
                _scores_kernel,
                sig,
                {"HAS_G": has_g, "HAS_H": has_h, "ACC64": wt == "fp64", "BLOCK": 1024},
            )


def packed_variants():
    """The per-round layout's kernels (packed.py)."""
    for wt, ct, acc in [("fp32", "fp32", "fp32"), ("fp32", "fp16", "fp32"), ("bf16", "bf16", "fp32"),
                        ("fp64", "fp64", "fp64")]:  # fmt: skip
        tables = {"w_meta": "*i64", "meta": "*i64"}
        client = {"c_base": f"*{ct}", "c_meta": "*i64", "work": "*i32", "row_inv": "*i32", "col_inv": "*i32"}
        stats = {"ssq_part": "*fp64", "bad_part": "*i8"}
        flags = {"OVERLAP": "constexpr", "ACC64": "constexpr", "BLOCK": "constexpr"}
        for overlap in (False, True):
            c = {"OVERLAP": overlap, "ACC64": acc == "fp64", "BLOCK": 1024}
            sig = {"w_base": f"*{wt}", **tables, "out": f"*{wt}", **client, "p_ptr": f"*{acc}", **stats,
                   "K": "i32", "SR": "i32", "SC": "i32", **flags}  # fmt: skip
            yield f"aggregate_packed w={wt} c={ct} overlap={overlap}", _aggregate_packed_kernel, sig, c
            sig = {"w_base": f"*{wt}", **tables, **client, "p_ptr": f"*{acc}", "sums_in": f"*{acc}",
                   "cover_in": f"*{acc}", "sums_out": f"*{acc}", "cover_out": f"*{acc}", **stats, "K": "i32",
                   "SR": "i32", "SC": "i32", **flags}  # fmt: skip
            yield f"fold_packed w={wt} c={ct} overlap={overlap}", _fold_packed_kernel, sig, c
            for add in (False, True):
                sig = {"w_base": f"*{wt}", **tables, **client, "sums": f"*{acc}", "cover": f"*{acc}",
                       "accept": "*i8", "weight": f"*{acc}", **stats, "SR": "i32", "SC": "i32",
                       "ADD": "constexpr", **flags}  # fmt: skip
                yield f"accumulate_packed w={wt} c={ct} overlap={overlap} add={add}", _accumulate_packed_kernel, sig, {
                    "ADD": add, **c}
            if ct == wt:
                sig = {"w_base": f"*{wt}", "w_meta": "*i64", "work": "*i32", "sums": f"*{acc}", "cover": f"*{acc}",
                       "out": f"*{wt}", "wsum": f"*{acc}", **flags}  # fmt: skip
                yield f"finish_partials w={wt} overlap={overlap}", _finish_partials_kernel, sig, c
        if ct == wt:
            sig = {"w_base": f"*{wt}", **tables, "row_inv": "*i32", "col_keep": "*i32", "counts": "*i64",
                   "starts": "*i64", "out": f"*{wt}", "work": "*i32", "N": "i32", "SR": "i32", "SC": "i32",
                   "out_numel": "i64", "BLOCK": "constexpr"}  # fmt: skip
            yield f"slice_packed w={wt}", _slice_packed_kernel, sig, {"BLOCK": 1024}


def main() -> int:
    todo = list(variants()) + list(packed_variants())
    print(f"variants {len(todo)}")
    for name, kernel, sig, constexprs in todo:
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=TARGET)
        except Exception as exc:  # report which variant failed
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            return 1
        print(f"ok   {name} ({len(compiled.asm['cubin'])} bytes of sm_90 cubin)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
