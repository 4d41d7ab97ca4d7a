"""The stage transformer and the stage layouts (CPU, tiny sizes, a few seconds in all)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from musiclm.lm import (
    BOS,
    NULL_COND,
    PAD,
    PRESETS,
    SEP,
    Transformer,
    TransformerConfig,
    get_stage,
)

TOKENS = dict(
    acoustic_levels=4,
    acoustic_codebook=32,
    acoustic_rate=75,
    coarse_levels=2,
    semantic_vocab=48,
    semantic_rate=25,
    cond_namespaces=["semantic", "coarse", "fine"],
    cond_levels=3,
    cond_codebook=16,
)


def make_sample(seconds=4.0, seed=0, tokens=TOKENS):
    """A shard sample whose streams encode time: semantic[t] = t, acoustic[q, t] = t // 3 + q (the
    semantic frame it falls in), so alignment can be read back from the tokens."""
    rng = np.random.default_rng(seed)
    T_s = int(round(seconds * tokens["semantic_rate"]))
    T_a = int(round(seconds * tokens["acoustic_rate"]))
    ratio = tokens["acoustic_rate"] // tokens["semantic_rate"]
    M = min(tokens["semantic_vocab"], tokens["acoustic_codebook"])  # same wrap-around for both
    sem = (np.arange(T_s) % M).astype(np.int16)
    ac = np.stack([(np.arange(T_a) // ratio + q) % M for q in range(tokens["acoustic_levels"])]).astype(np.int16)
    cond = rng.integers(0, tokens["cond_codebook"], size=(3, tokens["cond_levels"])).astype(np.int16)
    return {
        "__key__": "clip__0000",
        "acoustic.npy": ac,
        "semantic.npy": sem,
        "mulan.npy": np.zeros(8, np.float16),
        "cond.npy": cond,
        "json": {},
    }


def tiny_model(vocab=96, seq=64, **kw):
    torch.manual_seed(0)
    return Transformer(TransformerConfig.from_preset("tiny", vocab_size=vocab, max_seq_len=seq, **kw))


# ---------------------------------------------------------------------------------------------
# model


def test_presets_and_sizes():
    assert set(PRESETS) == {"tiny", "small", "base", "paper"}
    assert PRESETS["paper"] == dict(n_layer=24, n_head=16, d_model=1024)
    m = tiny_model()
    m_untied = tiny_model(tie_embeddings=False)
    assert m.lm_head.weight is m.tok_emb.weight
    assert m_untied.num_params() == m.num_params() + 96 * 64
    assert m.flops_per_token(64) == 6 * (m.num_params(non_embedding=True) + 96 * 64) + 12 * 2 * 64 * 64
    # GPT-2 init: residual projections are scaled down
    assert m.blocks[0].mlp.proj.weight.std() < m.blocks[0].mlp.fc.weight.std()


def test_kv_cache_matches_full_forward():
    m = tiny_model().eval()
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 20)
        parts = [m(x[:, :7], cache=cache)]  # prefill
        parts.append(m(x[:, 7:12], cache=cache))  # a chunk appended to the cache (explicit mask path)
        for t in range(12, 20):  # one token at a time
            parts.append(m(x[:, t : t + 1], cache=cache))
    inc = torch.cat(parts, dim=1)
    assert cache.length == 20
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_same_grads():
    x = torch.randint(0, 96, (2, 16))
    grads = []
    for ckpt in (False, True):
        m = tiny_model(checkpointing=ckpt).train()
        m(x).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_bf16_forward_and_rope_extension():
    m = tiny_model(seq=8).to(torch.bfloat16)
    out = m(torch.randint(0, 96, (1, 20)))  # longer than max_seq_len: rotary tables extend
    assert out.dtype == torch.bfloat16 and out.shape == (1, 20, 96)


def test_sample_guidance_mask_and_greedy():
    m = tiny_model().eval()
    prefix = torch.tensor([BOS, 10, 11, SEP])
    null = torch.tensor([BOS, NULL_COND, NULL_COND, SEP])
    mask = torch.zeros(6, 96, dtype=torch.bool)
    mask[0::2, 20:30] = True
    mask[1::2, 40:50] = True
    g = torch.Generator().manual_seed(0)
    out = m.sample(prefix, 6, temperature=1.0, top_k=5, cond_scale=3.0, logits_mask=mask, null_prefix=null, generator=g)
    assert out.shape == (1, 6)
    assert ((out[0, 0::2] >= 20) & (out[0, 0::2] < 30)).all()
    assert ((out[0, 1::2] >= 40) & (out[0, 1::2] < 50)).all()
    # greedy == argmax of the full forward, token by token
    greedy = m.sample(prefix, 5, temperature=0)
    seq = prefix[None]
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, seq[:, 4:])
    with pytest.raises(ValueError):
        m.sample(prefix, 2, cond_scale=2.0)


# ---------------------------------------------------------------------------------------------
# stages


def test_vocab_layouts():
    sem, coarse, fine = (get_stage(n, TOKENS, w) for n, w in (("semantic", 4), ("coarse", 2), ("fine", 1)))
    K, C = 3, 16
    assert sem.ranges == {"special": (0, 5), "cond": (5, 5 + K * C), "semantic": (53, 101)}
    assert coarse.ranges["acoustic"] == (101, 101 + 2 * 32)
    assert "semantic" not in fine.ranges and fine.ranges["acoustic"] == (53, 53 + 4 * 32)
    for st in (sem, coarse, fine):
        assert st.vocab_size % 64 == 0 and st.vocab_size >= st.used_vocab
    assert sem.seq_len == 2 + K + 4 * 25
    assert coarse.seq_len == 3 + K + 2 * 25 + 2 * 75 * 2
    assert fine.seq_len == 3 + K + 75 * 2 + 75 * 2
    assert fine.acoustic_offset(2) == 53 + 2 * 32 and fine.target_levels == [2, 3]
    assert coarse.expected_fingerprint_fields()["acoustic"] == {"frame_rate": 75, "levels": 4, "codebook_size": 32}
    assert "acoustic" not in sem.expected_fingerprint_fields()
    assert get_stage("fine", dict(TOKENS, window_seconds={"fine": 1.6})).window_seconds == 1.6
    assert get_stage("semantic", TOKENS, 1.01).window_seconds == 1.0  # rounded down to the 40 ms grid
    # paper-like layout
    paper = get_stage("coarse", dict(acoustic_levels=12, acoustic_rate=50, cond_levels=12))
    assert paper.window_seconds == 10 and paper.seq_len == 3 + 12 + 250 + 500 * 4


@pytest.mark.parametrize("name", ["semantic", "coarse", "fine"])
def test_example_layout_and_mask(name):
    st = get_stage(name, TOKENS, {"semantic": 3, "coarse": 2, "fine": 1}[name])
    sample = make_sample(4.0)
    ex = st.example(sample, np.random.default_rng(1))
    tok, mask, level = ex["tokens"].numpy(), ex["loss_mask"].numpy(), ex["level"].numpy()
    assert tok.shape == mask.shape == level.shape == (st.seq_len,)
    assert tok[0] == BOS and tok[1 + 3] == SEP and not (tok == PAD).any()
    cond_ns = sample["cond.npy"][["semantic", "coarse", "fine"].index(name)]
    assert list(tok[1:4]) == [st.cond_offset(k) + int(cond_ns[k]) for k in range(3)]
    # the mask covers exactly the positions whose next token is a target token
    n_target = st.target_length()
    targets = tok[1:][mask[:-1]]
    assert mask.sum() == n_target and not mask[-1]
    assert np.array_equal(np.nonzero(mask)[0], np.arange(st.seq_len - 1 - n_target, st.seq_len - 1))
    for t, ids in enumerate(targets):
        a, b = st.target_range(t)
        assert a <= ids < b
    if st.target_levels:  # frame-major: levels cycle within each frame
        nl = len(st.target_levels)
        assert list(level[mask][: 2 * nl]) == st.target_levels * 2
        assert (level[~mask] == -1).all()
    else:
        assert (level == -1).all()
    # the generation helpers agree with the training layout
    w = st.crop(sample, start_step=0)
    pre = st.prefix(w["cond"], semantic=w["semantic"], coarse=None if w["acoustic"] is None else w["acoustic"][:2])
    full, t0 = st.build(w["cond"], w["semantic"], w["acoustic"])
    assert torch.equal(pre, torch.from_numpy(full[:t0]))
    decoded = st.decode_target(full[t0:])
    if name == "semantic":
        assert np.array_equal(decoded, w["semantic"])
    else:
        assert np.array_equal(decoded, w["acoustic"][st.target_levels])
    m = st.target_logits_mask(len(full) - t0)
    assert m[np.arange(len(full) - t0), full[t0:]].all() and m.sum() == (len(full) - t0) * (
        48 if name == "semantic" else 32
    )


def test_frame_major_and_alignment_across_stages():
    sample = make_sample(4.0)
    coarse = get_stage("coarse", TOKENS, 2.0)
    sem = get_stage("semantic", TOKENS, 2.0)
    for seed in range(5):
        ex = coarse.example(sample, np.random.default_rng(seed))
        tok = ex["tokens"].numpy()
        n_s = 50
        s_ids = tok[5 : 5 + n_s] - coarse.semantic_offset
        ac = tok[5 + n_s + 1 :][: 150 * 2]
        assert tok[5 + n_s] == SEP
        frames = ac.reshape(150, 2)  # frame-major: [t, level]
        codes = frames - np.array([coarse.acoustic_offset(0), coarse.acoustic_offset(1)])
        assert np.array_equal(codes[:, 1], (codes[:, 0] + 1) % 32)  # level 1 of frame t follows level 0
        # acoustic frame t (75 Hz) lies in semantic frame t // 3 (25 Hz): the streams are aligned
        assert np.array_equal(codes[:, 0], s_ids[np.arange(150) // 3])
        # the semantic stage cut at the same start sees the same semantic frames
        w_c = coarse.crop(sample, np.random.default_rng(seed))
        w_s = sem.crop(sample, start_step=int(round(w_c["start_seconds"] * 25)))
        assert np.array_equal(w_s["semantic"], w_c["semantic"])
        assert np.array_equal(w_c["acoustic"][0], w_c["semantic"][np.arange(150) // 3])


def test_random_offsets_on_common_grid():
    st = get_stage("coarse", TOKENS, 1.0)
    sample = make_sample(4.0)
    rng = np.random.default_rng(0)
    starts = [st.crop(sample, rng)["start_seconds"] for _ in range(200)]
    for s in starts:
        assert abs(s * 25 - round(s * 25)) < 1e-9 and abs(s * 75 - round(s * 75)) < 1e-9
        assert 0 <= s <= 3.0
    assert len(set(starts)) > 30  # 76 possible offsets
    assert st.layout.grid == Fraction(1, 25)
    odd = get_stage("coarse", dict(TOKENS, acoustic_rate=50), 1.0)
    assert odd.layout.grid == Fraction(1, 25) and odd.layout.frames_per_grid("acoustic") == 2


def test_short_sample_padded_and_masked():
    st = get_stage("coarse", TOKENS, 2.0)
    sample = make_sample(0.6)  # 15 semantic frames, 45 acoustic frames
    ex = st.example(sample, np.random.default_rng(0))
    tok, mask = ex["tokens"].numpy(), ex["loss_mask"].numpy()
    n = 5 + 15 + 1 + 45 * 2
    assert (tok[n:] == PAD).all() and (tok[:n] != PAD).all()
    assert mask.sum() == 45 * 2 and not mask[n - 1 :].any()
    assert tok[5 + 15] == SEP


def test_cond_dropout_rate():
    st = get_stage("semantic", TOKENS, 1.0)
    sample = make_sample(2.0)
    rng = np.random.default_rng(0)
    exs = [st.example(sample, rng, cond_dropout=0.25) for _ in range(800)]
    dropped = np.array([bool(e["cond_dropped"]) for e in exs])
    assert abs(dropped.mean() - 0.25) < 0.05
    for e, d in zip(exs[:50], dropped[:50]):
        cond = e["tokens"][1:4]
        assert bool((cond == NULL_COND).all()) == d
    null_prefix = st.prefix(None)
    assert list(null_prefix) == [BOS, NULL_COND, NULL_COND, NULL_COND, SEP]


def test_loss_metrics_and_overfit():
    torch.manual_seed(0)
    st = get_stage("coarse", TOKENS, 0.4)
    rng = np.random.default_rng(0)
    batch = st.collate([st.example(make_sample(2.0, seed=i), rng) for i in range(4)])
    assert batch["tokens"].shape == (4, st.seq_len)
    model = Transformer(st.model_config("tiny"))
    loss, metrics = st.loss(model(batch["tokens"]), batch)
    assert set(metrics) == {"loss", "accuracy", "tokens", "loss/level_0", "loss/level_1"}
    assert metrics["tokens"] == batch["loss_mask"].sum()
    assert abs(loss.item() - math.log(st.vocab_size)) < 1.0  # starts near uniform
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, metrics = st.loss(model(batch["tokens"]), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * math.log(st.vocab_size), loss.item()
    assert metrics["accuracy"] > 0.5


# ---------------------------------------------------------------------------------------------
# benchmarks (smoke: tiny sizes)


def test_bench_lm_smoke():
    from musiclm.bench.lm import run

    r = run(preset="tiny", seq_len=32, batch_size=2, steps=1, warmup=1, threads=1, compile=False)
    assert r["ours"]["tokens_per_s"] > 0 and r["gpt2"]["tokens_per_s"] > 0
    assert r["ours"]["params"] == r["gpt2"]["params"] - 32 * 64  # GPT-2 adds learned positions


def test_bench_scaling_table():
    from musiclm.bench.scaling import render_markdown, run

    r = run()
    rows = {(x["stage"], x["gpus"]): x for x in r["memory"]}
    assert set(g for _, g in rows) == {8, 64, 512}
    paper = rows[("coarse", 8)]
    assert paper["zero3_gb"] < paper["zero2_gb"] < paper["zero1_gb"]
    md = render_markdown(r)
    assert "| semantic |" in md and "A100" in md and "H100" in md


def test_rope_real_arithmetic_equals_the_complex_rotation():
    """Rotary embeddings in real arithmetic (what torch.compile can fuse) give the numbers of the
    complex-multiply formulation they replaced."""
    from musiclm.lm.model import apply_rope, rope_frequencies

    torch.manual_seed(0)
    hd, L = 16, 37
    x = torch.randn(2, L, 3, hd)
    freqs = rope_frequencies(hd, L, 10000.0)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(L, dtype=torch.float32), inv)
    ref = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.polar(torch.ones_like(ang), ang)[:, None, :]
    ).flatten(-2)
    torch.testing.assert_close(apply_rope(x, freqs), ref, rtol=1e-6, atol=1e-6)
    # a rotation keeps each pair's norm, and position 0 is the identity
    torch.testing.assert_close(apply_rope(x, freqs)[:, 0], x[:, 0])
    assert apply_rope(x.bfloat16(), freqs).dtype == torch.bfloat16
