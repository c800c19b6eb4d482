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

from cahfp_ops.triton.curvature_scores import _scores_kernel  # noqa: E402
from cahfp_ops.triton.reconstruct_aggregate import _aggregate_kernel  # noqa: E402
from cahfp_ops.triton.slice_channels import _slice_kernel  # noqa: E402
from cahfp_ops.triton.topk_channel_masks import _topk_kernel  # noqa: E402

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


def main() -> int:
    todo = list(variants())
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
