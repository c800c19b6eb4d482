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


@pytest.mark.parametrize("method,mode", [(m.name, mode) for m in fedsim.METHODS.values() for mode in m.modes])
def test_tiny_run_every_method(method, mode):
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
    if method == "prunefl":  # sparse transfer: kept weights + a bitmap of the 4 conv / linear weights + 314 dense
        # weights 144 / 4,608 / 8,192 / 640: keep 50 % -> 6,792, 25 % -> 3,396; bitmaps 5 + 144 + 256 + 20 = 425
        assert r["params_down_per_client"] == r["params_up_per_client"] == ((6792 + 425 + 314) + (3396 + 425 + 314)) / 2
    elif method == "dapperfl":  # downloads the full model, uploads its compact one
        assert r["params_down_per_client"] == full and r["params_up_per_client"] == (3754 + 1082) / 2
    elif method == "fjord":  # widths drawn per round from {0.25, 0.5} (ratio 0.5) and {0.25} (0.75)
        assert 1082 <= r["params_down_per_client"] <= (3754 + 1082) / 2
    else:
        expected = full if not fedsim.METHODS[method].prunes else (3754 + 1082) / 2
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
    base = ["--data", "synthetic", "--clients", "2", "--rounds", "1", "--out", str(tmp_path), "--no-progress"]
    fedsim.main([*base, "--methods", "fedavg", "cahfp/overlap", "--seeds", "2"])
    out = capsys.readouterr().out
    assert "| fedavg | - |" in out and "| cahfp | overlap |" in out and "(2 seeds)" in out and " ± " in out
    js = json.loads(next(tmp_path.glob("*.json")).read_text())
    runs = [(r["method"], r["seed"]) for r in js["results"]]
    assert runs == [("fedavg", 0), ("cahfp", 0), ("fedavg", 1), ("cahfp", 1)]
    assert js["seeds"] == [0, 1] and len(js["summary"]) == 2
    png = next(tmp_path.glob("*.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"
    # the paired difference appears only when cahfp (reconstruct) ran
    fedsim.main([*base, "--methods", "fedprox", "--seeds", "2"])
    out = capsys.readouterr().out
    assert "| fedprox | - |" in out and "[" not in out.split("| fedprox |")[1].split("\n")[0]
    with pytest.raises(SystemExit, match="unknown method"):
        fedsim.main([*base, "--methods", "nope"])
    fedsim.main([*base, "--sweep", "--seeds", "1", "--methods", "fedavg", "heterofl", "cahfp"])
    table = (tmp_path / "sweep_synthetic.md").read_text()
    assert "Table I" in table and "alpha=0.1" in table and "| cahfp | reconstruct |" in table
    assert "| heterofl | overlap |" in table and "Table II" in table and "| fedmp |" in table


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
    js = json.loads((tmp_path / "attack_synthetic_x4.json").read_text())
    assert len(js["runs"]) == 2 * 2 * 4  # seeds x (none, signflip) x defences
    assert {(r["attack"], r["defence"], r["seed"]) for r in js["runs"]} == {
        (a, d, s) for a in ("none", "signflip") for d in fedsim_attack.DEFENCES for s in (0, 1)
    }
    assert (tmp_path / "attack_synthetic_x4.png").read_bytes()[:4] == b"\x89PNG"
    assert "±" in (tmp_path / "attack_synthetic_x4.md").read_text()
    with pytest.raises(SystemExit, match="attackers"):
        fedsim.main([*argv[:6], "--attack", "scale", "--attackers", "3", "--out", str(tmp_path), "--no-progress"])


def test_method_names_modes_and_aliases():
    import baselines as methods

    assert set(methods.METHODS) == {
        "fedavg", "fedprox", "prunefl", "dapperfl", "fedmp", "heterofl", "fedrolex", "fjord", "random",
        "cahfp"}  # fmt: skip
    assert methods.get("magnitude") is methods.METHODS["fedmp"]
    assert methods.parse_runs(["magnitude/overlap", "heterofl", "cahfp"]) == [
        ("fedmp", "overlap"), ("heterofl", "overlap"), ("cahfp", "reconstruct")]  # fmt: skip
    assert len(methods.parse_runs(["all"])) == len(methods.METHODS)
    with pytest.raises(ValueError, match="heterofl"):
        methods.parse_runs(["heterofl/reconstruct"])  # HeteroFL's rule is overlap
    with pytest.raises(ValueError, match="unknown method"):
        methods.get("fedsgd")
    assert methods.METHODS["heterofl"].weighting == methods.METHODS["fedrolex"].weighting == "count"
    assert methods.METHODS["fjord"].weighting == "samples"


def test_fjord_widths_nest_below_capacity():
    import baselines as methods

    g = torch.Generator().manual_seed(0)
    fjord = methods.METHODS["fjord"]
    seen = {0: set(), 1: set()}
    for _ in range(200):
        for k, r in methods.round_ratios(fjord, {0: 0.5, 1: 0.75}, g).items():
            seen[k].add(r)
    assert seen == {0: {0.5, 0.75}, 1: {0.75}}  # widths {0.25, 0.5} and {0.25}
    assert methods.round_ratios(methods.METHODS["fedavg"], {0: 0.5}, g) == {0: 0.0}
    assert methods.round_ratios(methods.METHODS["heterofl"], {0: 0.5}, g) == {0: 0.5}


def test_fedprox_proximal_term_and_local_work():
    """FedProx: mu = 0 and full local work is FedAvg exactly; the proximal term and fewer local
    steps for weaker ranks change the run."""
    import dataclasses

    import baselines as methods

    data = synthetic(n_train=120, n_test=40, seed=1)
    cfg = fedsim.Config(data="synthetic", clients=2, rounds=2, warmup_rounds=1, rank=2)
    parts = dirichlet_partition(data.y_train, 2, 1.0, seed=0)
    fedavg = fedsim.run(cfg, "fedavg", "reconstruct", data, parts, progress=False)
    plain = dataclasses.replace(methods.METHODS["fedprox"], name="fedprox0", prox_mu=0.0, rank_local_work=False)
    methods.METHODS["fedprox0"] = plain
    try:
        assert fedsim.run(cfg, "fedprox0", "reconstruct", data, parts, progress=False)["accuracy"] == fedavg["accuracy"]
    finally:
        del methods.METHODS["fedprox0"]
    prox = fedsim.run(cfg, "fedprox", "reconstruct", data, parts, progress=False)
    assert prox["params_down_per_client"] == fedavg["params_down_per_client"]  # full model


def test_seeds_table_has_mean_sd_and_paired_difference():
    results = []
    for seed, (a, c) in enumerate([(0.5, 0.6), (0.7, 0.7), (0.6, 0.8)]):
        for method, acc in (("fedavg", a), ("cahfp", c)):
            results.append({"method": method, "mode": "reconstruct", "seed": seed, "final_accuracy": acc,
                            "best_accuracy": acc, "accuracy": [acc], "full_params": 10, "params_down_per_client": 10,
                            "params_up_per_client": 10, "training_mflops_per_client": 1.0,
                            "full_training_mflops": 1.0, "seconds_per_round": 0.1})  # fmt: skip
    rows = {r["method"]: r for r in fedsim.summarise(results)}
    mu, half = rows["fedavg"]["diff"]  # differences -0.1, 0.0, -0.2: mean -0.1, sd 0.1, t(2) = 4.303
    assert mu == pytest.approx(-0.1) and half == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert "diff" not in rows["cahfp"]
    table = fedsim.format_table(results)
    assert "0.600 ± 0.100" in table and "-0.100 [-0.348, +0.148]" in table and "(3 seeds)" in table


def test_prunefl_masks_and_sparse_aggregation_by_hand():
    from baselines import prunefl as pf

    score = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.9]])
    assert pf.top_mask(score, 0.5).tolist() == [[False, True, False], [True, False, True]]  # tie 0.9: index 1 first
    masks = pf.client_masks({"w": score}, {0: 0.5, 1: 0.75})
    assert masks[1]["w"].sum() == 2 and bool((masks[1]["w"] <= masks[0]["w"]).all())  # nested
    g = {"w": torch.zeros(2, 2), "b": torch.zeros(2), "n": torch.tensor(5)}
    m0 = {"w": torch.tensor([[True, True], [False, False]])}
    m1 = {"w": torch.tensor([[True, False], [False, False]])}
    r0 = {"w": torch.full((2, 2), 1.0), "b": torch.tensor([1.0, 2.0]), "n": torch.tensor(7)}
    r1 = {"w": torch.full((2, 2), 4.0), "b": torch.tensor([4.0, 8.0]), "n": torch.tensor(9)}
    out = pf.aggregate_sparse(g, [r0, r1], [m0, m1], [1.0, 3.0])
    # w[0,0]: both keep -> (1 * 1 + 3 * 4) / 4; w[0,1]: client 0 only -> 1; row 1: nobody -> 0
    assert torch.equal(out["w"], torch.tensor([[3.25, 1.0], [0.0, 0.0]]))
    assert torch.equal(out["b"], torch.tensor([3.25, 6.5]))  # dense: FedAvg
    assert int(out["n"]) == 7
    state = {"w": torch.zeros(4, 16), "b": torch.zeros(3), "n": torch.tensor(1)}
    assert pf.sparse_params(state, {"w": torch.ones(4, 16, dtype=torch.bool)[:, :16] & (torch.arange(16) < 8)}) == (
        32 + 2 + 3)  # fmt: skip


def test_dapperfl_fusion_and_regulariser():
    from baselines import dapperfl as dfl

    assert dfl.fusion_coefficient(0) == 0.0 and dfl.fusion_coefficient(1) == pytest.approx(0.9 * 0.8)
    assert dfl.fusion_coefficient(50) == dfl.ALPHA_MIN
    g = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(2)}
    loc = {"w": torch.tensor([5.0, -1.0]), "n": torch.tensor(4)}
    fused = dfl.fuse(g, loc, 0.25)
    assert torch.equal(fused["w"], torch.tensor([4.0, 0.0])) and int(fused["n"]) == 4  # 0.25 g + 0.75 local
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    handle, penalty = dfl.representation_norm(net)
    x = torch.randn(5, 3)
    net(x)
    feats = torch.relu(net[0](x))
    assert torch.allclose(penalty(), feats.norm(dim=1).mean())
    handle.remove()


@pytest.mark.parametrize("prox_mu, work, label_split", [(0.0, 1.0, False), (0.01, 0.6, False), (0.0, 1.0, True)])
def test_batched_training_equals_client_by_client(prox_mu, work, label_split):
    """Clients of equal shapes trained together (vmap, padded and masked steps, masked
    BatchNorm statistics) end where local_sgd leaves each one alone: float64, so only summation
    order differs; different data sizes give different step counts and batch lengths."""
    import copy

    import fedsim_batched

    data = synthetic(n_train=300, n_test=10, seed=2)
    cfg = fedsim.Config(data="synthetic", batch_size=16)  # 23, 150, 90 samples: 8, 10, 8 steps
    torch.manual_seed(0)
    model = fedsim.make_model("small_cnn", data).double()
    model.dropout.p = 0.0  # dropout's draws differ between the two paths
    x, y = data.x_train.double(), data.y_train
    idxs = [torch.randperm(300, generator=torch.Generator().manual_seed(k))[:n] for k, n in enumerate((23, 150, 90))]
    alone = [copy.deepcopy(model) for _ in idxs]
    together = [copy.deepcopy(model) for _ in idxs]
    steps_alone = []
    # label split: each client's logits of a few classes zeroed (client 2 keeps every class)
    masks = torch.ones(3, 10, dtype=torch.bool)
    masks[0, [1, 4, 7]] = masks[1, 2:5] = False
    for k, m in enumerate(alone):
        anchors = [(p, p.detach().clone()) for p in m.parameters()] if prox_mu else []
        g = torch.Generator().manual_seed(10 + k)
        steps_alone.append(fedsim.local_sgd(cfg, m, idxs[k], x, y, g, work, anchors, prox_mu,
                                            label_mask=masks[k] if label_split else None))  # fmt: skip
    plans = [
        fedsim_batched.batch_plan(
            i,
            fedsim.batch_size_for(len(i), cfg.batch_size),
            cfg.local_epochs,
            work,
            torch.Generator().manual_seed(10 + k),
        )  # fmt: skip
        for k, i in enumerate(idxs)
    ]
    steps_together = fedsim_batched.train_group(together, plans, x, y, cfg.lr, cfg.momentum, prox_mu,
                                                masks if label_split else None)  # fmt: skip
    assert steps_together == steps_alone and len(set(steps_alone)) > 1
    for a, b in zip(alone, together):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            if key not in ("conv1.bias", "conv2.bias"):  # biases before BatchNorm: zero gradient in exact math
                assert not torch.equal(sa[key], model.state_dict()[key]), key  # training moved it
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-9, atol=1e-9, msg=key)
    if label_split:  # a zeroed logit gets no gradient: those classifier rows never move
        for k, m in enumerate(alone):
            off = ~masks[k]
            for key in ("fc2.weight", "fc2.bias"):
                assert torch.equal(m.state_dict()[key][off], model.state_dict()[key][off])
                assert not torch.equal(m.state_dict()[key][~off], model.state_dict()[key][~off])
    assert type(together[0].bn1) is torch.nn.BatchNorm2d  # the caller's modules are untouched


def test_batched_rounds_run_and_repeat():
    """Four clients at two widths: groups of two train together; a second run repeats the first."""
    data = synthetic(n_train=160, n_test=40, seed=1)
    cfg = fedsim.Config(data="synthetic", clients=4, rounds=2, warmup_rounds=1, rank=2, batched="on")
    parts = dirichlet_partition(data.y_train, 4, 1.0, seed=0)
    for method in ("fedavg", "cahfp", "fjord"):
        r = fedsim.run(cfg, method, fedsim.baselines.get(method).modes[0], data, parts, progress=False)
        again = fedsim.run(cfg, method, fedsim.baselines.get(method).modes[0], data, parts, progress=False)
        assert r["accuracy"] == again["accuracy"] and r["rejected_total"] == 0
    import fedsim_batched

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fedsim_batched.smallest_group("on", cpu) == 2 and fedsim_batched.smallest_group("auto", cuda) == 2
    assert fedsim_batched.smallest_group("auto", cpu) == fedsim_batched.CPU_SMALLEST_GROUP
    assert fedsim_batched.smallest_group("off", cpu) > 10**9
    with pytest.raises(ValueError, match="batched"):
        fedsim_batched.smallest_group("yes", cpu)


def test_static_bn_statistics_are_the_data_statistics():
    """HeteroFL's sBN: the evaluated model's BatchNorm statistics are the cumulative ones of a pass
    over the data (equal batches: the data's mean and the mean of the batches' unbiased
    variances); parameters and the momentum setting are untouched."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(512, 3) * 3 + 1
    before = {k: v.clone() for k, v in model.named_parameters()}
    out = fedsim.static_bn_statistics(model, x, batch=256)
    bn = model[1]
    h = model[0](x).detach()
    torch.testing.assert_close(bn.running_mean, h.mean(0))
    torch.testing.assert_close(bn.running_var, (h[:256].var(0) + h[256:].var(0)) / 2)
    assert out is model and not model.training and bn.momentum == 0.1
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert fedsim.baselines.get("heterofl").static_bn and fedsim.baselines.get("fedrolex").static_bn
    assert not fedsim.baselines.get("cahfp").static_bn


def test_label_split_classifier_rule_by_hand():
    """HeteroFL's label split: each classifier row is the plain mean over the clients holding
    its class (and, for a weight entry, keeping its column); the old value where none does."""
    from baselines import heterofl as ls

    g = torch.Generator().manual_seed(5)
    w_old, b_old = torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    cols = {"a": torch.tensor([0, 1, 2]), "b": None, "c": torch.tensor([1, 3])}
    width = {"a": 3, "b": 5, "c": 2}
    replies = {c: {"fc.weight": torch.randn(4, n, generator=g), "fc.bias": torch.randn(4, generator=g)}
               for c, n in width.items()}  # fmt: skip
    masks = {"a": torch.tensor([True, True, False, False]), "b": torch.tensor([True, False, True, False]),
             "c": torch.tensor([False, True, True, False])}  # fmt: skip
    names = ("fc.weight", "fc.bias")
    out = ls.aggregate_classifier({"fc.weight": w_old, "fc.bias": b_old}, replies, masks, cols, names)
    wa, wb, wc = (replies[c]["fc.weight"] for c in "abc")
    ba, bb, bc = (replies[c]["fc.bias"] for c in "abc")
    want_w = w_old.clone()
    # row 0: clients a (cols 0-2) and b (all)
    want_w[0] = torch.stack([(wa[0, 0] + wb[0, 0]) / 2, (wa[0, 1] + wb[0, 1]) / 2, (wa[0, 2] + wb[0, 2]) / 2,
                             wb[0, 3], wb[0, 4]])  # fmt: skip
    # row 1: clients a (cols 0-2) and c (cols 1, 3)
    want_w[1] = torch.stack([wa[1, 0], (wa[1, 1] + wc[1, 0]) / 2, wa[1, 2], wc[1, 1], w_old[1, 4]])
    # row 2: clients b (all) and c (cols 1, 3)
    want_w[2] = torch.stack([wb[2, 0], (wb[2, 1] + wc[2, 0]) / 2, wb[2, 2], (wb[2, 3] + wc[2, 1]) / 2, wb[2, 4]])
    # row 3: nobody holds class 3
    want_b = torch.stack([(ba[0] + bb[0]) / 2, (ba[1] + bc[1]) / 2, (bb[2] + bc[2]) / 2, b_old[3]])
    torch.testing.assert_close(out["fc.weight"], want_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["fc.bias"], want_b, rtol=1e-6, atol=1e-6)
    assert torch.equal(out["fc.weight"][3], w_old[3]) and torch.equal(out["fc.bias"][3], b_old[3])
    masks_y = ls.label_masks(torch.tensor([0, 2, 2, 1, 3]), [torch.tensor([0, 1]), torch.tensor([2, 3, 4])], 5)
    assert masks_y.tolist() == [[True, False, True, False, False], [False, True, True, True, False]]
    assert ls.classifier_names(fedsim.make_model("small_cnn", synthetic(n_train=20, n_test=4)), 10) == (
        "fc2.weight", "fc2.bias")  # fmt: skip


def test_label_split_round_keeps_absent_classes_and_runs_both_ways(monkeypatch):
    """A label-split round: the classifier rows of classes no client holds never move (no
    gradient in training, the old value in aggregation) while the others do, in the batched and
    in the client-by-client rounds (their training is compared in float64 above)."""
    from dataclasses import asdict

    from cahfp_ops.fl.server import Server

    data = synthetic(n_train=200, n_test=40, seed=4)
    keep = data.y_train < 7  # classes 7-9 absent from every client's data
    data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
    parts = dirichlet_partition(data.y_train, 6, 0.3, seed=1)
    cfg = fedsim.Config(data="synthetic", clients=6, rounds=2, rank=2)
    adopted = []
    real_adopt = Server.adopt

    def adopt(self, state):
        adopted.append((self.model.state_dict()["fc2.weight"].clone(), state["fc2.weight"].clone()))
        return real_adopt(self, state)

    monkeypatch.setattr(Server, "adopt", adopt)
    runs = {b: fedsim.run(fedsim.Config(**{**asdict(cfg), "batched": b}), "heterofl", "label-split", data, parts,
                          progress=False) for b in ("on", "off")}  # fmt: skip
    assert len(adopted) == 4 and runs["on"]["mode"] == "label-split"
    for w0, w in adopted:
        assert torch.equal(w[7:], w0[7:]) and not torch.equal(w[:7], w0[:7])
