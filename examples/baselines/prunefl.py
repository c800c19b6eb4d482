"""PruneFL for the simulator: adaptive unstructured pruning of a masked dense model.

PruneFL (Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices",
IEEE TNNLS 2022) prunes individual weights, not channels, so it does not run through the
channel-plan server: this module keeps the masks, the sparse aggregation and the accounting.
Choices, with the paper's sections:

* Importance (Sec. IV-B): the accumulated squared gradient of each weight. PruneFL's clients
  upload it at reconfiguration rounds; here the server accumulates the squared pseudo-gradient
  of the global model, ``g_t = (w_t - w_{t+1}) / (lr * steps)``, every round (the same
  server-side information CA-HFP uses; no extra upload).
* Initial mask (Sec. IV-A, initial pruning): weight magnitude of the initial model.
* Reconfiguration (Sec. IV-B) every :data:`RECONFIGURE_EVERY` rounds: each client's mask keeps
  the top ``(1 - r)`` of every prunable tensor (conv and linear weights; biases and BatchNorm
  stay dense) by importance, so a weaker client's mask nests inside a stronger one's. PruneFL
  has one mask for all clients, chosen to maximise importance per unit of time; with
  heterogeneous devices each client gets its own density, the rank's ratio the other methods use.
* Training: the dense model, masked weights set to zero in the download and after every step.
* Aggregation: each prunable entry is the sample-weighted mean over the clients whose mask keeps
  it; an entry no client keeps is zero (PruneFL's model is sparse). Dense entries: FedAvg.
* Communication (Sec. V, sparse transfer): per prunable tensor the kept values plus a
  one-bit-per-entry mask (``ceil(numel / 32)`` 32-bit words); dense tensors in full.
* FLOPs: masked dense training costs dense FLOPs on this hardware; the table reports that
  (sparse kernels would need about the density times it).
"""

from __future__ import annotations

import math

import fedsim_core
import torch
from torch import nn

from .method import Method

RECONFIGURE_EVERY = 5
METHOD = Method("prunefl", "gradient", ("overlap",), warmup=False)  # its own round loop: run()


def prunable(model: nn.Module) -> list[str]:
    """State-dict names of the conv and linear weights (the entries PruneFL masks)."""
    layers = (nn.Conv2d, nn.Linear)
    return [f"{n}.weight" if n else "weight" for n, mod in model.named_modules() if isinstance(mod, layers)]


def top_mask(score: torch.Tensor, keep: float) -> torch.Tensor:
    """Boolean mask of the ``ceil(keep * numel)`` highest scores (ties: lower flat index first)."""
    n = max(1, math.ceil(keep * score.numel()))
    flat = score.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:n]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=score.device)
    mask[order] = True
    return mask.view_as(score)


def client_masks(scores: dict[str, torch.Tensor], ratios: dict[int, float]) -> dict[int, dict[str, torch.Tensor]]:
    """Each client's masks: the top ``1 - r`` of every prunable tensor's scores."""
    return {k: {n: top_mask(s, 1.0 - r) for n, s in scores.items()} for k, r in ratios.items()}


def aggregate_sparse(global_state: dict, replies: list[dict], masks: list[dict], weights: list[float]) -> dict:
    """PruneFL's rule: masked entries averaged over their keepers (sample-weighted; zero where
    no client keeps them), dense floating entries by FedAvg, integer entries from the first reply."""
    total = sum(weights)
    out = {}
    for name, g in global_state.items():
        if not g.is_floating_point():
            out[name] = replies[0][name].clone()
            continue
        if name in masks[0]:
            num = torch.zeros_like(g, dtype=torch.float64)
            den = torch.zeros_like(g, dtype=torch.float64)
            for r, m, w in zip(replies, masks, weights):
                num += w * m[name] * r[name].double()
                den += w * m[name]
            out[name] = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0).to(g.dtype)
        else:
            out[name] = (sum(w * r[name].double() for r, w in zip(replies, weights)) / total).to(g.dtype)
    return out


def sparse_params(state: dict, mask: dict[str, torch.Tensor]) -> int:
    """Values sent for one sparse model: kept values and a bitmap per masked tensor, dense ones in full."""
    n = 0
    for name, v in state.items():
        if not v.is_floating_point():
            continue  # integer buffers (BatchNorm's batch counter) are not counted, as for every method
        if name in mask:
            n += int(mask[name].sum()) + math.ceil(v.numel() / 32)
        else:
            n += v.numel()
    return n


def run(cfg, method, data, parts, progress: bool = True, label: str | None = None) -> dict:
    """One PruneFL run with the simulator's data, model, local SGD and evaluation
    (``fedsim_core``); returns the same summary as ``fedsim_core.run``."""
    import time

    from cahfp_ops.fl import count_flops

    dev, model, capacity, (x_train, y_train), (x_test, y_test) = fedsim_core.setup(cfg, data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = prunable(model)
    importance = {n: state[n].abs().float() for n in names}  # initial pruning: magnitude
    accumulated = {n: torch.zeros_like(state[n], dtype=torch.float32) for n in names}
    full_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    flops = count_flops(model, data.x_train[:1].to(dev))["training_flops"]
    history, times, down = [], [], 0.0
    rounds = fedsim_core.round_iter(cfg, progress, label or f"{method}/overlap")
    masks = client_masks(importance, capacity)
    for t in rounds:
        t0 = time.perf_counter()
        if t and t % RECONFIGURE_EVERY == 0:
            masks = client_masks(accumulated, capacity)
        replies, weights, mask_list = [], [], []
        for cid in capacity:
            local = fedsim_core.make_model(cfg.model, data).to(dev)
            sent = {k: (v * masks[cid][k] if k in masks[cid] else v).clone() for k, v in state.items()}
            local.load_state_dict(sent)
            local.train()
            params = dict(local.named_parameters())
            pmask = [(params[n], masks[cid][n]) for n in names]

            def zero_pruned(pmask=pmask):
                with torch.no_grad():
                    for p, m in pmask:
                        p.mul_(m)

            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t * 1009 + cid)
            fedsim_core.local_sgd(cfg, local, parts[cid], x_train, y_train, g, after_step=zero_pruned)
            replies.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            weights.append(float(len(parts[cid])))
            mask_list.append(masks[cid])
            down += sparse_params(state, masks[cid]) / len(capacity)
        new = aggregate_sparse(state, replies, mask_list, weights)
        scale = 1.0 / (cfg.lr * fedsim_core.mean_local_steps(cfg, parts))
        for n in names:  # the server's accumulated squared pseudo-gradient
            accumulated[n] += ((state[n].float() - new[n].float()) * scale).pow(2)
        state = new
        times.append(time.perf_counter() - t0)
        model.load_state_dict(state)
        history.append(fedsim_core.evaluate(model, x_test, y_test))
        if progress:
            rounds.set_postfix(acc=f"{history[-1]:.3f}")
    mflops = flops / 1e6
    return fedsim_core.summary(method, "overlap", cfg, history, times, full_params, down, down, mflops, mflops)
