"""Stage sequence layouts: how the semantic, coarse and fine LMs see a token-shard sample.

A stage is only a layout; every stage trains the same ``Transformer``.

Vocabulary (one per stage, compact: only the ranges the stage uses, in this order)::

    specials      0 PAD, 1 BOS, 2 SEP, 3 EOS, 4 NULL_COND
    conditioning  the stage's MuLaN namespace, one range of cond_codebook ids per level
                  (cond level k, code c -> cond_offset(k) + c); K = cond_levels positions
    semantic      semantic_vocab ids                          (semantic and coarse stages)
    acoustic      one range of acoustic_codebook ids per level (level q, code c ->
                  acoustic_offset(q) + c); coarse: levels 0..coarse_levels-1, fine: all Q levels
    (padding)     unused ids up to a multiple of 64 (never a target, masked when sampling)

Levels are 0-based in code (level 0 = the paper's "level 1", the coarsest RVQ level).

Sequences (acoustic codes flattened frame-major: t0q0 t0q1 ... t1q0 ...)::

    semantic   BOS cond[K] SEP semantic[T_s]
    coarse     BOS cond[K] SEP semantic[T_s] SEP coarse[T_a * Qc]
    fine       BOS cond[K] SEP coarse[T_a * Qc] SEP fine[T_a * (Q - Qc)]

followed by PAD up to ``seq_len``. Position i predicts token i + 1; ``loss_mask[i]`` is True only
where token i + 1 belongs to the target stream (so the SEP before the target predicts its first
token, and the last target token predicts nothing). No EOS is trained: generation always asks for
a fixed number of target tokens.

Windows: a window of ``window_seconds`` is cut at a random offset on the time grid common to the
semantic and acoustic frame rates (the smallest interval that is a whole number of frames of both,
40 ms for 25 Hz and 75 Hz), so every stream covers exactly the same seconds. A sample shorter
than the window is used whole (streams are packed back to back, then padded and masked).

Classifier-free guidance: with probability ``cond_dropout`` the K conditioning tokens are all
replaced by the one learned NULL_COND token. ``Stage.prefix(cond=None, ...)`` builds the same
null-conditioned prefix at generation time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from .model import TransformerConfig

SPECIALS = ("pad", "bos", "sep", "eos", "null_cond")
PAD, BOS, SEP, EOS, NULL_COND = range(len(SPECIALS))
N_SPECIAL = len(SPECIALS)

STAGES = ("semantic", "coarse", "fine")
# The token-shard streams each stage reads (musiclm.data.shards.STREAMS): the conditioning tokens and
# the streams of its prefix and target. ``mulan`` (the embedding itself) is read by none of them.
STAGE_STREAMS = {
    "semantic": ("semantic", "cond"),
    "coarse": ("acoustic", "semantic", "cond"),
    "fine": ("acoustic", "cond"),
}
PAPER_WINDOWS = {"semantic": 30.0, "coarse": 10.0, "fine": 3.0}
# The paper's tokens (a ``tokens:`` section): SoundStream 24 kHz at 50 Hz with 12 RVQ levels (4 coarse
# + 8 fine), w2v-BERT k-means at 25 Hz with 1024 clusters, MuLaN RVQ 12 levels x 1024 per namespace.
PAPER_TOKENS = dict(
    acoustic_levels=12,
    acoustic_codebook=1024,
    acoustic_rate=50,
    coarse_levels=4,
    semantic_vocab=1024,
    semantic_rate=25,
    cond_namespaces=["semantic", "coarse", "fine"],
    cond_levels=12,
    cond_codebook=1024,
)
DEMO_WINDOWS = {"semantic": 10.0, "coarse": 5.0, "fine": 2.0}


def _fraction(x: float) -> Fraction:
    return Fraction(x).limit_denominator(100_000)


@dataclass(frozen=True)
class TokenLayout:
    """The token streams of a shard (the config's ``tokens:`` section)."""

    acoustic_levels: int = 8  # Q
    acoustic_codebook: int = 1024
    acoustic_rate: float = 75.0  # Hz (EnCodec 24 kHz: 75; the paper's SoundStream: 50)
    coarse_levels: int = 4  # Qc: levels 0..Qc-1 are coarse, the rest fine
    semantic_vocab: int = 1024
    semantic_rate: float = 25.0
    cond_namespaces: tuple = ("semantic", "coarse", "fine")
    cond_levels: int = 8  # K conditioning tokens per namespace
    cond_codebook: int = 1024

    def __post_init__(self):
        object.__setattr__(self, "cond_namespaces", tuple(self.cond_namespaces))
        if not 0 < self.coarse_levels < self.acoustic_levels:
            raise ValueError(f"coarse_levels={self.coarse_levels} must be in 1..acoustic_levels-1")

    @classmethod
    def from_config(cls, tokens: dict | TokenLayout | None) -> TokenLayout:
        """From a config ``tokens:`` dict (its ``window_seconds`` belong to the stages); any other
        unknown key is refused with the closest valid name, as ``TransformerConfig`` does."""
        from musiclm.config import check_keys

        if isinstance(tokens, TokenLayout):
            return tokens
        known = [f.name for f in fields(cls)]
        tokens = tokens or {}
        check_keys(tokens, known + ["window_seconds"], where="tokens")
        return cls(**{k: v for k, v in tokens.items() if k in known})

    @staticmethod
    def fields_from_fingerprints(fingerprints: dict) -> dict:
        """The ``tokens:`` fields a token-shard folder's tokenizer fingerprints fix (index.json's
        ``fingerprints``): rates, levels and vocabularies of every stream it carries.
        ``coarse_levels`` and the windows are modelling choices and are not included."""
        out: dict = {}
        ac, sem, q = (fingerprints.get(k) or {} for k in ("acoustic", "semantic", "quantizer"))
        if ac:
            out.update(
                acoustic_levels=ac["levels"], acoustic_codebook=ac["codebook_size"], acoustic_rate=ac["frame_rate"]
            )
        if sem:
            out.update(semantic_vocab=sem["vocab_size"], semantic_rate=sem["frame_rate"])
        if q:
            out.update(cond_levels=q["levels"], cond_codebook=q["codebook_size"])
            if q.get("namespaces"):
                out["cond_namespaces"] = list(q["namespaces"])
        return out

    @property
    def fine_levels(self) -> int:
        return self.acoustic_levels - self.coarse_levels

    @property
    def grid(self) -> Fraction:
        """Seconds of the common time grid: the least common multiple of both frame periods."""
        a, b = 1 / _fraction(self.semantic_rate), 1 / _fraction(self.acoustic_rate)
        return Fraction(math.lcm(a.numerator, b.numerator), math.gcd(a.denominator, b.denominator))

    def frames_per_grid(self, stream: str) -> int:
        rate = {"semantic": self.semantic_rate, "acoustic": self.acoustic_rate}[stream]
        n = _fraction(rate) * self.grid
        assert n.denominator == 1
        return int(n)


class Stage:
    """One stage's layout. Build with ``get_stage``."""

    def __init__(self, name: str, layout: TokenLayout, window_seconds: float, vocab_multiple: int = 64):
        if name not in STAGES:
            raise KeyError(f"unknown stage {name!r}; choose from {STAGES}")
        self.name, self.layout = name, layout
        lay = layout
        g = lay.grid
        self.window_steps = int(_fraction(window_seconds) / g)  # rounded down to the grid
        if self.window_steps < 1:
            raise ValueError(f"window {window_seconds}s is shorter than the time grid {float(g)}s")
        self.window_seconds = float(self.window_steps * g)
        self.namespace = name
        if name in lay.cond_namespaces:
            self.namespace_index = lay.cond_namespaces.index(name)
        elif len(lay.cond_namespaces) == 1:  # one shared namespace for every stage
            self.namespace_index = 0
        else:
            raise ValueError(f"cond_namespaces {lay.cond_namespaces} has no namespace for stage {name!r}")

        # streams in this stage: (prefix stream, target stream)
        self.prefix_stream, self.target_stream = {
            "semantic": (None, "semantic"),
            "coarse": ("semantic", "coarse"),
            "fine": ("coarse", "fine"),
        }[name]
        self.uses_semantic = name in ("semantic", "coarse")
        self.uses_acoustic = name in ("coarse", "fine")
        self.streams = STAGE_STREAMS[name]
        self.acoustic_levels_in_vocab = {"semantic": 0, "coarse": lay.coarse_levels, "fine": lay.acoustic_levels}[name]
        if name == "coarse":
            self.target_levels = list(range(lay.coarse_levels))
        elif name == "fine":
            self.target_levels = list(range(lay.coarse_levels, lay.acoustic_levels))
        else:
            self.target_levels = []

        # vocabulary ranges [start, stop)
        r: dict[str, tuple[int, int]] = {}
        pos = N_SPECIAL
        r["special"] = (0, N_SPECIAL)
        r["cond"] = (pos, pos + lay.cond_levels * lay.cond_codebook)
        pos = r["cond"][1]
        if self.uses_semantic:
            r["semantic"] = (pos, pos + lay.semantic_vocab)
            pos = r["semantic"][1]
        if self.uses_acoustic:
            r["acoustic"] = (pos, pos + self.acoustic_levels_in_vocab * lay.acoustic_codebook)
            pos = r["acoustic"][1]
        self.ranges = r
        self.used_vocab = pos
        self.vocab_size = -(-pos // vocab_multiple) * vocab_multiple

        # lengths of a full window
        self.semantic_frames = self.window_steps * lay.frames_per_grid("semantic")
        self.acoustic_frames = self.window_steps * lay.frames_per_grid("acoustic")
        self.seq_len = self._lengths(self.window_steps)[2]

    def __repr__(self):
        return f"Stage({self.name!r}, window={self.window_seconds}s, vocab={self.vocab_size}, seq_len={self.seq_len})"

    # -- offsets -------------------------------------------------------------------------------

    def cond_offset(self, level: int) -> int:
        return self.ranges["cond"][0] + level * self.layout.cond_codebook

    @property
    def semantic_offset(self) -> int:
        return self.ranges["semantic"][0]

    def acoustic_offset(self, level: int) -> int:
        if not 0 <= level < self.acoustic_levels_in_vocab:
            raise ValueError(f"acoustic level {level} is not in the {self.name} vocabulary")
        return self.ranges["acoustic"][0] + level * self.layout.acoustic_codebook

    def target_range(self, step: int | None = None) -> tuple[int, int]:
        """Vocabulary range [start, stop) of target token number ``step`` (any step for semantic)."""
        if self.name == "semantic":
            return self.ranges["semantic"]
        q = self.target_levels[(step or 0) % len(self.target_levels)]
        start = self.acoustic_offset(q)
        return start, start + self.layout.acoustic_codebook

    # -- lengths -------------------------------------------------------------------------------

    def _lengths(self, steps: int) -> tuple[int, int, int]:
        """(prefix length incl. the SEP before the target, target length, total) for `steps` grid steps."""
        lay = self.layout
        n_s = steps * lay.frames_per_grid("semantic")
        n_a = steps * lay.frames_per_grid("acoustic")
        head = 2 + lay.cond_levels  # BOS cond SEP
        if self.name == "semantic":
            prefix, target = head, n_s
        elif self.name == "coarse":
            prefix, target = head + n_s + 1, n_a * lay.coarse_levels
        else:
            prefix, target = head + n_a * lay.coarse_levels + 1, n_a * lay.fine_levels
        return prefix, target, prefix + target

    def target_length(self, seconds: float | None = None) -> int:
        """Number of target tokens for ``seconds`` of audio (default: the full window), on the grid."""
        steps = self.window_steps if seconds is None else int(_fraction(seconds) / self.layout.grid)
        return self._lengths(steps)[1]

    # -- windows -------------------------------------------------------------------------------

    def crop(self, sample: dict, rng: np.random.Generator | None = None, start_step: int | None = None) -> dict:
        """Cut this stage's window from a shard sample.

        Returns {"semantic": int64 [n_s] | None, "acoustic": int64 [Q, n_a] | None, "cond": int64 [K],
        "start_seconds": float, "seconds": float, "steps": int}. The offset is a random whole number
        of grid steps (``rng``), or ``start_step``; a sample shorter than the window is used whole."""
        lay = self.layout
        fs, fa = lay.frames_per_grid("semantic"), lay.frames_per_grid("acoustic")
        avail = []
        sem = ac = None
        if "semantic.npy" in sample:
            sem = np.asarray(sample["semantic.npy"]).astype(np.int64).reshape(-1)
            avail.append(len(sem) // fs)
        if "acoustic.npy" in sample:
            ac = np.asarray(sample["acoustic.npy"]).astype(np.int64)
            if ac.ndim != 2:
                raise ValueError(f"acoustic.npy must be [Q, T], got shape {ac.shape}")
            avail.append(ac.shape[1] // fa)
        if self.uses_semantic and sem is None:
            raise KeyError(f"stage {self.name} needs semantic.npy (sample {sample.get('__key__')})")
        if self.uses_acoustic and ac is None:
            raise KeyError(f"stage {self.name} needs acoustic.npy (sample {sample.get('__key__')})")
        n_avail = min(avail)
        if n_avail > self.window_steps:
            if start_step is None:
                rng = rng if rng is not None else np.random.default_rng()
                start_step = int(rng.integers(0, n_avail - self.window_steps + 1))
            start_step = min(max(int(start_step), 0), n_avail - self.window_steps)
            steps = self.window_steps
        else:
            start_step, steps = 0, n_avail
        out = {"semantic": None, "acoustic": None}
        if self.uses_semantic:
            out["semantic"] = sem[start_step * fs : (start_step + steps) * fs]
        if self.uses_acoustic:
            if ac.shape[0] < lay.acoustic_levels:
                raise ValueError(f"acoustic.npy has {ac.shape[0]} levels, the layout needs {lay.acoustic_levels}")
            out["acoustic"] = ac[: lay.acoustic_levels, start_step * fa : (start_step + steps) * fa]
        cond = np.asarray(sample["cond.npy"]).astype(np.int64)
        cond = cond.reshape(1, -1) if cond.ndim == 1 else cond
        out["cond"] = cond[self.namespace_index, : lay.cond_levels]
        if out["cond"].shape[0] != lay.cond_levels:
            raise ValueError(f"cond.npy has {out['cond'].shape[0]} tokens, the layout needs {lay.cond_levels}")
        out["start_seconds"] = float(start_step * lay.grid)
        out["seconds"] = float(steps * lay.grid)
        out["steps"] = steps
        return out

    # -- token ids -----------------------------------------------------------------------------

    def _check(self, x: np.ndarray, hi: int, what: str):
        if x.size and (x.min() < 0 or x.max() >= hi):
            raise ValueError(f"{what} ids out of range [0, {hi}): min {x.min()}, max {x.max()}")

    def cond_ids(self, cond) -> np.ndarray:
        """K conditioning codes -> token ids; None -> K NULL_COND tokens."""
        K = self.layout.cond_levels
        if cond is None:
            return np.full(K, NULL_COND, dtype=np.int64)
        cond = np.asarray(cond, dtype=np.int64).reshape(-1)
        if cond.shape[0] != K:
            raise ValueError(f"expected {K} conditioning tokens, got {cond.shape[0]}")
        self._check(cond, self.layout.cond_codebook, "conditioning")
        return cond + self.cond_offset(0) + np.arange(K) * self.layout.cond_codebook

    def semantic_ids(self, semantic) -> np.ndarray:
        s = np.asarray(semantic, dtype=np.int64).reshape(-1)
        self._check(s, self.layout.semantic_vocab, "semantic")
        return s + self.semantic_offset

    def acoustic_ids(self, codes, levels) -> np.ndarray:
        """codes [len(levels), T] of the given (0-based) levels -> frame-major flat ids [T * len(levels)]."""
        codes = np.asarray(codes, dtype=np.int64)
        levels = list(levels)
        if codes.ndim != 2 or codes.shape[0] != len(levels):
            raise ValueError(f"acoustic codes must be [{len(levels)}, T], got {codes.shape}")
        self._check(codes, self.layout.acoustic_codebook, "acoustic")
        offs = np.array([self.acoustic_offset(q) for q in levels], dtype=np.int64)
        return (codes.T + offs[None, :]).reshape(-1)

    def build(self, cond, semantic=None, acoustic=None) -> tuple[np.ndarray, int]:
        """The unpadded sequence for a (cropped) window and the index of its first target token.

        ``acoustic`` is [>= Q used levels, T_a] with all levels (coarse stage: levels 0..Qc-1 are
        the target; fine stage: 0..Qc-1 the prefix, Qc..Q-1 the target)."""
        lay = self.layout
        parts = [np.array([BOS]), self.cond_ids(cond), np.array([SEP])]
        if self.name == "semantic":
            target = self.semantic_ids(semantic)
        elif self.name == "coarse":
            parts += [self.semantic_ids(semantic), np.array([SEP])]
            target = self.acoustic_ids(acoustic[: lay.coarse_levels], self.target_levels)
        else:
            parts += [self.acoustic_ids(acoustic[: lay.coarse_levels], range(lay.coarse_levels)), np.array([SEP])]
            target = self.acoustic_ids(acoustic[lay.coarse_levels : lay.acoustic_levels], self.target_levels)
        prefix = np.concatenate(parts).astype(np.int64)
        return np.concatenate([prefix, target]), len(prefix)

    # -- training examples ---------------------------------------------------------------------

    def example(self, sample: dict, rng: np.random.Generator, cond_dropout: float = 0.0) -> dict:
        """One training example from a shard sample (see the module docstring for the layout)."""
        w = self.crop(sample, rng)
        dropped = bool(cond_dropout > 0 and rng.random() < cond_dropout)
        seq, t0 = self.build(None if dropped else w["cond"], w["semantic"], w["acoustic"])
        n = len(seq)
        tokens = np.full(self.seq_len, PAD, dtype=np.int64)
        tokens[:n] = seq
        loss_mask = np.zeros(self.seq_len, dtype=bool)
        loss_mask[t0 - 1 : n - 1] = True  # position i predicts token i+1, a target token
        level = np.full(self.seq_len, -1, dtype=np.int64)
        if self.target_levels:
            n_t = n - t0
            nl = len(self.target_levels)
            level[t0 - 1 : n - 1] = np.array(self.target_levels)[np.arange(n_t) % nl]
        return {
            "tokens": torch.from_numpy(tokens),
            "loss_mask": torch.from_numpy(loss_mask),
            "level": torch.from_numpy(level),
            "cond_dropped": torch.tensor(dropped),
        }

    @staticmethod
    def collate(examples: list[dict]) -> dict:
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}

    def loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """Cross-entropy on the target tokens only (mean over them), computed in fp32.

        Metrics (detached fp32 tensors): "loss", "accuracy", "tokens" (target tokens in the batch),
        and for acoustic stages "loss/level_q" per target level q (0-based)."""
        tokens, mask = batch["tokens"], batch["loss_mask"].bool()
        targets = F.pad(tokens[:, 1:], (0, 1), value=PAD)  # targets[i] = tokens[i + 1]
        mask = mask[:, : logits.size(1)]
        lg = logits[mask].float()  # [N, V]
        tgt = targets[:, : logits.size(1)][mask]
        n = tgt.numel()
        if n == 0:
            zero = logits.sum() * 0.0
            return zero, {
                "loss": zero.detach().float(),
                "accuracy": zero.detach().float(),
                "tokens": torch.zeros((), device=logits.device),
            }
        per_tok = F.cross_entropy(lg, tgt, reduction="none")
        loss = per_tok.mean()
        with torch.no_grad():
            metrics = {
                "loss": loss.detach(),
                "accuracy": (lg.argmax(-1) == tgt).float().mean(),
                "tokens": torch.tensor(float(n), device=logits.device),
            }
            if self.target_levels:
                lv = batch["level"][:, : logits.size(1)][mask]
                for q in self.target_levels:
                    sel = lv == q
                    metrics[f"loss/level_{q}"] = (
                        per_tok[sel].mean() if sel.any() else torch.zeros((), device=logits.device)
                    )
        return loss, metrics

    # -- generation helpers --------------------------------------------------------------------

    def prefix(self, cond=None, semantic=None, coarse=None) -> torch.Tensor:
        """Generation prefix, ending with the SEP before the target (LongTensor [L]).

        cond: K conditioning codes, or None for the null-conditioned prefix (classifier-free
        guidance). semantic: semantic ids (coarse stage). coarse: codes [Qc, T_a] (fine stage)."""
        parts = [np.array([BOS]), self.cond_ids(cond), np.array([SEP])]
        if self.name == "coarse":
            if semantic is None:
                raise ValueError("the coarse stage needs semantic ids")
            parts += [self.semantic_ids(semantic), np.array([SEP])]
        elif self.name == "fine":
            if coarse is None:
                raise ValueError("the fine stage needs coarse codes [Qc, T]")
            coarse = np.asarray(coarse)[: self.layout.coarse_levels]
            parts += [self.acoustic_ids(coarse, range(self.layout.coarse_levels)), np.array([SEP])]
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    def target_logits_mask(self, n: int, device=None) -> torch.Tensor:
        """bool [n, vocab_size]: row t allows only the range of target token t (frame-major levels)."""
        m = torch.zeros(n, self.vocab_size, dtype=torch.bool, device=device)
        for t in range(min(n, max(1, len(self.target_levels)))):
            a, b = self.target_range(t)
            m[t :: max(1, len(self.target_levels)), a:b] = True
        return m

    def decode_target(self, ids) -> np.ndarray:
        """Generated target ids -> semantic ids [T] or acoustic codes [n_target_levels, T]
        (a trailing incomplete frame is dropped)."""
        ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        ids = ids.astype(np.int64).reshape(-1)
        if self.name == "semantic":
            out = ids - self.semantic_offset
            self._check(out, self.layout.semantic_vocab, "generated semantic")
            return out
        nl = len(self.target_levels)
        T = len(ids) // nl
        frames = ids[: T * nl].reshape(T, nl)
        offs = np.array([self.acoustic_offset(q) for q in self.target_levels])
        codes = (frames - offs[None, :]).T
        self._check(codes, self.layout.acoustic_codebook, "generated acoustic")
        return codes

    # -- plumbing ------------------------------------------------------------------------------

    def expected_fingerprint_fields(self) -> dict:
        """Tokenizer fingerprint fields the shards must match for this stage."""
        lay = self.layout
        out = {"quantizer": {"levels": lay.cond_levels, "codebook_size": lay.cond_codebook}}
        if self.uses_semantic:
            out["semantic"] = {"frame_rate": lay.semantic_rate, "vocab_size": lay.semantic_vocab}
        if self.uses_acoustic:
            out["acoustic"] = {
                "frame_rate": lay.acoustic_rate,
                "levels": lay.acoustic_levels,
                "codebook_size": lay.acoustic_codebook,
            }
        return out

    def model_config(self, preset: str = "small", **overrides) -> TransformerConfig:
        """TransformerConfig for this stage: the preset's sizes, this stage's vocab and seq_len."""
        return TransformerConfig.from_preset(
            preset, **{"vocab_size": self.vocab_size, "max_seq_len": self.seq_len, **overrides}
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "window_seconds": self.window_seconds,
            "vocab_size": self.vocab_size,
            "used_vocab": self.used_vocab,
            "seq_len": self.seq_len,
            "ranges": dict(self.ranges),
            "semantic_frames": self.semantic_frames if self.uses_semantic else 0,
            "acoustic_frames": self.acoustic_frames if self.uses_acoustic else 0,
            "target_levels": list(self.target_levels),
        }


def get_stage(
    name: str, tokens: dict | TokenLayout | None = None, window_seconds: float | None = None, vocab_multiple: int = 64
) -> Stage:
    """The stage ``name`` for a ``tokens:`` config. Window: ``window_seconds``, else
    ``tokens["window_seconds"][name]`` when the config carries it, else the paper's (30 / 10 / 3 s)."""
    if window_seconds is None:
        windows = (tokens or {}).get("window_seconds", {}) if isinstance(tokens, dict) else {}
        window_seconds = windows.get(name, PAPER_WINDOWS.get(name))
    return Stage(name, TokenLayout.from_config(tokens), float(window_seconds), vocab_multiple=vocab_multiple)
