"""Server.assign's buffers: compact models sliced into buffers reused round after round, and
handed out in windows of clients (O(window) memory) with the same keep sets and bit-identical
models, replies and aggregates."""

import pytest
import torch

from cahfp_ops.fl import Server, zoo


def _server(seed=0):
    torch.manual_seed(seed)
    net = zoo.small_cnn(8)
    return Server(net, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed)), criterion="l1",
                  warmup_rounds=0, update_bound=None)  # fmt: skip


def _trained(state, k):
    return {n: v + 0.01 * (k + 1) if v.is_floating_point() else v + 1 for n, v in state.items()}


RATIOS = {c: (0.0, 0.25, 0.5, 0.75)[c % 4] for c in range(10)}


@pytest.mark.parametrize("window", [1, 3, 10, 64])
def test_windows_hand_out_the_same_models_and_aggregate_the_same(window):
    whole, windowed = _server(), _server()
    for _ in range(2):
        a = whole.assign(RATIOS)
        b = windowed.assign(RATIOS, window=window)
        assert all(b[c].state is None for c in b)
        assert [(x.params, x.bytes, x.training_flops) for x in a.values()] == [
            (x.params, x.bytes, x.training_flops) for x in b.values()]  # fmt: skip
        assert "never handed out" in windowed.check_update(0, a[0].state)
        replies, held = {}, 0
        for part in windowed.windows(window):
            assert len(part) <= window
            held = max(held, sum(b.numel() for b in windowed._slice_buffers.values()))
            for c, x in part.items():
                assert set(x.keeps) == set(a[c].keeps) and all(torch.equal(x.keeps[g], a[c].keeps[g]) for g in x.keeps)
                for n, v in a[c].state.items():
                    assert torch.equal(x.state[n], v), (c, n)
                replies[c] = _trained(dict(x.state), c)  # the window's models are trained (copied) now
        most = max(sum(a[c].params for c in list(a)[i : i + window]) for i in range(0, len(a), window))
        assert held <= max(most, 1)
        ra = whole.aggregate({c: _trained(dict(a[c].state), c) for c in a})
        rb = windowed.aggregate(replies)
        assert ra.accepted == rb.accepted == list(RATIOS)
        for n, v in whole.state.items():
            assert torch.equal(windowed.state[n], v), n


def test_slicing_buffers_are_reused_after_aggregation_and_fresh_while_open():
    server = _server()
    first = server.assign(RATIOS)
    ptr = first[1].state.buffer.data_ptr()
    server.aggregate({c: _trained(dict(a.state), c) for c, a in first.items()})
    second = server.assign(RATIOS)
    assert second[1].state.buffer.untyped_storage().data_ptr() == first[1].state.buffer.untyped_storage().data_ptr()
    kept = second[1].state.buffer.clone()
    third = server.assign(RATIOS)  # round still open: the second round's models stay as they were
    assert third[1].state.buffer.untyped_storage().data_ptr() != second[1].state.buffer.untyped_storage().data_ptr()
    assert torch.equal(second[1].state.buffer, kept)
    assert ptr  # (the first round's buffer was real memory)


def test_window_arguments_are_checked():
    server = _server()
    with pytest.raises(ValueError, match="window"):
        server.assign(RATIOS, window=0)
    server.assign(RATIOS, window=2)
    with pytest.raises(ValueError, match="size"):
        next(iter(server.windows(0)))
    with pytest.raises(ValueError, match="not handed out"):
        server.build(0)
