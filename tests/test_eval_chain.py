"""``musiclm eval chain``: probes, generated semantic tokens, BPM sweep and grid on a tiny package."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def test_within_style_spearman_known_answers():
    from musiclm.eval.chain import within_style_spearman

    asked = [60, 70, 80, 90, 100, 110]
    styles = ["a", "a", "a", "b", "b", "b"]
    # perfect order inside each style, even though style b is measured far lower than style a
    r = within_style_spearman([10, 20, 30, 1, 2, 3], asked, styles, n_boot=200)
    assert r["value"] == pytest.approx(1.0) and r["per_style"] == {"a": 1.0, "b": 1.0}
    assert within_style_spearman([30, 20, 10, 3, 2, 1], asked, styles, n_boot=200)["value"] == pytest.approx(-1.0)


def test_one_hot_and_histograms():
    from musiclm.eval.chain import one_hot_tokens, token_histograms

    oh = one_hot_tokens(np.array([[1, 0], [2, 3]]), 4)
    assert oh.shape == (2, 8) and oh[0].tolist() == [0, 1, 0, 0, 1, 0, 0, 0] and oh.sum() == 4
    h = token_histograms([np.array([0, 0, 1, 3])], 4)
    assert h.tolist() == [[0.5, 0.25, 0.0, 0.25]]


def _labelled_shards(directory, package) -> None:
    """Token shards whose semantic tokens tell the style apart (trap: ids 0-7, boom bap: 8-15) and
    whose json carries caption, style and bpm, in the package's token layout."""
    from test_package import TOKENS

    from musiclm.data.shards import ShardWriter, write_index
    from musiclm.generate import MusicLM
    from musiclm.testing import synthetic_fingerprints, synthetic_sample

    lm = MusicLM.from_pretrained(package)
    dim = lm.tokenizers.embedder.dim
    rng = np.random.default_rng(0)
    shards = []
    for split, n in (("train", 24), ("eval", 8)):
        w = ShardWriter(directory, split, kind="tokens", max_samples=8)
        for i in range(n):
            style = ["trap", "boom bap"][i % 2]
            bpm = 60 + 3 * i
            s = synthetic_sample(f"{split}{i:05d}__0000", rng, TOKENS, 2.0)
            s["semantic.npy"] = (s["semantic.npy"] % 8 + (0 if style == "trap" else 8)).astype(np.int16)
            s["mulan.npy"] = rng.standard_normal(dim).astype(np.float16)
            s["json"].update(caption=f"{style} beat at {bpm} BPM", style=style, bpm=bpm)
            w.write(s)
        shards += w.close()
    write_index(directory, shards, kind="tokens", fingerprints=synthetic_fingerprints(TOKENS))


def test_chain_end_to_end(tmp_path):
    from test_eval_report import _tiny_package

    from musiclm.cli import main
    from musiclm.eval.chain import SWEEP_CAPTIONS

    package = _tiny_package(tmp_path)
    shards = tmp_path / "tokens"
    _labelled_shards(str(shards), package)
    out = tmp_path / "chain"
    args = ["eval", "chain", "--model", package, "--shards", str(shards), "--out", str(out)]
    args += ["--grid-items", "4", "--temperatures", "0.5,1", "--cond-scales", "1,3", "--sweep-samples", "2"]
    assert main(args + ["--audio-sweep-samples", "1", "--audio-seconds", "1"]) == 0
    r = json.loads((out / "chain.json").read_text())
    assert r["items"] == 8 and r["train_items"] == 24 and r["chance"] == 0.5
    assert r["cond_source"] == "audio"  # the shards' quantizer fingerprint has no source: audio
    rows = r["link1"]["rows"]
    assert set(rows) >= {"audio embedding", "text embedding", "text tokens", "training tokens (shards) -> text tokens"}
    for row in rows.values():
        assert 0.0 <= row["style"]["value"] <= 1.0 and row["style"]["n"] == 8
    # the captions name the style: a probe on the text embedding reads it
    assert rows["text embedding"]["style"]["value"] == 1.0
    l2 = r["link2"]["rows"]
    assert l2["true tokens (ceiling)"]["style"]["value"] == 1.0  # the token histograms separate the styles
    assert {"generated, caption", "generated, other caption", "generated, unconditional"} <= set(l2)
    assert len(r["link2"]["grid"]["cells"]) == 4 and r["link2"]["grid"]["items"] == 4
    sweep = r["link2"]["bpm_sweep"]
    n_sweep = sum(len(b) for _, b in SWEEP_CAPTIONS.values())
    assert len(sweep["captions"]) == n_sweep and len(sweep["measured"]) == 2 * n_sweep
    assert len(r["link3"]["bpm_sweep_audio"]["measured_fourier"]) == n_sweep
    md = (out / "chain.md").read_text()
    assert "## 1. MuLaN embedding" in md and "| 0.5 | 3 |" in md
    assert (out / "chain.png").stat().st_size > 1000

    # another semantic stage (an exported run) and the package's quantizer passed explicitly
    sem = str(tmp_path / "semantic" / "model.safetensors")
    quant = os.path.join(package, "tokenizers", "quantizer")
    args2 = ["eval", "chain", "--model", package, "--shards", str(shards), "--out", str(tmp_path / "chain2")]
    args2 += ["--semantic", sem, "--quantizer", quant, "--grid-items", "2", "--temperatures", "1", "--cond-scales", "3"]
    assert main(args2 + ["--sweep-samples", "1", "--max-items", "4"]) == 0
    r2 = json.loads((tmp_path / "chain2" / "chain.json").read_text())
    assert r2["semantic_model"] == sem and r2["quantizer"] == os.path.abspath(quant) and r2["items"] == 4

    # shards without style / bpm labels: refused with the folder named
    from test_package import TOKENS

    from musiclm.testing import make_synthetic_token_shards

    bare = tmp_path / "bare"
    make_synthetic_token_shards(str(bare), TOKENS, n_train=8, n_eval=2, seconds=2.0)
    with pytest.raises(ValueError, match="bare"):
        main(["eval", "chain", "--model", package, "--shards", str(bare), "--out", str(tmp_path / "x")])
