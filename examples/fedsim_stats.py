"""Multi-seed statistics for the simulator's tables: mean ± sd and Student's t intervals."""

from __future__ import annotations

import statistics

T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """Student's t 97.5 % quantile (two-sided 95 % intervals); the normal 1.96 beyond 30 dof."""
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_mean_sd(values: list[float]) -> str:
    """``"0.963 ± 0.014"``, or the value alone for one seed."""
    mu, sd = mean_sd(values)
    return f"{mu:.3f} ± {sd:.3f}" if len(values) > 1 else f"{mu:.3f}"
