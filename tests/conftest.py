import zlib

import pytest
import torch

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
