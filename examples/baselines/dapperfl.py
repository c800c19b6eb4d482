"""DapperFL for the simulator: model fusion pruning, domain adaptive regularisation, and
aggregation of the pruned models recovered with the global one.

DapperFL (Jia et al., NeurIPS 2024) lets each client choose its own channels after local
training, so it does not run through the server's assign-then-train loop; this module drives
the library pieces directly (``trace_plan``, ``magnitude_scores``, ``assign_keep_sets``,
``extract``, ``reconstruct_aggregate_many``). Choices, with the paper's sections:

* Domain adaptive regularisation (DAR, Sec. 3.3): the local loss adds ``DAR_COEFF`` times the
  batch mean of the L2 norm of the representation the classifier reads (the input of the last
  linear layer).
* Model fusion pruning (MFP, Sec. 3.2): after local training, the client fuses its model with
  the global one, ``w = a_t * w_global + (1 - a_t) * w_local`` with
  ``a_t = max(ALPHA_MIN, ALPHA_0 * (1 - EPSILON)^t)`` (no fusion in round 0), then keeps the
  ``(1 - r)`` channels of every group with the largest L1 filter norm of the fused weights and
  uploads that compact model. The coefficients are our choice (the paper leaves them to a
  sweep): ``ALPHA_0 = 0.9``, ``ALPHA_MIN = 0.1``, ``EPSILON = 0.2``, ``DAR_COEFF = 0.01``.
* Heterogeneous model aggregation (Sec. 3.4): each pruned model is recovered to full size with
  the previous global model at its pruned entries, then averaged by sample count: exactly
  ``reconstruct_aggregate_many`` with the sample counts as coefficients.
* Training cost: the client downloads and trains the full model (DapperFL prunes after its first
  local epoch; the simulator runs one), uploads the compact one.
"""

from __future__ import annotations

import fedsim_core
import torch
from torch import nn

from .method import Method

ALPHA_0, ALPHA_MIN, EPSILON, DAR_COEFF = 0.9, 0.1, 0.2, 0.01
METHOD = Method("dapperfl", "l1", ("reconstruct",), warmup=False)  # its own round loop: run()


def fusion_coefficient(t: int) -> float:
    """``a_t``: the global model's share in round ``t``'s fusion (0 in round 0)."""
    return 0.0 if t == 0 else max(ALPHA_MIN, ALPHA_0 * (1 - EPSILON) ** t)


def fuse(global_state: dict, local_state: dict, alpha: float) -> dict:
    """``alpha * global + (1 - alpha) * local`` on floating entries; others from the local model."""
    return {
        k: alpha * global_state[k] + (1 - alpha) * v if v.is_floating_point() else v for k, v in local_state.items()
    }


def representation_norm(model: nn.Module):
    """(hook handle, penalty): the penalty returns the batch mean of the L2 norm of the last
    linear layer's input from the latest forward pass."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.Tensor] = []

    def hook(module, inputs):
        seen[:] = [inputs[0]]

    handle = last.register_forward_pre_hook(hook)
    return handle, lambda: seen[0].flatten(1).norm(dim=1).mean()


def run(cfg, method, data, parts, progress: bool = True, label: str | None = None) -> dict:
    """One DapperFL run with the simulator's data, model, local SGD and evaluation
    (``fedsim_core``); returns the same summary as ``fedsim_core.run``."""
    import copy
    import time

    from cahfp_ops import reconstruct_aggregate_many
    from cahfp_ops.fl import assign_keep_sets, count_flops, extract, magnitude_scores, trace_plan

    dev, model, capacity, (x_train, y_train), (x_test, y_test) = fedsim_core.setup(cfg, data)
    plan = trace_plan(copy.deepcopy(model), data.x_train[:2].to(dev))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    full_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    flops = count_flops(model, data.x_train[:1].to(dev))["training_flops"]
    history, times, up = [], [], 0.0
    rounds = fedsim_core.round_iter(cfg, progress, label or f"{method}/reconstruct")
    for t in rounds:
        t0 = time.perf_counter()
        alpha = fusion_coefficient(t)
        compact, keeps, weights = [], [], []
        for cid, r in capacity.items():
            local = copy.deepcopy(model)
            local.load_state_dict(state)
            local.train()
            handle, penalty = representation_norm(local)
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t * 1009 + cid)
            fedsim_core.local_sgd(cfg, local, parts[cid], x_train, y_train, g,
                             extra_loss=lambda penalty=penalty: DAR_COEFF * penalty())  # fmt: skip
            handle.remove()
            fused = fuse(state, {k: v.detach() for k, v in local.state_dict().items()}, alpha)
            keep = assign_keep_sets(plan, [r], magnitude_scores(plan, fused))[0]
            c = extract(fused, plan, [keep])[0]
            compact.append(c)
            keeps.append(keep)
            weights.append(float(len(parts[cid])))
            up += sum(v.numel() for v in c.values() if v.is_floating_point()) / len(capacity)
        rows, cols = plan.tensor_keep_sets(keeps)
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        new = reconstruct_aggregate_many(floats, [{k: c[k] for k in floats} for c in compact], rows, cols, weights)
        state = {k: new[k] if k in new else compact[0][k].clone() for k in state}
        times.append(time.perf_counter() - t0)
        model.load_state_dict(state)
        history.append(fedsim_core.evaluate(model, x_test, y_test))
        if progress:
            rounds.set_postfix(acc=f"{history[-1]:.3f}")
    down = float(full_params) * cfg.rounds  # the full model, every round
    mflops = flops / 1e6
    return fedsim_core.summary(method, "reconstruct", cfg, history, times, full_params, down, up, mflops, mflops)

