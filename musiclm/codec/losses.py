"""Codec training losses, discriminator and metrics (the ``codec`` stage and ``musiclm eval codec``).

Recipe (loss weights in the run config's ``codec.loss`` section; defaults in ``DEFAULT_LOSS_WEIGHTS``):

* reconstruction: multi-scale log-mel L1 (:class:`MultiScaleMelLoss`, the windows of
  descript-audio-codec's ``MelSpectrogramLoss``: 32 ... 2048 samples, scaled by sample rate) plus a
  small waveform L1 (audiocraft's ``l1: 0.1``);
* adversarial: EnCodec's multi-scale STFT discriminator (:class:`MultiScaleSTFTDiscriminator`,
  audiocraft ``msstftd``: complex STFT at 3 resolutions, 2-D convs dilated in time) with the hinge
  loss (SoundStream, EnCodec) and L1 feature matching normalised by the real features' mean
  magnitude (audiocraft's ``FeatureMatchingLoss``); switched on after ``codec.adversarial_after``
  steps;
* commitment: the residual VQ's (codebooks themselves are EMA-updated, no codebook loss).

Weights follow descript-audio-codec's ``conf/base.yml`` (mel 15, adversarial 1, feature matching 2,
commitment 0.25), because they are tuned for a plain weighted sum: audiocraft's weights (adv 4,
feat 4, msspec 2, l1 0.1) assume its gradient balancer, which needs one extra backward per loss term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "MultiScaleMelLoss",
    "MultiScaleSTFTDiscriminator",
    "feature_matching_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "log_mel",
    "mel_distance",
    "si_snr",
]

DEFAULT_LOSS_WEIGHTS = {"mel": 15.0, "l1": 0.1, "adv": 1.0, "feat": 2.0, "commit": 0.25}


def _mel_fb(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> torch.Tensor:
    import torchaudio.functional as AF

    return AF.melscale_fbanks(
        n_fft // 2 + 1, fmin, float(fmax or sample_rate / 2), n_mels, sample_rate, norm="slaney", mel_scale="slaney"
    )  # [n_freqs, n_mels]


def _windows(sample_rate: int) -> list[int]:
    """DAC's mel windows (32 ... 2048 at 44.1 kHz), scaled to the rate, powers of two, >= 64."""
    scale = sample_rate / 44100
    out = []
    for w in (32, 64, 128, 256, 512, 1024, 2048):
        n = 2 ** max(6, int(round(math.log2(w * scale))))
        if n not in out:
            out.append(n)
    return out


def log_mel(wav: torch.Tensor, fb: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """``[B, T]`` -> log10 mel ``[B, n_mels, frames]`` (power 2, clamped at 1e-5)."""
    window = torch.hann_window(n_fft, device=wav.device, dtype=wav.dtype)
    spec = torch.stft(wav, n_fft, hop, window=window, return_complex=True, center=True, pad_mode="reflect")
    power = spec.real**2 + spec.imag**2
    mel = torch.einsum("bft,fm->bmt", power, fb.to(wav.dtype))
    return torch.log10(mel.clamp_min(1e-5))


class MultiScaleMelLoss(nn.Module):
    """Mean over window sizes of the L1 distance between log-mel spectrograms (hop = window / 4)."""

    def __init__(self, sample_rate: int, windows: list[int] | None = None):
        super().__init__()
        self.windows = list(windows or _windows(sample_rate))
        self.fbs = [_mel_fb(sample_rate, w, min(80, max(8, w // 8))) for w in self.windows]

    def per_example(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B]`` distances (eval metric and training loss alike)."""
        out = 0.0
        for w, fb in zip(self.windows, self.fbs):
            if x.shape[-1] < w // 2 + 1:  # too short for reflect padding
                continue
            out = out + (log_mel(x, fb, w, w // 4) - log_mel(y, fb, w, w // 4)).abs().mean(dim=(1, 2))
        return out / len(self.windows)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_example(x, y).mean()


def mel_distance(
    x: torch.Tensor, y: torch.Tensor, sample_rate: int, max_hz: float | None = None, n_fft: int = 2048
) -> torch.Tensor:
    """``[B]`` log10-mel L1 at one resolution (``n_fft`` at 24 kHz, scaled), optionally only the mel
    bands below ``max_hz`` (e.g. 150 Hz: kick and 808)."""
    n_fft = 2 ** int(round(math.log2(n_fft * sample_rate / 24000)))
    fb = _mel_fb(sample_rate, n_fft, 128, fmax=sample_rate / 2).to(x.device)
    a, b = log_mel(x, fb, n_fft, n_fft // 4), log_mel(y, fb, n_fft, n_fft // 4)
    if max_hz is not None:
        freqs = torch.linspace(0, sample_rate / 2, fb.shape[0])
        centre = (fb * freqs[:, None]).sum(0) / fb.sum(0).clamp_min(1e-12)
        keep = (centre < max_hz) & (fb.sum(0) > 0)
        a, b = a[:, keep.to(a.device)], b[:, keep.to(b.device)]
    return (a - b).abs().mean(dim=(1, 2))


def si_snr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SNR in dB, ``[B]`` (zero-mean signals)."""
    est = estimate - estimate.mean(-1, keepdim=True)
    ref = reference - reference.mean(-1, keepdim=True)
    proj = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps) * ref
    noise = est - proj
    return 10 * torch.log10((proj.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))


# ---------------------------------------------------------------------------------------------- discriminator


class STFTDiscriminator(nn.Module):
    """EnCodec's STFT discriminator at one resolution: real and imaginary parts as 2 channels,
    2-D convs (kernel 3x9, frequency stride 2, time dilations 1/2/4), leaky ReLU."""

    def __init__(self, n_fft: int, hop: int, channels: int = 32):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        c = channels
        self.convs = nn.ModuleList(
            [
                weight_norm(nn.Conv2d(2, c, (3, 9), padding=(1, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(1, 1), padding=(1, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(2, 1), padding=(2, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(4, 1), padding=(4, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 3), padding=(1, 1))),
            ]
        )
        self.out = weight_norm(nn.Conv2d(c, 1, (3, 3), padding=(1, 1)))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        window = torch.hann_window(self.n_fft, device=wav.device, dtype=wav.dtype)
        spec = torch.stft(wav, self.n_fft, self.hop, window=window, return_complex=True, center=True, normalized=True)
        x = torch.stack([spec.real, spec.imag], 1).transpose(2, 3)  # [B, 2, frames, freqs]
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            feats.append(x)
        return self.out(x), feats


class MultiScaleSTFTDiscriminator(nn.Module):
    """EnCodec's MS-STFTD: STFT discriminators at ``n_ffts`` (hop = n_fft / 4); at 24 kHz
    (1024, 2048, 512), scaled with the sample rate."""

    def __init__(self, sample_rate: int = 24000, channels: int = 32, n_ffts: list[int] | None = None):
        super().__init__()
        if n_ffts is None:
            n_ffts = [2 ** int(round(math.log2(n * sample_rate / 24000))) for n in (1024, 2048, 512)]
        self.discs = nn.ModuleList([STFTDiscriminator(n, n // 4, channels) for n in n_ffts])

    def forward(self, wav: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        logits, feats = [], []
        for d in self.discs:
            lg, ft = d(wav)
            logits.append(lg)
            feats.append(ft)
        return logits, feats


def hinge_d_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)) / len(real)


def hinge_g_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.relu(1 - f).mean() for f in fake) / len(fake)


def feature_matching_loss(real_feats: list[list[torch.Tensor]], fake_feats: list[list[torch.Tensor]]) -> torch.Tensor:
    """Mean over discriminators and layers of L1(fake, real) / mean|real| (audiocraft, normalised)."""
    total, n = 0.0, 0
    for rs, fs in zip(real_feats, fake_feats):
        for r, f in zip(rs, fs):
            r = r.detach()
            total = total + (f - r).abs().mean() / r.abs().mean().clamp_min(1e-8)
            n += 1
    return total / max(n, 1)


def discriminator_accuracy(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Share of discriminator outputs on the right side of 0 (real > 0, fake < 0), both halves equal."""
    r = torch.stack([(x > 0).float().mean() for x in real]).mean()
    f = torch.stack([(x < 0).float().mean() for x in fake]).mean()
    return 0.5 * (r + f)
