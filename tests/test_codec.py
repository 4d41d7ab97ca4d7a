"""SoundStream (musiclm/codec/soundstream.py), its losses, and the ``codec`` training stage.

In-process tests use the ``tiny`` preset (8 kHz, 50 Hz, 4 levels x 64 codes); the launcher tests
run the real ``deepspeed`` launcher with 2 CPU processes on 1 s clips.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from musiclm.codec import AcousticTokenizer, build_acoustic
from musiclm.codec.losses import MultiScaleMelLoss, mel_distance, si_snr
from musiclm.codec.soundstream import (
    SOUNDSTREAM_PRESETS, SoundStream, SoundStreamTokenizer, resolve_soundstream_config, save_soundstream,
)


def beats(n: int = 4, seconds: float = 1.0, sample_rate: int = 8000, start: int = 0) -> torch.Tensor:
    from musiclm.data.demo_corpus import make_clip

    return torch.stack([torch.from_numpy(make_clip(0, i, seconds=seconds, sample_rate=sample_rate)[1]).float()
                        for i in range(start, start + n)])


@pytest.mark.parametrize("preset,rate,hop,levels,codes", [
    ("tiny", 8000, 160, 4, 64), ("demo", 24000, 320, 8, 256), ("paper", 24000, 480, 12, 1024)])
def test_presets_frame_rate_and_frame_count_convention(preset, rate, hop, levels, codes):
    torch.manual_seed(0)
    model = SoundStream({"preset": preset})
    tok = SoundStreamTokenizer(model=model)
    assert isinstance(tok, AcousticTokenizer)
    assert (tok.sample_rate, tok.hop_length, tok.levels, tok.codebook_size) == (rate, hop, levels, codes)
    assert tok.frame_rate == rate // hop and tok.frame_rate in (50, 75)  # on the grid with 25 Hz semantic ids
    # T_frames = T // hop: trailing samples that do not fill a frame are dropped
    for t in (hop * 3, hop * 3 + 1, hop * 4 - 1):
        wav = torch.randn(2, t) * 0.1
        c = tok.encode(wav)
        assert c.shape == (2, levels, t // hop) and c.dtype == torch.long
        assert int(c.min()) >= 0 and int(c.max()) < codes
        assert tok.decode(c).shape == (2, (t // hop) * hop)
        assert tok.decode(c[:, :1]).shape == (2, (t // hop) * hop)  # coarse levels alone decode too
    assert tok.encode(torch.zeros(1, hop - 1)).shape == (1, levels, 0)
    # trailing samples never change the codes
    wav = torch.randn(1, hop * 5) * 0.1
    assert torch.equal(tok.encode(wav), tok.encode(torch.cat([wav, torch.randn(1, hop - 1)], 1)))


def test_encoder_is_causal():
    torch.manual_seed(0)
    model = SoundStream({"preset": "tiny"}).eval()
    wav = torch.randn(1, 160 * 10) * 0.1
    later = wav.clone()
    later[:, 160 * 6:] += torch.randn(1, 160 * 4)
    a, b = model.encoder(wav), model.encoder(later)
    torch.testing.assert_close(a[..., :6], b[..., :6])  # frames before the change are unchanged
    assert not torch.allclose(a[..., 6:], b[..., 6:])


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown soundstream preset"):
        resolve_soundstream_config({"preset": "huge"})
    with pytest.raises(ValueError, match="unknown soundstream config keys"):
        resolve_soundstream_config({"preset": "tiny", "chanels": 8})
    with pytest.raises(ValueError, match="not a multiple of the hop"):
        resolve_soundstream_config({"preset": "tiny", "strides": [3, 7]})
    assert resolve_soundstream_config({"preset": "paper", "strides": [2, 4, 5, 8]})["strides"] == [2, 4, 5, 8]
    assert set(SOUNDSTREAM_PRESETS) == {"tiny", "demo", "paper"}


def test_save_load_registry_and_fingerprint(tmp_path):
    torch.manual_seed(0)
    model = SoundStream({"preset": "tiny"})
    d = save_soundstream(model, tmp_path / "ss")
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    tok = build_acoustic({"type": "soundstream", "model": d})
    assert isinstance(tok, SoundStreamTokenizer)
    wav = beats(2)
    ref = SoundStreamTokenizer(model=model)
    assert torch.equal(tok.encode(wav), ref.encode(wav))
    torch.testing.assert_close(tok.decode(tok.encode(wav)), ref.decode(ref.encode(wav)))
    fp = tok.fingerprint()
    json.dumps(fp)
    assert fp["kind"] == "acoustic" and fp["name"] == "soundstream"
    assert (fp["frame_rate"], fp["levels"], fp["codebook_size"], fp["sample_rate"]) == (50, 4, 64, 8000)
    assert fp == SoundStreamTokenizer(d).fingerprint()
    # new weights -> new fingerprint (a new tokens-<hash> shard folder); fewer levels -> another one too
    with torch.no_grad():
        model.decoder.net[0].conv.parametrizations.weight.original0.add_(1.0)
    other = save_soundstream(model, tmp_path / "ss2")
    assert SoundStreamTokenizer(other).fingerprint()["weights_sha256"] != fp["weights_sha256"]
    assert build_acoustic({"type": "soundstream", "model": d, "levels": 2}).fingerprint() != fp
    with pytest.raises(ValueError, match="needs model"):
        build_acoustic({"type": "soundstream"})


def _train_briefly(model: SoundStream, wav: torch.Tensor, steps: int) -> None:
    mel = MultiScaleMelLoss(model.sample_rate)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        out = model(wav)
        loss = mel(out["recon"], out["wav"]) + 0.1 * (out["recon"] - out["wav"]).abs().mean() + 0.25 * out["commit_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_round_trip_of_a_briefly_trained_model_beats_the_untrained_one():
    torch.manual_seed(0)
    train, held_out = beats(8), beats(4, start=8)
    model = SoundStream({"preset": "tiny"})
    untrained = SoundStreamTokenizer(model=SoundStream({"preset": "tiny"}).eval())

    def scores(tok):
        rec = tok.decode(tok.encode(held_out))
        return float(mel_distance(rec, held_out, 8000).mean()), float(si_snr(rec, held_out).mean())

    mel0, snr0 = scores(untrained)
    _train_briefly(model, train, 60)
    mel1, snr1 = scores(SoundStreamTokenizer(model=model))
    assert mel1 < 0.7 * mel0, (mel0, mel1)
    assert snr1 > snr0, (snr0, snr1)
    # more levels never reconstruct worse than the first level alone (residual VQ, quantizer dropout)
    tok = SoundStreamTokenizer(model=model)
    codes = tok.encode(held_out)
    m1 = float(mel_distance(tok.decode(codes[:, :1]), held_out, 8000).mean())
    m4 = float(mel_distance(tok.decode(codes), held_out, 8000).mean())
    assert m4 <= m1 * 1.02, (m1, m4)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_codec_quantizer_dropout_every_level_count_in_train_mode(k):
    torch.manual_seed(0)
    model = SoundStream({"preset": "tiny"})
    wav = beats(2)
    model.train()
    model(wav)  # k-means init
    out = model(wav, n_quantizers=k)
    z = model.encoder(out["wav"]).transpose(1, 2)
    expect = model.decoder(model.quantizer.decode(out["codes"].transpose(1, 2)[..., :k]).transpose(1, 2))
    torch.testing.assert_close(out["recon"], expect, rtol=1e-4, atol=1e-5)
    assert z.shape[1] == out["codes"].shape[-1]
