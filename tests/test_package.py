"""`musiclm package` and `load_package`: the model directory generation loads.

Tiny parts built in the test (no hub, no training): a SoundStream codec, MFCC + k-means, a tiny
MuLaN with a scratch caption tokenizer and a fitted conditioning quantizer, saved as a tokenizer
bundle; three tiny stage Transformers exported in the ``musiclm export`` format with the bundle's
fingerprints as their training fingerprints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from musiclm.lm.model import Transformer
from musiclm.lm.stages import STAGES, get_stage
from musiclm.package import PACKAGE_FILE, PackageMismatch, load_package, package_model
from musiclm.tokenizers import BUNDLE_FILE, TokenizerBundle, load_bundle
from musiclm.weights import write_exported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = {
    "acoustic_levels": 4,
    "acoustic_codebook": 64,
    "acoustic_rate": 50,
    "coarse_levels": 2,
    "semantic_vocab": 16,
    "semantic_rate": 25,
    "cond_namespaces": ["semantic", "coarse", "fine"],
    "cond_levels": 2,
    "cond_codebook": 8,
    "window_seconds": {"semantic": 1.0, "coarse": 0.4, "fine": 0.2},
}
CAPTIONS = ["hard trap beat dark piano", "lofi chill drums and vinyl", "boom bap jazz sample", "fast drill hi hats"]


def _tiny_bundle(root: str) -> TokenizerBundle:
    """SoundStream (8 kHz, 50 Hz, 4 x 64) + MFCC k-means (16) + tiny MuLaN + quantizer (2 x 8)."""
    from helpers_models import sine_batch

    from musiclm.codec.soundstream import SoundStream, SoundStreamTokenizer
    from musiclm.mulan.model import MuLaN, train_caption_tokenizer
    from musiclm.mulan.mulan_embedder import MuLaNEmbedder
    from musiclm.quantize import MuLaNEmbedQuantizer
    from musiclm.semantic import SemanticFeatures, SemanticTokenizer, fit_kmeans

    os.makedirs(root, exist_ok=True)
    torch.manual_seed(0)
    acoustic = SoundStreamTokenizer(model=SoundStream({"preset": "tiny"}).eval())
    feats = SemanticFeatures.from_config({"type": "mfcc", "rate": 25})
    centroids = fit_kmeans([feats(sine_batch(4, 2.0, feats.sample_rate, seed=1))], n_clusters=16, seed=0)
    semantic = SemanticTokenizer(feats, centroids)
    tok = train_caption_tokenizer(CAPTIONS * 4, os.path.join(root, "captions.json"), vocab_size=100)
    mulan = MuLaNEmbedder(MuLaN({"preset": "tiny", "text": {"tokenizer_file": tok}}))
    quant = MuLaNEmbedQuantizer(dim=mulan.dim, levels=2, codebook_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.fit(torch.nn.functional.normalize(torch.randn(64, mulan.dim), dim=-1), seed=0)
    return TokenizerBundle(
        acoustic=acoustic,
        semantic=semantic,
        embedder=mulan,
        quantizer=quant,
        semantic_features=feats,
        config={
            "acoustic": {"type": "soundstream"},
            "semantic": {"features": {"type": "mfcc", "rate": 25}},
            "mulan": {"type": "mulan"},
            "quantizer": {"levels": 2, "codebook_size": 8},
        },
    )


def _export_stage(name: str, out_dir: str, fingerprints: dict | None, tokens: dict = TOKENS, seed: int = 0) -> str:
    """A tiny random stage Transformer written as `musiclm export` writes it -> the weights path."""
    st = get_stage(name, tokens)
    torch.manual_seed(seed)
    model = Transformer(st.model_config("tiny"))
    meta = {
        "kind": "musiclm.stage_lm",
        "stage": name,
        "model": model.cfg.to_dict(),
        "tokens": tokens,
        "window_seconds": st.window_seconds,
        "layout": st.describe(),
        "step": 7,
        "fingerprints": fingerprints,
        "num_params": model.num_params(),
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    write_exported(tensors, meta, path)
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    bundle = _tiny_bundle(str(root / "src"))
    fps = bundle.fingerprints()
    bundle_dir = bundle.save(str(root / "bundle"))
    shutil.rmtree(root / "src")  # the bundle must not need its sources
    stages = {n: _export_stage(n, str(root / n), fps, seed=i) for i, n in enumerate(STAGES)}
    return {"root": root, "bundle": bundle_dir, "stages": stages, "fingerprints": fps}


def _package(parts, out, **kw):
    s = parts["stages"]
    args = dict(semantic=s["semantic"], coarse=s["coarse"], fine=s["fine"], tokenizers=parts["bundle"], out=str(out))
    args.update(kw)
    return package_model(**args)


def _same_outputs(a, b):
    prefix = torch.arange(12)[None] % 5
    for name in STAGES:
        sa, ma = a.stages[name]
        sb, mb = b.stages[name]
        assert sa.vocab_size == sb.vocab_size and sa.window_seconds == sb.window_seconds
        torch.testing.assert_close(ma(prefix), mb(prefix), rtol=0, atol=0)


def test_bundle_with_mulan_and_soundstream_is_self_contained(parts, tmp_path):
    moved = str(tmp_path / "elsewhere" / "bundle")
    shutil.copytree(parts["bundle"], moved)
    b1, b2 = load_bundle(parts["bundle"]), load_bundle(moved)
    for part in ("acoustic", "semantic", "mulan", "quantizer"):
        assert b2.fingerprints()[part]["weights_sha256"] == parts["fingerprints"][part]["weights_sha256"]
    cfg = json.loads(open(os.path.join(moved, BUNDLE_FILE)).read())["config"]
    assert cfg["mulan"]["model"] == "mulan" and cfg["acoustic"]["model"] == "acoustic"
    assert not any(os.path.isabs(str(v)) for sec in cfg.values() if isinstance(sec, dict) for v in sec.values())
    wav = torch.randn(2, 8000) * 0.1
    a, b = b1.tokenize(wav), b2.tokenize(wav)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    torch.testing.assert_close(b1.embedder.embed_text(CAPTIONS), b2.embedder.embed_text(CAPTIONS), rtol=0, atol=0)


def test_package_round_trip_and_moved_directory(parts, tmp_path):
    out = _package(parts, tmp_path / "models" / "tiny-pkg", extra_card={"license": "cc-by-nc-4.0"})
    assert sorted(os.listdir(out)) == ["README.md", "coarse", "fine", "package.json", "semantic", "tokenizers"]
    for n in STAGES:
        assert sorted(os.listdir(os.path.join(out, n))) == ["model.json", "model.safetensors"]
    pkg = load_package(out)
    doc = pkg.config
    assert doc["format"] == "musiclm-package" and doc["windows"] == {"semantic": 1.0, "coarse": 0.4, "fine": 0.2}
    assert doc["tokens"]["acoustic_levels"] == 4 and "window_seconds" not in doc["tokens"]
    assert pkg.sampling("fine")["temperature"] == 0.4 and pkg.sampling("semantic")["cond_scale"] == 3.0
    assert set(pkg.stages) == set(STAGES)
    for name, (st, model) in pkg.stages.items():
        assert st.name == name and not model.training and model.cfg.vocab_size == st.vocab_size
    assert pkg.tokenizers.embedder.embed_text(["trap"]).shape == (1, 128)
    assert pkg.fingerprints["acoustic"]["weights_sha256"] == parts["fingerprints"]["acoustic"]["weights_sha256"]
    # weights are the exported ones
    from musiclm.lm.model import load_stage_model

    ref = load_stage_model(parts["stages"]["coarse"])
    x = torch.arange(20)[None] % 7
    torch.testing.assert_close(pkg.stages["coarse"][1](x), ref.eval()(x), rtol=0, atol=0)

    moved = str(tmp_path / "copied" / "pkg")
    shutil.copytree(out, moved)
    shutil.rmtree(out)  # nothing may point back at the original folder
    again = load_package(moved)
    assert again.directory == os.path.abspath(moved)
    _same_outputs(pkg, again)


def test_model_card_fields(parts, tmp_path):
    out = _package(parts, tmp_path / "pkg", extra_card={"license": "mit", "name": "rapbeats-tiny"})
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\nlicense: mit\n")
    for needle in (
        "# rapbeats-tiny",
        "## How to generate",
        "musiclm generate",
        f'MusicLM.from_pretrained("{out}")',
        'generate("caption", duration=10, num_samples=4, seed=0)',
        "## Intended use",
        "## Training data",
        "manifest sha256: `unknown`",  # exported weights without a run: stated as unknown
        "## Stages",
        "## Final metrics",
        "## Tokenizers",
        "## Configs",
        '"acoustic_levels": 4',
        "temperature",
    ):
        assert needle in card, needle
    assert "| semantic | 7 |" in card  # the step the weights were exported at


def test_card_reads_run_metrics_and_manifest(parts, tmp_path):
    """A stage whose export names its run folder: the card shows the run's final metrics and the
    training manifest + its sha256 from the shard folder's index.json."""
    import hashlib

    run = tmp_path / "runs" / "semantic"
    run.mkdir(parents=True)
    shards = tmp_path / "shards" / "tokens-abc"
    shards.mkdir(parents=True)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.wav", "caption": "trap"}\n')
    (shards / "index.json").write_text(
        json.dumps({"manifest": str(manifest), "hours": 0.5, "samples": 10, "clips": 3, "fingerprint_hash": "abc"})
    )
    (run / "config.yaml").write_text(f"data:\n  shards: [{shards}]\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "train/loss": 3.0})
        + "\n"
        + json.dumps({"step": 10, "train/loss": 2.5, "eval/loss": 2.75})
        + "\n{cut"
    )
    w = parts["stages"]["semantic"]
    meta = json.load(open(w.replace(".safetensors", ".json")))
    meta["source"] = {"run_dir": str(run)}
    d = tmp_path / "sem"
    d.mkdir()
    shutil.copy(w, d / "model.safetensors")
    (d / "model.json").write_text(json.dumps(meta))
    out = _package(parts, tmp_path / "pkg", semantic=str(d))
    card = open(os.path.join(out, "README.md")).read()
    assert "train/loss 2.5 (step 10)" in card and "eval/loss 2.75 (step 10)" in card
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() in card
    doc = json.load(open(os.path.join(out, PACKAGE_FILE)))
    assert doc["data"]["manifest"] == str(manifest) and doc["data"]["hours"] == 0.5


def test_mismatched_parts_refused(parts, tmp_path):
    # a fine stage trained on another conditioning codebook: layout vs the other stages and the bundle
    other = dict(TOKENS, cond_codebook=16)
    bad = _export_stage("fine", str(tmp_path / "fine16"), parts["fingerprints"], tokens=other)
    with pytest.raises(PackageMismatch) as err:
        _package(parts, tmp_path / "pkg", fine=bad)
    msg = str(err.value)
    assert "fine stage" in msg and "semantic stage" in msg and "tokenizers" in msg and "cond_codebook" in msg
    assert not os.path.exists(tmp_path / "pkg")  # nothing written

    # a coarse stage trained on codes of another codec (same layout, other weights)
    fps = json.loads(json.dumps(parts["fingerprints"]))
    fps["acoustic"]["weights_sha256"] = "0" * 64
    bad = _export_stage("coarse", str(tmp_path / "coarse-other"), fps)
    with pytest.raises(PackageMismatch, match=r"coarse stage .* vs fine stage .*acoustic\.weights_sha256"):
        _package(parts, tmp_path / "pkg", coarse=bad)

    # weights of the wrong stage
    with pytest.raises(PackageMismatch, match="not 'fine'"):
        _package(parts, tmp_path / "pkg", fine=parts["stages"]["coarse"])

    # the same disagreement introduced after packaging is refused at load time
    out = _package(parts, tmp_path / "ok")
    cfg_path = os.path.join(out, "fine", "model.json")
    meta = json.load(open(cfg_path))
    meta["fingerprints"]["quantizer"]["levels"] = 3
    json.dump(meta, open(cfg_path, "w"))
    with pytest.raises(
        PackageMismatch, match=r"fine stage \(fine/model.json\) vs tokenizers .*quantizer\.levels 3 != 2"
    ):
        load_package(out)


def test_missing_part_refused(parts, tmp_path):
    out = _package(parts, tmp_path / "pkg")
    os.remove(os.path.join(out, "coarse", "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"coarse stage part coarse/model.safetensors is missing"):
        load_package(out)
    out = _package(parts, tmp_path / "pkg2")
    shutil.rmtree(os.path.join(out, "tokenizers"))
    with pytest.raises(FileNotFoundError, match=r"tokenizers/tokenizers.json is missing"):
        load_package(out)
    with pytest.raises(FileNotFoundError, match="package.json is missing"):
        load_package(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _package(parts, tmp_path / "pkg3", semantic=str(tmp_path / "nowhere"))
    # a package replaces its folder whole: a folder of other things is refused, an older package replaced
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "kmeans.safetensors").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="not a package"):
        _package(parts, tmp_path / "models")
    assert (tmp_path / "models" / "kmeans.safetensors").read_bytes() == b"keep me"
    assert _package(parts, tmp_path / "pkg2") == str(tmp_path / "pkg2")


def test_package_on_s3_loads(parts, tmp_path, moto_s3, monkeypatch):
    monkeypatch.setenv("MUSICLM_CACHE", str(tmp_path / "cache"))
    url = f"{moto_s3}/models/tiny"
    assert _package(parts, url) == url
    local = load_package(_package(parts, tmp_path / "local"))
    remote = load_package(url)
    assert remote.directory.startswith(str(tmp_path / "cache"))
    _same_outputs(local, remote)
    # a second load reuses the cached copy
    assert load_package(url).directory == remote.directory


def test_package_from_tokenizers_config_and_codec(parts, tmp_path):
    """--tokenizers as a config file (paths to the parts) and --codec replacing the acoustic part."""
    import yaml

    b = parts["bundle"]
    cfg = {
        "tokenizers": {
            "acoustic": {"type": "encodec", "model": "nowhere-never-loaded"},
            "semantic": {"features": {"type": "mfcc", "rate": 25}, "kmeans": os.path.join(b, "kmeans.safetensors")},
            "mulan": {"type": "mulan", "model": os.path.join(b, "mulan")},
            "quantizer": {"path": os.path.join(b, "quantizer")},
        }
    }
    path = tmp_path / "tokenizers.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = _package(parts, tmp_path / "pkg", tokenizers=str(path), codec=os.path.join(b, "acoustic"))
    pkg = load_package(out)
    assert pkg.tokenizers.acoustic.name == "soundstream"
    assert json.load(open(os.path.join(out, "tokenizers", BUNDLE_FILE)))["config"]["acoustic"]["type"] == "soundstream"


def test_package_module_imports_no_training_code():
    code = (
        "import sys, musiclm.package; "
        "bad = [m for m in sys.modules if m.startswith('musiclm.train') or m == 'deepspeed']; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_package(parts, tmp_path):
    s = parts["stages"]
    out = str(tmp_path / "cli-pkg")
    res = subprocess.run(
        [sys.executable, "-m", "musiclm.cli", "package", "--semantic", s["semantic"],
         "--coarse", os.path.dirname(s["coarse"]), "--fine", s["fine"], "--tokenizers", parts["bundle"],
         "--out", out, "--license", "mit", "--cond-scale", "semantic=6", "--temperature", "0.9",
         "--sampling-note", "chosen from the grid"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["out"] == out and summary["stages"]["coarse"]["step"] == 7 and summary["license"] == "mit"
    assert os.path.isfile(os.path.join(out, PACKAGE_FILE))
    # the sampling defaults set at packaging are what generation starts from
    from musiclm.generate import MusicLM

    lm = MusicLM.from_pretrained(out)
    assert lm.default_sampling["semantic"].cond_scale == 6.0 and lm.default_sampling["coarse"].cond_scale == 3.0
    assert all(lm.default_sampling[n].temperature == 0.9 for n in ("semantic", "coarse", "fine"))
    doc = json.load(open(os.path.join(out, PACKAGE_FILE)))
    source = doc["sampling"]["source"]
    assert "semantic.cond_scale=6.0" in source and "chosen from the grid" in source
    from musiclm.package import package_sampling

    with pytest.raises(ValueError, match="unknown setting 'beam'"):
        package_sampling({"semantic": {"beam": 4}})


# ---------------------------------------------------------------------------------------------- --init_from


def test_init_from_resolves_and_refuses_mismatches(parts, tmp_path):
    """Weights-only start: exported file, its folder or a package + the run's stage; a shape or
    layout mismatch is one line naming the tensor / field."""
    from musiclm.train.init_from import InitFromError, load_init_weights, resolve_init_weights

    out = _package(parts, tmp_path / "pkg")
    w = parts["stages"]["coarse"]
    assert resolve_init_weights(w, "coarse") == w
    assert resolve_init_weights(os.path.dirname(w), "coarse") == w
    assert resolve_init_weights(out, "coarse") == os.path.join(out, "coarse", "model.safetensors")
    st = get_stage("coarse", TOKENS)
    model = Transformer(st.model_config("tiny"))
    info = load_init_weights(model, out, "coarse", TOKENS)
    assert info["step"] == 7
    from musiclm.lm.model import load_stage_model

    x = torch.arange(30)[None] % 9
    torch.testing.assert_close(model.eval()(x), load_stage_model(w).eval()(x), rtol=0, atol=0)

    wide = Transformer(st.model_config("tiny", d_model=32))
    with pytest.raises(InitFromError, match=r"tensor '.*' has shape \[.*\], the model needs \[.*\]"):
        load_init_weights(wide, w, "coarse")
    with pytest.raises(InitFromError, match="weights of the 'coarse' stage, this run trains 'fine'"):
        load_init_weights(model, w, "fine")
    with pytest.raises(InitFromError, match="cond_namespaces"):
        load_init_weights(model, w, "coarse", dict(TOKENS, cond_namespaces=["fine", "coarse", "semantic"]))
    with pytest.raises(InitFromError, match="no such file"):
        resolve_init_weights(str(tmp_path / "nope"), "coarse")


@pytest.mark.slow
def test_init_from_starts_from_the_exported_weights(parts, tmp_path):
    """Through the real launcher: a tiny semantic run is exported; a new run with --init_from and
    a learning rate of 1e-12 gives the exported model's logits (probe after its one step) and
    checkpoints the exported weights unchanged, at step 1 of a fresh schedule; a rerun of that
    run resumes its checkpoint and says init_from is ignored."""
    from safetensors.torch import load_file
    from train_utils import launch, make_tiny_shards, read_log, train_args

    from musiclm.lm.model import load_stage_model
    from musiclm.train.export import export

    shards = make_tiny_shards(str(tmp_path / "shards"), n_train=32, n_eval=16)
    run_a = str(tmp_path / "run_a")
    rc = launch(1, train_args("semantic", run_a, shards, "zero2", ["--max_steps", "4"]), run_a + ".log")
    assert rc == 0, read_log(run_a + ".log")[-3000:]
    # `musiclm package` takes a run folder too (exported on the way); these tiny synthetic-shard stages
    # have no tokenizer bundle of their layout, so the package is refused naming the run's stage
    with pytest.raises(PackageMismatch, match=rf"semantic stage \({run_a}\) vs tokenizers .*tokens\.semantic_vocab 32"):
        _package(parts, tmp_path / "pkg", semantic=run_a)
    exported = export(run_a, str(tmp_path / "export" / "model.safetensors"))["weights"]

    run_b = str(tmp_path / "run_b")
    extra = ["--max_steps", "1", "--init_from", os.path.dirname(exported)]
    # lr 1e-12: the one update moves no weight by more than ~1e-12 (the config refuses lr 0)
    extra += ["--set", "deepspeed.optimizer.params.lr=1.0e-12", "train.probe_logits=true"]
    rc = launch(1, train_args("semantic", run_b, shards, "zero2", extra), run_b + ".log")
    log = read_log(run_b + ".log")
    assert rc == 0, log[-3000:]
    assert "weights only; optimizer, schedule and data position start fresh" in log
    probe = load_file(os.path.join(run_b, "probe_logits.safetensors"))
    ref = load_stage_model(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(probe["tokens"]), probe["logits"], rtol=1e-5, atol=1e-5)
    again = export(run_b, str(tmp_path / "export_b" / "model.safetensors"))
    assert again["step"] == 1  # a fresh schedule: step 1, not 5
    a, b = load_file(exported), load_file(again["weights"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-9)

    extra[1] = "2"
    rc = launch(1, train_args("semantic", run_b, shards, "zero2", extra), run_b + ".2.log")
    log = read_log(run_b + ".2.log")
    assert rc == 0, log[-3000:]
    assert "ignored: the run resumes from its checkpoint" in log


def test_stage_fields_it_never_reads_may_differ(parts, tmp_path):
    """A semantic stage trained on a token folder without the acoustic stream keeps default acoustic
    fields in its tokens: section; they are not compared, and the package's layout is the coarse
    stage's (it reads every stream)."""
    sem = _export_stage(
        "semantic", str(tmp_path / "sem"), parts["fingerprints"], tokens=dict(TOKENS, acoustic_levels=8)
    )
    out = _package(parts, tmp_path / "pkg", semantic=sem)
    assert json.load(open(os.path.join(out, PACKAGE_FILE)))["tokens"]["acoustic_levels"] == 4
    assert load_package(out).stages["semantic"][0].layout.acoustic_levels == 8
