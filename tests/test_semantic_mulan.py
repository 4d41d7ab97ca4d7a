"""Semantic features from a layer of our MuLaN's audio tower (``type: mulan``) and the
``musiclm eval tempo`` report.

Tiny random MuLaN (``tiny`` preset: 16 kHz, 32 mels, 20 ms hop, 2 s window = 7 time patches of
0.32 s, 2 blocks, d=64, scratch caption tokenizer) saved with ``save_mulan`` into tmp_path and
loaded back through the same path users give. Everything here is CPU-fast.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

SR = 16_000
CAPTIONS = [
    "dusty lo-fi boom bap beat at 84 bpm, mellow rhodes in d minor",
    "dark trap beat at 70 bpm with rolling hi-hats and a heavy 808",
    "drill beat at 72 bpm, sliding 808 and sparse piano",
    "lo-fi beat at 90 bpm with vinyl crackle and a soft pad",
]


def _tiny_mulan(root, seed: int = 0, tweak=None) -> str:
    from musiclm.mulan.checkpoint import save_mulan
    from musiclm.mulan.model import MuLaN, train_caption_tokenizer

    tok = os.path.join(root, "tokenizer.json")
    if not os.path.exists(tok):
        train_caption_tokenizer(CAPTIONS * 4, tok, vocab_size=120)
    torch.manual_seed(seed)
    model = MuLaN({"preset": "tiny", "text": {"tokenizer_file": tok}})
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    return save_mulan(model, os.path.join(root, f"mulan-{seed}-{tweak.__name__ if tweak else 'plain'}"))


@pytest.fixture(scope="module")
def mulan_dir(tmp_path_factory) -> str:
    return _tiny_mulan(str(tmp_path_factory.mktemp("semantic_mulan")))


def _feats(mulan_dir, **kw):
    from musiclm.semantic import SemanticFeatures

    return SemanticFeatures(type="mulan", model=mulan_dir, **{"layer": 2, "rate": 25, **kw})


def _wav(seconds: float, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, int(round(seconds * SR)), generator=g) * 0.1


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.3, 1.0, 2.0, 2.5, 4.48, 7.0])
def test_shapes_and_frame_count(mulan_dir, seconds):
    f = _feats(mulan_dir)
    assert f.sample_rate == SR and f.frame_rate == 25
    assert f.dim == 2 * 64  # 32 mels / 16 = 2 frequency patches x d_model 64, concatenated
    assert f.native_frame_seconds == pytest.approx(0.32)
    wav = _wav(seconds)
    x = f(wav)
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (2, wav.shape[1] * 25 // SR, f.dim) == (2, f.num_frames(wav.shape[1]), f.dim)
    assert torch.isfinite(x).all()


def test_mean_over_frequency_and_empty_input(mulan_dir):
    f = _feats(mulan_dir, freq="mean")
    assert f.dim == 64
    assert tuple(f(_wav(3.0)).shape) == (2, 75, 64)
    assert tuple(f(_wav(0.01)).shape) == (2, 0, 64)  # fewer samples than one frame: zero frames
    with pytest.raises(ValueError, match="freq"):
        _feats(mulan_dir, freq="max")


def test_time_alignment_and_windows(mulan_dir):
    """Each 40 ms frame is the 0.32 s patch that covers it (8 frames per patch), and a clip
    longer than the tower's window equals, on its first window, the features of that window
    alone: windows continue the patch grid without a seam."""
    f = _feats(mulan_dir, layer=1)
    m = f.mulan
    assert m["window_patches"] == 7 and m["window_samples"] == 7 * 16 * 320
    wav = _wav(6.0, batch=1)
    x = f(wav)[0]
    native = f._mulan_frames(wav)[0]
    assert native.shape[0] == 19  # 2 full windows of 7 patches + ceil((1 + 1.52 s / 20 ms) / 16) = 5
    for j in (0, 7, 8, 63, 149):
        torch.testing.assert_close(x[j], native[j * 40 // 320])
    first = f._mulan_frames(wav[:, : m["window_samples"] - m["hop"]])[0]
    torch.testing.assert_close(native[:7], first, rtol=1e-4, atol=1e-4)


def test_layer_out_of_range_and_missing_model(mulan_dir):
    from musiclm.semantic import SemanticFeatures

    for layer in (0, 3):
        with pytest.raises(ValueError, match=r"layer .* out of range 1\.\.2"):
            _feats(mulan_dir, layer=layer)(_wav(1.0))
    with pytest.raises(ValueError, match="need a model"):
        SemanticFeatures(type="mulan")


def test_ast_mulan_is_refused(tmp_path):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    from musiclm.mulan.checkpoint import save_mulan
    from musiclm.mulan.model import MuLaN, train_caption_tokenizer

    ast_dir = str(tmp_path / "tiny-ast")
    ASTModel(
        ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_length=128)
    ).save_pretrained(ast_dir)
    ASTFeatureExtractor(max_length=128).save_pretrained(ast_dir)
    tok = train_caption_tokenizer(CAPTIONS * 4, str(tmp_path / "tok.json"), vocab_size=120)
    d = save_mulan(
        MuLaN(
            {
                "preset": "tiny",
                "audio": {"kind": "ast", "pretrained": ast_dir, "seconds": 1.0},
                "text": {"tokenizer_file": tok},
            }
        ),
        str(tmp_path / "m"),
    )
    with pytest.raises(ValueError, match="spectrogram.*AST"):
        _feats(d, layer=1)(_wav(1.0))


def test_fingerprint_follows_weights_and_layer(tmp_path, mulan_dir):
    from musiclm.semantic import SemanticTokenizer

    cent = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)

    def fp(d, layer):
        return SemanticTokenizer(_feats(d, layer=layer), cent).fingerprint()

    a = fp(mulan_dir, 2)
    assert a == fp(mulan_dir, 2)  # deterministic across loads
    assert a["config"]["features"]["type"] == "mulan"
    assert a["config"]["features"]["layer"] == 2
    assert a["config"]["features"]["mulan_audio_config"]["patch"] == [16, 16]
    assert a["frame_rate"] == 25
    b = fp(mulan_dir, 1)
    assert b["config"] != a["config"] and b["weights_sha256"] != a["weights_sha256"]

    def bump_block1(model):
        model.audio_tower.encoder.layers[0].linear1.weight.add_(0.01)

    def bump_text(model):  # the text tower does not change audio features
        model.text_proj.weight.add_(0.01)

    c = fp(_tiny_mulan(str(tmp_path), tweak=bump_block1), 2)
    assert c["config"] == a["config"] and c["weights_sha256"] != a["weights_sha256"]
    d = fp(_tiny_mulan(str(tmp_path), seed=0, tweak=bump_text), 2)
    assert d["weights_sha256"] == a["weights_sha256"]

    from musiclm.data.shards import fingerprint_hash

    assert len({fingerprint_hash({"semantic": x}) for x in (a, b, c)}) == 3  # three shard folders


def test_kmeans_tokenizer_and_bundle(tmp_path, mulan_dir):
    from musiclm.semantic import SemanticTokenizer, fit_kmeans, load_centroids, save_centroids
    from musiclm.tokenizers import build_tokenizers

    f = _feats(mulan_dir)
    feats = [f(_wav(3.0, seed=s)) for s in range(3)]
    cent = fit_kmeans(feats, 16, seed=0)
    assert cent.shape == (16, f.dim)
    km = save_centroids(tmp_path / "km.safetensors", cent, f.config())
    tok = SemanticTokenizer(f, km)
    ids = tok.encode(_wav(2.5))
    assert ids.shape == (2, 62) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < 16
    _, meta = load_centroids(km, with_metadata=True)
    assert meta["features"]["type"] == "mulan"

    # the tokenizers config section, with paths relative to a base directory
    os.symlink(mulan_dir, tmp_path / "mulan")
    cfg = {"semantic": {"features": {"type": "mulan", "model": "mulan", "layer": 2}, "kmeans": "km.safetensors"}}
    bundle = build_tokenizers(cfg, base_dir=tmp_path)
    assert bundle.semantic is not None and bundle.semantic.vocab_size == 16
    assert bundle.frame_rates() == {"semantic": 25}
    wav24 = _wav(2.0, batch=2, seed=5)  # the bundle takes 24 kHz by default and resamples
    out = bundle.tokenize(
        torch.nn.functional.interpolate(wav24[:, None], scale_factor=1.5)[:, 0], entries=["semantic.npy"]
    )
    assert out[0]["semantic.npy"].dtype == np.int16 and out[0]["semantic.npy"].shape == (50,)
    fp = bundle.fingerprints()["semantic"]
    assert fp["name"] == "mulan-kmeans" and fp["vocab_size"] == 16 and fp["sample_rate"] == SR


# --------------------------------------------------------------------------------------------
# tempo from tokens
# --------------------------------------------------------------------------------------------


def _beat_tokens(bpm: float, seconds: float = 10.0, rate: int = 25, seed: int = 0) -> np.ndarray:
    """A token sequence that changes on every beat (one 'drum' token for 2 frames, then a
    background token), plus a few random flips."""
    g = np.random.default_rng(seed)
    n = int(seconds * rate)
    tok = np.full(n, 3)
    t = 0.0
    while t * rate < n:
        i = int(round(t * rate))
        tok[i : i + 2] = 1
        t += 60.0 / bpm
    flips = g.choice(n, n // 40, replace=False)
    tok[flips] = g.integers(4, 8, size=len(flips))
    return tok


@pytest.mark.parametrize("bpm", [62.0, 75.0, 88.5, 104.0])
def test_token_tempo_estimate(bpm):
    from musiclm.eval.tempo import estimate_token_tempo, tempo_errors

    est = estimate_token_tempo(_beat_tokens(bpm), 25.0)
    raw, folded = tempo_errors(np.array([est]), np.array([bpm]))
    assert folded[0] < 0.03 * bpm, (bpm, est)
    cent = np.random.default_rng(1).standard_normal((8, 4))
    est_c = estimate_token_tempo(_beat_tokens(bpm), 25.0, centroids=cent)
    assert tempo_errors(np.array([est_c]), np.array([bpm]))[1][0] < 0.03 * bpm
    assert np.isnan(estimate_token_tempo(np.zeros(250, dtype=int), 25.0))  # no change, no tempo


def test_tempo_errors_and_summary():
    from musiclm.eval.tempo import summarize, tempo_errors

    raw, folded = tempo_errors(np.array([170.0, 85.0, 60.0]), np.array([85.0, 80.0, 90.0]))
    np.testing.assert_allclose(raw, [85.0, 5.0, 30.0])
    np.testing.assert_allclose(folded, [0.0, 5.0, 30.0])
    s = summarize([170.0, 85.0, float("nan")], [85.0, 85.0, 90.0])
    assert s["n"] == 2 and s["nan"] == 1 and s["acc4"] == 0.5 and s["acc4_octave_folded"] == 1.0


def _token_shards(root, n_train=12, n_eval=6, vocab=16, cond_codebook=8, levels=2):
    """Token shards whose semantic ids beat at each clip's bpm."""
    from musiclm.data.shards import ShardWriter, write_index

    g = np.random.default_rng(0)
    styles = ["trap", "lo-fi"]
    shards = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        with ShardWriter(root, split, kind="tokens") as w:
            for i in range(n):
                style = styles[i % 2]
                bpm = float(g.uniform(60, 110))
                sem = _beat_tokens(bpm, seed=i) % vocab
                w.write(
                    {
                        "__key__": f"{split}-{i:03d}__0000",
                        "acoustic.npy": g.integers(0, 1024, (8, 750)).astype(np.int16),
                        "semantic.npy": sem.astype(np.int16),
                        "mulan.npy": g.standard_normal(128).astype(np.float16),
                        "cond.npy": g.integers(0, cond_codebook, (3, levels)).astype(np.int16),
                        "json": {
                            "clip_id": f"{split}-{i:03d}",
                            "caption": CAPTIONS[i % 4],
                            "start": 0.0,
                            "end": 10.0,
                            "tags": {"bpm": bpm, "style": style},
                        },
                    }
                )
        shards += w.shards
    fps = {"semantic": {"kind": "semantic", "frame_rate": 25, "vocab_size": vocab}}
    write_index(root, shards, kind="tokens", fingerprints=fps)
    return root


def test_eval_tempo_ceiling_and_baselines(tmp_path):
    from musiclm.eval.tempo import evaluate_tempo

    d = _token_shards(str(tmp_path / "tok"))
    res = evaluate_tempo(d, out_dir=str(tmp_path / "out"))
    m = res["methods"]
    assert set(m) == {"ceiling", "train_mean", "style_mean"}
    assert m["ceiling"]["n"] == 6 and m["ceiling"]["mae_octave_folded"] < 3.0
    assert m["train_mean"]["mae"] > m["ceiling"]["mae_octave_folded"]
    assert set(res["info"]["train_style_mean_bpm"]) == {"trap", "lo-fi"}
    assert os.path.getsize(tmp_path / "out" / "tempo.png") > 1000
    assert json.load(open(tmp_path / "out" / "tempo.json"))["methods"]["ceiling"] == m["ceiling"]


def test_eval_tempo_cli_with_generation(tmp_path, mulan_dir, capsys):
    """`musiclm eval tempo` end to end with a tiny random semantic-stage export, our tiny MuLaN's
    text embeddings and a quantizer fitted on random embeddings."""
    from safetensors.torch import save_file

    from musiclm.cli import main
    from musiclm.lm.model import Transformer
    from musiclm.lm.stages import get_stage
    from musiclm.quantize import MuLaNEmbedQuantizer

    d = _token_shards(str(tmp_path / "tok"))
    tokens = {"semantic_vocab": 16, "cond_levels": 2, "cond_codebook": 8, "window_seconds": {"semantic": 4}}
    stage = get_stage("semantic", tokens)
    cfg = stage.model_config("tiny")
    torch.manual_seed(0)
    lm = Transformer(cfg)
    weights = str(tmp_path / "sem.safetensors")
    save_file({k: v.contiguous().clone() for k, v in lm.state_dict().items()}, weights)
    with open(str(tmp_path / "sem.json"), "w") as f:
        json.dump(
            {
                "kind": "musiclm.stage_lm",
                "stage": "semantic",
                "model": cfg.to_dict(),
                "tokens": tokens,
                "window_seconds": stage.window_seconds,
                "step": 0,
            },
            f,
        )
    q = MuLaNEmbedQuantizer(128, levels=2, codebook_size=8)
    q.fit(np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32))
    qdir = q.save(str(tmp_path / "quant"))
    out = str(tmp_path / "ev")
    rc = main(
        [
            "eval",
            "tempo",
            "--shards",
            d,
            "--model",
            weights,
            "--mulan",
            mulan_dir,
            "--quantizer",
            qdir,
            "--samples",
            "2",
            "--cond-scale",
            "2.0",
            "--out",
            out,
            "--label",
            "tiny",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    m = res["methods"]
    assert {"ceiling", "generated", "generated_mismatched", "generated_audio_cond", "train_mean", "style_mean"} == set(
        m
    )
    assert len(res["info"]["text_audio_cond_agreement_per_level"]) == 2
    gain = res["info"]["following_gain_folded_bpm"]
    assert gain["captions"] <= 6 and (gain["mean"] is None or gain["ci95"][0] <= gain["mean"] <= gain["ci95"][1])
    assert m["generated"]["n"] + m["generated"]["nan"] == 12  # 6 captions x 2 samples
    assert res["info"]["generated_frames"] == 100  # the model's 4 s window at 25 Hz
    assert os.path.exists(os.path.join(out, "tempo.png"))
