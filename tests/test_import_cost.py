"""``import cahfp_ops`` stays cheap: every Flower or Ray worker process pays it. The compiler
stack (``torch._dynamo``, about 2 s) loads only when something is compiled."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_load_the_compiler_stack():
    code = "import sys, cahfp_ops; print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_validation_switch_is_still_a_constant_under_compile():
    from cahfp_ops._validation import validation_enabled

    assert getattr(validation_enabled, "_dynamo_marked_constant", False)
