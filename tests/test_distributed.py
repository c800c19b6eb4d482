"""Sharded aggregation: two gloo processes on loopback give the single-process result."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cahfp_ops.fl.aggregate import StreamingAggregator
from cahfp_ops.fl.distributed import all_reduce_aggregator
from helpers import fl_round_setup


def _clients():
    torch.manual_seed(0)  # the model's initialisation: identical in every process
    g = torch.Generator().manual_seed(11)
    _, plan, keeps, sd, states = fl_round_setup(g)
    rows, cols = plan.tensor_keep_sets(keeps)
    per_client = [({n: v[k] for n, v in rows.items()}, {n: v[k] for n, v in cols.items()}) for k in range(len(states))]
    return sd, states, per_client, [3.0, 1.0, 2.0, 0.5]


def _worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sd, states, per_client, weights = _clients()
        agg = StreamingAggregator(sd, mode)
        for k in range(rank, len(states), world):  # this rank's share of the clients
            agg.add(states[k], *per_client[k], weights[k])
        all_reduce_aggregator(agg)
        torch.save(agg.result(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["reconstruct", "overlap"])
def test_two_gloo_processes_match_single_process(tmp_path, mode):
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(2, _free_port(), mode, out), nprocs=2, join=True, start_method="spawn")
    sd, states, per_client, weights = _clients()
    single = StreamingAggregator(sd, mode)
    for k in range(len(states)):
        single.add(states[k], *per_client[k], weights[k])
    expected = single.result()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for name, v in expected.items():
            if v.is_floating_point():
                torch.testing.assert_close(got[name], v, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(got[name], v), name


def test_requires_initialised_group():
    with pytest.raises(RuntimeError, match="not initialised"):
        all_reduce_aggregator(StreamingAggregator({"w": torch.zeros(2)}))
