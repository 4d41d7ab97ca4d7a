"""`musiclm eval report` and its metrics, each on inputs with a known answer.

Metrics: MCC of identical / orthogonal embeddings, the tag KL of identical posteriors (0) and of a
closed-form pair, a click track at a known BPM through both tempo estimators, the tempo scores on
hand-made pairs, a style classifier on separable synthetic classes, the unigram entropy of shards
with a known distribution. End to end: a tiny package (the parts tests/test_package.py builds:
SoundStream "tiny", MFCC k-means, tiny MuLaN, three tiny stage LMs) on a tiny manifest of two
synthetic styles -> report.md with the baselines table first, report.json, PNGs, TensorBoard;
a rerun reuses the generated set.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf

from musiclm.eval.audio_tempo import click_track, fourier_tempo, spearman, tempo_agreement
from musiclm.eval.mcc import cosine_rows, derangement, mcc
from musiclm.eval.style import clip_features, label_accuracy, train_classifier
from musiclm.eval.tagkl import bernoulli_kl, normalized_kl, paired_tag_kl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ metrics


def test_mcc_known_answers():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 8))
    out = mcc(a, 3 * a, n_boot=50)
    assert out["value"] == pytest.approx(1.0) and out["n"] == 6 and out["ci95"][0] == pytest.approx(1.0)
    e = np.eye(4)
    assert mcc(e, np.roll(e, 1, axis=0), n_boot=10)["value"] == pytest.approx(0.0)
    np.testing.assert_allclose(cosine_rows(e, -e), -1.0)
    for n in (2, 3, 9):
        p = derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n)) and not np.any(p == np.arange(n))


def test_tag_kl_known_answers():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, (5, 50))
    assert np.allclose(bernoulli_kl(p, p), 0.0) and np.allclose(normalized_kl(p, p), 0.0)
    out = paired_tag_kl(p, p, n_boot=20)
    assert out["bernoulli"]["value"] == pytest.approx(0.0) and out["n"] == 5
    # one tag at 0.5 vs 0.25, the rest equal: KL = (0.5 ln 2 + 0.5 ln(2/3)) / 50
    a, b = np.full(50, 0.3), np.full(50, 0.3)
    a[0], b[0] = 0.5, 0.25
    assert bernoulli_kl(a, b) == pytest.approx((0.5 * np.log(2) + 0.5 * np.log(0.5 / 0.75)) / 50)
    assert normalized_kl(a, b) > 0 and bernoulli_kl(b, a) != pytest.approx(bernoulli_kl(a, b))  # not symmetric


@pytest.mark.parametrize("bpm", [62.0, 87.5, 110.0, 140.0])
def test_click_track_bpm(bpm):
    from musiclm.data.music_analysis import estimate_tempo

    x = click_track(bpm, 5.0, sr=16000)
    assert fourier_tempo(x, 16000) == pytest.approx(bpm, rel=0.01)
    est = estimate_tempo(x, 16000)  # the project's estimator folds into 57-114 BPM
    assert min(abs(est - bpm), abs(2 * est - bpm)) < 0.01 * bpm
    assert np.isnan(fourier_tempo(np.zeros(16000 * 3), 16000))


def test_tempo_agreement_scores():
    true = [60.0, 80.0, 100.0, 120.0]
    exact = tempo_agreement(true, true, n_boot=50)
    assert exact["spearman"]["value"] == pytest.approx(1.0)
    assert exact["within_4pct"]["value"] == 1.0 and exact["octave_errors"]["value"] == 0.0
    pred = [62.0, 86.0, 200.0, float("nan")]  # +3.3 %, +7.5 %, double time, no estimate
    out = tempo_agreement(pred, true, n_boot=50)
    assert out["n"] == 3 and out["missing"] == 1
    assert out["within_4pct"]["value"] == pytest.approx(1 / 3) and out["within_8pct"]["value"] == pytest.approx(2 / 3)
    assert out["octave_errors"]["value"] == pytest.approx(1 / 3)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(0.8)


def test_style_classifier_separates_synthetic_styles():
    rng = np.random.default_rng(2)
    styles = ["boom bap", "drill", "lo-fi"]
    centers = rng.standard_normal((3, 20)) * 3

    def clips(n):
        y = [styles[i % 3] for i in range(n)]
        x = [clip_features(centers[i % 3] + rng.standard_normal((5, 20))) for i in range(n)]
        return np.stack(x), y

    x_tr, y_tr = clips(60)
    x_te, y_te = clips(30)
    clf = train_classifier(x_tr, y_tr, "style", seed=7)
    acc = label_accuracy(clf.predict(x_te), y_te, n_boot=50)
    assert acc["value"] >= 0.9 > 1 / 3 and acc["n"] == 30
    assert clf.describe()["chance"] == pytest.approx(1 / 3) and clf.classes == sorted(styles)
    # labels unrelated to the audio: near chance, not at the ceiling
    shuffled = list(np.random.default_rng(3).permutation(y_tr))
    clf2 = train_classifier(x_tr, shuffled, "style", seed=7)
    assert label_accuracy(clf2.predict(x_te), y_te, n_boot=10)["value"] < 0.8
    with pytest.raises(ValueError, match="2 classes"):
        train_classifier(x_tr, ["a"] * len(x_tr))


def test_fad_by_style_prefers_the_captions_style():
    from musiclm.eval.report import fad_by_style

    rng = np.random.default_rng(0)
    centre = {"a": 0.0, "b": 3.0}

    def clip(style):
        return centre[style] + rng.standard_normal((5, 4))

    real_style = ["a", "b"] * 10
    real = [clip(s) for s in real_style]
    gen_style = ["a", "b"] * 6
    gen = [{"segments": clip(s)} for s in gen_style]  # generations that follow their caption's style
    r = fad_by_style(real, real_style, gen, gen_style)
    assert set(r["per_style"]) == {"a", "b"} and r["styles_below"] == 2
    assert r["per_style"]["a"]["generated_clips"] == 6 and r["matched_mean"] < r["other_style_mean"] / 5
    ignored = [{"segments": clip("a")} for _ in gen_style]  # every caption gives style a
    r2 = fad_by_style(real, real_style, ignored, gen_style)
    assert r2["per_style"]["b"]["matched"] > r2["per_style"]["b"]["other_style"] / 2  # no gain for style b


def test_spread_check_catches_identical_generations():
    from musiclm.eval.report import spread_check

    rng = np.random.default_rng(0)
    real = [rng.standard_normal((5, 8)) + rng.standard_normal(8) for _ in range(20)]
    varied = [rng.standard_normal((5, 8)) + rng.standard_normal(8) for _ in range(8)]
    one = rng.standard_normal((5, 8))
    same = [one + 1e-4 * rng.standard_normal((5, 8)) for _ in range(8)]  # a decoder that ignores its codes
    ok, bad = spread_check(real, varied), spread_check(real, same)
    assert ok["passed"] and 0.5 < ok["value"] < 1.5
    assert not bad["passed"] and bad["value"] < 0.01 and bad["baseline"] == 0.0


def test_codec_codes_check():
    from musiclm.eval.report import codec_codes_check

    cm = {"own_codes_mel_l1": 1.27, "other_clip_codes_mel_l1": 1.27, "ratio": 1.0}  # the decoder ignores its codes
    res = {"codec": {"type": "soundstream"}, "codes_matter": cm}
    bad = codec_codes_check(res, "x.json")
    assert not bad["passed"] and "ignores its codes" in bad["failures"][0] and bad["baseline"] == 1.0
    res["codes_matter"].update(own_codes_mel_l1=0.6, ratio=0.6 / 1.27)
    assert codec_codes_check(res, "x.json")["passed"]
    assert codec_codes_check({"codes_matter": {"clips": 0, "ratio": None}}, "x.json") is None  # older JSON: no row


def test_unigram_entropy_of_shards(tmp_path):
    from test_package import TOKENS

    from musiclm.eval.report import unigram_entropy
    from musiclm.testing import make_synthetic_token_shards

    tokens = {k: v for k, v in TOKENS.items() if k != "window_seconds"}
    make_synthetic_token_shards(str(tmp_path), tokens, n_train=8, n_eval=2, seconds=2.0, samples_per_shard=4)
    sem = unigram_entropy(str(tmp_path), "semantic", coarse_levels=2, acoustic_levels=4)
    assert 0 < sem["nats"] <= np.log(16) + 1e-9 and sem["samples"] == 8
    coarse = unigram_entropy(str(tmp_path), "coarse", coarse_levels=2, acoustic_levels=4)
    assert set(coarse["per_level"]) == {"0", "1"} and 0 < coarse["nats"] <= np.log(64) + 1e-9
    # two levels with equal counts: the joint entropy is at most the mean per level + log 2
    assert coarse["joint_nats"] <= coarse["nats"] + np.log(2) + 1e-9


# ------------------------------------------------------------------------------------------ end to end


def _tiny_package(root) -> str:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_package import _export_stage, _tiny_bundle

    from musiclm.lm.stages import STAGES
    from musiclm.package import package_model

    bundle = _tiny_bundle(str(root / "src"))
    fps = bundle.fingerprints()
    bundle_dir = bundle.save(str(root / "bundle"))
    stages = {n: _export_stage(n, str(root / n), fps, seed=i) for i, n in enumerate(STAGES)}
    return package_model(**stages, tokenizers=bundle_dir, out=str(root / "package"))


def _tiny_corpus(root) -> str:
    """12 train + 4 eval clips of two audibly different styles (a low tone with clicks, noise bursts)."""
    sr = 16000
    os.makedirs(root / "audio", exist_ok=True)
    lines = []
    rng = np.random.default_rng(0)
    for i in range(16):
        style = ["tone", "noise"][i % 2]
        bpm = 70 + 5 * i
        x = click_track(bpm, 2.0, sr=sr, seed=i)
        t = np.arange(len(x)) / sr
        x = x + (0.3 * np.sin(2 * np.pi * 110 * t) if style == "tone" else 0.2 * rng.standard_normal(len(x)))
        path = root / "audio" / f"c{i:02d}.wav"
        sf.write(path, x.astype(np.float32), sr)
        split = "eval" if i >= 12 else "train"
        cap = f"{'warm tone' if style == 'tone' else 'harsh noise'} beat at {bpm} BPM"
        lines.append(
            {
                "id": f"c{i:02d}",
                "audio": f"audio/c{i:02d}.wav",
                "caption": cap,
                "split": split,
                "style": style,
                "mood": ["calm", "dark"][(i // 2) % 2],
                "bpm": bpm,
            }
        )
    with open(root / "manifest.jsonl", "w") as f:
        f.write("\n".join(json.dumps(line) for line in lines) + "\n")
    return str(root / "manifest.jsonl")


def _fake_runs(root, shards) -> list[str]:
    """Run folders as the training monitor leaves them: config.yaml (stage, shards) + metrics.jsonl."""
    runs = []
    for name, loss in (("semantic", 0.5), ("coarse", 0.7), ("fine", 99.0)):  # fine above its baseline: FAIL
        d = root / "runs" / name
        os.makedirs(d, exist_ok=True)
        (d / "config.yaml").write_text(f"stage: {name}\ndata:\n  shards: [{shards}]\n")
        (d / "metrics.jsonl").write_text(
            json.dumps({"step": 5, "train/loss": 3.0}) + "\n" + json.dumps({"step": 5, "eval/loss": loss}) + "\n"
        )
        runs.append(str(d))
    return runs


def test_report_end_to_end(tmp_path):
    from test_package import TOKENS

    from musiclm.cli import main
    from musiclm.testing import make_synthetic_token_shards

    package = _tiny_package(tmp_path)
    manifest = _tiny_corpus(tmp_path)
    shards = tmp_path / "tokens"
    make_synthetic_token_shards(str(shards), TOKENS, n_train=8, n_eval=2, seconds=2.0, samples_per_shard=4)
    runs = _fake_runs(tmp_path, shards)
    mem = tmp_path / "memorization.json"
    mem.write_text(json.dumps({"exact_share": 0.0, "approx_share": 0.25, "longest_exact_match": 7, "n": 4}))
    out = tmp_path / "report"
    args = [
        "eval",
        "report",
        "--model",
        package,
        "--manifest",
        manifest,
        "--captions",
        "3",
        "--num-samples",
        "2",
        "--duration",
        "1.0",
        "--out",
        str(out),
        "--runs",
        *runs,
        "--memorization",
        str(mem),
        "--n-boot",
        "50",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    md = (out / "report.md").read_text()
    sections = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert sections[0] == "## Does each model beat its trivial baseline?"
    table = md.split("## Does each model beat its trivial baseline?")[1].split("\n\n")[1]
    assert "| semantic stage | eval loss < unigram entropy | 0.500 |" in table and "**pass**" in table
    assert "| fine stage |" in table and "**FAIL**" in table  # 99 nats is not below any entropy here
    assert "| MuLaN |" in table and "| codec | " in table and "not checked" in table  # no --codec-eval given
    for title in (
        "MuLaN cycle consistency",
        "KL divergence",
        "Style accuracy",
        "Mood accuracy",
        "Tempo against",
        "FAD and KID",
        "Memorization",
        "paper's MusicCaps figures",
    ):
        assert title in md, title
    assert "| 0 | 0.25 | 7 | 4 |" in md  # the memorization JSON as given

    r = json.loads((out / "report.json").read_text())
    met = r["metrics"]
    assert met["mcc"]["first"]["n"] == 3 and met["mcc"]["real"]["n"] == 4 and "unconditional" in met["mcc"]
    assert set(met["kl"]) >= {"first", "best", "shuffled", "unconditional", "real_shuffled"}
    style = met["classifiers"]["style"]
    assert style["chance"] == 0.5 and style["classifier"]["train_clips"] == 12
    assert style["real"]["value"] >= 0.75  # two audibly different styles: the ceiling is high
    for est in ("project", "fourier"):  # 1-s clips hold one or two beats: the figures themselves mean little here
        assert met["tempo"][est]["real"]["n"] + met["tempo"][est]["real"]["missing"] == 4
        assert len(met["tempo"][est]["estimates"]["first"]) == 3
    assert met["fad"]["first"]["generated"]["clips"] == 3 and met["fad"]["first"]["real"]["clips"] == 4
    for png in ("spectrograms.png", "metrics.png", "tempo.png"):
        assert (out / png).stat().st_size > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))

    index = json.loads((out / "generated" / "index.json").read_text())
    assert len(index["items"]) == 3 and len(index["unconditional"]["files"]) == 3
    rec = index["items"][0]
    assert rec["files"] == ["cand1.wav", "cand2.wav"] and rec["first"] == "cand1.wav"
    assert rec["best"] == rec["files"][rec["rank_order"][0]]
    assert sorted(index["shuffle"]) == [0, 1, 2] and all(index["shuffle"][i] != i for i in range(3))

    # a rerun reads the saved set: nothing is generated again
    from musiclm.eval.generated import generate_eval_set, manifest_items
    from musiclm.generate import MusicLM

    before = {f: os.path.getmtime(out / "generated" / rec["dir"] / f) for f in rec["files"]}
    lm = MusicLM.from_pretrained(package)
    lm.generate = None  # would raise if called
    again = generate_eval_set(lm, manifest_items(manifest)[:3], str(out / "generated"), num_samples=2, duration=1.0)
    assert again["items"] == index["items"] and again["unconditional"] == index["unconditional"]
    assert {f: os.path.getmtime(out / "generated" / rec["dir"] / f) for f in rec["files"]} == before


def test_eval_set_in_worker_processes_gives_the_same_files(tmp_path):
    """workers=2 (two spawned processes, each loading the package) writes byte-identical wavs and the
    same index as one process, and a rerun with workers=2 generates nothing."""
    from musiclm.eval.generated import generate_eval_set, manifest_items
    from musiclm.generate import MusicLM

    package = _tiny_package(tmp_path)
    items = manifest_items(_tiny_corpus(tmp_path))[:3]
    lm = MusicLM.from_pretrained(package)
    kw = dict(num_samples=2, duration=0.5, unconditional=3)
    one = generate_eval_set(lm, items, str(tmp_path / "w1"), **kw)
    two = generate_eval_set(lm, items, str(tmp_path / "w2"), workers=2, **kw)

    def strip(index):
        drop = ("timings_seconds", "wall_seconds")
        items = [{k: v for k, v in it.items() if k not in drop} for it in index["items"]]
        return items, index["unconditional"]["files"], index["shuffle"]

    assert strip(one) == strip(two) and [it["id"] for it in two["items"]] == [it.id for it in items]
    files = [os.path.join(it["dir"], f) for it in one["items"] for f in it["files"]] + one["unconditional"]["files"]
    assert len(files) == 3 * 2 + 3
    for f in files:
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f
    lm.generate = None  # a rerun must not generate (and must not start workers that would)
    assert strip(generate_eval_set(lm, items, str(tmp_path / "w2"), workers=2, **kw)) == strip(two)


def test_memorization_table_reads_both_forms():
    from musiclm.eval.report import memorization_table

    flat = memorization_table({"exact_share": 0.0, "approx_share": 0.25, "longest_exact_match": 7, "n": 4})
    assert flat[-1] == "| 0 | 0.25 | 7 | 4 |"
    nested = {
        "n": 64,
        "prompt_seconds": 5.0,
        "continuation_seconds": 5.0,
        "greedy": {
            "exact_share": 0.5,
            "approx_share": 0.75,
            "ci95": {"exact_share": [0.4, 0.6], "approx_share": None},
            "negative_match_share": 0.01,
        },
        "sampled": {"exact_share": 0.0, "approx_share": 0.1, "ci95": {}},
        "longest_exact_match": {"tokens": 50, "seconds": 2.0, "clip": "beat-1"},
        "reference": {"match_length_seconds": {"n": 8, "max": 0.4}},
    }
    text = "\n".join(memorization_table(nested))
    assert "| greedy | 0.500 [0.400, 0.600] | 0.750 | 0.010 | 64 |" in text and "| sampled | 0.000 |" in text
    assert "2.00 s (50 tokens)" in text and "longest 0.40 s" in text


def test_musiccaps_set_lists_missing_clips(tmp_path):
    from musiclm.eval.generated import bpm_from_caption, musiccaps_items

    audio = tmp_path / "downloads"
    os.makedirs(audio)
    for ytid in ("abc123", "def456"):
        sf.write(audio / f"{ytid}.wav", click_track(90, 2.0, sr=16000), 16000)
    (tmp_path / "musiccaps.csv").write_text(
        "ytid,start_s,end_s,aspect_list,caption\n"
        "abc123,30,40,\"['hip hop']\",A mellow hip hop beat at 90 bpm.\n"
        "zzz999,0,10,\"['rock']\",A loud rock song.\n"
        "def456,10,20,\"['jazz']\",Smooth jazz with brushes.\n"
    )
    items, missing = musiccaps_items(str(tmp_path / "musiccaps.csv"), str(audio))
    assert [it.id for it in items] == ["abc123", "def456"] and missing == ["zzz999"]
    assert items[0].labels == {"bpm": 90.0} and items[1].labels == {}
    assert bpm_from_caption("trap, 140BPM, dark") == 140.0 and bpm_from_caption("no tempo here") is None
