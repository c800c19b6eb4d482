"""HeteroFL (Diao et al., ICLR 2021, Sec. 3.1-3.2): static prefix submodels (the first
``(1 - r) C`` channels of every layer) and its combine rule: each entry is the plain mean over
the clients that hold it (count based: weight 1 per client), the global value where none does.
``heterofl/label-split`` adds HeteroFL's optional label-split masking of the classifier
(its ``mask`` option, below): a client's logits of classes absent from its
data are set to 0 in training, and each classifier row is averaged over the clients holding
its class only. Static batch normalisation (sBN, Sec. 3.2): BatchNorm normalises by batch
statistics in training, and the statistics used to evaluate the global model are the
cumulative ones of its pass over the clients' training data (HeteroFL queries the clients
after training; the simulator makes the same pass over the union of their data before each
evaluation).

The label split (Sec. 3.1-3.2 and the reference code's ``mask`` option): the simulator's
``heterofl/label-split`` (HeteroFL's overlap rule plus the label split; plain ``heterofl`` runs
without it).

Two parts:

* **Training**: a client's logits for the classes absent from its local data are set to 0
  before the loss (``masked_fill(label_mask == 0, 0)``, not ``-inf``: those classes still sit in
  the softmax's denominator, but their classifier rows get no gradient).
* **Aggregation**: each classifier row (weight row and bias entry of class ``c``) is the plain
  mean over the clients whose data hold class ``c`` (and, for a weight entry, that keep its
  input column), the global value where none does; every other tensor keeps the method's own
  rule. Without it, a client's untouched rows would pull the mean back to the old global row.

The classifier is the model's last ``nn.Linear`` whose outputs are the classes (the channel
plan never prunes it: it feeds the model output). The rows are recombined with the library's
``cahfp_ops.reconstruct_aggregate`` in ``overlap`` mode, each client's compact classifier cut
to its label rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from torch import Tensor, nn

from cahfp_ops import reconstruct_aggregate

from .method import Method

MODE = "label-split"  # the aggregation-mode name that turns it on
METHOD = Method("heterofl", "prefix", ("overlap", MODE), weighting="count", warmup=False, static_bn=True)


def label_masks(y: Tensor, parts: Sequence[Tensor], num_classes: int) -> Tensor:
    """``(K, num_classes)`` bool: ``[k, c]`` whether client ``k``'s samples ``parts[k]`` hold class ``c``."""
    out = torch.zeros(len(parts), num_classes, dtype=torch.bool)
    for k, idx in enumerate(parts):
        out[k, y[idx.to(y.device)].unique().cpu()] = True
    return out


def classifier_names(model: nn.Module, num_classes: int) -> tuple[str, str | None]:
    """State-dict names of the classifier's weight and bias (None: no bias): the last
    ``nn.Linear`` of ``model`` with ``num_classes`` outputs."""
    found = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.out_features == num_classes:
            found = (name, mod)
    if found is None:
        raise ValueError(f"label split: the model has no nn.Linear with {num_classes} outputs")
    name, mod = found
    prefix = f"{name}." if name else ""
    return f"{prefix}weight", (f"{prefix}bias" if mod.bias is not None else None)


def aggregate_classifier(
    previous: Mapping[str, Tensor],
    replies: Mapping[Hashable, Mapping[str, Tensor]],
    masks: Mapping[Hashable, Tensor],
    cols: Mapping[Hashable, Tensor | None],
    names: tuple[str, str | None],
) -> dict[str, Tensor]:
    """The classifier's tensors under the label-split rule.

    Args:
        previous: the global state before the round (at least the classifier's tensors).
        replies: accepted client -> its compact state_dict (the classifier's rows are all
            classes; its columns the client's kept input channels).
        masks: client -> ``(C,)`` bool, the classes of its data (:func:`label_masks`).
        cols: client -> its kept input channels of the classifier weight (ascending int64),
            None for all.
        names: the weight's and the bias's names (:func:`classifier_names`).

    Returns:
        name -> new full-size tensor: each row the count-based mean (weight 1 per client) over
        the clients holding the row's class (and the entry's column); the previous value where
        none does.
    """
    clients = list(replies)
    present = [n for n in names if n is not None]
    if not clients:
        return {n: previous[n].clone() for n in present}
    device = previous[present[0]].device
    rows = [masks[c].nonzero().flatten().to(device) for c in clients]  # each client's label rows
    out = {}
    for name in present:
        compacts = [replies[c][name][r] for c, r in zip(clients, rows)]
        cs = [cols.get(c) for c in clients] if previous[name].dim() > 1 else None
        out[name] = reconstruct_aggregate(previous[name], compacts, rows, cs, [1.0] * len(clients), mode="overlap")
    return out


def aggregate_label_split(
    plan, assignments: Mapping, previous: Mapping[str, Tensor], updates: Mapping[Hashable, Mapping[str, Tensor]],
    masks: Tensor, accepted: Sequence[Hashable], names: tuple[str, str | None],
) -> dict[str, Tensor]:  # fmt: skip
    """:func:`aggregate_classifier` after a server round: the accepted clients' kept input
    columns of the classifier from the round's channel ``plan`` and ``assignments`` (what
    ``Server.assign`` returned), their label masks (rows of ``masks``), their replies."""
    _, cols = plan.tensor_keep_sets([assignments[c].keeps for c in accepted])
    col = dict(zip(accepted, cols.get(names[0], [None] * len(accepted))))
    return aggregate_classifier(previous, {c: updates[c] for c in accepted}, {c: masks[c] for c in accepted}, col,
                                names)  # fmt: skip
