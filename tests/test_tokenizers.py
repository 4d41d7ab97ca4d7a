"""Tokenizers on tiny random transformers models saved to (and loaded from) temp directories."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers_models import (
    make_tiny_clap,
    make_tiny_encodec,
    make_tiny_hubert,
    make_tiny_tokenizer_config,
    make_tiny_w2v_bert,
    random_encodec_24khz,
    sine_batch,
)

from musiclm.codec import AcousticTokenizer, EncodecTokenizer, build_acoustic
from musiclm.mulan import AudioTextEmbedder, ClapEmbedder, build_embedder, window_spans
from musiclm.semantic import (
    SemanticFeatures,
    SemanticTokenizer,
    fit_kmeans,
    load_centroids,
    save_centroids,
)
from musiclm.tokenizers import BUNDLE_FILE, BundleMismatch, build_tokenizers, load_bundle

COMMON_KEYS = ("kind", "name", "config", "weights_sha256", "sample_rate")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "root": root,
        "encodec": make_tiny_encodec(root / "encodec"),
        "hubert": make_tiny_hubert(root / "hubert"),
        "clap": make_tiny_clap(root / "clap"),
    }


@pytest.fixture(scope="module")
def encodec(models):
    return EncodecTokenizer(models["encodec"], bandwidth=6.0)


@pytest.fixture(scope="module")
def clap(models):
    return ClapEmbedder(models["clap"])


# ------------------------------------------------------------------------------------ acoustic


def test_encodec_encode_decode_shapes(encodec):
    assert isinstance(encodec, AcousticTokenizer)
    assert encodec.sample_rate == 24_000 and encodec.frame_rate == 75 and encodec.hop_length == 320
    assert encodec.levels == 8 and encodec.codebook_size == 1024
    wav = sine_batch(3, 2.0)
    codes = encodec.encode(wav)
    assert codes.shape == (3, 8, 150) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 1024
    assert codes.unique().numel() > 1  # random codebooks, not all zero
    # batched == one by one
    assert torch.equal(codes[1:2], encodec.encode(wav[1]))
    # T_frames = T // hop, trailing partial frame dropped
    assert encodec.encode(wav[:, : 24_000 + 100]).shape == (3, 8, 75)
    assert encodec.encode(wav[:, :319]).shape == (3, 8, 0)
    audio = encodec.decode(codes)
    assert audio.shape == (3, 150 * 320) and audio.dtype == torch.float32
    assert encodec.decode(codes[:, :2]).shape == (3, 150 * 320)  # coarse levels only


def test_encodec_bandwidth_sets_levels(models):
    tok = build_acoustic({"type": "encodec", "model": models["encodec"], "bandwidth": 1.5})
    assert tok.levels == 2
    assert tok.encode(sine_batch(1, 1.0)).shape == (1, 2, 75)
    with pytest.raises(ValueError, match="bandwidth"):
        _ = EncodecTokenizer(models["encodec"], bandwidth=5.0).levels


def test_encodec_fingerprint_changes_with_weights_and_config(models, encodec, tmp_path):
    fp = encodec.fingerprint()
    json.dumps(fp)
    for key in COMMON_KEYS + ("frame_rate", "levels", "codebook_size"):
        assert key in fp
    assert fp["kind"] == "acoustic" and fp["frame_rate"] == 75 and fp["levels"] == 8
    # stable: a fresh load of the same directory
    assert EncodecTokenizer(models["encodec"]).fingerprint() == fp
    # config change
    other = EncodecTokenizer(models["encodec"], bandwidth=3.0).fingerprint()
    assert other["config"] != fp["config"] and other["levels"] == 4
    # weights change: same config, one weight perturbed
    from transformers import EncodecModel

    m = EncodecModel.from_pretrained(models["encodec"])
    with torch.no_grad():
        m.quantizer.layers[0].codebook.embed[0, 0] += 1.0
    m.save_pretrained(tmp_path / "enc2")
    fp2 = EncodecTokenizer(tmp_path / "enc2").fingerprint()
    assert fp2["weights_sha256"] != fp["weights_sha256"] and fp2["config"] == fp["config"]


def test_random_encodec_24khz_has_the_real_config(tmp_path):
    tok = EncodecTokenizer(random_encodec_24khz(tmp_path / "e24"), bandwidth=6.0)
    assert (tok.sample_rate, tok.frame_rate, tok.levels, tok.codebook_size) == (24_000, 75, 8, 1024)
    assert EncodecTokenizer(tmp_path / "e24", bandwidth=24.0).levels == 32
    assert 14e6 < sum(p.numel() for p in tok.model.parameters()) < 16e6
    assert tok.encode(sine_batch(1, 1.0)).shape == (1, 8, 75)


# ------------------------------------------------------------------------------------ semantic


def test_mfcc_features_frame_alignment():
    f = SemanticFeatures("mfcc", rate=25)
    assert f.sample_rate == 16_000 and f.dim == 20
    assert f(sine_batch(2, 2.0, 16_000)).shape == (2, 50, 20)
    assert f(sine_batch(1, 1.5, 16_000)).shape == (1, 37, 20)  # floor(1.5 * 25)
    logmel = SemanticFeatures("logmel", n_mels=32)
    assert logmel(sine_batch(1, 3.0, 16_000)).shape == (1, 75, 32)


def test_kmeans_on_mfcc_and_semantic_ids(tmp_path):
    f = SemanticFeatures("mfcc")
    wav = sine_batch(4, 2.0, 16_000, seed=3)
    feats = f(wav)
    centroids = fit_kmeans(iter([feats[:2], feats[2:]]), n_clusters=12, seed=0, batch_size=64)
    assert centroids.shape == (12, 20) and centroids.dtype == np.float32
    # deterministic for a seed
    np.testing.assert_array_equal(centroids, fit_kmeans([feats], n_clusters=12, seed=0, batch_size=64))

    path = save_centroids(tmp_path / "km.safetensors", centroids, f.config())
    loaded, meta = load_centroids(path, with_metadata=True)
    np.testing.assert_array_equal(loaded, centroids)
    assert meta["features"]["type"] == "mfcc"

    tok = SemanticTokenizer(f, path)
    assert tok.vocab_size == 12 and tok.frame_rate == 25 and tok.sample_rate == 16_000
    ids = tok.encode(wav)
    assert ids.shape == (4, 50) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 12
    assert torch.equal(tok.encode(wav[2:3]), ids[2:3])

    fp = tok.fingerprint()
    for key in COMMON_KEYS + ("frame_rate", "vocab_size"):
        assert key in fp
    assert fp["kind"] == "semantic" and fp["vocab_size"] == 12 and fp["frame_rate"] == 25
    assert SemanticTokenizer(SemanticFeatures("mfcc"), path).fingerprint() == fp
    moved = centroids.copy()
    moved[0, 0] += 1.0
    assert SemanticTokenizer(f, moved).fingerprint()["weights_sha256"] != fp["weights_sha256"]
    assert (
        SemanticTokenizer(SemanticFeatures("mfcc", n_mfcc=20, n_mels=40), centroids).fingerprint()["config"]
        != fp["config"]
    )


def test_kmeans_streams_with_partial_fit():
    g = np.random.default_rng(1)
    centers = g.standard_normal((4, 6)) * 5
    chunks = [centers[g.integers(0, 4, 40)] + 0.1 * g.standard_normal((40, 6)) for _ in range(6)]
    c = fit_kmeans(iter(chunks), n_clusters=4, seed=0, batch_size=50, in_memory_limit=60)
    assert c.shape == (4, 6)
    # every true center has a centroid nearby
    d = np.linalg.norm(centers[:, None] - c[None], axis=-1).min(1)
    assert d.max() < 1.0, d
    assert fit_kmeans(iter(chunks), n_clusters=4, max_samples=50).shape == (4, 6)


def test_kmeans_clips_clusters_with_warning():
    with pytest.warns(UserWarning, match="clipping"):
        c = fit_kmeans([np.random.default_rng(0).standard_normal((5, 3))], n_clusters=8)
    assert c.shape == (5, 3)


def test_hf_semantic_features_layer_and_rate(models):
    from transformers import AutoFeatureExtractor, AutoModel

    f = SemanticFeatures("hf", model=models["hubert"], layer=1, rate=25)
    assert f.sample_rate == 16_000
    wav = sine_batch(2, 2.0, 16_000)
    feats = f(wav)
    assert feats.shape == (2, 50, 32)
    assert torch.allclose(f(wav[1]), feats[1:2], atol=1e-5)
    assert f.model.config.num_hidden_layers == 1  # blocks after `layer` dropped

    # the captured layer equals transformers' hidden_states[layer], pooled 49 -> 25 frames/s
    m = AutoModel.from_pretrained(models["hubert"]).eval()
    fe = AutoFeatureExtractor.from_pretrained(models["hubert"])
    with torch.no_grad():
        hs = m(**fe([w.numpy() for w in wav], sampling_rate=16_000, return_tensors="pt"), output_hidden_states=True)
    ref = torch.nn.functional.adaptive_avg_pool1d(hs.hidden_states[1].transpose(1, 2), 50).transpose(1, 2)
    assert torch.allclose(feats, ref, atol=1e-4)

    ids = SemanticTokenizer(f, fit_kmeans([feats], 8)).encode(wav)
    assert ids.shape == (2, 50) and int(ids.max()) < 8
    fp1 = SemanticTokenizer(f, np.ones((8, 32), np.float32)).fingerprint()
    f2 = SemanticFeatures("hf", model=models["hubert"], layer=2)
    fp2 = SemanticTokenizer(f2, np.ones((8, 32), np.float32)).fingerprint()
    assert fp1["config"] != fp2["config"] and fp1["weights_sha256"] != fp2["weights_sha256"]


def test_w2v_bert_features(tmp_path):
    """w2v-BERT 2.0 family: fbank input_features from its own feature extractor, 50 Hz -> 25 Hz."""
    f = SemanticFeatures("hf", model=make_tiny_w2v_bert(tmp_path / "w2v"), layer=2, rate=25)
    wav = sine_batch(2, 1.0, 16_000)
    feats = f(wav)
    assert feats.shape == (2, 25, 32) and torch.isfinite(feats).all()
    assert torch.allclose(f(wav[:1]), feats[:1], atol=1e-4)


# ------------------------------------------------------------------------------------ MuLaN


def test_clap_embeddings_windows_and_text(clap):
    assert isinstance(clap, AudioTextEmbedder)
    assert clap.sample_rate == 48_000 and clap.dim == 32 and clap.window_seconds == 1.0
    wav = sine_batch(2, 1.0, 48_000)
    emb = clap.embed_audio(wav)
    assert emb.shape == (2, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(clap.embed_audio(wav), emb, atol=1e-6)  # deterministic
    assert torch.allclose(clap.embed_audio(wav[1]), emb[1:2], atol=1e-5)

    # 2.5 s with 1 s windows: 1 s + 1 s; the 0.5 s rest is shorter than min_window_seconds -> dropped
    assert window_spans(120_000, 48_000, 48_000) == [(0, 48_000), (48_000, 96_000)]
    assert window_spans(30_000, 48_000, 48_000) == [(0, 30_000)]
    long = sine_batch(2, 2.5, 48_000, seed=5)
    e_long = clap.embed_audio(long)
    w1 = clap.embed_windows(long[:, :48_000])
    w2 = clap.embed_windows(long[:, 48_000:96_000])
    ref = torch.nn.functional.normalize(w1 + w2, dim=-1)
    assert torch.allclose(e_long, ref, atol=1e-5)

    txt = clap.embed_text(["a rap beat with heavy drums", "calm piano"])
    assert txt.shape == (2, 32)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(clap.embed_text(["calm piano"]), txt[1:2], atol=1e-5)


def test_clap_fingerprint(models, clap):
    fp = clap.fingerprint()
    json.dumps(fp)
    for key in COMMON_KEYS + ("dim",):
        assert key in fp
    assert fp["kind"] == "mulan" and fp["dim"] == 32 and fp["sample_rate"] == 48_000
    assert build_embedder({"type": "clap", "model": models["clap"]}).fingerprint() == fp
    assert ClapEmbedder(models["clap"], window_seconds=0.5).fingerprint()["config"] != fp["config"]


# ------------------------------------------------------------------------------------ bundle


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return make_tiny_tokenizer_config(tmp_path_factory.mktemp("tok_cfg"), semantic="mfcc")


def _check_sample(sample: dict, seconds: float, bundle) -> None:
    assert sorted(sample) == ["acoustic.npy", "cond.npy", "mulan.npy", "semantic.npy"]
    a, s, m, c = sample["acoustic.npy"], sample["semantic.npy"], sample["mulan.npy"], sample["cond.npy"]
    assert a.dtype == np.int16 and a.shape == (8, int(seconds * 75))
    assert s.dtype == np.int16 and s.shape == (int(seconds * 25),)
    assert m.dtype == np.float16 and m.shape == (32,)
    assert c.dtype == np.int16 and c.shape == (3, 4)
    assert 0 <= a.min() and a.max() < 1024 and 0 <= s.min() and s.max() < 16 and 0 <= c.min() and c.max() < 1024
    assert abs(float(np.linalg.norm(m.astype(np.float32))) - 1.0) < 1e-2
    np.testing.assert_array_equal(c, bundle.quantizer.encode(m.astype(np.float32)))


def test_bundle_tokenize_matches_shard_contract(tiny_config):
    bundle = build_tokenizers(tiny_config)
    assert bundle.sample_rate == 24_000
    assert bundle.available() == ["acoustic.npy", "semantic.npy", "mulan.npy", "cond.npy"]
    wav = sine_batch(2, 2.0, 24_000)
    out = bundle.tokenize(wav)
    assert len(out) == 2
    for sample in out:
        _check_sample(sample, 2.0, bundle)
    # list input with unequal lengths (a shorter last segment): each clip tokenized on its own
    mixed = bundle.tokenize([wav[0].numpy(), wav[1, :36_000]])
    _check_sample(mixed[1], 1.5, bundle)
    for key in out[0]:
        np.testing.assert_array_equal(mixed[0][key], out[0][key])
    only = bundle.tokenize(wav[:1], entries=["semantic.npy"])
    assert list(only[0]) == ["semantic.npy"]

    fps = bundle.fingerprints()
    assert sorted(fps) == ["acoustic", "mulan", "quantizer", "semantic"]
    json.dumps(fps)
    assert fps["acoustic"]["frame_rate"] == 75 and fps["semantic"]["frame_rate"] == 25
    assert fps["semantic"]["vocab_size"] == 16 and fps["mulan"]["dim"] == 32
    assert fps["quantizer"]["namespaces"] == ["semantic", "coarse", "fine"] and fps["quantizer"]["levels"] == 4


def test_bundle_text_sourced_conditioning(tiny_config):
    """quantizer.source: text -> cond.npy quantizes the caption's MuLaN text embedding (what generation
    quantizes), mulan.npy stays the audio embedding; the source is in the fingerprint."""
    import torch

    audio_bundle = build_tokenizers(tiny_config)
    cfg = dict(tiny_config, quantizer=dict(path=tiny_config["quantizer"], source="text"))
    bundle = build_tokenizers(cfg)
    assert bundle.cond_source == "text" and audio_bundle.cond_source == "audio"
    wav = sine_batch(2, 2.0, 24_000)
    captions = ["dark trap beat, 70 BPM", "dusty boom bap loop, 92 BPM"]
    out = bundle.tokenize(wav, captions=captions)
    ref = audio_bundle.tokenize(wav)
    with torch.inference_mode():
        text = bundle.embedder.embed_text(captions).float().to(torch.float16).float()
    for i, sample in enumerate(out):
        np.testing.assert_array_equal(sample["cond.npy"], bundle.quantizer.encode(text[i : i + 1])[0].numpy())
        np.testing.assert_array_equal(sample["mulan.npy"], ref[i]["mulan.npy"])  # still the audio embedding
        np.testing.assert_array_equal(sample["semantic.npy"], ref[i]["semantic.npy"])
    assert bundle.fingerprints()["quantizer"]["source"] == "text"
    assert "source" not in audio_bundle.fingerprints()["quantizer"]  # audio fingerprints unchanged
    with pytest.raises(ValueError, match="caption"):
        bundle.tokenize(wav)
    with pytest.raises(ValueError, match="empty at positions \\[1\\]"):
        bundle.tokenize(wav, captions=["a beat", " "])
    assert list(bundle.tokenize(wav[:1], entries=["semantic.npy"])[0]) == ["semantic.npy"]  # no caption needed
    lyrics = build_tokenizers(dict(tiny_config, quantizer=dict(path=tiny_config["quantizer"], source="lyrics")))
    with pytest.raises(ValueError, match="quantizer.source"):
        lyrics.tokenize(wav, captions=captions)


def test_bundle_partial_and_new_quantizer(tiny_config):
    cfg = dict(tiny_config)
    cfg.pop("quantizer")
    cfg["semantic"] = {"features": cfg["semantic"]["features"]}  # no k-means yet
    bundle = build_tokenizers(cfg)
    assert bundle.semantic is None and bundle.semantic_features is not None and bundle.quantizer is None
    assert bundle.available() == ["acoustic.npy", "mulan.npy"]
    assert sorted(bundle.fingerprints()) == ["acoustic", "mulan"]
    with pytest.raises(ValueError, match="cannot produce"):
        bundle.tokenize(sine_batch(1, 1.0), entries=["cond.npy"])
    q = bundle.new_quantizer()
    assert q.dim == 32 and q.levels == 8 and q.codebook_size == 1024
    cfg["quantizer"] = {"path": "missing_dir", "preset": "paper"}
    with pytest.warns(UserWarning, match="quantizer"):
        assert build_tokenizers(cfg).new_quantizer().levels == 12


def test_bundle_save_load_roundtrip(models, tmp_path):
    cfg = make_tiny_tokenizer_config(tmp_path / "src", semantic="hf")
    bundle = build_tokenizers(cfg)
    wav = sine_batch(2, 1.0, 24_000, seed=9)
    out = bundle.tokenize(wav)
    fps = bundle.fingerprints()
    d = bundle.save(tmp_path / "bundle")
    shutil.rmtree(tmp_path / "src")  # the bundle is self-contained
    assert os.path.isfile(os.path.join(d, BUNDLE_FILE))
    loaded = load_bundle(d)
    assert loaded.fingerprints() == fps
    again = loaded.tokenize(wav)
    for a, b in zip(out, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    doc = json.loads((tmp_path / "bundle" / BUNDLE_FILE).read_text())
    doc["fingerprints"]["acoustic"]["levels"] = 4
    (tmp_path / "bundle" / BUNDLE_FILE).write_text(json.dumps(doc))
    with pytest.raises(BundleMismatch, match="acoustic.*levels"):
        load_bundle(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_bundle(d, check=False).acoustic.levels == 8
