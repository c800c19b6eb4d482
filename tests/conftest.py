import importlib.util
import os
import zlib

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter, so the
# whole op suite also checks the GPU kernels' logic (set before any kernel is defined).
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton  # noqa: F401  (its library functions are built now, in interpreter mode)

import cahfp_ops
from cahfp_ops._debug import poison_outputs
from helpers import backends_under_test


@pytest.fixture(params=backends_under_test())
def backend(request):
    """Run the test body on each backend under test, with kernel outputs poisoned."""
    name = request.param
    if name == "cpp" and not cahfp_ops.load_cpp():
        pytest.fail("the C++ kernels failed to build or load")
    with cahfp_ops.use_backend(name), poison_outputs():
        yield name


@pytest.fixture
def gen(request):
    """A generator seeded from the test id, so each test gets fresh, reproducible data."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g
