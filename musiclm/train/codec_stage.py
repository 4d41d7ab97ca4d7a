"""The ``codec`` training stage: SoundStream (generator) + MS-STFT discriminator on audio shards.

``deepspeed launch/train.py --stage codec --config launch/configs/codec.yaml --deepspeed_config ...``
trains :class:`musiclm.codec.soundstream.SoundStream` on the audio shards of ``ray_jobs/pack_audio.py``.
The generator is the run's main engine; the discriminator is a second DeepSpeed engine
(``Trainer.make_engine``: its own optimizer, warmup + cosine schedule, ``train/lr/disc``,
``train/grad_norm/disc``, checkpointed and resumed), created on the first step with a fixed seed so
every rank starts equal. Config keys read here (the rest belong to the engine)::

    model: {preset: demo, ...}        # musiclm.codec.soundstream config (preset + overrides)
    codec:
      crop_seconds: 1.0               # random crop per sample (shorter samples: zero-padded)
      min_seconds: 0.25               # shorter samples are skipped and recorded
      adversarial: true               # false: reconstruction only, no discriminator engine
      adversarial_after: 0            # steps of reconstruction-only warm-up before the GAN losses
      disc_channels: 32
      d_lr_scale: 1.0                 # discriminator lr = generator lr x this
      loss: {mel: 15, l1: 0.1, adv: 1, feat: 2, commit: 0.25}   # musiclm.codec.losses
      media_clips: 2                  # eval clips logged as audio + spectrogram images
      skip_log: null                  # JSONL of skipped samples (default <run_dir>/skipped_samples.jsonl)
      inject_nan_at_step: null        # fault injection (tests): that step's batch is NaN on rank
      inject_nan_rank: 0              #   inject_nan_rank only; the guard must skip it on every rank

One step: the generator's forward (EMA codebook updates, k-means init on the first batch, dead-code
restarts, quantizer dropout); if the GAN is on, a discriminator step (hinge) on the real batch and
the detached reconstruction; then the generator step through the discriminator with its parameters
frozen (no discriminator gradient is left behind). **Non-finite guard**: each engine's loss is
checked on every rank and the flag all-reduced *before* backward; if any rank sees NaN/inf, every
rank skips that engine's backward and step (no gradient, no optimizer or schedule update) and the
quantizer's codebook buffers are restored to their state before the forward (EMA statistics of a
bad batch never land). Non-finite *gradients* of a finite loss are caught by DeepSpeed's ZeRO-1/2
overflow check (global grad norm not finite -> gradients dropped, step skipped on every rank);
both kinds are logged per step as ``train/skipped/generator`` and ``train/skipped/disc`` (1 = skipped).

Logged every step: ``loss/mel``, ``loss/l1``, ``loss/commit``, ``loss/adv``, ``loss/feat``,
``loss/disc``, ``disc_accuracy``, ``codebook/perplexity/level_<q>``, ``codebook/restarts/level_<q>``
(this step), ``codebook/restarts_total``, ``n_quantizers`` (mean levels used under dropout).
Held-out (``eval_step``): multi-scale mel distance (``eval/loss``), SI-SNR, waveform L1. Whole split
(``eval_outputs``/``eval_summary``): SI-SNR and mel distance for 1 level, the coarse levels and all
levels, the mel distance below 150 Hz, and for the first ``media_clips`` eval clips the
reconstruction (TensorBoard ``add_audio``) and an original-over-reconstruction log-mel image.

Export: ``musiclm export RUN --out DIR/model.safetensors`` writes ``model.json`` beside it with the
codec config; ``DIR`` then loads as ``tokenizers: acoustic: {type: soundstream, model: DIR}``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch

from musiclm.codec.losses import (
    DEFAULT_LOSS_WEIGHTS,
    MultiScaleMelLoss,
    MultiScaleSTFTDiscriminator,
    _mel_fb,
    discriminator_accuracy,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    log_mel,
    mel_distance,
    si_snr,
)
from musiclm.codec.soundstream import SoundStream, resolve_soundstream_config
from musiclm.train.audio_samples import SkippedSamples, decode_sample_audio
from musiclm.train.spec import TrainSpec, register_train_spec

log = logging.getLogger(__name__)

__all__ = [
    "SPEC",
    "build_example",
    "build_model",
    "collate",
    "custom_step",
    "eval_outputs",
    "eval_step",
    "eval_summary",
    "loss",
    "model_config",
    "skipped_samples",
]

DEFAULTS = {
    "crop_seconds": 1.0,
    "min_seconds": 0.25,
    "adversarial": True,
    "adversarial_after": 0,
    "disc_channels": 32,
    "d_lr_scale": 1.0,
    "loss": dict(DEFAULT_LOSS_WEIGHTS),
    "media_clips": 2,
    "skip_log": None,
    "inject_nan_at_step": None,
    "inject_nan_rank": 0,
}

_LOCK = threading.Lock()
_SKIPPED: list[dict] = []
_SEEN: set = set()
_MEL: dict[int, MultiScaleMelLoss] = {}
_STATE: dict[str, Any] = {"trainer": None, "media": None, "media_pending": True}


def stage_cfg(cfg: dict) -> dict:
    c = dict(DEFAULTS)
    user = dict(cfg.get("codec") or {})
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"codec: unknown keys {unknown} (known: {sorted(DEFAULTS)})")
    c.update(user)
    w = dict(DEFAULT_LOSS_WEIGHTS)
    bad = sorted(set(c.get("loss") or {}) - set(w))
    if bad:
        raise ValueError(f"codec.loss: unknown terms {bad} (known: {sorted(w)})")
    w.update(c.get("loss") or {})
    c["loss"] = {k: float(v) for k, v in w.items()}
    return c


def model_cfg(cfg: dict) -> dict:
    return resolve_soundstream_config(cfg.get("model") or {})


def _mel_loss(sample_rate: int) -> MultiScaleMelLoss:
    with _LOCK:
        if sample_rate not in _MEL:
            _MEL[sample_rate] = MultiScaleMelLoss(sample_rate)
        return _MEL[sample_rate]


# --------------------------------------------------------------------------------------------
# examples (audio shards: flac + json per sample; bad samples skipped and recorded)
# --------------------------------------------------------------------------------------------


_SKIPS = SkippedSamples("codec")


def _record_skip(sample: dict, reason: str, cfg: dict) -> None:
    _SKIPS.record(sample, reason, cfg, stage_cfg(cfg).get("skip_log"))


def skipped_samples(clear: bool = False) -> list[dict]:
    """Samples this process skipped so far: ``[{key, url, reason, rank}]``."""
    return _SKIPS.samples(clear)


def build_example(sample: dict, rng: np.random.Generator, cfg: dict) -> dict | None:
    """One audio-shard sample -> ``{"wav": [T] float32, "length": int, "bpm": float}`` with
    ``T = crop_seconds`` at the model's rate (a multiple of the hop), or None (skipped, recorded)."""
    from musiclm.audio import resample

    mc, sc = model_cfg(cfg), stage_cfg(cfg)
    sr = int(mc["sample_rate"])
    hop = int(np.prod(mc["strides"]))
    decoded = decode_sample_audio(sample, _SKIPS, cfg, sc.get("skip_log"))
    if decoded is None:
        return None
    wav, sr_in = decoded
    if wav.size < float(sc["min_seconds"]) * sr_in:
        _record_skip(sample, f"shorter than min_seconds={sc['min_seconds']}", cfg)
        return None
    crop = max(hop, int(round(float(sc["crop_seconds"]) * sr)) // hop * hop)
    crop_in = int(np.ceil(crop * sr_in / sr))
    if wav.size > crop_in:
        start = int(rng.integers(0, wav.size - crop_in + 1))
        wav = wav[start : start + crop_in]
    x = torch.from_numpy(np.ascontiguousarray(wav))
    if sr_in != sr:
        x = resample(x, int(sr_in), sr)
    length = min(int(x.shape[-1]), crop)
    out = torch.zeros(crop)
    out[:length] = x[:length]
    js = sample.get("json") or {}
    bpm = (js.get("tags") or {}).get("bpm") if isinstance(js, dict) else None
    return {"wav": out, "length": length, "bpm": float(bpm) if isinstance(bpm, (int, float)) else float("nan")}


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    examples = [e for e in examples if e is not None]
    if not examples:
        raise ValueError("codec collate: empty batch")
    return {
        "wav": torch.stack([e["wav"] for e in examples]),
        "length": torch.as_tensor([e["length"] for e in examples], dtype=torch.long),
        "bpm": torch.as_tensor([e["bpm"] for e in examples], dtype=torch.float32),
    }


# --------------------------------------------------------------------------------------------
# model, step
# --------------------------------------------------------------------------------------------


def build_model(cfg: dict) -> SoundStream:
    stage_cfg(cfg)  # refuse bad keys before any work
    model = SoundStream(cfg.get("model") or {})
    log.info(
        "codec: SoundStream %s, %.2fM parameters, %d Hz frames, %d levels x %d codes",
        model.cfg["preset"],
        model.num_params() / 1e6,
        model.frame_rate,
        model.levels,
        model.codebook_size,
    )
    return model


def _recon_losses(out: dict, sr: int, w: dict) -> tuple[torch.Tensor, dict]:
    recon, wav = out["recon"], out["wav"]
    mel = _mel_loss(sr)(recon, wav)
    l1 = (recon - wav).abs().mean()
    commit = out["commit_loss"]
    total = w["mel"] * mel + w["l1"] * l1 + w["commit"] * commit
    return total, {"loss/mel": mel.detach(), "loss/l1": l1.detach(), "loss/commit": commit.detach()}


def loss(model: Any, batch: dict, cfg: dict) -> tuple[torch.Tensor, dict]:
    """Reconstruction objective only (what ``eval`` would use without ``eval_step``)."""
    out = model(batch["wav"])
    return _recon_losses(out, model_cfg(cfg)["sample_rate"], stage_cfg(cfg)["loss"])


def _discriminator(trainer) -> Any:
    if "disc" not in trainer.engines:
        sc = stage_cfg(trainer.cfg)
        with torch.random.fork_rng():
            torch.manual_seed(int(trainer.cfg.get("seed", 0)) + 7919)
            module = MultiScaleSTFTDiscriminator(model_cfg(trainer.cfg)["sample_rate"], int(sc["disc_channels"]))
        opt = (trainer.ds_config.get("optimizer") or {}).get("params") or {}
        lr = float(opt.get("lr", 1e-3)) * float(sc["d_lr_scale"])
        trainer.make_engine(module, "disc", {"optimizer": {"params": {"lr": lr}}})
    return trainer.engines["disc"]


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def _nonfinite(x: torch.Tensor) -> bool:
    return _any_rank(not bool(torch.isfinite(x.detach()).all()))


def _ds_skipped(engine, before: int) -> bool:
    """DeepSpeed dropped the step (ZeRO overflow check: the global grad norm was not finite)."""
    return int(getattr(engine, "skipped_steps", 0)) > before


def custom_step(trainer, batch: dict):
    _STATE["trainer"] = trainer
    gen = trainer.engine
    sc = stage_cfg(trainer.cfg)
    w = sc["loss"]
    sr = int(model_cfg(trainer.cfg)["sample_rate"])
    module = gen.module
    rvq = module.quantizer
    disc = _discriminator(trainer) if sc["adversarial"] else None
    adv_on = disc is not None and trainer.step >= int(sc["adversarial_after"])
    snapshot = {k: v.detach().clone() for k, v in rvq.named_buffers()}
    if (
        sc["inject_nan_at_step"] is not None
        and int(sc["inject_nan_at_step"]) == trainer.step + 1
        and trainer.rank == int(sc["inject_nan_rank"])
    ):
        batch = dict(batch, wav=batch["wav"] * float("nan"))

    out = gen(batch["wav"])
    recon, wav = out["recon"], out["wav"]
    nan = torch.tensor(float("nan"))
    metrics: dict[str, Any] = {
        "loss/disc": torch.zeros(()),
        "disc_accuracy": nan,
        "loss/adv": torch.zeros(()),
        "loss/feat": torch.zeros(()),
        "skipped/disc": 0.0,
        "skipped/generator": 0.0,
    }

    # discriminator step (hinge) on the real batch and the detached reconstruction
    if adv_on:
        real_logits, _ = disc(wav)
        fake_logits, _ = disc(recon.detach())
        d_loss = hinge_d_loss(real_logits, fake_logits)
        metrics["loss/disc"] = d_loss.detach()
        metrics["disc_accuracy"] = discriminator_accuracy(real_logits, fake_logits).detach()
        if _nonfinite(d_loss):
            metrics["skipped/disc"] = 1.0
        else:
            before = int(getattr(disc, "skipped_steps", 0))
            disc.backward(d_loss)
            disc.step()
            metrics["skipped/disc"] = 1.0 if _ds_skipped(disc, before) else 0.0

    # generator step: reconstruction (+ adversarial and feature matching through a frozen D)
    g_loss, rec_metrics = _recon_losses(out, sr, w)
    metrics.update(rec_metrics)
    if adv_on:
        for p in disc.module.parameters():
            p.requires_grad_(False)
        try:
            with torch.no_grad():
                _, real_feats = disc(wav)
            fake_logits, fake_feats = disc(recon)
            adv = hinge_g_loss(fake_logits)
            feat = feature_matching_loss(real_feats, fake_feats)
        finally:
            for p in disc.module.parameters():
                p.requires_grad_(True)
        g_loss = g_loss + w["adv"] * adv + w["feat"] * feat
        metrics["loss/adv"], metrics["loss/feat"] = adv.detach(), feat.detach()
    if _nonfinite(g_loss):
        metrics["skipped/generator"] = 1.0
        with torch.no_grad():  # the EMA/k-means updates of this forward never land
            for k, v in rvq.named_buffers():
                v.copy_(snapshot[k])
        if trainer.rank == 0:
            trainer.log(f"step {trainer.step + 1}: non-finite generator loss on some rank: step skipped on every rank")
    else:
        before = int(getattr(gen, "skipped_steps", 0))
        gen.backward(g_loss)
        gen.step()
        if _ds_skipped(gen, before):
            metrics["skipped/generator"] = 1.0
            if trainer.rank == 0:
                trainer.log(f"step {trainer.step + 1}: non-finite gradient: DeepSpeed skipped the generator step")

    stats = rvq.stats
    for q in range(module.levels):
        metrics[f"codebook/perplexity/level_{q + 1}"] = float(stats["perplexity"][q])
        metrics[f"codebook/restarts/level_{q + 1}"] = float(stats["restarts"][q])
    metrics["codebook/restarts_total"] = float(rvq.restarts.sum()) if hasattr(rvq, "restarts") else 0.0
    metrics["n_quantizers"] = float(stats["n_quantizers"])
    metrics["adversarial"] = 1.0 if adv_on else 0.0
    return g_loss.detach(), metrics


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def eval_step(model: Any, batch: dict, cfg: dict) -> tuple[torch.Tensor, dict]:
    """Held-out reconstruction with every level: multi-scale mel distance (the loss), SI-SNR, L1."""
    sr = model_cfg(cfg)["sample_rate"]
    out = model(batch["wav"])
    mel = _mel_loss(sr)(out["recon"], out["wav"])
    return mel, {"si_snr": si_snr(out["recon"], out["wav"]).mean(), "l1": (out["recon"] - out["wav"]).abs().mean()}


def _level_counts(mc: dict) -> dict[str, int]:
    return {"1": 1, "coarse": int(mc["coarse_levels"]), "all": int(mc["levels"])}


def eval_outputs(model: Any, batch: dict, cfg: dict) -> dict:
    """Per clip: SI-SNR and mel distance for 1 / coarse / all levels, mel distance below 150 Hz."""
    mc = model_cfg(cfg)
    sr = int(mc["sample_rate"])
    rows: dict[str, torch.Tensor] = {}
    recon_all = None
    for name, k in _level_counts(mc).items():
        out = model(batch["wav"], n_quantizers=k)
        rows[f"si_snr/{name}"] = si_snr(out["recon"], out["wav"])
        rows[f"mel/{name}"] = _mel_loss(sr).per_example(out["recon"], out["wav"])
        recon_all, wav = out["recon"], out["wav"]
    rows["mel_below_150hz/all"] = mel_distance(recon_all, wav, sr, max_hz=150.0)
    if _STATE["media_pending"] and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        n = int(stage_cfg(cfg)["media_clips"])
        _STATE["media"] = (wav[:n].detach().float().cpu(), recon_all[:n].detach().float().cpu(), sr)
        _STATE["media_pending"] = False
    return rows


def _spectrogram_image(orig: torch.Tensor, recon: torch.Tensor, sr: int) -> np.ndarray:
    """``[3, H, W]`` float image in [0, 1]: log-mel of the original (top) over the reconstruction."""
    n_fft = 2 ** int(round(np.log2(1024 * sr / 24000)))
    fb = _mel_fb(sr, n_fft, 80)
    a = log_mel(orig[None], fb, n_fft, n_fft // 4)[0].flip(0)
    b = log_mel(recon[None], fb, n_fft, n_fft // 4)[0].flip(0)
    lo, hi = float(a.max()) - 6.0, float(a.max())
    img = torch.cat([a, torch.full((2, a.shape[1]), lo), b], 0)
    img = ((img - lo) / (hi - lo)).clamp(0, 1).numpy()
    return np.stack([img, img**2, 1 - img])  # a simple colour map without matplotlib


def _log_media() -> None:
    trainer, media = _STATE["trainer"], _STATE["media"]
    _STATE["media"], _STATE["media_pending"] = None, True
    writer = getattr(getattr(trainer, "monitor", None), "writer", None)
    if writer is None or media is None:
        return
    wav, recon, sr = media
    for i in range(wav.shape[0]):
        peak = max(float(recon[i].abs().max()), 1.0)
        writer.add_audio(f"eval_audio/clip_{i}/reconstruction", (recon[i] / peak)[None], trainer.step, sample_rate=sr)
        if trainer.step <= 0 or not getattr(trainer, "_codec_originals_logged", False):
            writer.add_audio(f"eval_audio/clip_{i}/original", wav[i][None], trainer.step, sample_rate=sr)
        writer.add_image(
            f"eval_spectrogram/clip_{i}", _spectrogram_image(wav[i], recon[i], sr), trainer.step, dataformats="CHW"
        )
    trainer._codec_originals_logged = True
    writer.flush()


def eval_summary(outputs: dict, cfg: dict) -> dict:
    """Means over the eval split (rank 0), and the media of the fixed eval clips to TensorBoard."""
    out = {k: float(v.double().mean()) for k, v in outputs.items()}
    out["clips"] = float(next(iter(outputs.values())).shape[0])
    try:
        _log_media()
    except Exception as e:  # media must never stop training
        log.warning("codec: could not log eval audio/images: %s", e)
    return out


def count_tokens(batch: dict) -> int:
    """Audio samples in the batch (tokens/s = audio samples per second; / sample rate = real-time factor)."""
    return int(batch["wav"].numel())


def flops_per_token(model: Any, cfg: dict) -> float:
    """Training FLOPs per audio sample: 6 x the parameters each sample passes through (convs run
    per sample before the strides, per frame after) -- estimated as 6 x N x (receptive share) ~ 6 x
    the encoder/decoder parameters / hop x sum of strides. A rough figure for MFU."""
    m = getattr(model, "module", model)
    n = sum(p.numel() for p in m.parameters())
    return 6.0 * n / max(1, m.hop_length) * sum(m.cfg["strides"])


def model_config(cfg: dict) -> dict:
    """Written beside exported weights: :func:`musiclm.codec.soundstream.load_soundstream` reads it."""
    return {"kind": "musiclm.soundstream", "model": model_cfg(cfg)}


SPEC = register_train_spec(
    TrainSpec(
        name="codec",
        data_kind="audio",
        build_model=build_model,
        build_example=build_example,
        collate=collate,
        loss=loss,
        custom_step=custom_step,
        config_keys=("model", "codec"),
        eval_step=eval_step,
        count_tokens=count_tokens,
        flops_per_token=flops_per_token,
        model_config=model_config,
        eval_outputs=eval_outputs,
        eval_summary=eval_summary,
        description="SoundStream codec: generator + MS-STFT discriminator (musiclm.codec)",
    ),
    overwrite=True,
)
