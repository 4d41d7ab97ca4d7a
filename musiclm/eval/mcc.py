"""MuLaN cycle consistency (MCC): does the audio land where its caption points in MuLaN's space?

MCC (MusicLM, arXiv 2301.11325, section 5.1) is the cosine between the MuLaN text embedding of a
caption and the MuLaN audio embedding of the music generated from it, averaged over captions. The
generator reranks its candidates by exactly this cosine, so MCC of the reranked best candidate is
what reranking maximised, not a grade: the report grades **candidate 1 of each batch in generation
order** (un-reranked) and shows the reranked figure beside it for what reranking buys. References:
real clips with their own captions (what a true pair scores with this MuLaN), real clips with
another clip's caption (shuffled pairs, a derangement: what an unrelated pair scores), generations
from another caption and unconditional generations.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_rows", "derangement", "mcc"]


def cosine_rows(a, b) -> np.ndarray:
    """Row-wise cosine of two ``[N, D]`` arrays (rows need not be normalised)."""
    a = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu().numpy() if hasattr(b, "detach") else b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [N, D] arrays of one shape, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A permutation of ``range(n)`` with no fixed point (for n >= 2): item i is paired with
    item ``perm[i] != i``. A random cyclic shift of a random order, so it is one cycle."""
    if n < 2:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    shift = int(rng.integers(1, n))
    perm = np.empty(n, dtype=np.int64)
    perm[order] = order[(np.arange(n) + shift) % n]
    return perm


def mcc(text_emb, audio_emb, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean cosine of pairs ``(text_emb[i], audio_emb[i])`` with a 95 % bootstrap interval over pairs:
    ``{"value", "ci95", "n", "per_pair"}``."""
    from musiclm.eval.stats import bootstrap_ci

    cos = cosine_rows(text_emb, audio_emb)
    ci = bootstrap_ci(np.mean, cos, n_boot=n_boot, seed=seed)
    return {"value": ci["value"], "ci95": ci["ci95"], "n": len(cos), "per_pair": [float(c) for c in cos]}
