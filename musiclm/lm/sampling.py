"""One sampler for every stage: sliding windows over any duration, streams kept aligned.

A stage LM is trained on windows of ``Stage.window_seconds`` (semantic 30 s, coarse 10 s, fine 3 s
in the paper; 10 / 5 / 2 s in the demo). A longer piece is sampled window by window on the stage's
time grid (``TokenLayout.grid``, e.g. 40 ms for 25 Hz semantic and 75 Hz acoustic tokens):

    window 1   [0 ............. W)                   every step sampled
    window 2          [W-c ....... 2W-c)             the first c steps are the previous window's
    window 3                 [2W-2c ..... 3W-2c)     tokens (forced context), the rest sampled

``c = round(overlap * W)`` steps of context (``overlap`` = 0.5 by default), so each window after
the first samples ``W - c`` new steps while it sees the last ``c`` steps it continues. The
conditioning stream of a window (semantic ids for the coarse stage, coarse codes for the fine
stage) is cut from the same grid steps as the window, so window t of the coarse stage sees the
semantic ids of exactly its own seconds. The last window samples only what is left, so the output
has exactly ``steps`` grid steps.

Known tokens at the start (a prompt clip to continue) are the forced context of the first
windows. Conditioning tokens can change over time (story mode): a window never samples across a
switch time (the planner cuts windows there), and each window uses the conditioning of the
segment its sampled steps are in.

All candidates (the batch) share the windows and go through ``Transformer.sample`` together:
one KV-cached forward per token for the whole batch (2x the batch with classifier-free
guidance). One ``torch.Generator`` drives every draw, so the same seed gives the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .model import Transformer
from .stages import Stage

__all__ = [
    "PAPER_SAMPLING",
    "SAMPLING_SOURCE",
    "SamplingSettings",
    "StageSample",
    "Window",
    "plan_windows",
    "sample_stage",
]


@dataclass
class SamplingSettings:
    """How one stage draws its tokens (see ``Transformer.sample``)."""

    temperature: float = 1.0
    top_k: int | None = None  # None or 0: no top-k truncation
    top_p: float | None = None  # None or 1.0: no nucleus truncation
    cond_scale: float = 3.0  # classifier-free guidance; 1.0 = plain conditional sampling

    def __post_init__(self):
        if self.temperature is None or not math.isfinite(float(self.temperature)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 0):
            raise ValueError(f"top_k must be a whole number >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0 < float(self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.cond_scale is None or not math.isfinite(float(self.cond_scale)) or self.cond_scale < 0:
            raise ValueError(f"cond_scale must be >= 0 (1 = no guidance), got {self.cond_scale}")
        self.temperature = float(self.temperature)
        self.top_k = int(self.top_k) if self.top_k else None
        self.top_p = float(self.top_p) if self.top_p is not None and self.top_p < 1 else None
        self.cond_scale = float(self.cond_scale)

    def replace(self, **overrides) -> SamplingSettings:
        unknown = set(overrides) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown sampling settings {sorted(unknown)}; known: {sorted(asdict(self))}")
        return SamplingSettings(**{**asdict(self), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# The MusicLM paper (Agostinelli et al. 2023, arXiv 2301.11325) samples with temperature 1.0
# (semantic), 0.95 (coarse) and 0.4 (fine), as AudioLM, from the full distribution (no top-k/top-p).
# It has no classifier-free guidance: 3.0 is MusicGen's scale and the open audiolm/musiclm-pytorch
# samplers' default; the stages learn the unconditional model from their conditioning dropout.
# A package's ``sampling`` section (musiclm.package) overrides these.
SAMPLING_SOURCE = (
    "temperatures: MusicLM (arXiv 2301.11325), 1.0 / 0.95 / 0.4 as AudioLM; top_k / top_p off; "
    "cond_scale 3.0: MusicGen (arXiv 2306.05284), the paper has no CFG"
)
PAPER_SAMPLING: dict[str, SamplingSettings] = {
    "semantic": SamplingSettings(temperature=1.0, cond_scale=3.0),
    "coarse": SamplingSettings(temperature=0.95, cond_scale=3.0),
    "fine": SamplingSettings(temperature=0.4, cond_scale=3.0),
}


@dataclass(frozen=True)
class Window:
    """One window on the grid: tokens of steps [start, sampled_from) are forced context, steps
    [sampled_from, end) are sampled; ``segment`` indexes the conditioning it uses."""

    start: int
    sampled_from: int
    end: int
    segment: int


def plan_windows(
    total_steps: int,
    window_steps: int,
    overlap: float = 0.5,
    known_steps: int = 0,
    switch_steps: Sequence[int] = (0,),
) -> list[Window]:
    """The windows covering ``total_steps`` grid steps, for a stage of ``window_steps`` steps.

    ``known_steps``: steps already given at the start (a prompt), never resampled.
    ``switch_steps``: step where each conditioning segment starts (ascending, the first is 0); a
    window never samples across one. Every window is at most ``window_steps`` long and samples at
    least one step; together they sample steps [known_steps, total_steps) exactly once."""
    if window_steps < 1:
        raise ValueError("window_steps must be >= 1")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    switches = sorted(set(int(s) for s in switch_steps) | {0})
    context = min(int(round(overlap * window_steps)), window_steps - 1)
    hop = window_steps - context
    windows: list[Window] = []
    done = min(max(int(known_steps), 0), total_steps)
    while done < total_steps:
        new = window_steps if done == 0 else hop
        segment = max(i for i, s in enumerate(switches) if s <= done)
        nxt = switches[segment + 1] if segment + 1 < len(switches) else total_steps
        end = min(done + new, total_steps, nxt)
        start = max(0, end - window_steps)  # as much context as fits in the window
        windows.append(Window(start, done, end, segment))
        done = end
    return windows


@dataclass
class StageSample:
    """What :func:`sample_stage` returns."""

    target: np.ndarray  # semantic ids [B, T_s] or acoustic codes of the stage's levels [B, L, T_a]
    windows: list[Window]
    conditioning: list[list[int]]  # the conditioning token ids each window used (prefix positions 1..K)
    logits: list[torch.Tensor] = field(default_factory=list)  # per window [B, n_new, V] when asked for


def _steps_len(stage: Stage, steps: int) -> int:
    return stage._lengths(steps)[1]


@torch.no_grad()
def sample_stage(
    stage: Stage,
    model: Transformer,
    steps: int,
    batch_size: int,
    conds: Sequence[np.ndarray | None],
    *,
    switch_steps: Sequence[int] = (0,),
    semantic: np.ndarray | None = None,
    coarse: np.ndarray | None = None,
    known: np.ndarray | None = None,
    settings: SamplingSettings | None = None,
    generator: torch.Generator | None = None,
    overlap: float = 0.5,
    use_cache: bool = True,
    return_logits: bool = False,
    progress: Callable[[int], None] | None = None,
) -> StageSample:
    """Sample ``steps`` grid steps of ``stage``'s target stream for ``batch_size`` candidates.

    Args:
        conds: the stage's K conditioning codes per conditioning segment (``None`` = NULL_COND,
            unconditional); segment i starts at ``switch_steps[i]``.
        semantic: int [B, >= steps * fs] semantic ids (coarse stage).
        coarse: int [B, >= Qc, >= steps * fa] coarse codes (fine stage).
        known: target stream given at the start (semantic ids [B, n] or codes [B, L, n]); its whole
            grid steps are kept and continued.
        progress: called with 1 after every sampled target token (a progress bar's ``update``).

    Returns the target stream of exactly ``steps`` grid steps (semantic ids [B, steps * fs], or
    the stage's acoustic levels [B, L, steps * fa]).
    """
    lay = stage.layout
    fs, fa = lay.frames_per_grid("semantic"), lay.frames_per_grid("acoustic")
    settings = settings or SamplingSettings()
    if len(conds) != len(switch_steps):
        raise ValueError(f"{len(conds)} conditioning segments for {len(switch_steps)} switch steps")
    if stage.name == "coarse" and (semantic is None or semantic.shape[-1] < steps * fs):
        raise ValueError(f"the coarse stage needs semantic ids [B, >= {steps * fs}]")
    if stage.name == "fine" and (coarse is None or coarse.shape[-1] < steps * fa):
        raise ValueError(f"the fine stage needs coarse codes [B, Qc, >= {steps * fa}]")
    device = next(model.parameters()).device

    per_step = _steps_len(stage, 1)
    target = torch.zeros(batch_size, steps * per_step, dtype=torch.long)
    known_steps = 0
    if known is not None:
        known = np.asarray(known)
        frames = known.shape[-1]
        known_steps = min(frames // (fs if stage.name == "semantic" else fa), steps)
        if known_steps:
            if stage.name == "semantic":
                ids = np.stack([stage.semantic_ids(k[: known_steps * fs]) for k in known])
            else:
                ids = np.stack([stage.acoustic_ids(k[:, : known_steps * fa], stage.target_levels) for k in known])
            if ids.shape[0] != batch_size:
                ids = np.broadcast_to(ids, (batch_size, ids.shape[1]))
            target[:, : known_steps * per_step] = torch.from_numpy(np.ascontiguousarray(ids))

    windows = plan_windows(steps, stage.window_steps, overlap, known_steps, switch_steps)
    used_conds: list[list[int]] = []
    all_logits: list[torch.Tensor] = []
    for w in windows:
        cond = conds[w.segment]
        guided = cond is not None and settings.cond_scale != 1.0
        rows, null_rows = [], []
        for b in range(batch_size):
            kw = {}
            if stage.name == "coarse":
                kw["semantic"] = semantic[b, w.start * fs : w.end * fs]
            elif stage.name == "fine":
                kw["coarse"] = coarse[b, : lay.coarse_levels, w.start * fa : w.end * fa]
            rows.append(stage.prefix(cond, **kw))
            if guided:
                null_rows.append(stage.prefix(None, **kw))
        forced = target[:, w.start * per_step : w.sampled_from * per_step]
        prefix = torch.cat([torch.stack(rows), forced], dim=1).to(device)
        null = torch.cat([torch.stack(null_rows), forced], dim=1).to(device) if guided else None
        used_conds.append(rows[0][1 : 1 + lay.cond_levels].tolist())
        n_new = (w.end - w.sampled_from) * per_step
        out = model.sample(
            prefix,
            n_new,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            cond_scale=settings.cond_scale if guided else 1.0,
            logits_mask=stage.target_logits_mask(n_new),  # windows start on whole frames: level order holds
            null_prefix=null,
            generator=generator,
            use_cache=use_cache,
            return_logits=return_logits,
            on_token=progress,
        )
        if return_logits:
            out, lg = out
            all_logits.append(lg.cpu())
        target[:, w.sampled_from * per_step : w.end * per_step] = out.cpu()

    decoded = np.stack([stage.decode_target(row) for row in target])
    return StageSample(target=decoded, windows=windows, conditioning=used_conds, logits=all_logits)
