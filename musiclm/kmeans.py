"""k-means, one implementation for the semantic tokenizer and the residual VQ (scikit-learn).

* :func:`fit_model`: a fitted sklearn ``MiniBatchKMeans`` (k-means++, 3 inits) or ``KMeans`` (1 init);
  "Number of distinct clusters" warnings (identical points, e.g. residuals a level already fits)
  are silenced.
* :func:`kmeans`: centroids of an in-memory ``[N, D]`` array (``ResidualVQ.fit``, level by level).
* :func:`fit_kmeans`: centroids of a stream of feature arrays (the semantic tokenizer's k-means;
  fitted in memory up to a limit, then refined with ``partial_fit``).

All are deterministic for a seed and input order.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["fit_kmeans", "fit_model", "kmeans"]


def fit_model(
    x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 100, batch_size: int = 4096, minibatch: bool = True
):
    """sklearn k-means fitted on ``x [N, D]``: ``MiniBatchKMeans`` (``n_init=3``, no labels kept)
    when ``minibatch``, else ``KMeans`` (``n_init=1``)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if minibatch:
        model = MiniBatchKMeans(
            n_clusters=k, batch_size=batch_size, random_state=seed, n_init=3, max_iter=max_iter, compute_labels=False
        )
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=1, max_iter=max_iter)
    with warnings.catch_warnings():
        # identical points (e.g. residuals after a level that already fits every point) are fine
        warnings.filterwarnings("ignore", message=".*Number of distinct clusters.*")
        return model.fit(x)


def kmeans(x: np.ndarray, k: int, seed: int = 0, max_iter: int = 100, minibatch_above: int = 20_000) -> np.ndarray:
    """k-means centroids ``[k, D]`` of ``x [N, D]`` (N >= k): sklearn ``KMeans`` (k-means++), or
    ``MiniBatchKMeans`` above ``minibatch_above`` rows."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = fit_model(x, k, seed=seed, max_iter=max_iter, batch_size=4096, minibatch=x.shape[0] > minibatch_above)
    return km.cluster_centers_.astype(np.float32)


def _as_rows(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    return x.reshape(-1, x.shape[-1])


def fit_kmeans(
    features_iter: Iterable[Any],
    n_clusters: int,
    seed: int = 0,
    batch_size: int = 4096,
    max_samples: int | None = None,
    in_memory_limit: int = 200_000,
    max_iter: int = 100,
) -> np.ndarray:
    """Fit k-means centroids (sklearn ``MiniBatchKMeans``) on feature frames.

    ``features_iter`` yields arrays/tensors ``[..., D]`` (e.g. ``[B, T_s, D]`` batches); rows are
    frames. The first ``in_memory_limit`` rows are fitted in memory with ``fit`` (k-means++ init,
    several passes); rows beyond that refine the centroids with ``partial_fit`` in chunks of
    ``batch_size`` (one pass, streaming). ``max_samples`` stops reading after that many rows.
    With fewer rows than ``n_clusters`` the number of clusters is clipped (with a warning).
    Returns float32 ``[n_clusters, D]`` centroids; deterministic for a seed and input order.
    """
    buf: list[np.ndarray] = []
    n_buf = 0
    seen = 0
    km = None

    def flush_stream(final: bool) -> None:
        nonlocal buf, n_buf
        if not buf:
            return
        x = np.concatenate(buf)
        start = 0
        while x.shape[0] - start >= batch_size or (final and start < x.shape[0]):
            km.partial_fit(x[start : start + batch_size])
            start += batch_size
        rest = x[start:]
        buf, n_buf = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)

    def fit_in_memory(x: np.ndarray):
        k = n_clusters
        if x.shape[0] < n_clusters:
            warnings.warn(
                f"fit_kmeans: only {x.shape[0]} frames for {n_clusters} clusters; clipping to {x.shape[0]} clusters",
                stacklevel=3,
            )
            k = x.shape[0]
        return fit_model(x, k, seed=seed, max_iter=max_iter, batch_size=batch_size, minibatch=True)

    for chunk in features_iter:
        rows = _as_rows(chunk)
        if max_samples is not None:
            rows = rows[: max(0, max_samples - seen)]
        seen += rows.shape[0]
        if rows.shape[0]:
            buf.append(rows)
            n_buf += rows.shape[0]
        if km is None and n_buf > in_memory_limit:
            x = np.concatenate(buf)
            km = fit_in_memory(x[:in_memory_limit])
            buf, n_buf = [x[in_memory_limit:]], x.shape[0] - in_memory_limit
        if km is not None and n_buf >= batch_size:
            flush_stream(final=False)
        if max_samples is not None and seen >= max_samples:
            break

    if km is None:
        if n_buf == 0:
            raise ValueError("fit_kmeans got no feature frames")
        km = fit_in_memory(np.concatenate(buf))
    else:
        flush_stream(final=True)
    return km.cluster_centers_.astype(np.float32)
