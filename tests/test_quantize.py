"""ResidualVQ and MuLaNEmbedQuantizer: fitting, round trips, persistence, fingerprints."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from musiclm.quantize import QUANTIZER_PRESETS, MuLaNEmbedQuantizer, ResidualVQ, auto_codebook_size


def clustered(n=300, dim=32, clusters=6, noise=0.03, seed=0, normalize=True) -> np.ndarray:
    g = np.random.default_rng(seed)
    centers = g.standard_normal((clusters, dim))
    x = centers[g.integers(0, clusters, n)] + noise * g.standard_normal((n, dim))
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_rvq_fit_roundtrip_shapes_and_cosine():
    x = clustered(n=400, dim=16, clusters=8)
    rvq = ResidualVQ(16, levels=3, codebook_size=32).fit(x, seed=0)
    codes = rvq.encode(x)
    assert codes.shape == (400, 3) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    y = rvq.decode(codes)
    assert y.shape == (400, 16)
    assert rvq.reconstruction_cosine(x) > 0.99
    # coarser reconstructions from the first levels are worse (or equal), never better
    err = [float(((rvq.decode(codes[:, :k]) - torch.from_numpy(x)) ** 2).sum()) for k in (1, 2, 3)]
    assert err[0] >= err[1] >= err[2]
    # batched [..., D] layout
    assert rvq.encode(torch.from_numpy(x).reshape(20, 20, 16)).shape == (20, 20, 3)


def test_rvq_clips_codebook_to_samples_with_warning():
    x = clustered(n=20, dim=8)
    rvq = ResidualVQ(8, levels=2, codebook_size=64)
    with pytest.warns(UserWarning, match="only 20 vectors"):
        rvq.fit(x)
    assert rvq.n_codes.tolist() == [20, 20]
    codes = rvq.encode(x)
    assert int(codes.max()) < 20
    assert rvq.reconstruction_cosine(x) > 0.999


def test_rvq_training_forward_straight_through_and_ema():
    torch.manual_seed(0)
    x = torch.from_numpy(clustered(n=256, dim=8, normalize=False))
    rvq = ResidualVQ(8, levels=2, codebook_size=16, ema_decay=0.8).fit(x[:64])
    before = rvq.codebooks.clone()
    rvq.train()
    inp = x.clone().requires_grad_(True)
    q, codes, loss = rvq(inp)
    assert q.shape == x.shape and codes.shape == (256, 2) and torch.isfinite(loss)
    (q.sum() + loss).backward()
    assert inp.grad is not None and torch.isfinite(inp.grad).all()
    assert not torch.equal(before, rvq.codebooks)  # EMA moved the codebooks
    rvq.eval()
    snap = rvq.codebooks.clone()
    rvq(x)
    assert torch.equal(snap, rvq.codebooks)  # no update in eval mode


def test_mulan_quantizer_encode_layout_and_cosine():
    x = clustered(n=300, dim=32, clusters=6)
    q = MuLaNEmbedQuantizer(32, levels=4, codebook_size=64).fit(x, seed=0)
    codes = q.encode(x)
    assert isinstance(codes, np.ndarray) and codes.dtype == np.int16
    assert codes.shape == (300, 3, 4)
    assert codes.min() >= 0 and codes.max() < 64
    t = q.encode(torch.from_numpy(x[:5]))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int16 and t.shape == (5, 3, 4)
    assert q.encode(x[0]).shape == (3, 4)
    cos = q.reconstruction_cosine(x)
    assert set(cos) == {"semantic", "coarse", "fine", "mean"}
    assert cos["mean"] > 0.95, cos
    rec = q.decode(codes)
    assert rec.shape == (300, 3, 32)
    # namespaces are fitted with different seeds -> not all identical codebooks
    assert not torch.equal(q.rvq["semantic"].codebooks, q.rvq["coarse"].codebooks)


def test_mulan_quantizer_defaults_and_presets():
    q = MuLaNEmbedQuantizer(16)
    assert q.levels == 8 and q.codebook_size == 1024 and q.namespaces == ["semantic", "coarse", "fine"]
    p = MuLaNEmbedQuantizer.from_preset(16, "paper")
    assert p.levels == QUANTIZER_PRESETS["paper"]["levels"] == 12


def test_mulan_quantizer_save_load_identical_codes_and_fingerprint(tmp_path):
    x = clustered(n=120, dim=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = MuLaNEmbedQuantizer(24, levels=3, codebook_size=1024).fit(x, seed=1)  # clipped: 120 < 1024
    d = q.save(tmp_path / "q")
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert files == ["config.json", "quantizer.safetensors"]
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["levels"] == 3 and cfg["codebook_size"] == 1024 and cfg["fitted_on"] == 120
    r = MuLaNEmbedQuantizer.load(d)
    np.testing.assert_array_equal(q.encode(x), r.encode(x))

    fp = q.fingerprint()
    assert fp == r.fingerprint()
    json.dumps(fp)
    for key in ("kind", "name", "config", "weights_sha256", "sample_rate", "namespaces", "levels", "codebook_size"):
        assert key in fp
    assert fp["kind"] == "quantizer" and fp["levels"] == 3 and fp["codebook_size"] == 1024

    # weights change -> fingerprint changes
    r.rvq["fine"].codebooks[0, 0, 0] += 1.0
    assert r.fingerprint()["weights_sha256"] != fp["weights_sha256"]
    # config change (same weights layout, more levels) -> fingerprint changes
    q2 = MuLaNEmbedQuantizer(24, levels=4, codebook_size=1024)
    assert q2.fingerprint()["config"] != fp["config"]
    # refit with another seed -> different weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q3 = MuLaNEmbedQuantizer(24, levels=3, codebook_size=1024).fit(x, seed=7)
    assert q3.fingerprint()["weights_sha256"] != fp["weights_sha256"]


def test_auto_codebook_size_follows_the_corpus():
    assert auto_codebook_size(200) == 16  # the 200-clip demo
    assert auto_codebook_size(900) == 64  # the 1,000-clip demo's train split
    assert auto_codebook_size(10) == 16  # never below the minimum
    assert auto_codebook_size(5_000_000) == 1024  # a real corpus: the preset's size
    assert auto_codebook_size(5_000_000, cap=256) == 256
    sizes = [auto_codebook_size(n) for n in range(1, 100_000, 997)]
    assert sizes == sorted(sizes) and all(s & (s - 1) == 0 for s in sizes)  # monotone powers of two


def test_bundle_new_quantizer_auto_codebook():
    from musiclm.tokenizers import build_tokenizers

    bundle = build_tokenizers({"quantizer": {"preset": "paper", "codebook_size": "auto"}})
    q = bundle.new_quantizer(dim=16, num_embeddings=900)
    assert (q.levels, q.codebook_size) == (12, 64)
    with pytest.raises(ValueError, match="number of embeddings"):
        bundle.new_quantizer(dim=16)
    fixed = build_tokenizers({"quantizer": {"preset": "default"}}).new_quantizer(dim=16, num_embeddings=900)
    assert fixed.codebook_size == 1024  # an explicit/preset size is kept


def _pinned_input() -> np.ndarray:
    g = np.random.default_rng(1234)
    centers = g.standard_normal((10, 16))
    x = centers[g.integers(0, 10, 200)] + 0.05 * g.standard_normal((200, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_mulan_quantizer_outputs_and_fingerprint_are_pinned(tmp_path):
    """Conditioning tokens already in shards stay valid when ResidualVQ changes: the same fit on a
    fixed input gives the same codes, the same buffers (state-dict keys and bytes) and the same
    fingerprint as the code that wrote them (values recorded before the codec's ResidualVQ upgrades),
    and a quantizer directory in the old layout loads strictly."""
    import hashlib

    from musiclm.fingerprint import canonical_hash

    x = _pinned_input()
    q = MuLaNEmbedQuantizer(16, levels=3, codebook_size=32).fit(x, seed=3)
    codes = q.encode(x)
    assert codes[:2].tolist() == [[[17, 20, 30], [6, 19, 26], [13, 8, 20]], [[7, 2, 25], [2, 17, 10], [21, 2, 26]]]
    assert hashlib.sha256(codes.tobytes()).hexdigest() == (
        "a4a9f1afe6f21499b358a70262998ae6d9a49a2155ce5d4da43bb76f84328d75"
    )
    assert sorted(q.state_dict()) == [
        f"rvq.{ns}.{b}" for ns in ("coarse", "fine", "semantic") for b in ("codebooks", "fitted", "n_codes")
    ]
    fp = q.fingerprint()
    assert fp["weights_sha256"] == "9806d04ad6ec5a326e4064fe511b7e9d52d22d3f6a4daf1495cea2d75d12e3eb"
    assert canonical_hash(fp) == "cf935ce2220b0ff0"
    r = MuLaNEmbedQuantizer.load(q.save(tmp_path / "q"))
    np.testing.assert_array_equal(r.encode(x), codes)
    assert canonical_hash(r.fingerprint()) == "cf935ce2220b0ff0"


# ----------------------------------------------------------------------------- the codec's training machinery


def _blobs(n=512, dim=8, clusters=4, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g) * 2
    x = centers[torch.randint(0, clusters, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g)
    return x, centers


def test_rvq_kmeans_init_from_the_first_batches():
    x, _ = _blobs()
    rvq = ResidualVQ(8, levels=2, codebook_size=8, ema_decay=0.99, kmeans_init=True, kmeans_init_batches=2)
    rvq.train()

    def rel_err():
        return float(((rvq.decode(rvq.encode(x)) - x) ** 2).sum() / (x**2).sum())

    before = rel_err()
    assert not bool(rvq.fitted) and before > 0.9  # random 0.02-scale codebooks
    rvq(x[:256])  # first batch: collected, codes from the random codebooks
    assert not bool(rvq.fitted)
    rvq(x[256:])  # second batch: fitted on both
    assert bool(rvq.fitted)
    assert rel_err() < 1e-3 and rvq.reconstruction_cosine(x) > 0.999
    snap = rvq.codebooks.clone()
    rvq.eval()
    rvq(x)
    assert torch.equal(snap, rvq.codebooks)  # nothing moves in eval mode, and no second init
    # the options appear in the config only when used (the MuLaN quantizer's config is unchanged)
    assert rvq.config()["kmeans_init"] is True and "kmeans_init" not in ResidualVQ(8).config()


def test_rvq_ema_moves_codewords_to_the_cluster_means():
    x, centers = _blobs(clusters=4, noise=0.01)
    rvq = ResidualVQ(8, levels=1, codebook_size=4, ema_decay=0.5)
    rvq.fit(x + 0.3)  # k-means on shifted data: every codeword off by 0.3 per dimension
    off = torch.cdist(rvq.codebooks[0], centers).min(1).values
    assert float(off.min()) > 0.5
    rvq.train()
    for _ in range(30):
        rvq(x)
    err = torch.cdist(rvq.codebooks[0], centers).min(1).values
    assert float(err.max()) < 0.05, err
    assert rvq.stats["perplexity"].shape == (1,) and 3.5 < float(rvq.stats["perplexity"][0]) <= 4.0


def test_rvq_dead_code_restart_counts_and_revives_codes():
    x, centers = _blobs(clusters=4, noise=0.05)
    rvq = ResidualVQ(8, levels=2, codebook_size=16, ema_decay=0.8, dead_code_threshold=0.5)
    rvq.fit(x)
    with torch.no_grad():  # 12 of 16 level-1 codes far from any data: never chosen, they die
        rvq.codebooks[0, 4:] = 100.0
        rvq.embed_sum[0, 4:] = 100.0
        rvq.codebooks[0, :4] = centers
        rvq.embed_sum[0, :4] = centers
    rvq.train()
    total = torch.zeros(2, dtype=torch.long)
    for _ in range(10):
        rvq(x)
        total += rvq.stats["restarts"]
    assert int(total[0]) >= 12 and torch.equal(total, rvq.restarts)
    # every level-1 code now sits near the data (restarted from batch vectors, then EMA-updated)
    dist = torch.cdist(rvq.codebooks[0], x).min(1).values
    assert float(dist.max()) < 1.0, dist
    # and is used: level-1 perplexity well above the 4 codes it had
    rvq(x)
    assert float(rvq.stats["perplexity"][0]) > 5
    with pytest.raises(ValueError, match="needs ema_decay"):
        ResidualVQ(8, dead_code_threshold=1.0)
    assert "restarts" not in ResidualVQ(8, ema_decay=0.9).state_dict()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_rvq_n_quantizers_is_honoured_at_every_level_count(mode):
    x, _ = _blobs(n=64, dim=8, clusters=8, noise=0.5)
    rvq = ResidualVQ(8, levels=4, codebook_size=16).fit(x)
    rvq.train(mode == "train")
    errs = []
    for k in range(1, 5):
        q, codes, loss = rvq(x, n_quantizers=k)
        assert codes.shape == (64, 4)
        torch.testing.assert_close(q, rvq.decode(codes[:, :k]))
        errs.append(float(((q - x) ** 2).mean()))
        assert torch.isfinite(loss)
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1]
    # one count per batch element
    xb = x.reshape(4, 16, 8)
    q, codes, _ = rvq(xb, n_quantizers=torch.tensor([1, 2, 3, 4]))
    for b in range(4):
        torch.testing.assert_close(q[b], rvq.decode(codes[b, :, : b + 1]))
    with pytest.raises(ValueError, match="1..4"):
        rvq(x, n_quantizers=5)


def test_rvq_quantizer_dropout_draws_every_level_count_per_example():
    torch.manual_seed(0)
    x, _ = _blobs(n=256, dim=8, clusters=8, noise=0.5)
    rvq = ResidualVQ(8, levels=3, codebook_size=16, quantizer_dropout=1.0).fit(x)
    rvq.train()
    seen = set()
    xb = x.reshape(32, 8, 8)
    for _ in range(5):
        q, codes, _ = rvq(xb)
        for b in range(32):
            k = next(k for k in range(1, 4) if torch.allclose(q[b], rvq.decode(codes[b, :, :k])))
            seen.add(k)
    assert seen == {1, 2, 3}
    assert 1.0 <= float(rvq.stats["n_quantizers"]) < 3.0
    rvq.eval()  # no dropout at inference
    q, codes, _ = rvq(xb)
    torch.testing.assert_close(q, rvq.decode(codes))
