"""``musiclm eval memorization`` on inputs with known answers: a model overfit on its training
sequences copies them (exact share 1), an untrained one does not (0); the suffix-array index finds
a planted copy of known length and nothing longer; the histogram rule; bad inputs refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from musiclm.eval import memorization as M
from musiclm.lm.model import Transformer
from musiclm.lm.stages import get_stage

TOKENS = {
    "acoustic_levels": 4,
    "acoustic_codebook": 16,
    "acoustic_rate": 10,
    "coarse_levels": 2,
    "semantic_vocab": 32,
    "semantic_rate": 5,
    "cond_namespaces": ["semantic", "coarse", "fine"],
    "cond_levels": 2,
    "cond_codebook": 8,
}


def _stage():
    return get_stage("semantic", TOKENS, 4.0)  # 20 semantic frames per window


def _items(n: int = 3, frames: int = 20, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "key": f"clip{i:03d}__0000",
            "clip": f"clip{i:03d}",
            "semantic": rng.integers(0, TOKENS["semantic_vocab"], frames),
            "cond": np.stack([np.array([i % 8, (i * 3 + 1) % 8])] * 3),  # distinct per clip, all namespaces
        }
        for i in range(n)
    ]


def _model(stage, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(stage.model_config("tiny"))


def _overfit(stage, items, steps: int = 200) -> Transformer:
    """Train the tiny LM on exactly these sequences until greedy decoding reproduces them."""
    model = _model(stage)
    seqs, starts = zip(*(stage.build(it["cond"][0], it["semantic"]) for it in items))
    x = torch.tensor(np.stack(seqs))
    t0 = starts[0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits[:, t0 - 1 :].reshape(-1, logits.size(-1)), x[:, t0:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny models run 5x faster than with two threads on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def overfit(one_thread):
    stage = _stage()
    items = _items()
    return stage, items, _overfit(stage, items)


def test_suffix_array_matches_sorting():
    rng = np.random.default_rng(1)
    for n, v in ((1, 2), (50, 2), (200, 5), (300, 100)):
        s = rng.integers(0, v, n)
        naive = sorted(range(n), key=lambda i: tuple(s[i:]))
        assert M.suffix_array(s).tolist() == naive


def test_index_finds_planted_copy_of_known_length():
    rng = np.random.default_rng(2)
    corpus = [rng.integers(0, 500, 300) for _ in range(6)]  # tokens < 500
    planted = corpus[3][40:57]  # 17 tokens of sequence 3 (clip B)
    shorter = corpus[5][100:109]  # 9 tokens of sequence 5 (clip C)
    filler = lambda k: rng.integers(500, 1000, k)  # noqa: E731  (never in the corpus: no longer match possible)
    query = np.concatenate([filler(10), shorter, filler(5), planted, filler(8)])
    idx = M.TokenIndex(corpus, [f"s{i}" for i in range(6)], ["A", "A", "B", "B", "C", "C"])
    m = idx.longest_match(query)
    assert m["tokens"] == 17 and m["sequence"] == "s3" and m["offset"] == 40 and m["query_start"] == 24
    assert idx.longest_match(query, exclude_group="B")["tokens"] == 9  # the copy from another clip
    assert idx.longest_match(query, exclude_group="B")["sequence"] == "s5"
    assert idx.longest_match(filler(30))["tokens"] == 0
    # a copy never spans two sequences: the end of s0 followed by the start of s1 matches only one side
    across = np.concatenate([corpus[0][-6:], corpus[1][:4]])
    assert idx.longest_match(across)["tokens"] == 6


def test_histogram_cost_rule():
    a = np.array([1, 2, 3, 3, 4])
    assert M.histogram_ot_cost(a, a, None) == 0.0
    assert M.histogram_ot_cost(a, a[::-1], None) == 0.0  # order does not matter: a shifted copy matches
    assert M.histogram_ot_cost(a, np.array([1, 2, 3, 5, 6]), None) == pytest.approx(2 / 5)  # total variation
    line = np.array([[0.0], [1.0], [2.0]])  # centroids on a line: mean distinct distance 4/3
    cost = M.ground_cost_matrix(line)
    assert M.histogram_ot_cost(np.array([0, 0]), np.array([1, 1]), cost) == pytest.approx(0.75)
    assert M.histogram_ot_cost(np.array([0, 2]), np.array([1, 2]), cost) == pytest.approx(0.75 / 2)


def test_overfit_model_copies_and_untrained_does_not(overfit):
    stage, items, model = overfit
    kw = dict(clips=3, prompt_seconds=[0.0, 1.0], continuation_seconds=2.0, sampling={"temperature": 1.0})
    res = M.evaluate_memorization(model, stage, items, **kw)
    assert res["n"] == 3 and res["prompt_seconds"] == 1.0 and res["continuation_seconds"] == 2.0
    assert res["greedy"]["exact_share"] == 1.0 and res["greedy"]["approx_share"] == 1.0
    assert res["greedy"]["ci95"]["exact_share"] == [1.0, 1.0]
    assert res["longest_exact_match"]["tokens"] == 10 and res["longest_exact_match"]["seconds"] == 2.0
    assert res["longest_exact_match"]["clip"] == res["longest_exact_match"]["prompt_clip"]
    assert res["longest_exact_match_other_clip"]["tokens"] < 10
    assert [s["prompt_seconds"] for s in res["sweep"]] == [0.0, 1.0]
    json.dumps({k: v for k, v in res.items() if k != "_plot"})

    fresh = M.evaluate_memorization(_model(stage, seed=1), stage, items, **kw)
    assert fresh["greedy"]["exact_share"] == 0.0 and fresh["sampled"]["exact_share"] == 0.0
    assert fresh["greedy"]["approx_share"] == 0.0
    assert fresh["longest_exact_match"]["tokens"] < 10


def test_long_prompt_uses_sliding_windows(overfit):
    stage, items, model = overfit
    long_items = [{**it, "semantic": np.concatenate([it["semantic"], it["semantic"]])} for it in items]
    gen = M.continue_prompts(
        model,
        stage,
        np.stack([it["cond"][0] for it in long_items]),
        np.stack([it["semantic"][:15] for it in long_items]),
        10,
    )
    assert gen.shape == (3, 10) and gen.min() >= 0 and gen.max() < TOKENS["semantic_vocab"]


def test_bad_inputs_refused(overfit):
    stage, items, model = overfit
    with pytest.raises(ValueError, match="longer than every training sample"):
        M.evaluate_memorization(model, stage, items, prompt_seconds=3.0, continuation_seconds=2.0)
    with pytest.raises(ValueError, match="whole number of semantic frames"):
        M.evaluate_memorization(model, stage, items, prompt_seconds=0.1, continuation_seconds=1.0)
    with pytest.raises(ValueError, match=">= 0 seconds"):
        M.evaluate_memorization(model, stage, items, prompt_seconds=-1.0)
    with pytest.raises(ValueError, match="at least one semantic frame"):
        M.evaluate_memorization(model, stage, items, prompt_seconds=1.0, continuation_seconds=0.0)


def test_cli_on_exported_weights_and_shards(tmp_path, overfit):
    from musiclm.cli import main
    from musiclm.testing import make_synthetic_token_shards
    from musiclm.weights import write_exported

    stage, _items_, model = overfit
    shards = str(tmp_path / "tokens")
    make_synthetic_token_shards(shards, TOKENS, n_train=12, n_eval=4, seconds=4.0, samples_per_shard=8)
    weights = str(tmp_path / "semantic.safetensors")
    meta = {"stage": "semantic", "model": model.cfg.to_dict(), "tokens": TOKENS, "window_seconds": 4.0}
    write_exported({k: v.clone() for k, v in model.state_dict().items()}, meta, weights)
    out = str(tmp_path / "out")
    args = ["eval", "memorization", "--model", weights, "--shards", shards, "--clips", "6", "--threads", "1"]
    assert main(args + ["--prompt-seconds", "1", "--continuation-seconds", "2", "--out", out]) == 0
    res = json.load(open(os.path.join(out, "memorization.json")))
    assert res["n"] == 6 and res["index"]["sequences"] == 12 and res["ground_cost"] == "0/1 token identity"
    assert set(res["greedy"]) >= {"exact_share", "approx_share", "ci95"} and res["reference"]["match_length_seconds"]
    assert os.path.getsize(os.path.join(out, "memorization.png")) > 1000
    with pytest.raises(ValueError, match="longer than every training sample"):
        main(args + ["--prompt-seconds", "4", "--continuation-seconds", "1"])
