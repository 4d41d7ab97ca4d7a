"""`musiclm generate`: the sampler (musiclm.lm.sampling), the pipeline (musiclm.generate) and the CLI.

Tiny random parts built in the test (musiclm.bench.generate.random_parts("tiny")): SoundStream
"tiny" (8 kHz, 50 Hz, 4 levels x 64, coarse 2), MFCC semantic tokens (25 Hz, 16 ids), a tiny
MuLaN with a 2 x 16 conditioning quantizer, three tiny stage Transformers with 1.0 / 0.4 / 0.2 s
windows (grid 40 ms: 1 semantic and 2 acoustic frames per step).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from musiclm.bench.generate import random_parts
from musiclm.generate import (
    GenerationRequestError,
    MusicLM,
    parse_story_prompt,
    rank_order,
    sampling_overrides,
    score_candidates,
)
from musiclm.lm.sampling import SamplingSettings, plan_windows, sample_stage
from musiclm.lm.stages import NULL_COND, STAGES
from musiclm.mulan.embedder import AudioTextEmbedder

SR = 8000  # the tiny SoundStream's rate
CAPTION = "hard-hitting trap beat at 70 bpm with dark piano"
OTHER = "dark drill beat with sliding 808 bass"  # different semantic/coarse conditioning codes than CAPTION


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return random_parts("tiny", str(tmp_path_factory.mktemp("parts")), seed=0)


@pytest.fixture(scope="module")
def model(parts):
    return MusicLM(**parts)


def _gen(model, caption=CAPTION, **kw):
    kw.setdefault("duration", 0.9)
    kw.setdefault("num_samples", 2)
    return model.generate(caption, progress=False, **kw)


def _generation_order(result, name):
    """Tokens of stage ``name`` in the order the candidates were generated (result.tokens is ranked)."""
    out = np.empty_like(result.tokens[name])
    for r, i in enumerate(result.order):
        out[i] = result.tokens[name][r]
    return out


# ------------------------------------------------------------------------------------------ sampler


def test_plan_windows_cover_every_step_once():
    for total, W, overlap, known, switches in [
        (33, 10, 0.5, 0, (0,)),
        (7, 10, 0.5, 0, (0,)),
        (50, 25, 1 / 3, 6, (0,)),
        (40, 10, 0.5, 0, (0, 13, 31)),
        (40, 10, 0.5, 12, (0, 13)),
    ]:
        ws = plan_windows(total, W, overlap, known, switches)
        sampled = np.zeros(total, dtype=int)
        for i, w in enumerate(ws):
            assert 0 <= w.start <= w.sampled_from < w.end <= total and w.end - w.start <= W
            sampled[w.sampled_from : w.end] += 1
            # no window samples across a switch; it uses the segment it samples in
            seg_starts = list(switches) + [total]
            assert seg_starts[w.segment] <= w.sampled_from and w.end <= seg_starts[w.segment + 1]
            if i and w.sampled_from >= W:  # a later window keeps at least the overlap as context
                assert w.sampled_from - w.start >= round(overlap * W)
        assert (sampled[known:] == 1).all() and (sampled[:known] == 0).all()


def test_same_seed_same_tokens_and_audio_exact_length(model):
    a = _gen(model, duration=1.3, seed=3)  # 1.3 s: not a multiple of any window (1.0 / 0.4 / 0.2 s)
    b = _gen(model, duration=1.3, seed=3)
    c = _gen(model, duration=1.3, seed=4)
    for name in STAGES:
        np.testing.assert_array_equal(a.tokens[name], b.tokens[name])
    torch.testing.assert_close(a.wavs, b.wavs, rtol=0, atol=0)
    assert not np.array_equal(a.tokens["semantic"], c.tokens["semantic"])
    steps = math.ceil(1.3 / 0.04)  # 33 grid steps
    assert a.wavs.shape == (2, round(1.3 * SR))
    assert a.tokens["semantic"].shape == (2, steps)
    assert a.tokens["coarse"].shape == (2, 2, 2 * steps) and a.tokens["fine"].shape == (2, 2, 2 * steps)
    assert len(a.windows["fine"]) > 5 and a.windows["semantic"][-1]["end"] == pytest.approx(steps * 0.04)
    assert a.rtf > 0 and set(a.timings) >= {"text", "semantic", "coarse", "fine", "decode", "rerank", "total"}


def test_windows_keep_streams_aligned(model, monkeypatch):
    """Window t of the coarse stage sees the semantic ids of its own span, the fine stage the coarse
    codes of its span, and every window's forced context is the stage's own earlier output."""
    calls = {name: [] for name in STAGES}
    for name in STAGES:
        m = model.stages[name][1]
        real = m.sample

        def spy(prefix, n_new, *a, _real=real, _name=name, **kw):
            calls[_name].append(prefix.clone())
            return _real(prefix, n_new, *a, **kw)

        monkeypatch.setattr(m, "sample", spy)
    res = _gen(model, duration=1.3, seed=1)
    sem, coarse, fine = (_generation_order(res, n) for n in STAGES)
    K = model.stages["semantic"][0].layout.cond_levels
    for name in STAGES:
        st = model.stages[name][0]
        assert len(calls[name]) == len(res.windows[name])
        for prefix, w in zip(calls[name], res.windows[name]):
            a, s, e = (round(w[k] / 0.04) for k in ("start", "sampled_from", "end"))
            body = prefix[:, K + 2 :].numpy()  # after BOS cond[K] SEP
            if name == "semantic":
                ctx = body[:, : s - a] - st.semantic_offset
                np.testing.assert_array_equal(ctx, sem[:, a:s])
            elif name == "coarse":
                np.testing.assert_array_equal(body[:, : e - a] - st.semantic_offset, sem[:, a:e])
                forced = body[:, e - a + 1 :]  # after the second SEP
                want = np.stack([st.acoustic_ids(c[:, 2 * a : 2 * s], st.target_levels) for c in coarse])
                np.testing.assert_array_equal(forced, want)
            else:
                n = 2 * (e - a) * 2  # frames x coarse levels
                want = np.stack([st.acoustic_ids(c[:, 2 * a : 2 * e], range(2)) for c in coarse])
                np.testing.assert_array_equal(body[:, :n], want)
                want_f = np.stack([st.acoustic_ids(f[:, 2 * a : 2 * s], st.target_levels) for f in fine])
                np.testing.assert_array_equal(body[:, n + 1 :], want_f)


def test_kv_cache_gives_the_logits_of_uncached_sampling_every_stage(model):
    a = _gen(model, duration=1.2, seed=2, return_logits=True)
    b = _gen(model, duration=1.2, seed=2, return_logits=True, use_cache=False)
    for name in STAGES:
        np.testing.assert_array_equal(a.tokens[name], b.tokens[name])
        assert len(a.logits[name]) == len(b.logits[name]) >= 2
        for la, lb in zip(a.logits[name], b.logits[name]):
            torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


def test_cfg_scale_one_is_conditional_sampling_and_guidance_mixes_logits(model, parts):
    codes = parts["tokenizers"].quantizer.encode(parts["tokenizers"].embedder.embed_text([CAPTION])).numpy()
    rng = np.random.default_rng(0)
    for name in STAGES:
        st, m = model.stages[name]
        kw = {}
        if name == "coarse":
            kw["semantic"] = rng.integers(0, 16, st.semantic_frames)
        if name == "fine":
            kw["coarse"] = rng.integers(0, 64, (2, st.acoustic_frames))
        cond = codes[0, st.namespace_index]
        prefix, null = st.prefix(cond, **kw)[None], st.prefix(None, **kw)[None]
        n = 8
        mask = st.target_logits_mask(n)
        t1, l1 = m.sample(
            prefix,
            n,
            cond_scale=1.0,
            null_prefix=null,
            logits_mask=mask,
            generator=torch.Generator().manual_seed(0),
            return_logits=True,
        )
        t2, l2 = m.sample(prefix, n, logits_mask=mask, generator=torch.Generator().manual_seed(0), return_logits=True)
        torch.testing.assert_close(l1, l2, rtol=0, atol=0)
        assert torch.equal(t1, t2)
        # scale 3: the logits are null + 3 (cond - null) of the two sequences, each run alone
        t3, l3 = m.sample(
            prefix, n, cond_scale=3.0, null_prefix=null, logits_mask=mask, temperature=0, return_logits=True
        )
        with torch.no_grad():
            lc = m(torch.cat([prefix, t3], 1))[:, prefix.shape[1] - 1 : -1].float()
            ln = m(torch.cat([null, t3], 1))[:, null.shape[1] - 1 : -1].float()
        torch.testing.assert_close(l3, ln + 3.0 * (lc - ln), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(lc, ln)  # the conditioning matters, so the check is not vacuous


def test_sampler_top_p_keeps_the_nucleus(model):
    st, m = model.stages["semantic"]
    prefix = st.prefix(np.zeros(2, dtype=np.int64))[None].expand(64, -1)
    g = torch.Generator().manual_seed(0)
    mask = st.target_logits_mask(1)
    _, logits = m.sample(prefix[:1], 1, logits_mask=mask, return_logits=True)
    allowed = logits[0, 0].masked_fill(~mask[0], float("-inf"))
    probs = torch.softmax(allowed, -1)
    order = torch.argsort(probs, descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.3).sum()) + 1].tolist())
    drawn = m.sample(prefix, 1, logits_mask=mask, top_p=0.3, generator=g)[:, 0]
    assert set(drawn.tolist()) <= nucleus
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=1.5)


# ------------------------------------------------------------------------------------------ ranking


class ToneEmbedder(AudioTextEmbedder):
    """A transparent stand-in for MuLaN: audio -> square root of the energy in 8 log-spaced bands,
    text "... N Hz ..." -> the band of N. A clip that is a tone at N Hz matches its caption."""

    edges = np.geomspace(60, 3900, 9)

    @property
    def sample_rate(self) -> int:
        return SR

    @property
    def dim(self) -> int:
        return 8

    @property
    def window_seconds(self) -> float:
        return 1.0

    def embed_windows(self, wav):
        spec = torch.fft.rfft(torch.as_tensor(wav).float(), dim=-1).abs() ** 2
        freqs = torch.fft.rfftfreq(wav.shape[-1], 1 / SR)
        bands = [spec[:, (freqs >= lo) & (freqs < hi)].sum(-1) for lo, hi in zip(self.edges, self.edges[1:])]
        return torch.nn.functional.normalize(torch.stack(bands, -1).sqrt(), dim=-1)

    def embed_text(self, texts):
        out = torch.zeros(len(texts), 8)
        for i, t in enumerate(texts):
            hz = float(t.split(" Hz")[0].split()[-1])
            out[i, int(np.searchsorted(self.edges, hz)) - 1] = 1.0
        return out

    def fingerprint(self):
        return {"kind": "mulan", "name": "tones"}


def test_rerank_puts_a_matching_clip_first_and_returns_score_order(model):
    res = _gen(model, duration=1.0, num_samples=3, seed=0)
    # the pipeline's own ranking: scores best first, and they are the scores of the wavs returned
    assert res.scores == sorted(res.scores, reverse=True) and sorted(res.order) == [0, 1, 2]
    again = score_candidates(model.tokenizers.embedder, res.wavs, res.sample_rate, [CAPTION])
    np.testing.assert_allclose(again, res.scores, rtol=1e-5, atol=1e-6)
    # a real clip that matches the caption, injected among the generated candidates, ranks first
    t = np.arange(res.wavs.shape[-1]) / SR
    clip = torch.tensor(0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(0).standard_normal(len(t)))
    wavs = torch.cat([res.wavs[:1], clip[None].float(), res.wavs[1:]])
    scores = score_candidates(ToneEmbedder(), wavs, SR, ["a pure tone at 440 Hz"])
    order = rank_order(scores)
    assert order[0] == 1 and scores[1] > 0.9
    assert list(np.asarray(scores)[order]) == sorted(scores, reverse=True)
    # story mode scores each span against its own caption
    half = wavs.shape[-1] // 2
    two = torch.cat([wavs[1:2, :half], 0.3 * torch.sin(2 * np.pi * 2000 * torch.arange(half) / SR)[None]], -1)
    s = score_candidates(ToneEmbedder(), two, SR, ["tone at 440 Hz", "tone at 2000 Hz"], [(0, 0.5, 0), (0.5, 1.0, 1)])
    assert s[0] > 0.9


# ------------------------------------------------------------------------------------------ modes


def _cond_ids(model, name, caption):
    st = model.stages[name][0]
    tk = model.tokenizers
    codes = tk.quantizer.encode(tk.embedder.embed_text([caption])).numpy()[0, st.namespace_index]
    return st.cond_ids(codes).tolist()


def test_story_mode_switches_conditioning_at_the_given_time(model):
    assert _cond_ids(model, "semantic", CAPTION) != _cond_ids(model, "semantic", OTHER)
    res = model.generate([(0, CAPTION), (0.6, OTHER)], duration=1.2, num_samples=2, seed=0, progress=False)
    assert res.request["story"][1] == {"start_seconds": 0.6, "caption": OTHER}
    for name in STAGES:
        first, second = _cond_ids(model, name, CAPTION), _cond_ids(model, name, OTHER)
        seen = set()
        for w in res.windows[name]:
            assert w["end"] <= 0.6 + 1e-9 or w["sampled_from"] >= 0.6 - 1e-9  # no window samples across 0.6 s
            want = first if w["sampled_from"] < 0.6 - 1e-9 else second
            assert w["cond_ids"] == want, (name, w)
            seen.add(w["segment"])
        assert seen == {0, 1}
    # the same via the command-line form
    assert parse_story_prompt("0.6:drums come in") == (0.6, "drums come in")
    assert parse_story_prompt("1:30:outro") == (90.0, "outro")


def test_continuation_starts_from_the_prompt_clips_tokens(model, tmp_path):
    t = np.arange(int(0.5 * SR)) / SR
    clip = (0.3 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32) / 2
    path = str(tmp_path / "clip.wav")
    sf.write(path, clip, SR)
    from musiclm.audio import load_audio

    wav, sr = load_audio(path)
    tok = model.tokenizers.tokenize(wav[None], sample_rate=sr, entries=["acoustic.npy", "semantic.npy"])[0]
    steps = min(len(tok["semantic.npy"]), tok["acoustic.npy"].shape[-1] // 2)  # 1 semantic, 2 acoustic frames/step
    assert steps == 12
    res = _gen(model, duration=1.0, seed=0, prompt_audio=path)
    for r in range(2):
        np.testing.assert_array_equal(res.tokens["semantic"][r, :steps], tok["semantic.npy"][:steps])
        np.testing.assert_array_equal(res.tokens["coarse"][r, :, : 2 * steps], tok["acoustic.npy"][:2, : 2 * steps])
        np.testing.assert_array_equal(res.tokens["fine"][r, :, : 2 * steps], tok["acoustic.npy"][2:, : 2 * steps])
    for name in STAGES:
        assert res.windows[name][0]["sampled_from"] == pytest.approx(steps * 0.04)
    assert res.request["prompt_seconds"] == pytest.approx(steps * 0.04) and res.wavs.shape[-1] == SR


def test_unconditional_uses_null_cond_everywhere(model):
    res = model.generate(unconditional=True, duration=0.6, num_samples=2, seed=0, progress=False)
    K = model.stages["semantic"][0].layout.cond_levels
    for name in STAGES:
        assert res.conditioning[name] == [None]
        assert all(w["cond_ids"] == [NULL_COND] * K for w in res.windows[name])
    assert res.scores == [None, None] and res.request["unconditional"] is True


def test_bad_requests_are_refused_before_any_work(model, parts, monkeypatch, tmp_path):
    work = []
    for name in STAGES:
        monkeypatch.setattr(model.stages[name][1], "sample", lambda *a, **k: work.append("sample"))
    monkeypatch.setattr(model.tokenizers.embedder, "embed_text", lambda *a, **k: work.append("embed"))
    garbage = tmp_path / "broken.wav"
    garbage.write_bytes(b"RIFF\x00\x00garbage" * 10)
    cases = [
        (dict(caption=""), "caption is empty"),
        (dict(caption="   "), "caption is empty"),
        (dict(caption=None), "caption is empty"),
        (dict(caption=CAPTION, duration=0), "duration must be > 0"),
        (dict(caption=CAPTION, duration=-2), "duration must be > 0"),
        (dict(caption=CAPTION, duration=float("nan")), "duration must be > 0"),
        (dict(caption=CAPTION, duration=7200), "longer than 3600"),
        (dict(caption=CAPTION, num_samples=0), "num_samples"),
        (dict(caption=CAPTION, prompt_audio=str(tmp_path / "missing.wav")), "cannot read the prompt clip.*not found"),
        (dict(caption=CAPTION, prompt_audio=str(garbage)), "cannot read the prompt clip"),
        (
            dict(caption=CAPTION, duration=0.2, prompt_audio=(np.zeros(SR, np.float32) + 0.1, SR)),
            "longer than the clip",
        ),
        (dict(caption=CAPTION, unconditional=True), "unconditional generation takes no caption"),
        (dict(caption=[(2.0, "late start")]), "must start at 0"),
        (dict(caption=[(0, CAPTION), (0.5, "")]), "caption at 0.5 s is empty"),
        (dict(caption=CAPTION, sampling={"fine": {"temperature": -1}}), "temperature must be >= 0"),
        (dict(caption=CAPTION, sampling={"bass": {"temperature": 1}}), "unknown stage 'bass'"),
    ]
    for kw, msg in cases:
        with pytest.raises(GenerationRequestError, match=msg):
            model.generate(**{"duration": 1.0, "progress": False, **kw})
    # a model missing a part
    broken = MusicLM(parts["stages"], type(parts["tokenizers"])(embedder=parts["tokenizers"].embedder))
    with pytest.raises(GenerationRequestError, match="missing: acoustic codec.*MuLaN quantizer"):
        broken.generate(CAPTION, duration=1.0, progress=False)
    assert work == []


def test_stage_layouts_checked_on_the_fields_each_stage_reads(parts, model):
    from musiclm.lm import Transformer, get_stage

    tokens = dict(parts["config"]["tokens"])
    # a semantic stage trained on a folder without acoustic streams: acoustic fields are defaults
    sem_only = {k: v for k, v in tokens.items() if not k.startswith("acoustic") and k != "coarse_levels"}
    st = get_stage("semantic", sem_only)
    assert (
        st.layout.acoustic_rate != tokens["acoustic_rate"] and st.vocab_size == model.stages["semantic"][0].vocab_size
    )
    stages = dict(parts["stages"], semantic=(st, parts["stages"]["semantic"][1]))
    a = _gen(MusicLM(stages, parts["tokenizers"], parts["config"]), duration=0.6, seed=7)
    b = _gen(model, duration=0.6, seed=7)
    np.testing.assert_array_equal(a.tokens["fine"], b.tokens["fine"])
    # a fine stage that reads other conditioning tokens is refused, naming stage and field
    fine = get_stage("fine", {**tokens, "cond_levels": 3})
    bad = dict(parts["stages"], fine=(fine, Transformer(fine.model_config("tiny"))))
    with pytest.raises(GenerationRequestError, match=r"stage fine token layout differs .* \['cond_levels'\]"):
        _gen(MusicLM(bad, parts["tokenizers"], parts["config"]))


def test_sampling_overrides_from_command_line_values():
    assert sampling_overrides(temperature="0.9") == {s: {"temperature": 0.9} for s in STAGES}
    assert sampling_overrides(temperature="semantic=1.0,coarse=0.95", top_k="fine=50") == {
        "semantic": {"temperature": 1.0},
        "coarse": {"temperature": 0.95},
        "fine": {"top_k": 50},
    }
    with pytest.raises(GenerationRequestError, match="unknown stage 'bass'"):
        sampling_overrides(cond_scale="bass=2")
    with pytest.raises(GenerationRequestError, match="not a number"):
        sampling_overrides(top_p="semantic=high")


# ------------------------------------------------------------------------------------------ package + CLI


def _write_package(parts, root) -> str:
    """Save the parts as `musiclm export` stages + a tokenizer bundle and package them."""
    package = pytest.importorskip("musiclm.package")
    from musiclm.weights import write_exported

    bundle = parts["tokenizers"]
    fps = bundle.fingerprints()
    bundle_dir = bundle.save(os.path.join(root, "bundle"))
    paths = {}
    for name, (st, m) in parts["stages"].items():
        meta = {
            "kind": "musiclm.stage_lm",
            "stage": name,
            "model": m.cfg.to_dict(),
            "tokens": parts["config"]["tokens"],
            "window_seconds": st.window_seconds,
            "layout": st.describe(),
            "step": 0,
            "fingerprints": fps,
            "num_params": m.num_params(),
        }
        paths[name] = os.path.join(root, name, "model.safetensors")
        os.makedirs(os.path.dirname(paths[name]))
        write_exported({k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}, meta, paths[name])
    return package.package_model(tokenizers=bundle_dir, out=os.path.join(root, "pkg"), **paths)


def test_package_then_generate_round_trip_and_cli(parts, model, tmp_path, capsys):
    from musiclm.cli import main

    pkg = _write_package(parts, str(tmp_path))
    loaded = MusicLM.from_pretrained(pkg)
    a = _gen(loaded, duration=0.8, seed=5)
    b = _gen(model, duration=0.8, seed=5)
    for name in STAGES:
        np.testing.assert_array_equal(a.tokens[name], b.tokens[name])
    torch.testing.assert_close(a.wavs, b.wavs)
    assert a.request["sampling"]["fine"]["temperature"] == 0.4  # the package's defaults

    out = str(tmp_path / "out")
    args = ["generate", CAPTION, "--model", pkg, "--duration", "0.8", "--num-samples", "2", "--seed", "5"]
    rc = main(args + ["--out", out, "--no-progress", "--temperature", "fine=0.5", "--top-k", "0"])
    assert rc == 0
    slug = "hard-hitting-trap-beat-at-70-bpm-with-dark-piano"
    assert sorted(os.listdir(out)) == [f"{slug}-2.wav", f"{slug}.json", f"{slug}.png", f"{slug}.wav"]
    wav, sr = sf.read(os.path.join(out, f"{slug}.wav"))
    assert sr == SR and len(wav) == round(0.8 * SR)
    with open(os.path.join(out, f"{slug}.json")) as f:
        doc = json.load(f)
    assert doc["caption"] == CAPTION and doc["seed"] == 5 and doc["num_samples"] == 2
    assert doc["sampling"]["fine"]["temperature"] == 0.5 and doc["sampling"]["coarse"]["temperature"] == 0.95
    assert [c["file"] for c in doc["candidates"]] == [f"{slug}.wav", f"{slug}-2.wav"]
    assert doc["candidates"][0]["score"] >= doc["candidates"][1]["score"]
    assert set(doc["timings_seconds"]) >= set(STAGES) and doc["rtf"] > 0 and doc["spectrogram"] == f"{slug}.png"
    with open(os.path.join(out, f"{slug}.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # a bad request: a message naming the problem, exit status 2, nothing written, checked before
    # the model is loaded (the model named here does not exist)
    for bad, msg in [
        (["", "--duration", "4"], "caption is empty"),
        ([CAPTION, "--duration", "-1"], "duration must be > 0"),
        ([CAPTION, "--prompt-audio", str(tmp_path / "nope.wav")], "cannot read the prompt clip"),
        ([CAPTION, "--top-p", "coarse=2"], "top_p must be in"),
    ]:
        assert main(["generate", *bad, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "none")]) == 2
        assert msg in capsys.readouterr().err
    assert main(["generate", CAPTION, "--model", str(tmp_path / "no-model")]) == 2
    assert "not a musiclm package" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none")


def test_sample_stage_refuses_a_missing_stream(model):
    st, m = model.stages["coarse"]
    with pytest.raises(ValueError, match="semantic ids"):
        sample_stage(st, m, 10, 1, [None])


def test_long_piece_figures(model):
    from musiclm.bench.generate import long_piece_report, longest_repeat

    assert longest_repeat(np.array([5, 1, 2, 3, 9, 1, 2, 3, 7])) == 3 and longest_repeat(np.arange(6)) == 0
    res = model.generate(CAPTION, duration=2.5, num_samples=1, seed=0, progress=False)
    rep = long_piece_report(model, res, CAPTION)
    assert rep["semantic_windows"] == len(res.windows["semantic"]) == len(rep["window_rms_db"]) >= 3
    assert all(np.isfinite(r["ratio"]) for r in rep["mel_distance_per_stage"].values())
    assert rep["longest_exact_semantic_repeat_tokens"] < len(res.tokens["semantic"][0])


def test_generation_imports_no_training_code():
    import subprocess
    import sys

    code = (
        "import sys, musiclm.generate, musiclm.lm.sampling; "
        "bad = [m for m in sys.modules if m.startswith('musiclm.train') or m.split('.')[0] == 'deepspeed']; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
