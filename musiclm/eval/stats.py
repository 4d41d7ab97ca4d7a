"""Statistics shared by the evaluation families: intervals over units (clips, captions).

Every figure in the eval report carries its N and a 95 % interval. ``bootstrap_ci`` resamples the
*units* of each sample independently with replacement (clips, not segments: segments of one clip
are not independent) and recomputes the statistic on every resample; the interval is the 2.5th and
97.5th percentile of those values. It serves plain means (``bootstrap_ci(np.mean, values)``) as well
as set-level metrics of two samples (``bootstrap_ci(kid_of, real_clips, generated_clips)``).

``jackknife_ci`` is for statistics that depend on the number of *distinct* units, as FAD does (it
grows as a set shrinks): a bootstrap resample repeats units, so its values sit above the figure and
the percentile interval can miss the figure altogether. The delete-a-group jackknife removes one
group of units at a time (never repeating any), estimates the standard error from the spread of
those values (variances of independent samples add) and gives ``value +- z * se``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["bootstrap_ci", "jackknife_ci", "limit_threads"]


def bootstrap_ci(
    statistic: Callable[..., float],
    *samples: Sequence[Any] | np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """``{"value", "ci95": [lo, hi], "n_boot", "n": [units per sample]}``.

    ``statistic(*samples)`` is computed once on the data and ``n_boot`` times on resamples in which
    each sample's units (its first axis / list items) are drawn with replacement, independently per
    sample. Resamples whose statistic is not finite are dropped (``n_boot`` counts the rest); with
    fewer than 2 units in some sample the interval is ``None``. ``level`` other than 0.95 is allowed
    (the key stays ``ci95`` only at 0.95; otherwise it is ``ci``)."""
    if not samples:
        raise ValueError("bootstrap_ci needs at least one sample")
    value = float(statistic(*samples))
    sizes = [len(s) for s in samples]
    key = "ci95" if abs(level - 0.95) < 1e-12 else "ci"
    out: dict[str, Any] = {"value": value, key: None, "n_boot": 0, "n": sizes, "level": level}
    if min(sizes) < 2 or n_boot <= 0:
        return out
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        resampled = []
        for s, n in zip(samples, sizes):
            idx = rng.integers(0, n, n)
            resampled.append(s[idx] if isinstance(s, np.ndarray) else [s[i] for i in idx])
        v = float(statistic(*resampled))
        if np.isfinite(v):
            values.append(v)
    if values:
        alpha = (1.0 - level) / 2
        lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
        out[key] = [float(lo), float(hi)]
    out["n_boot"] = len(values)
    return out


def jackknife_ci(
    statistic: Callable[..., float],
    *samples: Sequence[Any] | np.ndarray,
    groups: int = 50,
    level: float = 0.95,
) -> dict:
    """``{"value", "ci95": [lo, hi], "se", "n": [units per sample], "groups": [per sample]}``.

    Delete-a-group jackknife over independent samples: each sample's units are split into
    ``min(groups, n)`` contiguous groups; ``statistic`` is recomputed with one group of one sample
    left out; ``se^2 = sum over samples of (G - 1) / G * sum_g (theta_g - mean)^2``; the interval is
    the normal one, ``value +- z * se``. ``None`` when some sample has fewer than 2 units."""
    from statistics import NormalDist

    if not samples:
        raise ValueError("jackknife_ci needs at least one sample")
    value = float(statistic(*samples))
    sizes = [len(s) for s in samples]
    key = "ci95" if abs(level - 0.95) < 1e-12 else "ci"
    out: dict[str, Any] = {"value": value, key: None, "se": None, "n": sizes, "groups": [], "level": level}
    if min(sizes) < 2:
        return out
    var = 0.0
    for k, (s, n) in enumerate(zip(samples, sizes)):
        bounds = np.linspace(0, n, min(groups, n) + 1).round().astype(int)
        thetas = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            keep = np.r_[0:a, b:n]
            left = s[keep] if isinstance(s, np.ndarray) else [s[i] for i in keep]
            thetas.append(float(statistic(*samples[:k], left, *samples[k + 1 :])))
        t = np.asarray(thetas)
        g = len(t)
        var += (g - 1) / g * float(np.sum((t - t.mean()) ** 2))
        out["groups"].append(g)
    se = float(np.sqrt(var))
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    out["se"] = se
    out[key] = [value - z * se, value + z * se]
    return out


def limit_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads and numpy's BLAS pool (``--threads`` of the eval commands).

    On a machine whose cores are shared, one thread per process is often several times faster than
    the defaults (which assume every core is free). ``None``/0 leaves the defaults alone."""
    if not threads:
        return
    import torch
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    torch.set_num_threads(int(threads))
    threadpool_limits(int(threads))
