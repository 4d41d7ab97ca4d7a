"""``musiclm eval memorization``: does the semantic stage copy its training data?

The MusicLM paper (arXiv 2301.11325, section 5.5 "Memorization analysis", after Carlini et al. 2022)
prompts the **semantic** stage with the MuLaN audio conditioning tokens of a training example and its
first T semantic tokens (T from 0 to 10 s), decodes a 5-s continuation **greedily**, and counts

* **exact matches**: the generated continuation is identical, token for token, to the training
  example's own continuation;
* **approximate matches**: the two continuations have nearly the same *histogram* of semantic
  tokens, whatever the order (so a copy that is shifted or differs in a few positions still counts):
  the matching cost is an optimal-transport distance between the two token histograms, whose ground
  cost is the Euclidean distance between the k-means centroids of the tokens; a pair matches when
  the cost is below a threshold chosen on *negative* pairs (continuations of different examples) so
  that almost none of those match. (The paper solves the transport with Sinkhorn iterations and
  reports its threshold for w2v-BERT centroids; as we recall the section, it found exact matches
  below 0.2 % and approximate ones about 1 % with a 10-s prompt.)

What this module implements, precisely (``RULE`` goes into the JSON):

* prompt: ``cond.npy`` of the shard sample (the stage's namespace: the *audio* conditioning tokens
  training saw, the paper's M_A) and its first ``prompt_seconds`` of semantic ids; target: the next
  ``continuation_seconds``. Samples shorter than prompt + continuation are skipped (counted); when
  every sample is too short the run is refused.
* decoding: ``greedy`` (temperature 0, the paper's) and ``sampled`` (the package's semantic sampling
  defaults, ``samples`` draws per example), both with the package's classifier-free guidance scale
  unless ``cond_scale`` is given, through ``Transformer.sample`` (KV cache) -- batched when prompt +
  continuation fit in one stage window, else :func:`musiclm.lm.sampling.sample_stage` per example
  (its sliding windows, prompt as known start tokens).
* exact: all continuation tokens equal.
* approximate: the histograms have the same mass (T tokens each), so the optimal transport between
  them is an assignment of the T generated tokens to the T target tokens; we solve it **exactly**
  (``scipy.optimize.linear_sum_assignment``; Sinkhorn is its entropic approximation) and divide by T.
  Ground cost: centroid distance divided by the mean distance between distinct centroids
  (scale-free), or, without centroids, 0/1 token identity (the cost is then the total-variation
  distance of the histograms). Threshold ``tau``: the ``approx_fpr`` quantile (default 0.001) of the
  costs between the *real* continuations of different clips of the sampled set -- a property of the
  data, the same for every model and decoding, so figures compare across checkpoints. Exact matches
  (cost 0) are approximate matches too. ``negative_match_share`` is the share of (generated, other
  clip's target) pairs under ``tau``: the chance level ``approx_share`` is read against.
* longest exact match: every generated continuation is looked up in a suffix array of all
  train-split semantic sequences (:class:`TokenIndex`); the longest run of generated tokens found
  verbatim anywhere (``longest_exact_match``), and the longest found in a clip *other* than the
  prompt's (``longest_exact_match_other_clip``: copying from elsewhere). ``reference``: the same for
  the real continuations of held-out (eval split) clips -- how long a match music that was never
  trained on gets by chance in this corpus.

Intervals: 95 % bootstrap over examples (:func:`musiclm.eval.stats.bootstrap_ci`).

Output ``memorization.json`` (top level = the longest prompt asked for; ``sweep`` lists every prompt
length when several are given)::

    {"n", "prompt_seconds", "continuation_seconds", "frame_rate", "skipped_short",
     "greedy":  {"exact_share", "approx_share", "ci95": {"exact_share": [lo, hi], "approx_share": [lo, hi]},
                 "negative_match_share", "mean_token_agreement", "match_length_seconds": {...}},
     "sampled": {... the same, "samples_per_clip", "settings"},
     "longest_exact_match": {"tokens", "seconds", "clip", "prompt_clip", "decoding"},
     "longest_exact_match_other_clip": {...}, "reference": {...},
     "approx_threshold", "approx_fpr", "ground_cost", "rule", "model", "shards", "seed", "wall_s", ...}

and ``memorization.png`` (histogram of the longest-match lengths, and of the approximate-match costs
of positives and negatives with ``tau``).

    musiclm eval memorization --model models/rapbeats-demo --shards shards/rapbeats/tokens-<hash> \\
        --clips 64 --prompt-seconds 2 --continuation-seconds 3 --out runs/eval/memorization

Suffix-array index: built by prefix doubling (``numpy.lexsort`` of rank pairs): O(n log n) per
doubling round and O(log L) rounds, L the longest repeat (≈ 0.2 s for the demo's 42k tokens);
about 40 bytes per token. A query of m tokens costs O(m · L · log n). At paper scale (280k hours =
2.5e10 tokens, ~1 TB of index) build one index per shard group (memory-mapped), query each in
parallel (e.g. one Ray task per group) and keep the maximum; that is not implemented here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "RULE",
    "TokenIndex",
    "suffix_array",
    "load_semantic_items",
    "load_semantic_model",
    "ground_cost_matrix",
    "histogram_ot_cost",
    "continue_prompts",
    "evaluate_memorization",
    "memorization_from_paths",
    "plot_memorization",
    "add_arguments",
    "run_from_args",
    "main",
]

RULE = (
    "MusicLM (arXiv 2301.11325) sec. 5.5: prompt = the training sample's MuLaN audio conditioning tokens + its "
    "first prompt_seconds of semantic ids; continuation of continuation_seconds decoded greedily (and sampled). "
    "exact = every continuation token equals the sample's own continuation. approximate = optimal-transport "
    "cost between the two token histograms (ground cost: k-means centroid distance / mean distance between "
    "distinct centroids; 0/1 token identity without centroids), solved exactly as an assignment of the T tokens "
    "(the paper: Sinkhorn), <= tau, tau = the approx_fpr quantile of the costs between real continuations of "
    "different clips (the paper also calibrates on negative pairs). longest exact match = longest run of "
    "generated tokens found verbatim in the train-split semantic sequences (suffix array)."
)


# --------------------------------------------------------------------------------------------
# suffix array index over the training shards' semantic tokens
# --------------------------------------------------------------------------------------------


def suffix_array(text: np.ndarray) -> np.ndarray:
    """Suffix array of an int sequence (prefix doubling with ``np.lexsort``).

    O(n log n) per round, one round per doubling of the longest repeated substring."""
    s = np.asarray(text).reshape(-1)
    n = len(s)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(s, return_inverse=True)[1].astype(np.int64)
    k = 1
    while True:
        second = np.full(n, -1, dtype=np.int64)
        if k < n:
            second[: n - k] = rank[k:]
        order = np.lexsort((second, rank))
        r1, r2 = rank[order], second[order]
        new = np.empty(n, dtype=np.int64)
        new[order] = np.concatenate([[0], np.cumsum((r1[1:] != r1[:-1]) | (r2[1:] != r2[:-1]))])
        rank = new
        if rank[order[-1]] == n - 1 or k >= n:
            return order
        k *= 2


class TokenIndex:
    """Exact-match lookups of token runs in a set of sequences (e.g. the train split).

    Sequences are concatenated with a unique negative separator after each one, so no match
    crosses from one sequence into the next; ``groups`` (e.g. clip ids) name what a match may be
    excluded from (``longest_match(..., exclude_group=g)``)."""

    def __init__(self, sequences: Sequence[np.ndarray], names: Sequence[str], groups: Sequence[str] | None = None):
        if len(sequences) != len(names):
            raise ValueError(f"{len(sequences)} sequences for {len(names)} names")
        parts, starts, pos = [], [], 0
        for i, seq in enumerate(sequences):
            seq = np.asarray(seq, dtype=np.int64).reshape(-1)
            if seq.size and seq.min() < 0:
                raise ValueError(f"sequence {names[i]!r} has negative tokens (reserved for separators)")
            starts.append(pos)
            parts += [seq, np.array([-1 - i], dtype=np.int64)]
            pos += len(seq) + 1
        self.text = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.names = list(names)
        self.groups = list(groups) if groups is not None else list(names)
        group_ids = {g: k for k, g in enumerate(dict.fromkeys(self.groups))}
        self._group_of_seq = np.array([group_ids[g] for g in self.groups], dtype=np.int64)
        self._group_ids = group_ids
        t0 = time.perf_counter()
        self.sa = suffix_array(self.text)
        self.build_s = time.perf_counter() - t0
        self._seq_of_sa = np.searchsorted(self.starts, self.sa, side="right") - 1
        self._first = self.text[self.sa]  # sorted: first token of every suffix

    @property
    def n_tokens(self) -> int:
        return int(len(self.text) - len(self.starts))

    def _match_from(self, query: np.ndarray, i: int, exclude: int | None) -> tuple[int, int]:
        """(length, a suffix-array row) of the longest prefix of query[i:] in the text."""
        lo = int(np.searchsorted(self._first, query[i], side="left"))
        hi = int(np.searchsorted(self._first, query[i], side="right"))
        if not self._ok(lo, hi, exclude):
            return 0, -1
        length, j = 1, i + 1
        while j < len(query) and hi > lo:
            col = self.text[self.sa[lo:hi] + length]  # never out of range: a separator ends every sequence
            a = lo + int(np.searchsorted(col, query[j], side="left"))
            b = lo + int(np.searchsorted(col, query[j], side="right"))
            if not self._ok(a, b, exclude):
                break
            lo, hi, length, j = a, b, length + 1, j + 1
        return length, self._pick(lo, hi, exclude)

    def _ok(self, lo: int, hi: int, exclude: int | None) -> bool:
        if hi <= lo:
            return False
        if exclude is None:
            return True
        return bool(np.any(self._group_of_seq[self._seq_of_sa[lo:hi]] != exclude))

    def _pick(self, lo: int, hi: int, exclude: int | None) -> int:
        if exclude is None:
            return lo
        rows = lo + np.flatnonzero(self._group_of_seq[self._seq_of_sa[lo:hi]] != exclude)
        return int(rows[0])

    def longest_match(self, query: Sequence[int] | np.ndarray, exclude_group: str | None = None) -> dict:
        """The longest run of ``query`` found verbatim in one sequence:
        ``{"tokens", "query_start", "sequence", "group", "offset"}`` (``tokens`` 0 when none matches);
        ``exclude_group``: ignore matches inside sequences of that group (e.g. the prompt's own clip)."""
        q = np.asarray(query, dtype=np.int64).reshape(-1)
        ex = self._group_ids.get(exclude_group) if exclude_group is not None else None
        if exclude_group is not None and ex is None:
            ex = -1  # a group the index does not hold: nothing to exclude
        best = {"tokens": 0, "query_start": None, "sequence": None, "group": None, "offset": None}
        for i in range(len(q)):
            if len(q) - i <= best["tokens"]:
                break  # no longer match can start here
            length, row = self._match_from(q, i, ex)
            if length > best["tokens"]:
                p = int(self.sa[row])
                s = int(self._seq_of_sa[row])
                best = {
                    "tokens": int(length),
                    "query_start": int(i),
                    "sequence": self.names[s],
                    "group": self.groups[s],
                    "offset": int(p - self.starts[s]),
                }
        return best


# --------------------------------------------------------------------------------------------
# approximate matching: optimal transport between token histograms
# --------------------------------------------------------------------------------------------


def ground_cost_matrix(centroids: np.ndarray | None) -> np.ndarray | None:
    """Euclidean distances between k-means centroids ``[V, V]``, divided by the mean distance between
    distinct centroids (so costs are scale-free); ``None`` (0/1 token identity) without centroids."""
    if centroids is None:
        return None
    c = np.asarray(centroids, dtype=np.float64)
    sq = np.sum(c * c, axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * c @ c.T, 0.0))
    np.fill_diagonal(d, 0.0)
    off = d[~np.eye(len(d), dtype=bool)]
    scale = float(off.mean()) if off.size and off.mean() > 0 else 1.0
    return (d / scale).astype(np.float32)


def histogram_ot_cost(a: np.ndarray, b: np.ndarray, cost: np.ndarray | None) -> float:
    """Optimal-transport cost between the token histograms of two equally long sequences, per token.

    Both histograms have mass T, so the transport plan is an assignment of a's tokens to b's
    (Birkhoff): solved exactly. ``cost=None``: 0/1 ground cost = 1 - sum(min(h_a, h_b)) / T."""
    a = np.asarray(a, dtype=np.int64).reshape(-1)
    b = np.asarray(b, dtype=np.int64).reshape(-1)
    if len(a) != len(b):
        raise ValueError(f"sequences of different lengths {len(a)} and {len(b)}")
    if len(a) == 0:
        return 0.0
    ua, ca = np.unique(a, return_counts=True)
    ub, cb = np.unique(b, return_counts=True)
    _, ia, ib = np.intersect1d(ua, ub, assume_unique=True, return_indices=True)
    common = np.minimum(ca[ia], cb[ib])
    if cost is None:
        return float(1.0 - common.sum() / len(a))
    # with a metric ground cost some optimal plan leaves the shared mass in place: assign only the rest
    ca[ia] -= common
    cb[ib] -= common
    ra, rb = np.repeat(ua, ca), np.repeat(ub, cb)
    if len(ra) == 0:
        return 0.0
    from scipy.optimize import linear_sum_assignment

    m = cost[ra[:, None], rb[None, :]].astype(np.float64)
    r, c = linear_sum_assignment(m)
    return float(m[r, c].sum() / len(a))


# --------------------------------------------------------------------------------------------
# data and model
# --------------------------------------------------------------------------------------------


def load_semantic_items(shards: str, split: str) -> list[dict]:
    """``[{"key", "clip", "semantic" int64 [T], "cond" int64 [ns, K] | None}]`` of a token-shard
    split in key order; only ``semantic.npy``, ``cond.npy`` and ``json`` are decoded."""
    from musiclm.data.shards import decode_sample, shard_reader

    keep = ("semantic.npy", "cond.npy", "json")
    items = []
    for raw in shard_reader(shards, split, shuffle=0, rank=0, world_size=1, decode=False):
        s = decode_sample({k: v for k, v in raw.items() if k in keep or k.startswith("__")})
        if "semantic.npy" not in s:
            raise KeyError(f"{shards}: sample {s['__key__']} has no semantic.npy (the semantic stream is needed)")
        js = s.get("json") or {}
        cond = s.get("cond.npy")
        if cond is not None:
            cond = np.asarray(cond).astype(np.int64)
            cond = cond.reshape(1, -1) if cond.ndim == 1 else cond
        items.append(
            {
                "key": s["__key__"],
                "clip": str(js.get("clip_id") or s["__key__"].split("__")[0]),
                "semantic": np.asarray(s["semantic.npy"]).astype(np.int64).reshape(-1),
                "cond": cond,
            }
        )
    items.sort(key=lambda it: it["key"])
    return items


def _fp_sha(fps: dict | None, name: str) -> str | None:
    return ((fps or {}).get(name) or {}).get("weights_sha256")


def load_semantic_model(model: str, kmeans: str | None = None) -> dict:
    """The semantic stage of a package directory (``package.json``: its weights, sampling defaults,
    k-means centroids from the tokenizer bundle) or of exported weights (``X.safetensors`` + JSON;
    centroids from ``kmeans``). Returns ``{"stage", "lm", "sampling", "centroids", "fingerprints",
    "source", "step"}``; only the semantic LM is loaded (not MuLaN or the codec)."""
    from musiclm.lm.model import load_stage_model
    from musiclm.lm.sampling import PAPER_SAMPLING
    from musiclm.lm.stages import get_stage
    from musiclm.weights import load_exported

    model = os.fspath(model)
    centroids_path = kmeans
    if os.path.isdir(model):
        pkg_file = os.path.join(model, "package.json")
        if not os.path.isfile(pkg_file):
            raise FileNotFoundError(f"{model} is a folder without package.json: pass a `musiclm package` folder")
        with open(pkg_file) as f:
            doc = json.load(f)
        entry = (doc.get("stages") or {}).get("semantic") or {}
        weights = os.path.join(model, entry.get("weights", "semantic/model.safetensors"))
        cfg = os.path.join(model, entry.get("config", "semantic/model.json"))
        _, meta = load_exported(weights, cfg) if os.path.isfile(cfg) else load_exported(weights)
        sampling = dict(((doc.get("sampling") or {}).get("semantic")) or PAPER_SAMPLING["semantic"].to_dict())
        fps = doc.get("fingerprints") or meta.get("fingerprints") or {}
        if centroids_path is None:
            tok_dir = os.path.join(model, (doc.get("tokenizers") or {}).get("dir", "tokenizers"))
            tok_json = os.path.join(tok_dir, "tokenizers.json")
            rel = None
            if os.path.isfile(tok_json):
                with open(tok_json) as f:
                    tdoc = json.load(f)
                rel = ((tdoc.get("config") or tdoc).get("semantic") or {}).get("kmeans")
            cand = os.path.join(tok_dir, rel or "kmeans.safetensors")
            centroids_path = cand if os.path.isfile(cand) else None
    else:
        weights = model
        _, meta = load_exported(weights)
        sampling = PAPER_SAMPLING["semantic"].to_dict()
        fps = meta.get("fingerprints") or {}
    stage_name = meta.get("stage")
    stage_name = stage_name.get("name") if isinstance(stage_name, dict) else stage_name
    if stage_name not in (None, "semantic"):
        raise ValueError(f"{weights} is a {stage_name!r} stage model; memorization is measured on the semantic stage")
    stage = get_stage("semantic", meta.get("tokens") or {}, meta.get("window_seconds"))
    lm = load_stage_model(weights, meta).eval()
    centroids = None
    if centroids_path:
        from musiclm.semantic import load_centroids

        centroids = load_centroids(centroids_path)
        if centroids.shape[0] != stage.layout.semantic_vocab:
            raise ValueError(
                f"k-means {centroids_path} has {centroids.shape[0]} centroids, the semantic stage's vocabulary is "
                f"{stage.layout.semantic_vocab}"
            )
    return {
        "stage": stage,
        "lm": lm,
        "sampling": sampling,
        "centroids": centroids,
        "centroids_path": None if centroids_path is None else os.path.abspath(centroids_path),
        "fingerprints": fps,
        "source": os.path.abspath(model),
        "step": meta.get("step"),
    }


def _check_shards(index: dict, stage, fps: dict, shards: str) -> None:
    """Refuse shards whose semantic ids or conditioning tokens are in another code space."""
    have = index.get("fingerprints") or {}
    sem = have.get("semantic") or {}
    if sem.get("vocab_size") and int(sem["vocab_size"]) != stage.layout.semantic_vocab:
        raise ValueError(
            f"{shards}: semantic vocabulary {sem['vocab_size']} differs from the model's {stage.layout.semantic_vocab}"
        )
    for name in ("semantic", "quantizer"):
        a, b = _fp_sha(fps, name), _fp_sha(have, name)
        if a and b and a != b:
            raise ValueError(
                f"{shards} was tokenized with another {name} tokenizer than the model trained on "
                f"(weights_sha256 {b[:12]} vs {a[:12]}): its tokens are in another code space"
            )


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------


def continue_prompts(
    lm,
    stage,
    conds: np.ndarray,
    prompts: np.ndarray,
    n_new: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cond_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """Semantic ids ``[N, n_new]`` continuing ``prompts [N, P]`` under ``conds [N, K]`` (the stage
    namespace's codes), with ``Transformer.sample`` (KV cache, guidance, target-range mask).

    Prompt + continuation within one stage window: batched ``model.sample`` calls with the prompt in
    the prefix; longer: :func:`musiclm.lm.sampling.sample_stage` per row (sliding windows, the
    prompt as known start tokens)."""
    import torch

    from musiclm.lm.sampling import SamplingSettings, sample_stage

    conds = np.asarray(conds, dtype=np.int64)
    prompts = np.asarray(prompts, dtype=np.int64).reshape(len(conds), -1)
    P = prompts.shape[1]
    gen = torch.Generator().manual_seed(int(seed))
    guided = cond_scale != 1.0
    out: list[np.ndarray] = []
    if P + n_new <= stage.semantic_frames:
        mask = stage.target_logits_mask(n_new)
        null_head = stage.prefix(None)
        for i in range(0, len(conds), batch_size):
            heads = torch.stack([stage.prefix(c) for c in conds[i : i + batch_size]])
            known = torch.stack([torch.from_numpy(stage.semantic_ids(p)) for p in prompts[i : i + batch_size]])
            prefix = torch.cat([heads, known], dim=1)
            null = torch.cat([null_head[None].expand_as(heads), known], dim=1) if guided else None
            with torch.inference_mode():
                ids = lm.sample(
                    prefix,
                    n_new,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    cond_scale=cond_scale,
                    logits_mask=mask,
                    null_prefix=null,
                    generator=gen,
                )
            out += [stage.decode_target(row) for row in ids]
        return np.stack(out) if out else np.zeros((0, n_new), dtype=np.int64)
    fs = stage.layout.frames_per_grid("semantic")
    if P % fs or n_new % fs:
        raise ValueError(f"prompt and continuation must be whole {float(stage.layout.grid)} s grid steps")
    settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, cond_scale=cond_scale)
    steps = (P + n_new) // fs
    for c, p in zip(conds, prompts):
        res = sample_stage(stage, lm, steps, 1, [c], known=p[None] if P else None, settings=settings, generator=gen)
        out.append(res.target[0, P : P + n_new])
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------


def _share(flags: np.ndarray, seed: int) -> tuple[float, list[float] | None]:
    from musiclm.eval.stats import bootstrap_ci

    ci = bootstrap_ci(lambda x: float(np.mean(x)), flags, n_boot=1000, seed=seed)
    return round(ci["value"], 6), None if ci["ci95"] is None else [round(v, 6) for v in ci["ci95"]]


def _frames(seconds: float, rate: float, what: str) -> int:
    if seconds is None or not math.isfinite(float(seconds)) or seconds < 0:
        raise ValueError(f"{what} must be >= 0 seconds, got {seconds}")
    n = float(seconds) * rate
    if abs(n - round(n)) > 1e-6:
        raise ValueError(f"{what} {seconds} s is not a whole number of semantic frames at {rate:g} Hz")
    return int(round(n))


def _length_stats(lengths: Sequence[int], rate: float) -> dict:
    x = np.asarray(lengths, dtype=np.float64)
    if not len(x):
        return {"n": 0}
    return {
        "n": int(len(x)),
        "mean": round(float(x.mean()) / rate, 4),
        "median": round(float(np.median(x)) / rate, 4),
        "max": round(float(x.max()) / rate, 4),
    }


def evaluate_memorization(
    lm,
    stage,
    train_items: Sequence[dict],
    *,
    clips: int = 64,
    prompt_seconds: float | Sequence[float] = 2.0,
    continuation_seconds: float = 3.0,
    sampling: dict | None = None,
    cond_scale: float | None = None,
    samples: int = 1,
    centroids: np.ndarray | None = None,
    approx_fpr: float = 0.001,
    max_negatives: int = 2000,
    reference_items: Sequence[dict] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    index: TokenIndex | None = None,
) -> dict:
    """Memorization of ``lm`` (a semantic-stage Transformer) on ``train_items`` (as returned by
    :func:`load_semantic_items`); see the module docstring for every figure and the rule."""
    t_start = time.perf_counter()
    rate = float(stage.layout.semantic_rate)
    prompts_s = [float(p) for p in (prompt_seconds if isinstance(prompt_seconds, (list, tuple)) else [prompt_seconds])]
    if not prompts_s:
        raise ValueError("no prompt length given")
    n_cont = _frames(continuation_seconds, rate, "continuation")
    if n_cont < 1:
        raise ValueError("the continuation must be at least one semantic frame long")
    p_frames = [_frames(p, rate, "prompt") for p in prompts_s]
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0 < approx_fpr < 1:
        raise ValueError(f"approx_fpr must be in (0, 1), got {approx_fpr}")
    if not train_items:
        raise ValueError("no training samples to prompt with")
    if any(it.get("cond") is None for it in train_items):
        raise ValueError("the shards have no cond.npy: the prompt needs the samples' conditioning tokens")
    longest_clip = max(len(it["semantic"]) for it in train_items)
    need = max(p_frames) + n_cont
    if need > longest_clip:
        raise ValueError(
            f"prompt {max(prompts_s):g} s + continuation {n_cont / rate:g} s = {need / rate:g} s is longer than every "
            f"training sample (the longest is {longest_clip / rate:g} s): shorten the prompt or the continuation"
        )
    eligible = [it for it in train_items if len(it["semantic"]) >= need]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(eligible), size=min(int(clips), len(eligible)), replace=False).tolist())
    items = [eligible[i] for i in chosen]
    n = len(items)
    sampling = dict(sampling or {})
    scale = float(cond_scale if cond_scale is not None else sampling.get("cond_scale", 1.0))
    cost = ground_cost_matrix(centroids)

    if index is None:
        index = TokenIndex(
            [it["semantic"] for it in train_items],
            [it["key"] for it in train_items],
            [it["clip"] for it in train_items],
        )
    conds = np.stack([it["cond"][stage.namespace_index, : stage.layout.cond_levels] for it in items])
    clip_of = [it["clip"] for it in items]

    # negatives: the real continuations of different clips (data only: tau is model independent)
    def neg_pairs(count: int) -> list[tuple[int, int]]:
        pairs = [(i, j) for i in range(count) for j in range(count) if i != j and clip_of[i] != clip_of[j]]
        if len(pairs) > max_negatives:
            pick = np.random.default_rng(seed + 1).choice(len(pairs), max_negatives, replace=False)
            pairs = [pairs[k] for k in sorted(pick)]
        return pairs

    pairs = neg_pairs(n)
    results = []
    for P_s, P in zip(prompts_s, p_frames):
        targets = np.stack([it["semantic"][P : P + n_cont] for it in items])
        prompts = np.stack([it["semantic"][:P] for it in items]) if P else np.zeros((n, 0), dtype=np.int64)
        neg_costs = np.array([histogram_ot_cost(targets[i], targets[j], cost) for i, j in pairs])
        tau = float(np.quantile(neg_costs, approx_fpr)) if len(neg_costs) else 0.0
        res: dict[str, Any] = {"n": n, "prompt_seconds": P_s, "continuation_seconds": n_cont / rate}
        decodings = {
            "greedy": dict(temperature=0.0, top_k=None, top_p=None, reps=1),
            "sampled": dict(
                temperature=float(sampling.get("temperature", 1.0)),
                top_k=sampling.get("top_k"),
                top_p=sampling.get("top_p"),
                reps=int(samples),
            ),
        }
        longest = {"tokens": -1}
        longest_other = {"tokens": -1}
        costs_by: dict[str, dict] = {}
        for name, d in decodings.items():
            reps = d.pop("reps")
            t1 = time.perf_counter()
            gen = continue_prompts(
                lm,
                stage,
                np.repeat(conds, reps, axis=0),
                np.repeat(prompts, reps, axis=0),
                n_cont,
                cond_scale=scale,
                seed=seed,
                batch_size=batch_size,
                **d,
            ).reshape(n, reps, n_cont)
            gen_s = time.perf_counter() - t1
            exact = np.all(gen == targets[:, None, :], axis=2)  # [n, reps]
            pos = np.array([[histogram_ot_cost(gen[i, r], targets[i], cost) for r in range(reps)] for i in range(n)])
            approx = pos <= tau
            gen_neg = np.array([histogram_ot_cost(gen[i, 0], targets[j], cost) for i, j in pairs])
            agree = (gen == targets[:, None, :]).mean(axis=2)
            t2 = time.perf_counter()
            lengths, lengths_other = [], []
            for i in range(n):
                for r in range(reps):
                    m = index.longest_match(gen[i, r])
                    mo = index.longest_match(gen[i, r], exclude_group=clip_of[i])
                    lengths.append(m["tokens"])
                    lengths_other.append(mo["tokens"])
                    if m["tokens"] > longest["tokens"]:
                        longest = {**m, "prompt_clip": items[i]["key"], "decoding": name}
                    if mo["tokens"] > longest_other["tokens"]:
                        longest_other = {**mo, "prompt_clip": items[i]["key"], "decoding": name}
            match_s = time.perf_counter() - t2
            ex_share, ex_ci = _share(exact.mean(axis=1), seed)
            ap_share, ap_ci = _share(approx.mean(axis=1), seed)
            res[name] = {
                "exact_share": ex_share,
                "approx_share": ap_share,
                "ci95": {"exact_share": ex_ci, "approx_share": ap_ci},
                "exact_count": int(exact.sum()),
                "approx_count": int(approx.sum()),
                "continuations": int(exact.size),
                "samples_per_clip": reps,
                "negative_match_share": round(float(np.mean(gen_neg <= tau)), 6) if len(gen_neg) else None,
                "mean_token_agreement": round(float(agree.mean()), 6),
                "mean_ot_cost": round(float(pos.mean()), 6),
                "match_length_seconds": _length_stats(lengths, rate),
                "match_length_seconds_other_clip": _length_stats(lengths_other, rate),
                "settings": {**d, "cond_scale": scale},
                "generation_s": round(gen_s, 2),
                "lookup_s": round(match_s, 2),
            }
            costs_by[name] = {"positive": pos.reshape(-1).tolist(), "negative": gen_neg.tolist()}
            res[f"_lengths_{name}"] = lengths
        res["approx_threshold"] = round(tau, 6)
        res["negatives"] = len(pairs)
        res["longest_exact_match"] = _match_doc(longest, rate)
        res["longest_exact_match_other_clip"] = _match_doc(longest_other, rate)
        res["_costs"] = {**costs_by, "real_negative": neg_costs.tolist()}
        results.append(res)

    # reference: held-out continuations (never trained on) looked up the same way
    reference: dict[str, Any] | None = None
    ref_lengths: list[int] = []
    if reference_items:
        P = max(p_frames)
        ref = [it for it in reference_items if len(it["semantic"]) >= P + n_cont]
        for it in ref[: max(n, 1)]:
            ref_lengths.append(index.longest_match(it["semantic"][P : P + n_cont])["tokens"])
        reference = {
            "what": "real continuations of held-out (eval split) samples looked up in the train index",
            "match_length_seconds": _length_stats(ref_lengths, rate),
        }

    top = results[int(np.argmax(prompts_s))]
    out = {k: v for k, v in top.items() if not k.startswith("_")}
    out.update(
        frame_rate=rate,
        clips_requested=int(clips),
        eligible=len(eligible),
        skipped_short=len(train_items) - len(eligible),
        approx_fpr=approx_fpr,
        ground_cost="k-means centroid distance / mean distance" if cost is not None else "0/1 token identity",
        reference=reference,
        index={
            "sequences": len(index.names),
            "tokens": index.n_tokens,
            "hours": round(index.n_tokens / rate / 3600, 4),
            "build_s": round(index.build_s, 3),
        },
        rule=RULE,
        seed=seed,
        wall_s=round(time.perf_counter() - t_start, 2),
    )
    if len(results) > 1:
        out["sweep"] = [
            {
                "prompt_seconds": r["prompt_seconds"],
                **{d: {k: r[d][k] for k in ("exact_share", "approx_share", "ci95")} for d in ("greedy", "sampled")},
                "approx_threshold": r["approx_threshold"],
                "longest_exact_match": r["longest_exact_match"],
            }
            for r in results
        ]
    out["_plot"] = {
        "lengths": {d: top[f"_lengths_{d}"] for d in ("greedy", "sampled")},
        "reference": ref_lengths,
        "costs": top["_costs"],
        "tau": top["approx_threshold"],
        "rate": rate,
        "continuation_frames": n_cont,
    }
    return out


def _match_doc(m: dict, rate: float) -> dict:
    if m.get("tokens", -1) < 0:
        return {"tokens": 0, "seconds": 0.0, "clip": None}
    return {
        "tokens": int(m["tokens"]),
        "seconds": round(m["tokens"] / rate, 4),
        "clip": m.get("sequence"),
        "offset_seconds": None if m.get("offset") is None else round(m["offset"] / rate, 4),
        "prompt_clip": m.get("prompt_clip"),
        "decoding": m.get("decoding"),
    }


def plot_memorization(plot: dict, path: str, title: str | None = None) -> str:
    """Two panels: longest-match lengths (greedy, sampled, held-out reference) and OT costs
    (positives, negatives, the threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rate = plot["rate"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    top = plot["continuation_frames"]
    bins = np.arange(0, top + 2) - 0.5
    for label, xs in (
        ("greedy", plot["lengths"]["greedy"]),
        ("sampled", plot["lengths"]["sampled"]),
        ("held-out real", plot["reference"]),
    ):
        if len(xs):
            a1.hist(np.asarray(xs) / rate, bins=bins / rate, alpha=0.5, label=label)
    a1.axvline(top / rate, color="k", lw=0.8, ls=":")
    a1.set_xlabel("longest exact match in the train shards (s)", fontsize=8)
    a1.set_ylabel("continuations", fontsize=8)
    a1.legend(fontsize=7)
    costs = plot["costs"]
    allc = np.concatenate(
        [np.asarray(costs["real_negative"], float)]
        + [np.asarray(costs[d][k], float) for d in ("greedy", "sampled") for k in ("positive", "negative")]
        + [np.zeros(1)]
    )
    cb = np.linspace(0, max(float(allc.max()), 1e-6), 40)
    for label, key in (("greedy", "greedy"), ("sampled", "sampled")):
        if len(costs[key]["positive"]):
            a2.hist(costs[key]["positive"], bins=cb, alpha=0.5, density=True, label=f"{label} vs own target")
    if len(costs["real_negative"]):
        a2.hist(costs["real_negative"], bins=cb, alpha=0.4, density=True, label="real, different clips")
    a2.axvline(plot["tau"], color="k", lw=0.8, label=f"tau {plot['tau']:.3f}")
    a2.set_xlabel("histogram OT cost (approximate-match rule)", fontsize=8)
    a2.legend(fontsize=7)
    for ax in (a1, a2):
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memorization_from_paths(
    model: str,
    shards: str,
    *,
    out_dir: str | None = None,
    kmeans: str | None = None,
    split: str = "train",
    reference_split: str | None = "eval",
    **kwargs,
) -> dict:
    """Load the semantic stage (package folder or exported weights) and the shards, run
    :func:`evaluate_memorization`, write ``memorization.json`` and ``memorization.png`` to ``out_dir``."""
    import torch

    from musiclm.data import storage
    from musiclm.data.shards import list_shards, read_index

    t0 = time.perf_counter()
    index_doc = read_index(shards)
    m = load_semantic_model(model, kmeans)
    _check_shards(index_doc, m["stage"], m["fingerprints"], shards)
    train = load_semantic_items(shards, split)
    if not train:
        raise ValueError(f"no samples in split {split!r} of {shards}")
    reference = None
    if reference_split and list_shards(shards, reference_split):
        reference = load_semantic_items(shards, reference_split)
    load_s = time.perf_counter() - t0
    torch.manual_seed(int(kwargs.get("seed", 0)))
    res = evaluate_memorization(
        m["lm"],
        m["stage"],
        train,
        sampling=m["sampling"],
        centroids=m["centroids"],
        reference_items=reference,
        **kwargs,
    )
    plot = res.pop("_plot")
    res.update(
        model=m["source"],
        model_step=m["step"],
        kmeans=m["centroids_path"],
        shards=os.path.abspath(shards) if not storage.is_remote(shards) else shards,
        split=split,
        package_sampling=m["sampling"],
        load_s=round(load_s, 2),
        total_s=round(time.perf_counter() - t0, 2),
    )
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        res["plot"] = plot_memorization(
            plot,
            os.path.join(out_dir, "memorization.png"),
            title=f"memorization: {res['prompt_seconds']:g} s prompt, {res['continuation_seconds']:g} s continuation",
        )
        storage.write_json_atomic(os.path.join(out_dir, "memorization.json"), res, indent=2)
    return res


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--model", required=True, help="`musiclm package` folder, or exported semantic weights (.safetensors)"
    )
    p.add_argument("--shards", required=True, help="token-shard folder the model trained on (its train split is used)")
    p.add_argument("--split", default="train", help="split to prompt with and to index (default: train)")
    p.add_argument(
        "--reference-split", default="eval", help="held-out split for the chance-match reference ('' = none)"
    )
    p.add_argument("--kmeans", default=None, help="k-means centroids (default: the package's); none = 0/1 ground cost")
    p.add_argument("--clips", type=int, default=64, help="training samples prompted (drawn with --seed)")
    p.add_argument(
        "--prompt-seconds", type=float, nargs="+", default=[2.0], help="prompt length(s); the paper sweeps 0-10 s"
    )
    p.add_argument("--continuation-seconds", type=float, default=3.0, help="continuation compared (paper: 5 s)")
    p.add_argument("--samples", type=int, default=1, help="sampled continuations per clip (greedy is always 1)")
    p.add_argument("--cond-scale", type=float, default=None, help="guidance scale (default: the package's)")
    p.add_argument("--approx-fpr", type=float, default=0.001, help="share of real negative pairs under tau")
    p.add_argument("--max-negatives", type=int, default=2000, help="negative pairs (different clips) drawn at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; 1 is faster on a shared machine)"
    )
    p.add_argument("--out", default=None, help="folder for memorization.json and memorization.png")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    from musiclm.eval.stats import limit_threads

    limit_threads(getattr(args, "threads", None))
    res = memorization_from_paths(
        args.model,
        args.shards,
        out_dir=args.out,
        kmeans=args.kmeans,
        split=args.split,
        reference_split=args.reference_split or None,
        clips=args.clips,
        prompt_seconds=list(args.prompt_seconds),
        continuation_seconds=args.continuation_seconds,
        samples=args.samples,
        cond_scale=args.cond_scale,
        approx_fpr=args.approx_fpr,
        max_negatives=args.max_negatives,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    print(json.dumps(res, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="musiclm eval memorization", description=__doc__.splitlines()[0]))
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
