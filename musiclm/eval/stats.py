"""Statistics shared by the evaluation families: a percentile bootstrap over units (clips, captions).

Every figure in the eval report carries its N and a 95 % interval. ``bootstrap_ci`` resamples the
*units* of each sample independently with replacement (clips, not segments: segments of one clip
are not independent) and recomputes the statistic on every resample; the interval is the 2.5th and
97.5th percentile of those values. It serves plain means (``bootstrap_ci(np.mean, values)``) as well
as set-level metrics of two samples (``bootstrap_ci(fad_of, real_clips, generated_clips)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["bootstrap_ci"]


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
