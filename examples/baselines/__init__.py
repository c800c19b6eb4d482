"""The simulator's baselines, one small module each, behind one interface
(:class:`~baselines.method.Method`: its submodel choice and its aggregation rule; a module
whose method needs its own round loop also has ``run``).

| module | method | submodel choice | aggregation |
| --- | --- | --- | --- |
| ``fedavg`` | FedAvg | the full model | sample-weighted mean |
| ``fedprox`` | FedProx | the full model (+ proximal term, less local work) | sample-weighted mean |
| ``prunefl`` | PruneFL | weight masks (accumulated squared gradients), own loop | sparse mean |
| ``dapperfl`` | DapperFL | the client's own L1 channels after training, own loop | reconstruction |
| ``fedmp`` | FedMP | L1 filter norm | reconstruction (or overlap) |
| ``heterofl`` | HeteroFL | static prefixes | count-based overlap (or + label split) |
| ``fedrolex`` | FedRolex | rolling windows | count-based overlap |
| ``fjord`` | FjORD | sampled nested prefix widths | overlap |
| ``random_masks`` | random | random channels | reconstruction (or overlap) |
| ``cahfp`` | CA-HFP | curvature-aware scores | reconstruction (or overlap) |

Each module's docstring gives its choices, with the sections of its paper they rest on.
"""

from __future__ import annotations

from collections.abc import Callable

from . import cahfp, dapperfl, fedavg, fedmp, fedprox, fedrolex, fjord, heterofl, prunefl, random_masks
from .method import Method, round_ratios

__all__ = ["ALIASES", "DEFAULT_METHODS", "METHODS", "Method", "get", "own_loop", "parse_runs", "round_ratios"]

_MODULES = (fedavg, fedprox, prunefl, dapperfl, fedmp, heterofl, fedrolex, fjord, random_masks, cahfp)
METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in _MODULES}
_OWN_LOOPS: dict[str, Callable] = {m.METHOD.name: m.run for m in _MODULES if hasattr(m, "run")}
ALIASES = {"magnitude": "fedmp"}
DEFAULT_METHODS = ("fedavg", "fedprox", "fedmp", "heterofl", "fedrolex", "fjord", "cahfp")


def get(name: str) -> Method:
    """The method of a command-line name (aliases resolved)."""
    key = ALIASES.get(name, name)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS) + sorted(ALIASES)}")
    return METHODS[key]


def own_loop(method: Method) -> Callable | None:
    """The method's own round loop (``run(cfg, method, data, parts, progress, label)``), or None
    when it runs through the simulator's server loop."""
    return _OWN_LOOPS.get(method.name)


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
    """``method[/mode]`` specs -> (method, mode) pairs (``all``: every method in its default
    mode); a mode a method does not take is an error."""
    runs = []
    for spec in specs:
        if spec == "all":
            runs += [(m.name, m.modes[0]) for m in METHODS.values()]
            continue
        name, _, mode = spec.partition("/")
        m = get(name)
        mode = mode or m.modes[0]
        if mode not in m.modes:
            raise ValueError(f"method {m.name!r} aggregates with {m.modes}, not {mode!r}")
        runs.append((m.name, mode))
    return list(dict.fromkeys(runs))
