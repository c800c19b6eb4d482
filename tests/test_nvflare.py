"""The NVFlare integration: client helpers against real FLModel objects, the controller's reply
intake (provenance, duplicates, malformed replies) without a job, and one whole job in
NVFlare's simulator whose final model equals an offline Server run on the same replies, bit
for bit, with a failing site reported and the job finished."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("nvflare")
from nvflare.apis.fl_constant import FLMetaKey  # noqa: E402
from nvflare.app_common.abstract.fl_model import FLModel  # noqa: E402

from cahfp_ops.fl import zoo  # noqa: E402
from cahfp_ops.integrations.nvflare import (  # noqa: E402
    KEEP_KEY,
    PACKED_KEY,
    ROUND_KEY,
    ROUNDS_FILE,
    CAHFPController,
    compact_model,
    compact_state,
    make_server,
    num_examples,
    reply,
    resolve,
)
from cahfp_ops.layout import PackedModel  # noqa: E402

SERVER_ARGS = {"criterion": "l1", "warmup_rounds": 1, "update_bound": None}


def _controller(packed=True, **kw):
    ctl = CAHFPController(model="cahfp_ops.fl.zoo.small_cnn", input_shape=[2, 1, 8, 8], server_args=SERVER_ARGS,
                          ratio={"site-1": 0.5, "site-2": 0.75}, packed=packed, **kw)  # fmt: skip
    ctl.server = ctl.make_server()
    return ctl


def _sent(ctl, sites, round_=0):
    """What the controller sends each site (as the site receives it: params and meta)."""
    assignments = ctl.server.assign({s: ctl.site_ratio(s) for s in sites})
    ctl._replies, ctl._failed, ctl._round = {}, [], round_
    return {s: ctl.task_model(s, assignments[s], round_) for s in sites}


def _as_result(site, model: FLModel, sent: FLModel) -> FLModel:
    """A reply as the controller's callback sees it (NVFlare adds the site and the sent meta)."""
    meta = {**model.meta, "client_name": site, "props": dict(sent.meta)}
    return FLModel(params=model.params, params_type=model.params_type, metrics=model.metrics, meta=meta)


@pytest.mark.parametrize("packed", [True, False])
def test_client_helpers_round_trip(packed):
    ctl = _controller(packed)
    sent = _sent(ctl, ["site-1", "site-2"])
    for site, received in sent.items():
        assert (PACKED_KEY in received.params) == packed
        assert received.meta[KEEP_KEY] and received.meta[ROUND_KEY] == 0
        module = compact_model(zoo.small_cnn(), received)
        expect = ctl.server.assignments[site].state
        for name, value in module.state_dict().items():
            assert torch.equal(value, expect[name]), name
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.25)
        answer = reply(module, 17, {"train_loss": 1.5}, received=received)
        assert (PACKED_KEY in answer.params) == packed and num_examples(answer) == 17
        state = ctl.reply_state(site, answer)
        assert isinstance(state, PackedModel) == packed
        for name, value in module.state_dict().items():
            assert torch.equal(state[name], value), name


def test_unpacking_rejects_what_does_not_fit():
    ctl = _controller()
    received = _sent(ctl, ["site-1"])["site-1"]
    bad = FLModel(params={**received.params, PACKED_KEY: received.params[PACKED_KEY][:-1]}, meta=received.meta)
    with pytest.raises(ValueError, match="names and shapes"):
        compact_state(bad)
    answer = reply(compact_model(zoo.small_cnn(), received), 3, received=received)
    answer.params[PACKED_KEY] = answer.params[PACKED_KEY][:-1].clone()
    with pytest.raises(ValueError, match="elements"):
        ctl.reply_state("site-1", answer)
    steps_only = FLModel(params={"x": torch.ones(1)}, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 9})
    assert num_examples(steps_only) == 9
    with pytest.raises(KeyError, match="example count"):
        num_examples(FLModel(params={"x": torch.ones(1)}, meta={}))
    assert resolve("cahfp_ops.fl.zoo:small_cnn") is resolve("cahfp_ops.fl.zoo.small_cnn") is zoo.small_cnn
    with pytest.raises(ValueError, match="import path"):
        resolve("small_cnn")


def test_controller_arguments_are_checked():
    with pytest.raises(TypeError, match="ratio"):
        CAHFPController(ratio="half")
    with pytest.raises(ValueError, match="num_rounds"):
        CAHFPController(num_rounds=-1)
    with pytest.raises(ValueError, match="num_clients"):
        CAHFPController(num_clients=0)
    assert CAHFPController()._ignore_result_error is True  # a failing site never stops the job


def test_reply_intake_rejects_with_reasons_and_aggregates_in_site_order():
    ctl = _controller()
    sites = ["site-1", "site-2", "site-3", "site-4", "site-5"]
    sent = _sent(ctl, sites)
    answers = {}
    for i, site in enumerate(sites):
        module = compact_model(zoo.small_cnn(), sent[site])
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(0.5 + 0.1 * i)
        answers[site] = reply(module, 10 + i, {"train_loss": float(i)}, received=sent[site])
    late = _as_result("site-4", reply(compact_model(zoo.small_cnn(), sent["site-4"]), 4), sent["site-4"])
    late.meta["props"][ROUND_KEY] = 7
    no_count = _as_result("site-5", answers["site-5"], sent["site-5"])
    no_count.meta.pop("num_examples")
    no_count.meta.pop(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
    stranger = _as_result("site-9", answers["site-1"], sent["site-1"])
    # network order: site-2 before site-1; site-1 twice; site-3 fails; site-4 late; site-5 malformed
    assert ctl._receive(_as_result("site-2", answers["site-2"], sent["site-2"]))
    assert ctl._receive(_as_result("site-1", answers["site-1"], sent["site-1"]))
    assert not ctl._receive(_as_result("site-1", answers["site-1"], sent["site-1"]))
    assert not ctl._receive(late) and not ctl._receive(no_count) and not ctl._receive(stranger)
    ctl._failed.append(("site-3", "site site-3's task failed (return code EXECUTION_EXCEPTION)"))
    report = ctl.aggregate_round()
    assert report.accepted == ["site-1", "site-2"]
    assert set(report.rejected) == {"site-3", "site-4", "site-5", "site-9"}
    assert "round 7" in report.rejected["site-4"] and "malformed" in report.rejected["site-5"]
    assert "not sampled" in report.rejected["site-9"] and "EXECUTION_EXCEPTION" in report.rejected["site-3"]
    assert [r.reason for r in report.duplicates] == ["site site-1 replied more than once in round 0"]
    assert ctl._metrics == {"train_loss": (0 * 10 + 1 * 11) / 21}

    twin = _controller()
    twin_sent = _sent(twin, sites)
    expected = [(s, twin.reply_state(s, answers[s]), 10 + i) for i, s in enumerate(sites[:2])]
    assert all(torch.equal(twin_sent[s].params[PACKED_KEY], sent[s].params[PACKED_KEY]) for s in sites)
    twin.server.aggregate(expected, streaming=True)
    for k, v in twin.server.state.items():
        assert torch.equal(ctl.server.state[k], v), k


# ---------------------------------------------------------------------- one job in the simulator
SITE = '''
"""A site that "trains" deterministically: floating entries scaled and shifted by its index,
integer entries incremented; site-3 raises."""
import torch
import nvflare.client as flare
from cahfp_ops.fl import zoo
from cahfp_ops.integrations.nvflare import compact_model, reply


def train(module, site, round_):
    i = int(site.rsplit("-", 1)[1])
    with torch.no_grad():
        for v in module.state_dict().values():
            if v.is_floating_point():
                v.mul_(0.9).add_(0.01 * i + 0.001 * round_)
            else:
                v.add_(1)
    return 10 * i


def main():
    flare.init()
    site = flare.get_site_name()
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        if site == "site-3":
            raise RuntimeError("site-3 fails")
        module = compact_model(zoo.small_cnn(), received)
        n = train(module, site, received.current_round)
        flare.send(reply(module, n, {"train_loss": 0.5}, received=received))


if __name__ == "__main__":
    main()
'''

JOB = """
import sys
from cahfp_ops.integrations.nvflare import make_job
job = make_job("t", "site_train.py", model="cahfp_ops.fl.zoo.small_cnn", input_shape=[2, 1, 8, 8],
               server_args={server_args!r}, ratio={ratio!r}, num_rounds={rounds}, min_clients=3,
               train_timeout=120)
job.simulator_run(sys.argv[1], n_clients=3, threads=3)
"""


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("CAHFP_OPS_EXPECT_INSTALLED")),
                    reason="pure Python over the kernels: run once in CI, in the source checkout's job")  # fmt: skip
def test_simulator_job_equals_offline_server_and_reports_a_failing_site(tmp_path):
    ratio, rounds = {"site-1": 0.5, "site-2": 0.75, "site-3": 0.25}, 2
    (tmp_path / "site_train.py").write_text(SITE)
    (tmp_path / "job.py").write_text(JOB.format(server_args=SERVER_ARGS, ratio=ratio, rounds=rounds))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "job.py", str(tmp_path / "ws")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (history_file,) = (tmp_path / "ws").rglob(ROUNDS_FILE)
    history = json.loads(history_file.read_text())
    assert [h["round"] for h in history] == list(range(rounds))
    for h in history:
        assert h["accepted"] == ["site-1", "site-2"] and list(h["rejected"]) == ["site-3"]
        assert "task failed" in h["rejected"]["site-3"]
    (model_file,) = (tmp_path / "ws").rglob("cahfp_global_model.pt")
    final = torch.load(model_file)

    # offline: the same server, the same deterministic replies, site-3 silent
    spec = importlib.util.spec_from_file_location("cahfp_test_site", tmp_path / "site_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server, _ = make_server("cahfp_ops.fl.zoo.small_cnn", None, [2, 1, 8, 8], SERVER_ARGS, 0)
    for r in range(rounds):
        assignments = server.assign(dict(sorted(ratio.items())))
        replies = []
        for site in ("site-1", "site-2"):
            compact = server.build(site)
            n = module.train(compact, site, r)
            replies.append((site, compact.state_dict(), n))
        report = server.aggregate(replies, streaming=True)
        assert report.accepted == ["site-1", "site-2"] and report.absent == ["site-3"]
        assert set(assignments) == set(ratio)
    assert final.keys() == server.state.keys()
    for k, v in server.state.items():
        assert torch.equal(final[k], v), k


def test_example_job_exports_a_portable_job(tmp_path):
    """The example's job folder ships its scripts and names them inside its custom folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "examples", "nvflare_app", "run.py")
    run = subprocess.run([sys.executable, script, "--sites", "3", "--rounds", "2", "--export", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    app = tmp_path / "cahfp_digits" / "app"
    assert {p.name for p in (app / "custom").iterdir()} >= {"client.py", "digits_task.py"}
    server = json.loads((app / "config" / "config_fed_server.json").read_text())
    (workflow,) = server["workflows"]
    assert workflow["path"] == "cahfp_ops.integrations.nvflare.CAHFPController"
    args = workflow["args"]
    assert args["num_rounds"] == 2 and args["ratio"] == {"site-1": 0.5, "site-2": 0.5, "site-3": 0.75}
    assert args["evaluator"] == "digits_task.evaluate" and args["ignore_result_error"] is True
    client = json.loads((app / "config" / "config_fed_client.json").read_text())
    assert client["executors"][0]["executor"]["args"]["task_script_path"] == "client.py"
    assert not any("cahfp_ops" in p.name for p in (app / "custom").rglob("*"))  # an installed package, not shipped
