"""Large output buffers on transparent huge pages: same contents and shape as torch.empty."""

import pytest
import torch

from cahfp_ops import _hugepages


@pytest.mark.parametrize("prefault", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_empty_gives_a_writable_contiguous_buffer_of_the_asked_size(dtype, prefault):
    n = (_hugepages._MIN_BYTES // torch.empty((), dtype=dtype).element_size()) + 12345
    buf = _hugepages.empty(n, dtype, "cpu", prefault=prefault)
    assert buf.shape == (n,) and buf.dtype == dtype and buf.is_contiguous()
    src = torch.arange(n, dtype=torch.float64).to(dtype)
    buf.copy_(src)
    assert torch.equal(buf, src)
    if _hugepages._madvise() is not None:
        assert buf.data_ptr() % _hugepages._HUGE_PAGE == 0


def test_small_buffers_and_the_switch_give_plain_allocations(monkeypatch):
    small = _hugepages.empty(1000, torch.float32, "cpu")
    assert small.shape == (1000,) and small.storage_offset() == 0
    _hugepages._madvise.cache_clear()
    monkeypatch.setenv("CAHFP_OPS_HUGEPAGES", "0")
    try:
        assert _hugepages._madvise() is None
        big = _hugepages.empty(_hugepages._MIN_BYTES, torch.uint8, "cpu")
        assert big.storage_offset() == 0 and big.numel() == _hugepages._MIN_BYTES
    finally:
        _hugepages._madvise.cache_clear()
