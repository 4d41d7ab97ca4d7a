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
    SOUNDSTREAM_PRESETS,
    SoundStream,
    SoundStreamTokenizer,
    resolve_soundstream_config,
    save_soundstream,
)


def beats(n: int = 4, seconds: float = 1.0, sample_rate: int = 8000, start: int = 0) -> torch.Tensor:
    from musiclm.data.demo_corpus import make_clip

    return torch.stack(
        [
            torch.from_numpy(make_clip(0, i, seconds=seconds, sample_rate=sample_rate)[1]).float()
            for i in range(start, start + n)
        ]
    )


@pytest.mark.parametrize(
    "preset,rate,hop,levels,codes",
    [("tiny", 8000, 160, 4, 64), ("demo", 24000, 320, 8, 256), ("paper", 24000, 480, 12, 1024)],
)
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
    later[:, 160 * 6 :] += torch.randn(1, 160 * 4)
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
        loss = (
            mel(out["recon"], out["wav"]) + 0.1 * (out["recon"] - out["wav"]).abs().mean() + 0.25 * out["commit_loss"]
        )
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


# ----------------------------------------------------------------------------- the codec stage, real launcher

slow = pytest.mark.slow  # launches DeepSpeed processes


@pytest.fixture(scope="module")
def codec_work(tmp_path_factory):
    from musiclm.testing import make_synthetic_audio_shards

    work = tmp_path_factory.mktemp("codec")
    make_synthetic_audio_shards(str(work / "shards"), n_train=16, n_eval=4, seconds=1.5, sample_rate=8000)
    import yaml

    cfg = {
        "name": "codec-tiny",
        "stage": "codec",
        "seed": 0,
        "data": {"shards": str(work / "shards"), "shuffle": 16, "prefetch": 2},
        "model": {"preset": "tiny"},
        # GAN from step 2; step 3's batch is NaN on rank 1 only
        "codec": {
            "crop_seconds": 1.0,
            "adversarial_after": 1,
            "disc_channels": 4,
            "media_clips": 1,
            "inject_nan_at_step": 3,
            "inject_nan_rank": 1,
        },
        "train": {
            "max_steps": 5,
            "warmup_steps": 2,
            "log_every": 1,
            "eval_every": 5,
            "eval_batches": 1,
            "split_eval_every": 5,
            "split_eval_samples": 8,
            "checkpoint_every": 1,
            "keep_checkpoints": 10,
        },
        "deepspeed": {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 3.0e-3, "betas": [0.8, 0.99]}},
        },
    }
    with open(work / "codec.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    return work


def _codec_args(work, run_dir, extra=()):
    from train_utils import DS_CONFIGS

    return [
        "launch/train.py",
        "--config",
        str(work / "codec.yaml"),
        "--deepspeed_config",
        os.path.join(DS_CONFIGS, "zero2.json"),
        "--run_dir",
        run_dir,
        *extra,
    ]


@pytest.fixture(scope="module")
def codec_full(codec_work):
    from train_utils import launch, read_log

    run = str(codec_work / "full")
    assert launch(2, _codec_args(codec_work, run), run + ".log") == 0, read_log(run + ".log")[-4000:]
    return run


def _engine_state(run_dir: str, step: int, engine: str) -> dict:
    from musiclm.train.export import consolidated_state_dict

    return consolidated_state_dict(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"), engine)


@slow
def test_nan_batch_on_one_rank_is_skipped_on_every_rank_and_never_reaches_the_weights(codec_full):
    from train_utils import metrics, read_log

    recs = {r["step"]: r for r in metrics(codec_full) if "train/loss" in r}
    assert sorted(recs) == [1, 2, 3, 4, 5]
    # rank 1 alone saw NaN; the metric is the mean over 2 ranks: 1.0 means both skipped
    assert recs[3]["train/skipped/generator"] == 1.0 and recs[3]["train/skipped/disc"] == 1.0
    assert all(recs[s]["train/skipped/generator"] == 0.0 for s in (1, 2, 4, 5))
    assert all(np.isfinite(recs[s]["train/loss"]) for s in (1, 2, 4, 5))
    assert "non-finite generator loss" in read_log(codec_full + ".log")
    for engine in ("model", "disc"):
        s2, s3, s4 = (_engine_state(codec_full, s, engine) for s in (2, 3, 4))
        assert sorted(s2) == sorted(s3)
        for k in s2:  # weights, EMA codebooks and their statistics: untouched by the NaN step
            assert torch.equal(s2[k], s3[k]), (engine, k)
            assert torch.isfinite(s3[k]).all(), (engine, k)
        assert any(not torch.equal(s3[k], s4[k]) for k in s3), engine  # training goes on after it
        if engine == "model":
            assert "quantizer.codebooks" in s3 and "quantizer.cluster_size" in s3


@slow
def test_codec_resume_reproduces_both_engines(codec_work, codec_full):
    from train_utils import launch, metrics, read_log, train_losses

    part = str(codec_work / "part")
    assert launch(2, _codec_args(codec_work, part, ["--stop_after", "2"]), part + ".log") == 0, read_log(part + ".log")[
        -4000:
    ]
    assert max(train_losses(part)) == 2
    assert launch(2, _codec_args(codec_work, part), part + ".resume.log") == 0, read_log(part + ".resume.log")[-4000:]
    assert "resumed from" in read_log(part + ".resume.log")
    full = {r["step"]: r for r in metrics(codec_full) if "train/loss" in r}
    again = {r["step"]: r for r in metrics(part) if "train/loss" in r}
    assert sorted(again) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        for key in (
            "train/loss",
            "train/loss/mel",
            "train/loss/disc",
            "train/loss/adv",
            "train/grad_norm",
            "train/grad_norm/disc",
            "train/lr/disc",
            "train/codebook/perplexity/level_1",
        ):
            if step == 3 and key.startswith("train/grad_norm"):
                continue  # the skipped step has no gradient: the engine reports its last norm (none after a resume)
            assert again[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7, nan_ok=True), (step, key)
    for engine in ("model", "disc"):
        a, b = _engine_state(codec_full, 5, engine), _engine_state(part, 5, engine)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{engine} {k}")


@slow
def test_codec_resumes_at_another_world_size_through_universal_checkpoints(codec_work, codec_full):
    """Both engines (SoundStream and its discriminator) of a 2-process checkpoint resume in 1
    process: each is converted to a universal checkpoint and training goes on from its weights."""
    import shutil

    from train_utils import launch, metrics, read_log

    run = str(codec_work / "resize")
    os.makedirs(os.path.join(run, "checkpoints"))
    tag = os.path.join(run, "checkpoints", "step_00000004")
    shutil.copytree(os.path.join(codec_full, "checkpoints", "step_00000004"), tag)
    assert launch(1, _codec_args(codec_work, run), run + ".log") == 0, read_log(run + ".log")[-4000:]
    text = read_log(run + ".log")
    assert "world size 2 -> 1, universal checkpoint" in text
    assert os.path.isdir(os.path.join(tag, "model_universal")) and os.path.isdir(os.path.join(tag, "disc_universal"))
    full = {r["step"]: r for r in metrics(codec_full) if "train/loss" in r}
    got = {r["step"]: r for r in metrics(run) if "train/loss" in r}
    assert sorted(got) == [5]  # steps 1-4 came from the checkpoint
    # trained weights, not a fresh model: the step-5 losses are those of the 2-process run's step 5
    # within the difference of batches (one rank's half of them), far from an untrained start
    for key in ("train/loss/mel", "train/loss/disc"):
        assert got[5][key] == pytest.approx(full[5][key], rel=0.25), key
    assert got[5]["train/loss/mel"] < full[1]["train/loss/mel"]
    resized = _engine_state(run, 5, "disc")
    before = _engine_state(codec_full, 4, "disc")
    assert sorted(resized) == sorted(before)


@slow
def test_codec_run_logs_eval_media_and_exports_a_soundstream_tokenizer(codec_work, codec_full):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from train_utils import metrics

    from musiclm.train.export import export

    ev = [r for r in metrics(codec_full) if "eval/si_snr/all" in r]
    assert ev and all(
        k in ev[-1]
        for k in ("eval/mel/1", "eval/mel/coarse", "eval/mel/all", "eval/si_snr/1", "eval/mel_below_150hz/all")
    )
    assert any("eval/loss" in r and "eval/si_snr" in r for r in metrics(codec_full))
    acc = EventAccumulator(os.path.join(codec_full, "tb"), size_guidance={"audio": 0, "images": 0}).Reload()
    tags = acc.Tags()
    assert "eval_audio/clip_0/reconstruction" in tags["audio"] and "eval_spectrogram/clip_0" in tags["images"]
    assert "train/codebook/perplexity/level_4" in tags["scalars"] and "train/disc_accuracy" in tags["scalars"]

    out = codec_work / "exported"
    info = export(codec_full, str(out / "model.safetensors"))
    assert info["step"] == 5
    tok = build_acoustic({"type": "soundstream", "model": str(out)})
    wav = beats(2)
    codes = tok.encode(wav)
    assert codes.shape == (2, 4, 50) and tok.decode(codes).shape == (2, 8000)
    # the exported weights are the trained generator's (codebooks included)
    live = _engine_state(codec_full, 5, "model")
    torch.testing.assert_close(tok.model.quantizer.codebooks, live["quantizer.codebooks"])
    assert (
        tok.fingerprint()["weights_sha256"]
        != SoundStreamTokenizer(model=SoundStream({"preset": "tiny"})).fingerprint()["weights_sha256"]
    )
