"""Style (and mood) accuracy of generated clips: a classifier trained on the real training clips.

The labels are the corpus's own (the demo manifest's ``style`` and ``mood`` fields). The classifier
is independent of the MuLaN that reranks: it reads the **pretrained musicnn tagger's penultimate
layer** (:mod:`musiclm.eval.musicnn`, 200-d on 1-s segments), summarised per clip as the mean and
standard deviation over segments (400 features), standardised, then a multinomial **logistic
regression** (scikit-learn, L2, its strength picked by 5-fold cross-validation on the training
clips, ``seed`` for the folds). It never reads MuLaN embeddings.

Read its accuracy on held-out **real** clips first: that is the ceiling (how well style can be
heard at all through this classifier); then the share of generated clips classified as the style
their caption names, against chance = 1 / number of styles (and the majority-class share).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["StyleClassifier", "clip_features", "train_classifier", "label_accuracy"]


def clip_features(segments) -> np.ndarray:
    """``[segments, D]`` embeddings of one clip -> ``[2 D]``: mean and standard deviation over segments."""
    x = np.asarray(segments.detach().cpu().numpy() if hasattr(segments, "detach") else segments, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    return np.concatenate([x.mean(axis=0), x.std(axis=0)])


@dataclass
class StyleClassifier:
    """A fitted classifier of one label field (``style`` or ``mood``)."""

    field: str
    model: object  # sklearn Pipeline(StandardScaler, LogisticRegression)
    classes: list[str]
    train_counts: dict[str, int]
    seed: int
    C: float

    def predict(self, features: np.ndarray) -> list[str]:
        x = np.asarray(features, dtype=np.float64).reshape(-1, np.shape(features)[-1])
        return [str(v) for v in self.model.predict(x)]

    def describe(self) -> dict:
        return {
            "field": self.field,
            "classes": self.classes,
            "train_clips": int(sum(self.train_counts.values())),
            "train_counts": self.train_counts,
            "model": "standardise + multinomial logistic regression (L2), C by 5-fold CV",
            "C": self.C,
            "seed": self.seed,
            "chance": 1.0 / len(self.classes),
            "majority_share": max(self.train_counts.values()) / max(1, sum(self.train_counts.values())),
        }


def train_classifier(
    features: np.ndarray, labels: Sequence[str], field: str = "style", seed: int = 1234, Cs=(0.01, 0.1, 1.0, 10.0)
) -> StyleClassifier:
    """Fit the classifier on ``features [clips, F]`` and their ``labels``; the L2 strength ``C`` is the
    one with the best mean accuracy over (up to) 5 shuffled folds (ties: the smaller C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray([str(v) for v in labels])
    counts = Counter(y.tolist())
    if len(counts) < 2:
        raise ValueError(f"{field}: need at least 2 classes to train a classifier, got {sorted(counts)}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows for {len(y)} labels")

    def build(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))

    folds = min(5, len(y))
    best_c, best_acc = Cs[0], -1.0
    if folds >= 2 and len(Cs) > 1:
        for c in Cs:
            accs = []
            for tr, te in KFold(folds, shuffle=True, random_state=seed).split(x):
                if len(set(y[tr])) < 2:
                    continue
                accs.append(float(np.mean(build(c).fit(x[tr], y[tr]).predict(x[te]) == y[te])))
            acc = float(np.mean(accs)) if accs else -1.0
            if acc > best_acc + 1e-12:
                best_c, best_acc = c, acc
    model = build(best_c).fit(x, y)
    return StyleClassifier(field, model, sorted(counts), dict(sorted(counts.items())), seed, float(best_c))


def label_accuracy(predicted: Sequence[str], wanted: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Share of ``predicted[i] == wanted[i]`` with a 95 % bootstrap interval over clips."""
    from musiclm.eval.stats import bootstrap_ci

    hits = np.asarray([str(p) == str(w) for p, w in zip(predicted, wanted)], dtype=np.float64)
    if len(predicted) != len(wanted):
        raise ValueError(f"{len(predicted)} predictions for {len(wanted)} labels")
    if not len(hits):
        return {"value": None, "ci95": None, "n": 0}
    ci = bootstrap_ci(np.mean, hits, n_boot=n_boot, seed=seed)
    return {"value": ci["value"], "ci95": ci["ci95"], "n": len(hits)}
