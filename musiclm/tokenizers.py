"""All tokenizers of a corpus in one bundle: build from config, fingerprint, tokenize, save/load.

Config section (``tokenizers:`` in the YAML configs)::

    acoustic:  {type: encodec, model: facebook/encodec_24khz, bandwidth: 6.0}
    semantic:
      features: {type: hf, model: facebook/w2v-bert-2.0, layer: 6, rate: 25}   # or {type: mfcc|logmel}
      kmeans: path/to/centroids.safetensors       # written by ray_jobs/fit_kmeans.py
    mulan:     {type: clap, model: laion/clap-htsat-unfused}
    quantizer: path/to/quantizer_dir              # or {path: ..., levels: 8, codebook_size: 1024}
                                                  # source: audio (default) | text, see below

``quantizer.source`` picks what ``cond.npy`` quantizes: ``audio`` (the paper: the MuLaN audio
embedding of the segment, so training needs no captions) or ``text`` (the MuLaN text embedding of
the clip's caption: what generation quantizes, so the stage LMs train on the same kind of tokens they
get at inference; text and audio embeddings of one clip share few tokens -- ``musiclm eval
retrieval --quantizer`` measures it). ``text`` needs a caption for every clip and is part of the
quantizer fingerprint; ``mulan.npy`` stays the audio embedding either way.

Model entries are hub ids or directories; relative paths resolve against ``base_dir`` (the bundle
directory when loading a saved bundle). Everything loads lazily. Parts that are not fitted yet (no
k-means file, no quantizer directory) are ``None`` in the bundle; the fitting jobs use
``bundle.semantic_features`` / ``bundle.embedder`` / ``bundle.new_quantizer()`` to make them.

``bundle.tokenize(wav_24k)`` returns, per clip, exactly the token-shard entries of ``shards/README.md``:
``acoustic.npy`` int16 ``[Q, T_a]``, ``semantic.npy`` int16 ``[T_s]``, ``mulan.npy`` float16 ``[D]``,
``cond.npy`` int16 ``[namespaces, K]``; ``bundle.fingerprints()`` is the ``index.json``
``fingerprints`` structure.

A saved bundle directory (``bundle.save(dir)`` / ``load_bundle(dir)``) is self-contained: model
weights (``acoustic/``, ``semantic_model/``, ``mulan/``), ``kmeans.safetensors``, ``quantizer/`` and
``tokenizers.json`` (config with relative paths + the fingerprints, checked on load).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .codec import AcousticTokenizer, build_acoustic
from .data import storage
from .fingerprint import canonical_json
from .mulan import AudioTextEmbedder, build_embedder
from .quantize import QUANTIZER_PRESETS, MuLaNEmbedQuantizer, auto_codebook_size
from .semantic import SemanticFeatures, SemanticTokenizer, build_semantic
from .tensors import as_batch

__all__ = [
    "BUNDLE_FILE",
    "BundleMismatch",
    "TokenizerBundle",
    "build_tokenizers",
    "cond_source_of",
    "load_bundle",
    "resample",
]

BUNDLE_FILE = "tokenizers.json"
ENTRIES = ("acoustic.npy", "semantic.npy", "mulan.npy", "cond.npy")
COND_SOURCES = ("audio", "text")


class BundleMismatch(RuntimeError):
    """A saved bundle's fingerprints differ from the ones of the models it loads."""


def resample(wav: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """``[B, T]`` float resampled with ``torchaudio.functional.resample`` (no-op when rates match)."""
    if int(orig) == int(new):
        return wav
    import torchaudio.functional as AF

    return AF.resample(wav, int(orig), int(new))


def _resolve(value: Any, base_dir: str | None) -> Any:
    """A relative path that exists under ``base_dir`` becomes absolute; an existing ``s3://`` file
    or folder becomes a local copy (the loaders open paths); hub ids stay untouched."""
    if isinstance(value, (str, os.PathLike)) and storage.is_remote(value):
        return storage.local_copy(value) if storage.exists(value) else os.fspath(value)
    if not isinstance(value, (str, os.PathLike)) or base_dir is None:
        return value
    value = os.fspath(value)
    if os.path.isabs(value):
        return value
    cand = os.path.join(base_dir, value)
    return cand if os.path.exists(cand) else value


def _quantizer_section(q: Any) -> dict:
    if q is None:
        return {}
    if isinstance(q, (str, os.PathLike)):
        return {"path": os.fspath(q)}
    return dict(q)


def cond_source_of(quantizer_section: Any) -> str:
    """``source`` of a ``tokenizers.quantizer`` config section (default ``"audio"``), validated."""
    src = _quantizer_section(quantizer_section).get("source", "audio")
    if src not in COND_SOURCES:
        raise ValueError(f"tokenizers.quantizer.source must be one of {COND_SOURCES}, got {src!r}")
    return src


@dataclass
class TokenizerBundle:
    """The acoustic, semantic, MuLaN and quantizer tokenizers of one configuration."""

    acoustic: AcousticTokenizer | None = None
    semantic: SemanticTokenizer | None = None
    embedder: AudioTextEmbedder | None = None
    quantizer: MuLaNEmbedQuantizer | None = None
    semantic_features: SemanticFeatures | None = None
    config: dict = field(default_factory=dict)
    base_dir: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def sample_rate(self) -> int:
        """Rate of the audio ``tokenize`` expects: the acoustic tokenizer's (24 kHz)."""
        return int(self.acoustic.sample_rate) if self.acoustic is not None else 24_000

    def available(self) -> list[str]:
        """Shard entries this bundle can produce."""
        out = []
        if self.acoustic is not None:
            out.append("acoustic.npy")
        if self.semantic is not None:
            out.append("semantic.npy")
        if self.embedder is not None:
            out.append("mulan.npy")
            if self.quantizer is not None:
                out.append("cond.npy")
        return out

    @property
    def cond_source(self) -> str:
        """What ``cond.npy`` quantizes: ``"audio"`` (default) or ``"text"`` (the caption's embedding)."""
        return cond_source_of(self.config.get("quantizer"))

    def frame_rates(self) -> dict:
        out = {}
        if self.acoustic is not None:
            out["acoustic"] = self.acoustic.frame_rate
        if self.semantic_features is not None:
            out["semantic"] = self.semantic_features.rate
        return out

    def new_quantizer(self, dim: int | None = None, num_embeddings: int | None = None) -> MuLaNEmbedQuantizer:
        """An unfitted :class:`MuLaNEmbedQuantizer` with the config's settings (``preset``,
        ``levels``, ``codebook_size``, ``namespaces``) and the embedder's dim.
        ``codebook_size: auto`` sizes the codebooks to the ``num_embeddings`` it will be fitted on
        (:func:`musiclm.quantize.auto_codebook_size`, at most the preset's size)."""
        q = _quantizer_section(self.config.get("quantizer"))
        params = dict(QUANTIZER_PRESETS[q.get("preset", "default")])
        for key in ("levels", "codebook_size", "namespaces"):
            if key in q:
                params[key] = q[key]
        if params["codebook_size"] == "auto":
            if num_embeddings is None:
                raise ValueError("quantizer codebook_size: auto needs the number of embeddings it is fitted on")
            cap = QUANTIZER_PRESETS[q.get("preset", "default")]["codebook_size"]
            params["codebook_size"] = auto_codebook_size(num_embeddings, cap=cap)
        if dim is None:
            if self.embedder is None:
                raise ValueError("new_quantizer needs dim= when the bundle has no MuLaN embedder")
            dim = self.embedder.dim
        return MuLaNEmbedQuantizer(dim, **params)

    # ------------------------------------------------------------------ fingerprints
    def fingerprints(self) -> dict:
        """``{"acoustic": {...}, "semantic": {...}, "mulan": {...}, "quantizer": {...}}`` (present parts)."""
        out = {}
        if self.acoustic is not None:
            out["acoustic"] = self.acoustic.fingerprint()
        if self.semantic is not None:
            out["semantic"] = self.semantic.fingerprint()
        if self.embedder is not None:
            out["mulan"] = self.embedder.fingerprint()
        if self.quantizer is not None:
            out["quantizer"] = self.quantizer.fingerprint()
            if self.cond_source != "audio":  # audio-sourced fingerprints stay as they always were
                out["quantizer"]["source"] = self.cond_source
        return out

    # ------------------------------------------------------------------ tokenization
    @torch.inference_mode()
    def tokenize(
        self,
        wav: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
        sample_rate: int | None = None,
        entries: Sequence[str] | None = None,
        captions: Sequence[str] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Token-shard entries per clip.

        Args:
            wav: mono float audio ``[B, T]`` (or ``[T]``), or a list of 1-D clips of any lengths
                (grouped by length internally so no clip is padded).
            sample_rate: rate of ``wav``; defaults to :attr:`sample_rate` (24 kHz). Each model gets
                its own rate via ``torchaudio.functional.resample``.
            entries: subset of ``acoustic.npy``, ``semantic.npy``, ``mulan.npy``, ``cond.npy``;
                default: all this bundle can produce (:meth:`available`).
            captions: one caption per clip; needed for ``cond.npy`` when ``quantizer.source`` is
                ``text`` (:attr:`cond_source`).

        Returns one dict per clip (input order) with numpy arrays: ``acoustic.npy`` int16
        ``[Q, T // hop]``, ``semantic.npy`` int16 ``[T_s]`` (``T_s = seconds * rate``),
        ``mulan.npy`` float16 ``[D]``, ``cond.npy`` int16 ``[namespaces, K]`` (quantized from the
        float16-rounded embedding, so it can be recomputed from ``mulan.npy``).
        """
        sr = int(sample_rate or self.sample_rate)
        wanted = list(entries) if entries is not None else self.available()
        missing = [e for e in wanted if e not in self.available()]
        if missing:
            raise ValueError(f"this bundle cannot produce {missing} (available: {self.available()})")
        if isinstance(wav, (list, tuple)):
            clips = [as_batch(w)[0] for w in wav]
        else:
            clips = list(as_batch(wav))
        text_cond = "cond.npy" in wanted and self.cond_source == "text"
        if text_cond:
            bad = [i for i, c in enumerate(captions or []) if not isinstance(c, str) or not c.strip()]
            if captions is None or len(captions) != len(clips) or bad:
                raise ValueError(
                    f"quantizer.source: text quantizes each clip's caption: got "
                    f"{'no captions' if captions is None else f'{len(captions)} captions'} for {len(clips)} clips"
                    + (f", empty at positions {bad[:5]}" if bad else "")
                )
        results: list[dict | None] = [None] * len(clips)
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(clips):
            groups.setdefault(int(c.shape[-1]), []).append(i)
        for _, idx in groups.items():
            batch = torch.stack([clips[i] for i in idx]).float()
            out = self._tokenize_batch(batch, sr, wanted, [captions[i] for i in idx] if text_cond else None)
            for j, i in enumerate(idx):
                results[i] = {k: v[j] for k, v in out.items()}
        return results  # type: ignore[return-value]

    def _tokenize_batch(
        self, wav: torch.Tensor, sr: int, wanted: Sequence[str], captions: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if "acoustic.npy" in wanted:
            x = resample(wav, sr, self.acoustic.sample_rate)
            codes = self.acoustic.encode(x)
            out["acoustic.npy"] = _int16(codes, self.acoustic.codebook_size, "acoustic")
        if "semantic.npy" in wanted:
            x = resample(wav, sr, self.semantic.sample_rate)
            ids = self.semantic.encode(x)
            out["semantic.npy"] = _int16(ids, self.semantic.vocab_size, "semantic")
        audio16 = None  # the audio embedding (float16, as stored): for mulan.npy and audio-sourced cond.npy
        if "mulan.npy" in wanted or ("cond.npy" in wanted and captions is None):
            x = resample(wav, sr, self.embedder.sample_rate)
            audio16 = self.embedder.embed_audio(x).float().cpu().to(torch.float16)
            if "mulan.npy" in wanted:
                out["mulan.npy"] = audio16.numpy()
        if "cond.npy" in wanted:
            if captions is not None:  # quantizer.source: text
                emb16 = self.embedder.embed_text(list(captions)).float().cpu().to(torch.float16)
            else:
                emb16 = audio16
            codes = self.quantizer.encode(emb16.float())
            out["cond.npy"] = codes.cpu().numpy().astype(np.int16)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> str:
        """Write a self-contained bundle directory (weights, k-means, quantizer, tokenizers.json)."""
        directory = os.path.abspath(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        cfg = copy.deepcopy(self.config)
        if self.acoustic is not None:
            if not hasattr(self.acoustic, "save_pretrained"):
                raise TypeError(f"{type(self.acoustic).__name__} cannot be saved into a bundle")
            self.acoustic.save_pretrained(os.path.join(directory, "acoustic"))
            cfg.setdefault("acoustic", {})["model"] = "acoustic"
        if self.semantic_features is not None:
            sem = cfg.setdefault("semantic", {})
            feats = dict(sem.get("features", {}))
            if self.semantic_features.type == "hf":
                self.semantic_features.save_pretrained(os.path.join(directory, "semantic_model"))
                feats["model"] = "semantic_model"
                # the saved model keeps blocks 1..layer only
            sem["features"] = feats
            if self.semantic is not None:
                from .semantic import save_centroids

                save_centroids(
                    os.path.join(directory, "kmeans.safetensors"),
                    self.semantic.centroids,
                    self.semantic_features.config(),
                )
                sem["kmeans"] = "kmeans.safetensors"
            else:
                sem.pop("kmeans", None)
        if self.embedder is not None:
            if not hasattr(self.embedder, "save_pretrained"):
                raise TypeError(f"{type(self.embedder).__name__} cannot be saved into a bundle")
            self.embedder.save_pretrained(os.path.join(directory, "mulan"))
            cfg.setdefault("mulan", {})["model"] = "mulan"
        fingerprints = self.fingerprints()
        if self.embedder is not None:
            # the fingerprint of the copy this bundle now holds: an embedder's config can name files
            # (a MuLaN caption tokenizer, a text tower) that saving moved into the bundle, and
            # load() compares against what it rebuilds from here. Weights are the same bytes.
            fingerprints["mulan"] = build_embedder(
                {**cfg["mulan"], "model": os.path.join(directory, "mulan")}
            ).fingerprint()
        q = _quantizer_section(cfg.get("quantizer"))
        if self.quantizer is not None:
            self.quantizer.save(os.path.join(directory, "quantizer"))
            q["path"] = "quantizer"
        else:
            q.pop("path", None)
        if q:
            cfg["quantizer"] = q
        else:
            cfg.pop("quantizer", None)
        doc = {"format": "musiclm-tokenizers", "version": 1, "config": cfg, "fingerprints": fingerprints}
        storage.write_json_atomic(os.path.join(directory, BUNDLE_FILE), doc, indent=2, sort_keys=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu", check: bool = True) -> TokenizerBundle:
        """Load a directory written by :meth:`save`; with ``check`` the rebuilt tokenizers'
        fingerprints must equal the saved ones (loads every model), else :class:`BundleMismatch`."""
        directory = os.path.abspath(os.fspath(directory))
        with open(os.path.join(directory, BUNDLE_FILE)) as f:
            doc = json.load(f)
        bundle = build_tokenizers(doc["config"], base_dir=directory, device=device)
        if check:
            saved = doc.get("fingerprints", {})
            now = bundle.fingerprints()
            for name in sorted(set(saved) | set(now)):
                if canonical_json(saved.get(name)) != canonical_json(now.get(name)):
                    fields = sorted(
                        k
                        for k in set(saved.get(name) or {}) | set(now.get(name) or {})
                        if canonical_json((saved.get(name) or {}).get(k))
                        != canonical_json((now.get(name) or {}).get(k))
                    )
                    raise BundleMismatch(f"tokenizer bundle {directory}: {name} fingerprint differs in {fields}")
        return bundle


def _int16(x: torch.Tensor, vocab: int, what: str) -> np.ndarray:
    if vocab - 1 > np.iinfo(np.int16).max:
        raise ValueError(f"{what} vocabulary of {vocab} does not fit int16 shards")
    return x.cpu().numpy().astype(np.int16)


def build_tokenizers(
    cfg: Mapping[str, Any], base_dir: str | os.PathLike | None = None, device: str = "cpu"
) -> TokenizerBundle:
    """Build a :class:`TokenizerBundle` from a ``tokenizers`` config section (see module doc).

    Sections that are absent give ``None`` parts. Nothing is loaded until used.
    """
    cfg = copy.deepcopy(dict(cfg or {}))
    base = os.path.abspath(os.fspath(base_dir)) if base_dir is not None else None
    bundle = TokenizerBundle(config=copy.deepcopy(cfg), base_dir=base)

    if cfg.get("acoustic"):
        ac = dict(cfg["acoustic"])
        if "model" in ac:
            ac["model"] = _resolve(ac["model"], base)
        bundle.acoustic = build_acoustic(ac, device=device)

    if cfg.get("semantic"):
        sem = dict(cfg["semantic"])
        feats = dict(sem.get("features") or {"type": "mfcc"})
        if "model" in feats:
            feats["model"] = _resolve(feats["model"], base)
        sem["features"] = feats
        if sem.get("kmeans"):
            sem["kmeans"] = _resolve(sem["kmeans"], base)
        bundle.semantic_features, bundle.semantic = build_semantic(sem, device=device)

    if cfg.get("mulan"):
        mu = dict(cfg["mulan"])
        if "model" in mu:
            mu["model"] = _resolve(mu["model"], base)
        bundle.embedder = build_embedder(mu, device=device)

    q = _quantizer_section(cfg.get("quantizer"))
    if q.get("path"):
        path = _resolve(q["path"], base)
        if MuLaNEmbedQuantizer.exists(path):
            bundle.quantizer = MuLaNEmbedQuantizer.load(path, device=device)
        else:
            warnings.warn(f"MuLaN quantizer {path} not found: cond.npy unavailable until it is fitted", stacklevel=2)
    return bundle


def load_bundle(directory: str | os.PathLike, device: str = "cpu", check: bool = True) -> TokenizerBundle:
    """Shorthand for :meth:`TokenizerBundle.load`."""
    return TokenizerBundle.load(directory, device=device, check=check)
