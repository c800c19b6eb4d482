"""Backend selection: environment variable, context manager, resolution, C++ fallback."""


import pytest
import torch

import cahfp_ops
from cahfp_ops import cpp


def test_default_is_auto_and_resolves_to_cpp(monkeypatch):
    monkeypatch.delenv("CAHFP_OPS_BACKEND", raising=False)
    assert cahfp_ops.get_backend() == "auto"
    assert cahfp_ops.resolve_backend(torch.device("cpu")) == "cpp"


def test_env_and_context_manager(monkeypatch):
    monkeypatch.setenv("CAHFP_OPS_BACKEND", "torch")
    assert cahfp_ops.get_backend() == "torch"
    with cahfp_ops.use_backend("cpp"):
        assert cahfp_ops.get_backend() == "cpp"
        with cahfp_ops.use_backend("Torch"):
            assert cahfp_ops.resolve_backend(torch.device("cpu")) == "torch"
        assert cahfp_ops.get_backend() == "cpp"
    assert cahfp_ops.get_backend() == "torch"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        with cahfp_ops.use_backend("cuda"):
            pass
    with pytest.raises(TypeError):
        with cahfp_ops.use_backend(3):
            pass
    monkeypatch.setenv("CAHFP_OPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="CAHFP|backend"):
        cahfp_ops.get_backend()


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with cahfp_ops.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        cahfp_ops.resolve_backend(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with cahfp_ops.use_backend("triton"):
        assert cahfp_ops.resolve_backend(torch.device("cpu")) == "triton"


def test_cpp_backend_rejects_non_cpu():
    with cahfp_ops.use_backend("cpp"), pytest.raises(ValueError, match="CPU"):
        cahfp_ops.resolve_backend(torch.device("meta"))


def test_backends_agree(gen):
    weight = torch.randn(9, 4, 3, generator=gen)
    rows = [torch.tensor([0, 4, 8]), torch.tensor([2, 3])]
    clients = [torch.randn(3, 4, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)]
    with cahfp_ops.use_backend("cpp"):
        a = cahfp_ops.reconstruct_aggregate(weight, clients, rows)
    with cahfp_ops.use_backend("torch"):
        b = cahfp_ops.reconstruct_aggregate(weight, clients, rows)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_load_state_reports_success():
    assert cpp.load_cpp() and cpp.load_error() is None
