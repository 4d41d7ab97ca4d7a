"""Evaluation metrics on inputs with known answers: the musicnn port against outputs of the original
TensorFlow implementation (tests/data/musicnn_reference, written by scripts/musicnn_reference.py),
FAD/KID on Gaussians with closed forms, the clip bootstrap, and ``musiclm eval fad`` on wav folders."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from musiclm.eval.fad import embedding_metrics, evaluate_fad, fad_score, frechet_distance, kid_score
from musiclm.eval.musicnn import (
    DEFAULT_WEIGHTS,
    MTT_LABELS,
    MusicnnTagger,
    frames_for_seconds,
    mel_filterbank,
    musicnn_input,
)
from musiclm.eval.stats import bootstrap_ci, jackknife_ci

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_DIR = os.path.join(ROOT, "tests", "data", "musicnn_reference")


def _reference_script():
    spec = importlib.util.spec_from_file_location(
        "musicnn_reference", os.path.join(ROOT, "scripts", "musicnn_reference.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def clips():
    """The reference clips, regenerated, as float32 the way librosa.load reads the PCM-16 wav."""
    ref = _reference_script()
    out = {}
    for name, pcm in ref.make_clips().items():
        data = np.load(os.path.join(REF_DIR, f"{name}.npz"))
        assert str(data["pcm_sha256"]) == ref.pcm_sha256(pcm), (
            f"{name}: make_clips() no longer gives the reference clip"
        )
        out[name] = (pcm.astype(np.float32) / 32768.0, dict(data))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch and one BLAS thread: the figures are small, and on 2 shared cores OpenBLAS's thread
    pool makes a 200 x 200 eigendecomposition 30x slower."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tagger():
    return MusicnnTagger.from_pretrained()


# --------------------------------------------------------------------------------------------
# musicnn port
# --------------------------------------------------------------------------------------------


def test_musicnn_input_matches_original(clips):
    wav, ref = clips["click_90bpm"]
    rep = musicnn_input(wav)
    assert rep.shape == ref["input_mel"].shape == (len(wav) // 256 + 1, 96)
    # STFT, Slaney mel filterbank, float16 rounding and log10(10000 x + 1): the same input, bit for bit
    # up to float16 rounding ties
    assert np.abs(rep - ref["input_mel"]).max() <= 1e-4


def test_mel_filterbank_is_slaney_area_normalised():
    fb = mel_filterbank()
    assert fb.shape == (96, 257) and fb.dtype == np.float32
    freqs = np.linspace(0, 8000, 257)
    centres = freqs[fb.argmax(axis=1)]
    assert np.all(np.diff(centres) >= 0)  # bands in ascending order
    # Slaney scale: linear (66.7 Hz per mel) below 1 kHz -> evenly spaced low centres
    assert np.allclose(np.diff(centres[2:10]), np.diff(centres[2:10]).mean(), atol=freqs[1] + 1e-9)
    # area normalisation: every triangle integrates to 1 (height 2 / width), up to the sampling of the
    # triangles on 31.25 Hz FFT bins (within 8 % where bands are ~2 bins wide, near 1 kHz)
    area = fb.sum(axis=1) * freqs[1]
    assert np.allclose(area, 1.0, atol=0.08) and abs(np.median(area) - 1.0) < 1e-3


@pytest.mark.parametrize("name", ["click_90bpm", "chord_pad", "noise_bursts", "loud_sine"])
def test_musicnn_matches_original(tagger, clips, name):
    wav, ref = clips[name]
    taggram = tagger.taggram(wav, 16000).numpy()
    assert taggram.shape == ref["taggram"].shape
    assert np.abs(taggram - ref["taggram"]).max() < 1e-4
    assert np.abs(tagger.tags(wav, 16000).numpy() - ref["tags_mean"]).max() < 1e-4
    pen3 = tagger.embed(wav, 16000, segment_seconds=3.0).numpy()
    assert np.abs(pen3 - ref["penultimate"]).max() < 1e-4
    pen1 = tagger.embed(wav, 16000, segment_seconds=1.0).numpy()
    assert pen1.shape == ref["penultimate_1s"].shape
    assert np.abs(pen1 - ref["penultimate_1s"]).max() < 1e-4
    # pooled mid-end features reach ~40: the same float32 rounding shows as up to ~2e-4 absolute
    mp = tagger.embed(wav, 16000, segment_seconds=3.0, layer="max_pool").numpy()
    assert np.abs(mp - ref["max_pool"]).max() < 1e-4 * max(1.0, np.abs(ref["max_pool"]).max())


def test_musicnn_weights_and_api(tagger, clips):
    assert os.path.isfile(DEFAULT_WEIGHTS)
    assert os.path.isfile(os.path.join(os.path.dirname(DEFAULT_WEIGHTS), "LICENSE.md"))
    assert tagger.tag_names == MTT_LABELS and len(tagger.tag_names) == 50
    assert tagger.num_parameters() == 787_159  # + 4,920 batch-norm statistics = musicnn's 792,079
    assert frames_for_seconds(3) == 187 and frames_for_seconds(1) == 62
    wav, ref = clips["chord_pad"]
    # stereo input at another rate: mixed to mono and resampled to 16 kHz before the mel
    from musiclm.audio import resample

    w44 = resample(torch.from_numpy(wav), 16000, 44100)
    probs = tagger.tags(torch.stack([w44, w44]), 44100)
    assert probs.shape == (50,) and torch.all((probs >= 0) & (probs <= 1))
    assert np.abs(probs.numpy() - ref["tags_mean"]).max() < 0.05  # resampling round trip, not bit-exact
    # a clip shorter than one patch is repeat-padded instead of failing as the original does
    short = tagger.embed(wav[:8000], 16000, segment_seconds=1.0)
    assert short.shape == (1, 200) and torch.isfinite(short).all()
    assert tagger.embed(wav, 16000, layer="mean_pool").shape == (7, 753)
    with pytest.raises(ValueError, match="layer"):
        tagger.embed(wav, 16000, layer="logits")
    with pytest.raises(FileNotFoundError):
        MusicnnTagger.from_pretrained(os.path.join(ROOT, "no_such_weights"))


# --------------------------------------------------------------------------------------------
# FAD, KID, bootstrap
# --------------------------------------------------------------------------------------------


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # diagonal (commuting) covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    # general SPD covariances: the textbook formula with scipy's sqrtm
    from scipy.linalg import sqrtm

    s1, s2 = _spd(rng, d), _spd(rng, d)
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fad_and_kid_known_answers():
    rng = np.random.default_rng(1)
    d, n = 8, 2000
    s = _spd(rng, d)
    chol = np.linalg.cholesky(s)
    x = rng.standard_normal((n, d)) @ chol.T
    y = rng.standard_normal((n, d)) @ chol.T  # same distribution, independent sample
    shift = np.full(d, 0.5)
    z = rng.standard_normal((n, d)) @ chol.T + shift
    assert fad_score(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fad_score(x, y) < 0.02  # sampling noise only
    # shifted Gaussian: FAD -> |shift|^2 = 2.0 (the covariances are equal)
    assert fad_score(x, z) == pytest.approx(float(shift @ shift), abs=0.1)
    # per-clip lists give the same figure as the stacked array
    assert fad_score(np.split(x, 40), np.split(z, 40)) == pytest.approx(fad_score(x, z))
    k_same = kid_score(x, y, subset_size=400, subsets=10)
    k_shift = kid_score(x, z, subset_size=400, subsets=10)
    assert k_same["subsets"] == 10 and k_same["subset_size"] == 400 and k_same["std"] is not None
    assert abs(k_same["value"]) < 3 * k_same["std"] + 1e-3  # unbiased: 0 within noise
    assert k_shift["value"] > 20 * max(abs(k_same["value"]), 1e-4)
    whole = kid_score(x[:300], x[:300])  # identical small sets: one whole-set estimate, ~0
    assert whole["subsets"] == 1 and whole["std"] is None and abs(whole["value"]) < 0.05 * k_shift["value"]
    # a larger shift is farther by both metrics
    assert fad_score(x, z + shift) > fad_score(x, z)
    assert kid_score(x[:500], z[:500] + shift)["value"] > kid_score(x[:500], z[:500])["value"]


def test_bootstrap_ci_and_embedding_metrics():
    rng = np.random.default_rng(2)
    values = rng.normal(3.0, 1.0, 400)
    ci = bootstrap_ci(np.mean, values, n_boot=500)
    assert ci["n"] == [400] and ci["n_boot"] == 500
    assert ci["ci95"][0] < 3.0 < ci["ci95"][1] and ci["ci95"][1] - ci["ci95"][0] < 0.3
    assert bootstrap_ci(np.mean, values[:1])["ci95"] is None  # one unit: no interval
    # delete-one jackknife of a mean is exactly the textbook standard error s / sqrt(n)
    jk = jackknife_ci(np.mean, values, groups=400)
    assert jk["se"] == pytest.approx(values.std(ddof=1) / np.sqrt(400), rel=1e-9) and jk["groups"] == [400]
    assert jk["ci95"][0] < 3.0 < jk["ci95"][1]
    # two samples: variances add (difference of means)
    other = rng.normal(0.0, 2.0, 100)
    jk2 = jackknife_ci(lambda a, b: a.mean() - b.mean(), values, other, groups=1000)
    assert jk2["se"] == pytest.approx(np.sqrt(values.var(ddof=1) / 400 + other.var(ddof=1) / 100), rel=1e-9)
    real = [rng.standard_normal((10, 4)) for _ in range(12)]
    same = [rng.standard_normal((10, 4)) for _ in range(12)]
    far = [rng.standard_normal((10, 4)) + 1.0 for _ in range(8)]
    m_same = embedding_metrics(real, same, n_boot=50)
    m_far = embedding_metrics(real, far, n_boot=50)
    assert m_far["real"] == {"clips": 12, "segments": 120} and m_far["generated"] == {"clips": 8, "segments": 80}
    assert m_far["dim"] == 4 and m_far["kid"]["n_boot"] == 50 and m_far["fad"]["jackknife_groups"] == [12, 8]
    for metric in ("fad", "kid"):
        lo, hi = m_far[metric]["ci95"]
        assert lo <= m_far[metric]["value"] <= hi
    assert m_far["fad"]["value"] > 3 * m_same["fad"]["value"] and m_far["kid"]["value"] > m_same["kid"]["value"]
    assert m_far["floor"]["halves"] == [{"clips": 6, "segments": 60}] * 2


def test_eval_fad_on_wav_folders(tmp_path, clips):
    """The CLI path end to end: folders of wavs -> fad.json with counts; a set against itself -> 0."""
    rng = np.random.default_rng(3)
    real, gen = tmp_path / "real", tmp_path / "gen"
    real.mkdir()
    gen.mkdir()
    wav = clips["click_90bpm"][0][: 3 * 16000]
    for i in range(4):
        sf.write(real / f"r{i}.wav", np.roll(wav, 1000 * i), 16000)
        sf.write(gen / f"g{i}.flac", (0.2 * rng.standard_normal(2 * 22050)).astype(np.float32), 22050)
    (gen / "notes.json").write_text("{}")  # not audio: ignored
    res = evaluate_fad(str(real), str(real), split=None, n_boot=20, out=str(tmp_path / "out"))
    assert res["fad"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert res["real"]["clips"] == 4 and res["real"]["segments"] == 4 * 3
    from musiclm.cli import main as cli_main

    rc = cli_main(
        ["eval", "fad", "--real", str(real), "--generated", str(gen), "--n-boot", "20", "--out", str(tmp_path / "out")]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "fad.json").read_text())
    assert doc["generated"]["clips"] == 4 and doc["generated"]["segments"] == 4 * 2
    assert doc["embedding"] == {"model": "MTT_musicnn", "layer": "penultimate", "dim": 200, "segment_seconds": 1.0}
    assert doc["fad"]["value"] > 1.0 and doc["kid"]["value"] > res["kid"]["value"]
    assert cli_main(["eval", "fad", "--real", str(tmp_path / "missing"), "--generated", str(gen)]) == 2
