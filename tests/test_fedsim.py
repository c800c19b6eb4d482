"""The example federated simulator: partitioner statistics, a tiny run of every method and
mode on synthetic data, the accounting numbers, the data readers, and the CLI outputs."""

import gzip
import json
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cahfp_ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import fedsim  # noqa: E402
from fedsim_data import dirichlet_partition, load, load_cifar, load_fashion_mnist, synthetic  # noqa: E402


def test_partition_covers_everything_once_and_skews_with_alpha():
    labels = torch.arange(2000) % 10
    for alpha in (0.1, 1.0, 100.0):
        parts = dirichlet_partition(labels, 10, alpha, seed=3, min_size=5)
        allidx = torch.cat(parts).sort().values
        assert torch.equal(allidx, torch.arange(2000)) and min(len(p) for p in parts) >= 5

    def classes_per_client(alpha):
        parts = dirichlet_partition(labels, 10, alpha, seed=3)
        return np.mean([(torch.bincount(labels[p], minlength=10) / len(p) > 0.05).sum().item() for p in parts])

    few, many = classes_per_client(0.1), classes_per_client(100.0)
    assert few < 4 and many > 9.5, (few, many)


def test_ranks_and_batch_sizes():
    assert fedsim.client_ratios(2, 10) == [0.5] * 5 + [0.75] * 5
    assert fedsim.client_ratios(0, 3) == [0.25, 0.25, 0.0]
    assert fedsim.batch_size_for(144, 128) == 18 and fedsim.batch_size_for(5000, 128) == 128


@pytest.mark.parametrize("method", list(fedsim.METHODS))
@pytest.mark.parametrize("mode", cahfp_ops.MODES)
def test_tiny_run_every_method(method, mode):
    if method == "fedavg" and mode == "overlap":
        pytest.skip("FedAvg does not prune: one aggregation")
    data = synthetic(n_train=120, n_test=40, seed=1)
    cfg = fedsim.Config(data="synthetic", clients=2, rounds=2, warmup_rounds=1, rank=2)
    parts = dirichlet_partition(data.y_train, 2, 1.0, seed=0)
    r = fedsim.run(cfg, method, mode, data, parts, progress=False)
    # accuracy on the 40 test images: multiples of 1/40, the same on a second run
    assert len(r["accuracy"]) == 2 and all(0 <= a * 40 <= 40 and a * 40 == round(a * 40) for a in r["accuracy"])
    assert fedsim.run(cfg, method, mode, data, parts, progress=False)["accuracy"] == r["accuracy"]
    # accounting, by hand for the 8x8 small CNN (conv1 16, conv2 32, fc1 64 channels):
    # ratio 0.5 keeps 8/16/32 channels -> 3,754 floats; ratio 0.75 keeps 4/8/16 -> 1,082
    full = 13_898  # parameters plus BatchNorm statistics of the full model
    assert r["full_params"] == full
    expected = full if method == "fedavg" else (3754 + 1082) / 2
    assert r["params_down_per_client"] == r["params_up_per_client"] == expected
    macs_full = 64 * 16 * 9 + 16 * 32 * 16 * 9 + 128 * 64 + 64 * 10
    assert r["full_training_mflops"] == pytest.approx(6 * macs_full / 1e6)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_and_cifar_readers(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    fm = load_fashion_mnist(tmp_path)
    assert fm.x_train.shape == (12, 1, 28, 28) and fm.x_test.shape == (5, 1, 28, 28) and fm.y_train.dtype == torch.int64
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    labels = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = rng.integers(0, 10, 4).tolist()
        labels[name] = y
        with open(base / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": y}, f)
    c10 = load_cifar(tmp_path, 10)
    assert c10.x_train.shape == (20, 3, 32, 32) and c10.y_test.tolist() == labels["test_batch"]


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="CIFAR-100"):
        load_cifar(tmp_path, 100)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load("fmnist")
    with pytest.raises(SystemExit, match="fedsim: CIFAR-10"):
        fedsim.main(["--data", "cifar10", "--data-dir", str(tmp_path), "--no-progress"])


def test_cli_writes_table_json_plot_and_sweep(tmp_path, capsys):
    fedsim.main(
        [
            "--data",
            "synthetic",
            "--clients",
            "2",
            "--rounds",
            "1",
            "--methods",
            "fedavg",
            "cahfp/overlap",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert "| fedavg |" in out and "| cahfp | overlap |" in out
    js = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["method"] for r in js["results"]] == ["fedavg", "cahfp"]
    png = next(tmp_path.glob("*.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"
    fedsim.main(
        ["--data", "synthetic", "--clients", "2", "--rounds", "1", "--sweep", "--out", str(tmp_path), "--no-progress"]
    )
    table = (tmp_path / "sweep_synthetic.md").read_text()
    assert "Table I" in table and "alpha=0.1" in table and "| cahfp |" in table and "overlap (HeteroFL)" in table


def test_training_learns_the_synthetic_task():
    """FedAvg on the synthetic task goes from near chance (0.1) to near perfect in 8 rounds."""
    data = synthetic(n_train=120, n_test=40, seed=1)
    cfg = fedsim.Config(data="synthetic", clients=2, rounds=8, warmup_rounds=1, rank=2)
    parts = dirichlet_partition(data.y_train, 2, 1.0, seed=0)
    r = fedsim.run(cfg, "fedavg", "reconstruct", data, parts, progress=False)
    assert r["accuracy"][0] < 0.5 and r["final_accuracy"] >= 0.9


def test_attack_replies_by_hand():
    import fedsim_attack

    sent = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    trained = {"w": torch.tensor([1.5, 1.0]), "n": torch.tensor(4)}
    scale = fedsim_attack.make_tamper("scale", {0}, 4.0)
    flip = fedsim_attack.make_tamper("signflip", {0}, 4.0)
    assert torch.equal(scale(0, sent, trained)["w"], torch.tensor([3.0, -2.0]))  # 1 + 4 * 0.5, 2 + 4 * -1
    assert torch.equal(flip(0, sent, trained)["w"], torch.tensor([-1.0, 6.0]))  # 1 - 4 * 0.5, 2 - 4 * -1
    assert flip(0, sent, trained)["n"] is trained["n"]  # integer entries pass through
    assert scale(1, sent, trained) is trained  # honest client
    assert fedsim_attack.make_tamper("none", {0}, 4.0) is None
    with pytest.raises(ValueError, match="attack"):
        fedsim_attack.make_tamper("nope", {0}, 4.0)


def test_attack_is_seen_by_the_server_and_the_bound_rejects_a_huge_one():
    import fedsim_attack

    data = synthetic(n_train=200, n_test=40, seed=1)
    cfg = fedsim.Config(data="synthetic", clients=4, rounds=2, warmup_rounds=1, rank=2)
    parts = dirichlet_partition(data.y_train, 4, 1.0, seed=0)
    huge = fedsim_attack.make_tamper("signflip", {0}, 1e4)
    bounded = fedsim.run(cfg, "cahfp", "reconstruct", data, parts, False, server_options={}, tamper=huge)
    assert bounded["rejected_total"] == cfg.rounds  # client 0, every round
    clean = fedsim.run(cfg, "cahfp", "reconstruct", data, parts, False, server_options={"update_bound": None})
    attacked = fedsim.run(cfg, "cahfp", "reconstruct", data, parts, False,
                          server_options={"update_bound": None}, tamper=huge)  # fmt: skip
    assert attacked["rejected_total"] == 0 and attacked["accuracy"] != clean["accuracy"]


def test_attack_cli_writes_table_json_plot(tmp_path, capsys):
    import fedsim_attack

    argv = ["--data", "synthetic", "--clients", "3", "--rounds", "1", "--attack", "signflip", "--attackers", "1",
            "--seeds", "2", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    fedsim.main(argv)
    out = capsys.readouterr().out
    assert "| none |" in out and "| signflip |" in out and "median" in out and "trimmed_mean" in out
    js = json.loads((tmp_path / "attack_synthetic.json").read_text())
    assert len(js["runs"]) == 2 * 2 * 4  # seeds x (none, signflip) x defences
    assert {(r["attack"], r["defence"], r["seed"]) for r in js["runs"]} == {
        (a, d, s) for a in ("none", "signflip") for d in fedsim_attack.DEFENCES for s in (0, 1)
    }
    assert (tmp_path / "attack_synthetic.png").read_bytes()[:4] == b"\x89PNG"
    assert "±" in (tmp_path / "attack_synthetic.md").read_text()
    with pytest.raises(SystemExit, match="attackers"):
        fedsim.main([*argv[:6], "--attack", "scale", "--attackers", "3", "--out", str(tmp_path), "--no-progress"])
