"""KL divergence between a tagger's posteriors for real and generated clips (the paper's "KL").

MusicLM (arXiv 2301.11325, section 5.1) computes the KL divergence between the class predictions of
an AudioSet tagger for the reference clip and for the clip generated from the same caption; lower
means the generated clip has the reference's tag profile. Our tagger is musicnn (50 MagnaTagATune
tags, :mod:`musiclm.eval.musicnn`), whose outputs are 50 *independent* sigmoids, not a distribution.
Two readings, both reported, each with the reference (real) clip as P and the generated one as Q:

* :func:`bernoulli_kl` (the primary figure): each tag is its own Bernoulli variable; the KL of
  Bernoulli(p_k) from Bernoulli(q_k) averaged over the 50 tags. It is what KL means for a
  multi-label model, in nats per tag.
* :func:`normalized_kl`: the 50 probabilities divided by their sum, then the KL of the two
  categorical distributions (nats). This is the reading of the KL metric's common implementations
  for multi-label taggers (AudioGen / AudioLDM evaluation code normalise the posteriors) and the one
  to set beside the paper's 1.01, which was computed with another tagger (LEAF, 527 AudioSet classes)
  on MusicCaps: the numbers are context, not comparable.

Probabilities are clipped to [1e-6, 1 - 1e-6] so a saturated sigmoid gives a finite value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["EPS", "bernoulli_kl", "normalized_kl", "paired_tag_kl"]

EPS = 1e-6


def _probs(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    return np.clip(x, EPS, 1.0 - EPS)


def bernoulli_kl(p, q) -> np.ndarray:
    """Mean over tags (last axis) of ``KL(Bern(p_k) || Bern(q_k))`` in nats; shape of ``p`` minus
    its last axis."""
    p, q = _probs(p), _probs(q)
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    return kl.mean(axis=-1)


def normalized_kl(p, q) -> np.ndarray:
    """``KL(P || Q)`` in nats of the tag probabilities normalised to sum to 1 (last axis)."""
    p, q = _probs(p), _probs(q)
    p, q = p / p.sum(axis=-1, keepdims=True), q / q.sum(axis=-1, keepdims=True)
    return (p * np.log(p / q)).sum(axis=-1)


def paired_tag_kl(real: Sequence, generated: Sequence, n_boot: int = 1000, seed: int = 0) -> dict:
    """Both KLs for pairs ``(real[i], generated[i])`` of ``[tags]`` posteriors: per pair, the mean and
    a 95 % bootstrap interval over pairs, and ``n``."""
    from musiclm.eval.stats import bootstrap_ci

    r, g = np.asarray(real, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    if r.shape != g.shape or r.ndim != 2 or not len(r):
        raise ValueError(f"need two [pairs, tags] arrays of one shape, got {r.shape} and {g.shape}")
    out: dict = {"n": len(r)}
    for name, fn in (("bernoulli", bernoulli_kl), ("normalized", normalized_kl)):
        vals = fn(r, g)
        ci = bootstrap_ci(np.mean, vals, n_boot=n_boot, seed=seed)
        out[name] = {"value": ci["value"], "ci95": ci["ci95"], "n": len(vals), "per_pair": [float(v) for v in vals]}
    return out
