"""``musiclm eval codec`` (musiclm/eval/codec.py) and ``musiclm bench codec`` (musiclm/bench/codec.py).

Fast: a tiny SoundStream (the ``tiny`` preset at 24 kHz, so both low-pass baselines are below its
Nyquist frequency) on a few 1.5 s demo-corpus clips written at 16 kHz (the eval resamples them).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from musiclm.codec.soundstream import SoundStream, save_soundstream
from musiclm.eval import codec as codec_eval


def _clip(seconds: float = 2.0, sample_rate: int = 24000, i: int = 0) -> torch.Tensor:
    from musiclm.data.demo_corpus import make_clip

    return torch.from_numpy(make_clip(0, i, seconds=seconds, sample_rate=sample_rate)[1]).float()


@pytest.fixture(scope="module")
def tiny_codec_and_shards(tmp_path_factory):
    from musiclm.testing import make_synthetic_audio_shards

    root = tmp_path_factory.mktemp("codec_eval")
    shards = str(root / "audio")
    make_synthetic_audio_shards(shards, n_train=1, n_eval=3, seconds=1.5, sample_rate=16000)
    torch.manual_seed(0)
    model = SoundStream({"preset": "tiny", "sample_rate": 24000, "levels": 3, "coarse_levels": 2})
    model_dir = save_soundstream(model.eval(), str(root / "model"))
    return model_dir, shards, root


def test_eval_codec_command_end_to_end(tiny_codec_and_shards, capsys):
    from musiclm.cli import main

    model_dir, shards, root = tiny_codec_and_shards
    out = str(root / "eval")
    rc = main(["eval", "codec", "--model", model_dir, "--data", shards, "--max-clips", "2", "--out", out])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("codec_eval.json", "codec_eval.md", "codec_eval.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "codec_eval.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    res = json.load(open(os.path.join(out, "codec_eval.json")))
    assert res["clips"] == 2 and res["split"] == "eval"
    assert res["codec"]["sample_rate"] == 24000 and res["codec"]["levels"] == 3  # clips resampled 16k -> 24k
    rows = res["rows"]
    systems = [(r["system"], r["levels"]) for r in rows]
    # one row per level count (1, coarse, all) for the codec and for EnCodec at the nearest bitrate,
    # one per low-pass copy
    assert systems[:3] == [("soundstream", "1"), ("soundstream", "coarse"), ("soundstream", "all")]
    assert [s for s, _ in systems[3:6]] == ["encodec_random"] * 3
    assert [s for s, _ in systems[6:]] == ["lowpass_4khz", "lowpass_8khz"]
    assert len(rows) == 8 and res["skipped"] == []
    # bitrate = levels x log2(codebook) x frame rate: tiny at 24 kHz = 150 Hz x 6 bits per level
    assert [r["bitrate_bps"] for r in rows[:3]] == [900.0, 1800.0, 2700.0]
    # EnCodec (750 bps per level) at the nearest bitrate: 1, 2, 4 levels
    assert [r["n_levels"] for r in rows[3:6]] == [1, 2, 4]
    for r in rows:
        for m in codec_eval.METRICS:
            assert isinstance(r[m], float) and r[m] == r[m], (r["system"], m)
            assert len(r["per_clip"][m]) == 2
        assert r["tempo_clips"] == 2 and 0.0 <= r["tempo_kept"] <= 1.0  # the demo clips carry bpm tags
    assert res["tempo"]["clips_with_bpm"] == 2
    # the low-pass copies: 8 kHz keeps more of the spectrum than 4 kHz
    lp4, lp8 = rows[6], rows[7]
    assert lp8["mel_l1"] < lp4["mel_l1"] and lp8["mel_ms"] < lp4["mel_ms"]
    # the markdown table: one line per row, printed too
    table = open(os.path.join(out, "codec_eval.md")).read()
    body = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| system")]
    assert len(body) == len(rows)
    assert "| lowpass_8khz |" in printed and "| soundstream | all |" in printed


def test_eval_codec_other_rate_and_fewer_levels(tmp_path, tiny_codec_and_shards):
    """A 1-level 8 kHz model: one codec row (``1=coarse=all``), low-pass cut-offs at or above its
    Nyquist frequency skipped and named, no EnCodec."""
    _, shards, _ = tiny_codec_and_shards
    torch.manual_seed(0)
    model_dir = save_soundstream(SoundStream({"preset": "tiny", "levels": 1, "coarse_levels": 1}), str(tmp_path / "m"))
    res = codec_eval.evaluate_codec(model_dir, shards, max_clips=1, encodec="none", out_dir=None, tempo=False)
    assert res["codec"]["sample_rate"] == 8000
    assert [(r["system"], r["levels"]) for r in res["rows"]] == [("soundstream", "1=coarse=all")]
    assert [s["system"] for s in res["skipped"]] == ["lowpass_4khz", "lowpass_8khz"]
    assert res["rows"][0]["tempo_kept"] is None


def test_require_below_gates_on_the_matched_baseline(tiny_codec_and_shards, capsys):
    """``--require-below``: the codec with all levels against the bitrate-matched EnCodec row or a
    named row, on log-mel L1 overall and below 150 Hz; ``make demo`` stops on a failure."""

    def result(ours: tuple[float, float], enc: tuple[float, float]) -> dict:
        row = lambda system, levels, v, n=2, **kw: {  # noqa: E731
            "system": system,
            "levels": levels,
            "n_levels": n,
            "mel_l1": v[0],
            "mel_l1_below_150hz": v[1],
            **kw,
        }
        return {
            "codec": {"type": "soundstream", "levels": 2},
            "rows": [
                row("soundstream", "1", (9.0, 9.0), n=1),
                row("soundstream", "all", ours),
                row("encodec_random", "1 (~1)", (0.1, 0.1), n=1, matches="1"),
                row("encodec_random", "2 (~all)", enc, matches="all"),
                row("lowpass_4khz", "-", (0.5, 0.5)),
            ],
        }

    assert codec_eval.require_below(result((1.0, 1.0), (2.0, 2.0)), "encodec") == []
    fails = codec_eval.require_below(result((1.0, 3.0), (2.0, 2.0)), "encodec")
    assert len(fails) == 1 and fails[0].startswith("mel_l1_below_150hz") and "encodec_random 2.000" in fails[0]
    assert len(codec_eval.require_below(result((1.0, 1.0), (2.0, 2.0)), "lowpass_4khz")) == 2
    assert "no 'lowpass_8khz' row" in codec_eval.require_below(result((1.0, 1.0), (2.0, 2.0)), "lowpass_8khz")[0]

    # the command: an untrained tiny codec is not below the 8 kHz low-pass copy -> exit 1, reasons on stderr
    from musiclm.cli import main

    model_dir, shards, root = tiny_codec_and_shards
    argv = ["eval", "codec", "--model", model_dir, "--data", shards, "--max-clips", "1", "--no-tempo"]
    assert main([*argv, "--encodec", "none", "--out", str(root / "gate"), "--require-below", "lowpass_8khz"]) == 1
    assert "FAIL: mel_l1" in capsys.readouterr().err


def test_level_counts():
    assert codec_eval.level_counts(8, 4) == [("1", 1), ("coarse", 4), ("all", 8)]
    assert codec_eval.level_counts(12, 4) == [("1", 1), ("coarse", 4), ("all", 12)]
    assert codec_eval.level_counts(4, 4) == [("1", 1), ("coarse=all", 4)]
    assert codec_eval.level_counts(3, 1) == [("1=coarse", 1), ("all", 3)]
    assert codec_eval.level_counts(1, 1) == [("1=coarse=all", 1)]


def test_metrics_known_answers():
    sr = 24000
    x = _clip(2.0, sr)[None]
    # identity: the metric helper on a clip and itself
    same = codec_eval.clip_metrics(x, x.clone(), sr)
    assert float(same["si_snr_db"][0]) > 60.0
    for m in ("mel_ms", "mel_l1", "mel_l1_below_150hz"):
        assert float(same[m][0]) == pytest.approx(0.0, abs=1e-6), m
    # the 8 kHz low-pass keeps more of the clip than the 4 kHz one; both keep the band below 150 Hz
    m4 = codec_eval.clip_metrics(x, codec_eval.lowpass(x, sr, 4000), sr)
    m8 = codec_eval.clip_metrics(x, codec_eval.lowpass(x, sr, 8000), sr)
    assert float(m8["mel_l1"][0]) < float(m4["mel_l1"][0])
    assert float(m8["mel_ms"][0]) < float(m4["mel_ms"][0])
    assert float(m8["si_snr_db"][0]) > float(m4["si_snr_db"][0])
    assert float(m4["mel_l1_below_150hz"][0]) < 0.05
    # the brick-wall mask: nothing left above the cut-off
    spec = torch.fft.rfft(codec_eval.lowpass(x, sr, 4000)[0].double())
    freqs = torch.fft.rfftfreq(x.shape[-1], 1 / sr)
    assert float(spec[freqs > 4000].abs().max()) < 1e-7 * float(spec.abs().max())  # float32 rounding only
    # a scaled copy: SI-SNR does not care, the mel distance does
    half = codec_eval.clip_metrics(x, 0.5 * x, sr)
    assert float(half["si_snr_db"][0]) > 60.0 and float(half["mel_l1"][0]) > 0.1


def test_tempo_kept_counts_octave_errors_as_misses():
    from musiclm.data.demo_corpus import make_clip
    from musiclm.data.music_analysis import estimate_tempo

    rec, wav = make_clip(0, 0, seconds=8.0, sample_rate=16000)
    est = estimate_tempo(wav, 16000)
    assert codec_eval.tempo_kept(wav, 16000, est) is True
    assert codec_eval.tempo_kept(wav, 16000, est * 2) is False  # double time: a miss
    assert codec_eval.tempo_kept(wav, 16000, est * 1.05) is False  # 5 % off
    assert codec_eval.tempo_kept(wav, 16000, None) is None


def test_bench_codec_tiny():
    from musiclm.bench import codec as bench_codec

    res = bench_codec.run(presets=("tiny",), seconds=1, repeats=1, include_encodec=False)
    assert res["bench"] == "codec" and res["config"]["threads"] == 1 and res["config"]["input_seconds"] == 1.0
    m = res["models"]["soundstream_tiny"]
    for key in bench_codec.MODEL_KEYS:
        assert key in m, key
    assert m["params"] > 0 and m["encode_s"] > 0 and m["decode_s"] > 0
    assert m["encode_rtf"] == pytest.approx(m["encode_s"] / 1.0)
    assert m["sample_rate"] == 8000 and m["frame_rate"] == 50 and m["levels"] == 4
    assert res["ratios"] == {}  # no EnCodec to compare with


def test_code_usage_catches_a_collapsed_codebook(tiny_codec_and_shards, capsys):
    """Perplexity per level from a code histogram (1 = one code everywhere, the collapse whose decoded
    average spectrum can still beat a random codec), and ``--min-perplexity`` fails on it."""
    hist = np.zeros((3, 8), dtype=np.int64)
    hist[0] = 10  # uniform over 8 codes
    hist[1, 2] = 99  # collapsed: one code on 99 % of frames
    hist[1, 5] = 1
    hist[2, :2] = 5  # two codes, half each
    u = codec_eval.code_usage(hist)
    assert np.allclose(u["perplexity"], [8.0, np.exp(-(0.99 * np.log(0.99) + 0.01 * np.log(0.01))), 2.0])
    assert u["top_share"] == [0.125, 0.99, 0.5]

    res = {"codec": {"levels": 3, "level_counts": {"1": 1, "coarse": 2, "all": 3}}, "code_usage": u}
    fails = codec_eval.require_codes_used(res, 1.5)
    assert len(fails) == 1 and fails[0].startswith("level 2: code perplexity 1.06 < 1.5") and "99%" in fails[0]
    assert codec_eval.require_codes_used(res, 1.01) == []  # level 3 (a fine level) is not gated
    res["codec"]["level_counts"] = {"1=coarse": 1, "all": 3}
    assert codec_eval.require_codes_used(res, 1.5) == []

    # the command measures usage on the clips and gates on it
    from musiclm.cli import main

    model_dir, shards, root = tiny_codec_and_shards
    argv = [
        "eval",
        "codec",
        "--model",
        model_dir,
        "--data",
        shards,
        "--max-clips",
        "1",
        "--no-tempo",
        "--encodec",
        "none",
    ]
    assert main([*argv, "--out", str(root / "usage"), "--min-perplexity", "1"]) == 0
    saved = json.load(open(root / "usage" / "codec_eval.json"))
    perplexity = saved["code_usage"]["perplexity"]
    assert len(perplexity) == saved["codec"]["levels"] and all(p >= 1.0 for p in perplexity)
    assert "Codes used on these clips" in capsys.readouterr().out
    assert main([*argv, "--min-perplexity", "1e6"]) == 1
    assert "FAIL: level 1: code perplexity" in capsys.readouterr().err


def test_codes_matter_catches_a_decoder_that_ignores_its_codes(tiny_codec_and_shards, monkeypatch):
    """Each clip decoded from another clip's codes: a decoder that ignores its codes (every
    generation then decodes to the same audio, yet it can pass the mel and perplexity gates) gives
    the same log-mel L1 as from the clip's own codes, and ``--max-codes-ratio`` fails on it."""
    from musiclm.codec.soundstream import SoundStreamTokenizer

    model_dir, shards, _ = tiny_codec_and_shards
    res = codec_eval.evaluate_codec(model_dir, shards, encodec="none", lowpass_hz=(), tempo=False, plot=False)
    cm = res["codes_matter"]
    assert cm["clips"] == 2 and cm["ratio"] < 1.0 - 1e-5  # random weights: other codes, other (worse) audio
    assert codec_eval.require_codes_matter(res, 1.0) == []

    real_decode = SoundStreamTokenizer.decode

    def ignore_codes(self, codes):
        return real_decode(self, torch.zeros_like(codes))

    monkeypatch.setattr(SoundStreamTokenizer, "decode", ignore_codes)
    res = codec_eval.evaluate_codec(model_dir, shards, encodec="none", lowpass_hz=(), tempo=False, plot=False)
    assert res["codes_matter"]["ratio"] == pytest.approx(1.0, abs=1e-6)
    fails = codec_eval.require_codes_matter(res, 0.9999)
    assert len(fails) == 1 and "ignores its codes" in fails[0]
