"""The federated-learning layer of cahfp-ops: channel plans, compact models, aggregation,
channel importance, masks, the CA-HFP server, sharded aggregation and a model zoo.

It uses the kernel layer (:mod:`cahfp_ops`) only through its public functions.

    from cahfp_ops.fl import Server, resnet20
    server = Server(resnet20(), torch.randn(1, 3, 32, 32), criterion="curvature")
"""

from __future__ import annotations

from .aggregate import AggregatePartials, StreamingAggregator, aggregate_state, largest_reported
from .compact import build_compact, count_flops, count_params, extract
from .importance import (
    CRITERIA,
    CURVATURES,
    CurvatureImportance,
    CurvatureTracker,
    Importance,
    MagnitudeImportance,
    PrefixImportance,
    RandomImportance,
    RollingImportance,
    group_scores,
    magnitude_scores,
    make_importance,
    random_scores,
    tracker_scores,
)
from .masks import KeepSetRows, assign_keep_sets, assign_keep_tables, keep_sets_of_tables, kept_count
from .plan import RESIDUAL_MODES, ChannelGroup, ChannelPlan, Member
from .report import ClientRecord, RoundReport
from .server import Assignment, Server
from .trace import trace_plan
from .zoo import mlp, resnet20, resnet32, resnet56, small_cnn, vgg11, vgg16

__all__ = [
    "CRITERIA",
    "CURVATURES",
    "RESIDUAL_MODES",
    "AggregatePartials",
    "Assignment",
    "ChannelGroup",
    "ChannelPlan",
    "ClientRecord",
    "CurvatureImportance",
    "CurvatureTracker",
    "Importance",
    "KeepSetRows",
    "MagnitudeImportance",
    "PrefixImportance",
    "Member",
    "RandomImportance",
    "RollingImportance",
    "RoundReport",
    "Server",
    "StreamingAggregator",
    "aggregate_state",
    "assign_keep_sets",
    "assign_keep_tables",
    "build_compact",
    "count_flops",
    "count_params",
    "extract",
    "group_scores",
    "keep_sets_of_tables",
    "kept_count",
    "largest_reported",
    "magnitude_scores",
    "make_importance",
    "mlp",
    "random_scores",
    "resnet20",
    "resnet32",
    "resnet56",
    "small_cnn",
    "tracker_scores",
    "trace_plan",
    "vgg11",
    "vgg16",
]
