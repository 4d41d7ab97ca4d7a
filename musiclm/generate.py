"""The MusicLM pipeline: a caption in, N candidate pieces out, best first.

    text -> MuLaN text embedding -> conditioning tokens (one set per namespace)
         -> semantic -> coarse -> fine  (one sampler, musiclm.lm.sampling, sliding windows)
         -> codec decode -> rerank by cosine(MuLaN text embedding, MuLaN audio embedding)

    from musiclm.generate import MusicLM
    model = MusicLM.from_pretrained("models/rapbeats-demo")
    result = model.generate("hard-hitting trap beat at 70 bpm with dark piano", duration=10, num_samples=4, seed=0)
    result.save("out/")          # out/<slug>.wav (best), <slug>-2.wav ..., <slug>.json, <slug>.png

Beyond one caption:

* story mode: ``generate([(0, "calm intro"), (15, "drums come in")], duration=30)``: the
  conditioning tokens switch at those times (every stage cuts its windows there);
* continuation: ``prompt_audio="clip.wav"`` (or ``(wav, sample_rate)``): the clip is tokenized with
  the model's own tokenizers and its tokens are the start every stage continues; ``duration`` is
  the length of the whole output, the clip included (as MusicGen's continuation);
* unconditional: ``generate(unconditional=True)`` puts NULL_COND in every stage's prefix (the
  token the stages learned from conditioning dropout); no caption, no reranking.

The N candidates go through every stage as one batch (KV-cached; with classifier-free guidance
the conditional and null prefixes run as one batch of 2N). One ``torch.Generator`` seeded with
``seed`` drives every draw: the same seed gives the same tokens and audio.

Requests are checked before any work: an empty caption, a duration that is not positive or longer
than an hour, an unreadable or too-long prompt clip, a missing model part or one whose layout
disagrees with the others are refused with a :class:`GenerationRequestError` naming the problem.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from musiclm.lm.model import Transformer
from musiclm.lm.sampling import PAPER_SAMPLING, SAMPLING_SOURCE, SamplingSettings, Window, sample_stage
from musiclm.lm.stages import STAGES, Stage

__all__ = [
    "MAX_DURATION_SECONDS",
    "GenerationRequestError",
    "GenerationResult",
    "MusicLM",
    "check_request",
    "parse_story_prompt",
    "rank_order",
    "sampling_overrides",
    "score_candidates",
    "slugify",
]

log = logging.getLogger(__name__)

MAX_DURATION_SECONDS = 3600.0  # an hour: longer requests are a typo, not a piece
MAX_SAMPLES = 64
CAPTION = str | Sequence[tuple[float, str]]


# TokenLayout fields a stage's tokens depend on: a stage may have been trained on a token folder
# without the streams it never reads, so its layout's other fields can be defaults.
_COND = ("cond_levels", "cond_codebook", "cond_namespaces")
_SEM = ("semantic_vocab", "semantic_rate")
_AC = ("acoustic_levels", "acoustic_codebook", "acoustic_rate", "coarse_levels")
_LAYOUT_FIELDS = {"semantic": _COND + _SEM, "coarse": _COND + _SEM + _AC, "fine": _COND + _AC}


class GenerationRequestError(ValueError):
    """A generation request (or the model it names) that cannot be served; raised before any work."""


# ------------------------------------------------------------------------------------------ ranking


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a * b).sum(-1)


@torch.inference_mode()
def score_candidates(
    embedder,
    wavs: torch.Tensor,
    sample_rate: int,
    texts: Sequence[str],
    segments: Sequence[tuple[float, float, int]] | None = None,
) -> np.ndarray:
    """MuLaN score of each candidate ``wavs [N, T]``: the cosine between its audio embedding and
    the caption's text embedding. With ``segments`` ``(start_s, end_s, text index)`` (story mode)
    each span is scored against its own caption and the scores are averaged weighted by duration."""
    from musiclm.audio import resample

    wavs = torch.as_tensor(wavs).float()
    if wavs.dim() == 1:
        wavs = wavs[None]
    text_emb = embedder.embed_text(list(texts))
    x = resample(wavs, int(sample_rate), int(embedder.sample_rate))
    sr = int(embedder.sample_rate)
    if not segments:
        segments = [(0.0, x.shape[-1] / sr, 0)]
    total = torch.zeros(x.shape[0])
    weight = 0.0
    for start, end, i in segments:
        a, b = int(round(start * sr)), min(int(round(end * sr)), x.shape[-1])
        if b <= a:
            continue
        emb = embedder.embed_audio(x[:, a:b])
        total += _cosine(emb, text_emb[i][None]) * (b - a)
        weight += b - a
    return (total / max(weight, 1.0)).numpy()


def rank_order(scores: Sequence[float]) -> list[int]:
    """Indices of the candidates, best (highest score) first; ties keep generation order."""
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]


# ------------------------------------------------------------------------------------------ requests


def parse_story_prompt(text: str) -> tuple[float, str]:
    """``"15:drums come in"`` -> ``(15.0, "drums come in")``; ``"1:30:..."`` is 90 s."""
    m = re.match(r"^\s*(?:(\d+):)?(\d+(?:\.\d+)?)\s*:(.*)$", text, flags=re.S)
    if not m:
        raise GenerationRequestError(f"story prompt {text!r} is not '<seconds>:<caption>' (e.g. '15:drums come in')")
    minutes, seconds, caption = m.groups()
    return (int(minutes or 0) * 60 + float(seconds), caption.strip())


def sampling_overrides(**flags: str | float | int | None) -> dict[str, dict]:
    """Per-stage sampling overrides from command-line values: ``temperature="0.9"`` sets every
    stage, ``temperature="semantic=1.0,coarse=0.95"`` the stages named. Keys: temperature, top_k,
    top_p, cond_scale (top_k 0 and top_p 1 turn truncation off)."""
    casts = {"temperature": float, "top_k": int, "top_p": float, "cond_scale": float}
    out: dict[str, dict] = {}
    for key, value in flags.items():
        if key not in casts:
            raise GenerationRequestError(f"unknown sampling setting {key!r}; known: {sorted(casts)}")
        if value is None:
            continue
        text = str(value).strip()
        items = [t.strip() for t in text.split(",") if t.strip()]
        per_stage = [it.split("=", 1) if "=" in it else [None, it] for it in items]
        if not per_stage:
            raise GenerationRequestError(f"--{key.replace('_', '-')} is empty")
        for stage, v in per_stage:
            stages = list(STAGES) if stage is None else [stage.strip()]
            for st in stages:
                if st not in STAGES:
                    raise GenerationRequestError(
                        f"--{key.replace('_', '-')}: unknown stage {st!r} (stages: {', '.join(STAGES)})"
                    )
                try:
                    out.setdefault(st, {})[key] = casts[key](float(v)) if casts[key] is int else casts[key](v)
                except ValueError:
                    raise GenerationRequestError(f"--{key.replace('_', '-')}: {v!r} is not a number") from None
    return out


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name stem from a caption: lower case, runs of other characters become '-'."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:max_len].rstrip("-") or "music") if s else "music"


@dataclass
class _Request:
    captions: list[str]  # empty when unconditional
    switch_seconds: list[float]
    duration: float
    num_samples: int
    seed: int
    unconditional: bool
    sampling: dict[str, SamplingSettings]
    prompt_wav: torch.Tensor | None  # [T] at prompt_sr
    prompt_sr: int | None
    prompt_source: str | None


def _check_caption_and_length(
    caption: CAPTION | None, duration: float, num_samples: int, unconditional: bool
) -> tuple[list[str], list[float], float]:
    """The checks that need no model: (captions, switch seconds, duration) or GenerationRequestError."""
    try:
        duration = float(duration)
    except (TypeError, ValueError):
        raise GenerationRequestError(f"duration must be a number of seconds, got {duration!r}") from None
    if not math.isfinite(duration) or duration <= 0:
        raise GenerationRequestError(f"duration must be > 0 seconds, got {duration}")
    if duration > MAX_DURATION_SECONDS:
        raise GenerationRequestError(
            f"duration {duration:g} s is longer than {MAX_DURATION_SECONDS:g} s (one hour): is it in seconds?"
        )
    if int(num_samples) != num_samples or not 1 <= num_samples <= MAX_SAMPLES:
        raise GenerationRequestError(f"num_samples must be a whole number in 1..{MAX_SAMPLES}, got {num_samples}")

    captions: list[str] = []
    switch: list[float] = [0.0]
    if unconditional:
        if caption is not None and (not isinstance(caption, str) or caption.strip()):
            raise GenerationRequestError("unconditional generation takes no caption")
    elif caption is None or (isinstance(caption, str) and not caption.strip()):
        raise GenerationRequestError("the caption is empty: describe the music, or ask for unconditional=True")
    elif isinstance(caption, str):
        captions = [caption.strip()]
    else:
        story = [parse_story_prompt(c) if isinstance(c, str) else (float(c[0]), str(c[1])) for c in caption]
        if not story:
            raise GenerationRequestError("the story has no captions")
        switch = [t for t, _ in story]
        captions = [c.strip() for _, c in story]
        for t, c in story:
            if not c.strip():
                raise GenerationRequestError(f"the story caption at {t:g} s is empty")
        if switch[0] != 0:
            raise GenerationRequestError(f"the story must start at 0 s (first caption at {switch[0]:g} s)")
        if any(b <= a for a, b in zip(switch, switch[1:])):
            raise GenerationRequestError(f"story times must increase: {switch}")
        if switch[-1] >= duration:
            raise GenerationRequestError(f"story time {switch[-1]:g} s is not inside the {duration:g} s piece")
    return captions, switch, duration


def check_request(
    caption: CAPTION | None = None,
    *,
    duration: float = 10.0,
    num_samples: int = 4,
    prompt_audio=None,
    unconditional: bool = False,
    sampling: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Refuse a bad request without loading a model (the command runs it first): caption, story,
    duration, num_samples, sampling values and a readable prompt clip. ``MusicLM.generate``
    repeats these checks and adds the ones that need the model."""
    _check_caption_and_length(caption, duration, num_samples, unconditional)
    for name, over in (sampling or {}).items():
        if name not in STAGES:
            raise GenerationRequestError(f"sampling settings for unknown stage {name!r}; stages: {list(STAGES)}")
        try:
            PAPER_SAMPLING[name].replace(**{k: v for k, v in dict(over).items() if v is not None})
        except (TypeError, ValueError) as e:
            raise GenerationRequestError(f"{name} sampling: {e}") from None
    if prompt_audio is not None:
        MusicLM._read_prompt(prompt_audio)


# ------------------------------------------------------------------------------------------ result


@dataclass
class GenerationResult:
    """Candidates best first (``wavs[0]`` is the one to keep)."""

    wavs: torch.Tensor  # float32 [N, T] at sample_rate
    sample_rate: int
    scores: list[float | None]
    order: list[int]  # generation index of each candidate, in ranked order
    tokens: dict[str, np.ndarray]  # "semantic" [N, T_s], "coarse" [N, Qc, T_a], "fine" [N, Qf, T_a]
    conditioning: dict[str, list[list[int] | None]]  # per stage: the K codes of each caption (None = NULL_COND)
    windows: dict[str, list[dict]]  # per stage: the windows in seconds and the conditioning each used
    timings: dict[str, float]  # wall seconds per step of the pipeline
    rtf: float  # wall seconds per second of audio (< 1: faster than real time)
    request: dict = field(default_factory=dict)  # prompt, seed, duration, sampling settings, ...
    logits: dict[str, list[torch.Tensor]] | None = None  # per stage and window [N, n_new, V] (return_logits)

    @property
    def duration(self) -> float:
        return self.wavs.shape[-1] / self.sample_rate

    def summary(self) -> dict:
        """The JSON written beside the audio (no file names)."""
        return {
            **self.request,
            "sample_rate": self.sample_rate,
            "seconds": self.duration,
            "candidates": [
                {"rank": r + 1, "generated_as": int(i), "score": self.scores[r]} for r, i in enumerate(self.order)
            ],
            "timings_seconds": self.timings,
            "rtf": self.rtf,
            "rtf_per_stage": {k: v / self.duration for k, v in self.timings.items() if k in STAGES},
            "conditioning": self.conditioning,
            "windows": self.windows,
        }

    def save(self, out_dir: str, slug: str | None = None, spectrogram: bool = True) -> dict:
        """Write ``<slug>.wav`` (best), ``<slug>-2.wav`` ..., ``<slug>.json`` and ``<slug>.png``
        into ``out_dir`` (atomically; local or fsspec URL). Returns the JSON written."""
        from musiclm.data import storage

        slug = slug or slugify(self.request.get("caption") or "unconditional")
        storage.makedirs(out_dir)
        files = []
        for r in range(self.wavs.shape[0]):
            name = f"{slug}.wav" if r == 0 else f"{slug}-{r + 1}.wav"
            storage.write_bytes_atomic(storage.join(out_dir, name), _wav_bytes(self.wavs[r], self.sample_rate))
            files.append(name)
        doc = self.summary()
        for c, name in zip(doc["candidates"], files):
            c["file"] = name
        if spectrogram:
            png = f"{slug}.png"
            storage.write_bytes_atomic(storage.join(out_dir, png), self.spectrogram_png())
            doc["spectrogram"] = png
        storage.write_json_atomic(storage.join(out_dir, f"{slug}.json"), doc, indent=2)
        return doc

    def spectrogram_png(self) -> bytes:
        """Log-mel spectrograms of every candidate (best on top) as PNG bytes (matplotlib, Agg)."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from musiclm.audio import MelConfig, log_mel

        n = self.wavs.shape[0]
        cfg = MelConfig(sample_rate=self.sample_rate, n_fft=1024, hop_length=max(1, self.sample_rate // 100), n_mels=80)
        mels = log_mel(self.wavs, cfg).numpy() * (10 / math.log(10))  # dB
        fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n + 0.4), squeeze=False)
        for r, ax in enumerate(axes[:, 0]):
            s = self.scores[r]
            vmax = float(mels[r].max())
            ax.imshow(
                mels[r],
                origin="lower",
                aspect="auto",
                cmap="magma",
                vmin=vmax - 80,
                vmax=vmax,
                extent=(0, self.duration, 0, mels.shape[1]),
            )
            label = f"#{r + 1}" + (f"  MuLaN score {s:.3f}" if s is not None else "")
            ax.set_title(label, fontsize=8)
            ax.set_ylabel("mel bin")
            for w in self.windows.get("semantic", [])[1:]:  # where the semantic windows start sampling
                ax.axvline(w["sampled_from"], color="w", lw=0.5, ls="--")
        axes[-1, 0].set_xlabel("seconds")
        fig.suptitle((self.request.get("caption") or "unconditional")[:120], fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        return buf.getvalue()


def _wav_bytes(wav: torch.Tensor, sample_rate: int) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wav.detach().cpu().float().clamp(-1, 1).numpy(), int(sample_rate), format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ pipeline


class MusicLM:
    """Text-to-music with three stage LMs, a codec and MuLaN (see the module docstring).

    ``MusicLM.from_pretrained(dir)`` loads a directory written by ``musiclm package``;
    ``MusicLM(stages, tokenizers, config)`` takes the parts in memory (tests, benchmarks).

    Args:
        stages: ``{"semantic": (Stage, Transformer), "coarse": ..., "fine": ...}``.
        tokenizers: a :class:`~musiclm.tokenizers.TokenizerBundle` (``acoustic`` codec to decode,
            ``embedder`` + ``quantizer`` for captions and reranking, ``semantic`` for prompt clips).
        config: the package config; its ``sampling`` section (per stage temperature, top_k, top_p,
            cond_scale) overrides :data:`~musiclm.lm.sampling.PAPER_SAMPLING`.
    """

    def __init__(
        self,
        stages: Mapping[str, tuple[Stage, Transformer]],
        tokenizers,
        config: dict | None = None,
        directory: str | None = None,
    ):
        self.stages = dict(stages)
        self.tokenizers = tokenizers
        self.config = dict(config or {})
        self.directory = directory
        self.default_sampling = dict(PAPER_SAMPLING)
        for name, section in (self.config.get("sampling") or {}).items():
            if name in STAGES and section:
                self.default_sampling[name] = self.default_sampling[name].replace(**dict(section))

    @classmethod
    def from_pretrained(cls, directory: str, device: str = "cpu", compile: bool = False) -> MusicLM:
        """Load a ``musiclm package`` directory (local or s3://); parts whose fingerprints disagree
        are refused by :func:`musiclm.package.load_package`. ``compile``: ``torch.compile`` the
        three stage LMs (dynamic shapes: the KV cache grows; worth it on GPUs, tens of seconds of
        start-up on a CPU)."""
        from musiclm.lm.model import maybe_compile
        from musiclm.package import load_package

        pkg = load_package(directory, device=device)
        for _stage, model in pkg.stages.values():
            maybe_compile(model, compile, dynamic=True)
        return cls(pkg.stages, pkg.tokenizers, pkg.config, directory=pkg.directory)

    # -- checks -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        model = self.stages["semantic"][1] if "semantic" in self.stages else None
        return next(model.parameters()).device if model is not None else torch.device("cpu")

    def check_parts(self, need_text: bool = True, need_prompt: bool = False) -> None:
        """Every part a request needs is there and the layouts agree; else GenerationRequestError."""
        missing = [s for s in STAGES if s not in self.stages]
        tk = self.tokenizers
        if tk is None or getattr(tk, "acoustic", None) is None:
            missing.append("acoustic codec (tokenizers.acoustic)")
        if need_text and (tk is None or getattr(tk, "embedder", None) is None):
            missing.append("MuLaN (tokenizers.embedder)")
        if need_text and (tk is None or getattr(tk, "quantizer", None) is None):
            missing.append("MuLaN quantizer (tokenizers.quantizer)")
        if need_prompt and (tk is None or getattr(tk, "semantic", None) is None):
            missing.append("semantic tokenizer (tokenizers.semantic), needed to continue a prompt clip")
        if missing:
            where = f" in {self.directory}" if self.directory else ""
            raise GenerationRequestError(f"the model{where} is missing: {', '.join(missing)}")
        problems = []
        ref = self.stages["coarse"][0].layout  # the coarse stage reads every stream
        for name, (st, m) in self.stages.items():
            diff = [f for f in _LAYOUT_FIELDS[name] if getattr(ref, f) != getattr(st.layout, f)]
            if diff:
                problems.append(f"stage {name} token layout differs from the coarse stage's in {diff}")
            if m.cfg.vocab_size != st.vocab_size:
                problems.append(f"stage {name}: model vocab {m.cfg.vocab_size} != layout vocab {st.vocab_size}")
        ac = tk.acoustic
        if float(ac.frame_rate) != float(ref.acoustic_rate):
            problems.append(f"codec frame_rate {ac.frame_rate} != tokens.acoustic_rate {ref.acoustic_rate}")
        if int(ac.levels) < ref.acoustic_levels or int(ac.codebook_size) != ref.acoustic_codebook:
            problems.append(
                f"codec {ac.levels} levels x {ac.codebook_size} codes vs tokens {ref.acoustic_levels} x "
                f"{ref.acoustic_codebook}"
            )
        q = getattr(tk, "quantizer", None)
        if need_text and q is not None:
            if q.levels != ref.cond_levels or q.codebook_size != ref.cond_codebook:
                problems.append(
                    f"quantizer {q.levels} levels x {q.codebook_size} codes vs tokens {ref.cond_levels} x "
                    f"{ref.cond_codebook}"
                )
            if tk.embedder is not None and q.dim != tk.embedder.dim:
                problems.append(f"quantizer dim {q.dim} != MuLaN dim {tk.embedder.dim}")
        sem = getattr(tk, "semantic", None)
        if need_prompt and sem is not None:
            if int(sem.vocab_size) != ref.semantic_vocab:
                problems.append(
                    f"semantic tokenizer vocab {sem.vocab_size} != tokens.semantic_vocab {ref.semantic_vocab}"
                )
        if problems:
            raise GenerationRequestError("the model's parts disagree: " + "; ".join(problems))

    def _aligned_stages(self) -> dict[str, tuple[Stage, Transformer]]:
        """The stages on one common layout (the coarse stage's, which has every stream), so that
        every stage counts grid steps alike; their vocabularies are unchanged (checked)."""
        ref = self.stages["coarse"][0].layout
        out = {}
        for name, (st, m) in self.stages.items():
            if st.layout != ref:
                new = Stage(name, ref, st.window_seconds)
                if new.vocab_size != st.vocab_size:
                    raise GenerationRequestError(f"stage {name}: vocabulary changes on the common token layout")
                st = new
            out[name] = (st, m)
        return out

    def _request(
        self,
        caption: CAPTION | None,
        duration: float,
        num_samples: int,
        seed: int,
        prompt_audio,
        unconditional: bool,
        sampling: Mapping[str, Mapping[str, Any]] | None,
    ) -> _Request:
        """Validate everything before any work."""
        captions, switch, duration = _check_caption_and_length(caption, duration, num_samples, unconditional)

        settings = dict(self.default_sampling)
        for name, over in (sampling or {}).items():
            if name not in STAGES:
                raise GenerationRequestError(f"sampling settings for unknown stage {name!r}; stages: {list(STAGES)}")
            try:
                settings[name] = settings[name].replace(**{k: v for k, v in dict(over).items() if v is not None})
            except (TypeError, ValueError) as e:
                raise GenerationRequestError(f"{name} sampling: {e}") from None

        self.check_parts(need_text=not unconditional, need_prompt=prompt_audio is not None)

        wav = sr = source = None
        if prompt_audio is not None:
            wav, sr, source = self._read_prompt(prompt_audio)
            grid = float(self.stages["coarse"][0].layout.grid)
            seconds = wav.shape[-1] / sr
            if seconds < grid:
                raise GenerationRequestError(f"prompt clip {source} is {seconds:.3f} s, shorter than one {grid} s step")
            if seconds >= duration:
                raise GenerationRequestError(
                    f"prompt clip {source} is {seconds:.2f} s: duration ({duration:g} s) is the length of the "
                    "whole piece, clip included, so it must be longer than the clip"
                )
        return _Request(
            captions, switch, duration, int(num_samples), int(seed), unconditional, settings, wav, sr, source
        )

    @staticmethod
    def _read_prompt(prompt_audio) -> tuple[torch.Tensor, int, str]:
        from musiclm.audio import AudioError, load_audio

        if isinstance(prompt_audio, (tuple, list)) and len(prompt_audio) == 2:
            wav, sr = prompt_audio
            wav = torch.as_tensor(wav).float()
            wav = wav.mean(0) if wav.dim() == 2 else wav
            if wav.dim() != 1 or wav.numel() == 0 or not torch.isfinite(wav).all():
                raise GenerationRequestError("prompt audio must be a non-empty finite mono (or [C, T]) waveform")
            return wav, int(sr), "<waveform>"
        source = os.fspath(prompt_audio)
        try:
            wav, sr = load_audio(source)
        except AudioError as e:
            raise GenerationRequestError(f"cannot read the prompt clip: {e}") from None
        return wav.float(), int(sr), source

    # -- generation -------------------------------------------------------------------------------

    def generate(
        self,
        caption: CAPTION | None = None,
        *,
        duration: float = 10.0,
        num_samples: int = 4,
        seed: int = 0,
        prompt_audio=None,
        unconditional: bool = False,
        sampling: Mapping[str, Mapping[str, Any]] | None = None,
        overlap: float = 0.5,
        use_cache: bool = True,
        progress: bool = True,
        return_logits: bool = False,
    ) -> GenerationResult:
        """Generate ``num_samples`` pieces of ``duration`` seconds, ranked by MuLaN (best first).

        Args:
            caption: a caption, or ``[(start_seconds, caption), ...]`` (or ``"15:caption"`` strings)
                for story mode; None with ``unconditional=True``.
            prompt_audio: a clip to continue (path / URL, or ``(wav, sample_rate)``).
            sampling: per-stage overrides, e.g. ``{"fine": {"temperature": 0.5, "top_k": 50}}``.
            overlap: fraction of each window that is context from the previous window.
            use_cache: KV cache (False recomputes every prefix: the benchmark's baseline).
            return_logits: keep every stage's per-window logits in ``result.logits`` (generation
                order, not ranked; tests: memory grows with the vocabulary).
        """
        req = self._request(caption, duration, num_samples, seed, prompt_audio, unconditional, sampling)
        from tqdm.auto import tqdm

        timings: dict[str, float] = {}
        t_all = time.perf_counter()
        stages = self._aligned_stages()
        lay = stages["coarse"][0].layout
        grid = lay.grid
        steps = math.ceil(Fraction(req.duration).limit_denominator(1_000_000) / grid)
        switch_steps = [int(round(Fraction(t).limit_denominator(1_000_000) / grid)) for t in req.switch_seconds]
        if len(set(switch_steps)) != len(switch_steps):
            raise GenerationRequestError(f"story times {req.switch_seconds} fall on the same {float(grid)} s step")
        B = req.num_samples
        device = self.device
        gen = torch.Generator(device=device).manual_seed(req.seed)

        # text -> conditioning tokens per caption and namespace
        t0 = time.perf_counter()
        codes = None
        if req.captions:
            emb = self.tokenizers.embedder.embed_text(req.captions).float()
            codes = np.asarray(self.tokenizers.quantizer.encode(emb.cpu()).cpu().numpy(), dtype=np.int64)
        timings["text"] = time.perf_counter() - t0

        def stage_conds(stage: Stage) -> list[np.ndarray | None]:
            if codes is None:
                return [None] * len(switch_steps)
            return [codes[i, stage.namespace_index] for i in range(len(req.captions))]

        # a prompt clip -> the tokens every stage continues
        known: dict[str, np.ndarray | None] = {"semantic": None, "coarse": None, "fine": None}
        if req.prompt_wav is not None:
            t0 = time.perf_counter()
            tok = self.tokenizers.tokenize(
                req.prompt_wav[None], sample_rate=req.prompt_sr, entries=["acoustic.npy", "semantic.npy"]
            )[0]
            fs, fa = lay.frames_per_grid("semantic"), lay.frames_per_grid("acoustic")
            sem = np.asarray(tok["semantic.npy"], dtype=np.int64)
            ac = np.asarray(tok["acoustic.npy"], dtype=np.int64)[: lay.acoustic_levels]
            p_steps = min(len(sem) // fs, ac.shape[-1] // fa, steps - 1)
            if p_steps < 1:
                raise GenerationRequestError("the prompt clip gives no whole grid step of tokens")
            known["semantic"] = np.broadcast_to(sem[: p_steps * fs], (B, p_steps * fs))
            ac = ac[:, : p_steps * fa]
            known["coarse"] = np.broadcast_to(ac[: lay.coarse_levels], (B, lay.coarse_levels, p_steps * fa))
            known["fine"] = np.broadcast_to(ac[lay.coarse_levels :], (B, lay.fine_levels, p_steps * fa))
            timings["prompt"] = time.perf_counter() - t0

        outputs: dict[str, Any] = {}
        windows: dict[str, list[dict]] = {}
        logits: dict[str, list[torch.Tensor]] = {}
        cond_used: dict[str, list] = {}
        for name in STAGES:
            stage, model = stages[name]
            conds = stage_conds(stage)
            cond_used[name] = [None if c is None else [int(x) for x in c] for c in conds]
            total = stage._lengths(steps)[1]
            t0 = time.perf_counter()
            with tqdm(total=total, desc=f"{name:>8}", unit="tok", disable=not progress, leave=True) as bar:
                if known[name] is not None:
                    bar.update(stage._lengths(known[name].shape[-1] // _fpg(stage, name))[1])
                res = sample_stage(
                    stage,
                    model,
                    steps,
                    B,
                    conds,
                    switch_steps=switch_steps,
                    semantic=outputs.get("semantic"),
                    coarse=outputs.get("coarse"),
                    known=known[name],
                    settings=req.sampling[name],
                    generator=gen,
                    overlap=overlap,
                    use_cache=use_cache,
                    return_logits=return_logits,
                    progress=bar.update,
                )
            timings[name] = time.perf_counter() - t0
            outputs[name] = res.target
            windows[name] = [_window_dict(w, c, grid) for w, c in zip(res.windows, res.conditioning)]
            logits[name] = res.logits

        # decode: all levels, coarse first; exactly `duration` seconds
        t0 = time.perf_counter()
        codec = self.tokenizers.acoustic
        all_codes = torch.from_numpy(np.concatenate([outputs["coarse"], outputs["fine"]], axis=1))
        wavs = codec.decode(all_codes).float().cpu()
        sr = int(codec.sample_rate)
        n = int(round(req.duration * sr))
        if wavs.shape[-1] < n:  # the grid covers the duration; the codec may trim a partial frame
            wavs = torch.nn.functional.pad(wavs, (0, n - wavs.shape[-1]))
        wavs = wavs[:, :n].contiguous()
        timings["decode"] = time.perf_counter() - t0

        # rerank by MuLaN text-audio cosine
        t0 = time.perf_counter()
        if req.captions:
            bounds = req.switch_seconds + [req.duration]
            segments = [(bounds[i], bounds[i + 1], i) for i in range(len(req.captions))]
            scores = score_candidates(self.tokenizers.embedder, wavs, sr, req.captions, segments)
            order = rank_order(scores)
            ranked_scores: list[float | None] = [float(scores[i]) for i in order]
        else:
            order, ranked_scores = list(range(B)), [None] * B
        timings["rerank"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_all

        idx = torch.as_tensor(order)
        tokens = {k: np.ascontiguousarray(v[order]) for k, v in outputs.items()}
        caption_text = (
            None
            if not req.captions
            else req.captions[0]
            if len(req.captions) == 1
            else " | ".join(f"{t:g}s: {c}" for t, c in zip(req.switch_seconds, req.captions))
        )
        request = {
            "caption": caption_text,
            "story": [{"start_seconds": t, "caption": c} for t, c in zip(req.switch_seconds, req.captions)]
            if len(req.captions) > 1
            else None,
            "unconditional": req.unconditional,
            "prompt_audio": req.prompt_source,
            "prompt_seconds": None
            if req.prompt_wav is None
            else float(known["semantic"].shape[-1] / lay.semantic_rate),
            "seed": req.seed,
            "duration": req.duration,
            "num_samples": B,
            "sampling": {k: v.to_dict() for k, v in req.sampling.items()},
            "sampling_defaults_source": (self.config.get("sampling") or {}).get("source") or SAMPLING_SOURCE,
            "overlap": overlap,
            "kv_cache": use_cache,
            "window_seconds": {k: stages[k][0].window_seconds for k in STAGES},
            "model": self.directory,
            "device": str(device),
        }
        return GenerationResult(
            wavs=wavs[idx],
            sample_rate=sr,
            scores=ranked_scores,
            order=order,
            tokens=tokens,
            conditioning=cond_used,
            windows=windows,
            timings=timings,
            rtf=timings["total"] / req.duration,
            request=request,
            logits=logits if return_logits else None,
        )


def _fpg(stage: Stage, name: str) -> int:
    return stage.layout.frames_per_grid("semantic" if name == "semantic" else "acoustic")


def _window_dict(w: Window, cond: list[int], grid: Fraction) -> dict:
    return {
        "start": float(w.start * grid),
        "sampled_from": float(w.sampled_from * grid),
        "end": float(w.end * grid),
        "segment": w.segment,
        "cond_ids": cond,
    }
