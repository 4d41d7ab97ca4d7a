#!/usr/bin/env python
"""MFCC vs a MuLaN audio-tower layer as the semantic tokenizer's features: which one gives the
semantic stage the better tempo following?

    OMP_NUM_THREADS=1 .venv/bin/python scripts/semantic_features_experiment.py \\
        --audio /tmp/mulan_demo/audio --mulan /tmp/mulan_demo/run5/model --out /tmp/semfeat --minutes 8

Pipeline (``--steps``, default all of them, in this order; every step reuses what the earlier
ones wrote under ``--out``, so a step can be rerun alone):

``prep``      read the audio shards (``musiclm.data.shards.shard_reader``, 24 kHz clips, their json);
              acoustic codes (a tiny random EnCodec, 8 levels x 1024 at 75 Hz: only there because the
              token-shard contract and the training engine require ``acoustic.npy`` and an acoustic
              fingerprint -- the semantic stage never reads them) and the MuLaN audio embedding of
              every clip through :func:`musiclm.tokenizers.build_tokenizers`; fits ONE
              :class:`~musiclm.quantize.MuLaNEmbedQuantizer` (``--cond-levels`` x
              ``--cond-codebook``, small enough for ~900 train embeddings) on the train split and
              quantizes every clip (``cond.npy``). Shared by every variant.
``tokens``    per variant (``--variants mfcc mulan:2``): features of the train clips, k-means
              (:func:`musiclm.semantic.fit_kmeans`, ``--clusters``), then the semantic ids of every
              clip through the bundle, written as token shards with ``ShardWriter`` /
              ``write_index`` in the layout ``ray_jobs/tokenize.py`` writes
              (``<out>/shards/demo/tokens-<hash of the fingerprints>/``, one shard per 100 clips per
              split, same json). ``ray_jobs/tokenize.py`` itself reads a manifest of audio files,
              not audio shards, and its Ray start-up is heavy on a shared 2-core machine, so the
              library is called directly; ``<out>/tokenizers-<variant>.yaml`` is the equivalent
              tokenizers config.
``train``     the real launcher for each variant with the same budget:
              ``deepspeed --num_gpus 1 launch/train.py --stage semantic ...`` (``--minutes``,
              ``--max-steps``; CPU: ``DS_ACCELERATOR=cpu``, ``deepspeed_configs/cpu.json``).
``export``    ``musiclm export RUN --out <out>/export/<variant>.safetensors``.
``eval``      ``musiclm eval tempo`` for each variant (JSON + PNG under ``<out>/eval/<variant>``),
              then ``<out>/summary.json`` with the numbers of every variant side by side.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

STEPS = ("prep", "tokens", "train", "export", "eval")
DATASET = "demo"


def log(msg: str) -> None:
    print(f"[semfeat {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# audio
# --------------------------------------------------------------------------------------------


def read_clips(audio_dir: str) -> list[dict]:
    """Every sample of the audio shards (all splits), sorted by split and key:
    {"key", "split", "json", "wav" (float32 [T] at the shard rate), "sr"}."""
    import soundfile as sf

    from musiclm.data.shards import read_index, shard_reader

    index = read_index(audio_dir)
    out = []
    for split in sorted(index["splits"]):
        for s in shard_reader(audio_dir, split, shuffle=0):
            wav, sr = sf.read(io.BytesIO(s["flac"]), dtype="float32", always_2d=True)
            out.append({"key": s["__key__"], "split": split, "json": s["json"], "wav": wav.mean(axis=1), "sr": sr})
    out.sort(key=lambda c: (c["split"], c["key"]))
    return out


def batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


def variant_features(variant: str, mulan: str) -> dict:
    if variant in ("mfcc", "logmel"):
        return {"type": variant, "rate": 25}
    if variant.startswith("mulan"):
        layer = int(variant.split(":", 1)[1]) if ":" in variant else 2
        return {"type": "mulan", "model": os.path.abspath(mulan), "layer": layer, "rate": 25}
    raise SystemExit(f"unknown variant {variant!r} (mfcc | logmel | mulan:<layer>)")


def vname(variant: str) -> str:
    return variant.replace(":", "")


def rname(args, variant: str) -> str:
    """Name of a variant's LM run / export / eval (``--tag`` separates several budgets)."""
    return vname(variant) + (f"-{args.tag}" if args.tag else "")


def tokenizers_config(args, variant: str | None) -> dict:
    models = os.path.join(args.out, "models")
    cfg = {
        "acoustic": {"type": "encodec", "model": os.path.join(models, "tiny_encodec"), "bandwidth": 6.0},
        "mulan": {"type": "mulan", "model": os.path.abspath(args.mulan)},
        "quantizer": {
            "path": os.path.join(models, "quantizer"),
            "levels": args.cond_levels,
            "codebook_size": args.cond_codebook,
        },
    }
    if variant is not None:
        cfg["semantic"] = {
            "features": variant_features(variant, args.mulan),
            "kmeans": os.path.join(models, f"kmeans-{vname(variant)}.safetensors"),
        }
    return cfg


def make_tiny_encodec(directory: str, seed: int = 0) -> str:
    """EncodecModel at 24 kHz, hop 320 (75 Hz), 6 kbps = 8 levels x 1024, random and tiny."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    import torch
    from transformers import EncodecConfig, EncodecModel

    from musiclm.codec.encodec import randomize_codebooks

    torch.manual_seed(seed)
    config = EncodecConfig(
        target_bandwidths=[1.5, 3.0, 6.0],
        sampling_rate=24_000,
        hidden_size=16,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 2],
        num_lstm_layers=1,
        codebook_size=1024,
        codebook_dim=16,
    )
    model = EncodecModel(config).eval()
    randomize_codebooks(model, seed, scale=0.3)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------


def step_prep(args) -> None:
    import torch

    from musiclm.tokenizers import build_tokenizers

    torch.set_num_threads(1)
    t0 = time.time()
    make_tiny_encodec(os.path.join(args.out, "models", "tiny_encodec"))
    clips = read_clips(args.audio)
    log(f"prep: {len(clips)} clips read in {time.time() - t0:.1f}s")
    cfg = tokenizers_config(args, None)
    q_dir = cfg["quantizer"]["path"]
    bundle = build_tokenizers({k: v for k, v in cfg.items() if k != "quantizer"})
    keys = [c["key"] for c in clips]
    # the acoustic codes depend only on the audio and the tiny codec: reuse them (e.g. copied from
    # an earlier --out) when the clips are the same
    cache = os.path.join(args.out, "acoustic.npz")
    acoustic = None
    if os.path.exists(cache):
        za = np.load(cache)
        if list(za["keys"]) == keys and za["codec_sha256"].item() == bundle.acoustic.fingerprint()["weights_sha256"]:
            acoustic = list(za["acoustic"])
            log("prep: acoustic codes reused from acoustic.npz")
    entries = ["mulan.npy"] + (["acoustic.npy"] if acoustic is None else [])
    new_acoustic, mulan = [], []
    t1 = time.time()
    for b in batches(clips, 16):
        res = bundle.tokenize([torch.from_numpy(c["wav"]) for c in b], sample_rate=b[0]["sr"], entries=entries)
        if acoustic is None:
            new_acoustic += [r["acoustic.npy"] for r in res]
        mulan += [r["mulan.npy"] for r in res]
    if acoustic is None:
        acoustic = new_acoustic
        np.savez(
            cache,
            keys=np.array(keys),
            acoustic=np.stack(acoustic),
            codec_sha256=np.array(bundle.acoustic.fingerprint()["weights_sha256"]),
        )
    log(f"prep: {' + '.join(entries)} in {time.time() - t1:.1f}s")
    emb = np.stack(mulan)  # float16 [N, D]
    train = np.array([c["split"] == "train" for c in clips])
    qb = build_tokenizers({"quantizer": cfg["quantizer"]})
    quant = qb.new_quantizer(dim=int(emb.shape[1]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.fit(emb[train].astype(np.float32), seed=0)
    quant.save(q_dir)
    cond = quant.encode(torch.from_numpy(emb.astype(np.float32))).cpu().numpy().astype(np.int16)
    cos = quant.reconstruction_cosine(emb[~train].astype(np.float32))
    used = [int(len(np.unique(cond[train, 0, k]))) for k in range(cond.shape[2])]
    np.savez(
        os.path.join(args.out, "common.npz"),
        keys=np.array([c["key"] for c in clips]),
        acoustic=np.stack(acoustic),
        mulan=emb,
        cond=cond,
    )
    meta = {
        "clips": [{"key": c["key"], "split": c["split"], "json": c["json"]} for c in clips],
        "sample_rate": int(clips[0]["sr"]),
        "quantizer": quant.config(),
        "quantizer_eval_reconstruction_cosine": {k: round(float(v), 4) for k, v in cos.items()},
        "quantizer_codes_used_per_level_semantic_ns": used,
        "prep_s": round(time.time() - t0, 1),
    }
    with open(os.path.join(args.out, "common.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(
        f"prep: quantizer {quant.config()} eval cosine {meta['quantizer_eval_reconstruction_cosine']} "
        f"codes used per level {used}; done in {time.time() - t0:.1f}s"
    )


def _load_common(args):
    z = np.load(os.path.join(args.out, "common.npz"))
    with open(os.path.join(args.out, "common.json")) as f:
        meta = json.load(f)
    return z, meta


def step_tokens(args, variant: str) -> str:
    import torch
    import yaml

    from musiclm.data.shards import ShardWriter, token_shard_dir, write_index
    from musiclm.semantic import fit_kmeans, save_centroids
    from musiclm.tokenizers import build_tokenizers, resample

    torch.set_num_threads(1)
    t0 = time.time()
    z, meta = _load_common(args)
    clips = read_clips(args.audio)
    assert [c["key"] for c in clips] == list(z["keys"]), "audio shards changed since prep"
    cfg = tokenizers_config(args, variant)
    km_path = cfg["semantic"]["kmeans"]
    feats_bundle = build_tokenizers({"semantic": {"features": cfg["semantic"]["features"]}})
    feats = feats_bundle.semantic_features
    rng = np.random.default_rng(0)
    rows = []
    t1 = time.time()
    train = [c for c in clips if c["split"] == "train"]
    for b in batches(train, 16):
        wav = resample(torch.from_numpy(np.stack([c["wav"] for c in b])), b[0]["sr"], feats.sample_rate)
        x = feats(wav).numpy()  # [B, T_s, D]
        for f in x:
            k = min(len(f), args.frames_per_clip)
            rows.append(f[np.sort(rng.choice(len(f), k, replace=False))])
    feat_s = time.time() - t1
    train_seconds = sum(len(c["wav"]) / c["sr"] for c in train)
    x = np.concatenate(rows)
    log(
        f"tokens[{variant}]: features of {len(train)} train clips in {feat_s:.1f}s "
        f"({train_seconds / feat_s:.0f} audio-s/s), {x.shape[0]} frames x {x.shape[1]} for k-means"
    )
    t2 = time.time()
    cent = fit_kmeans([x], args.clusters, seed=0, max_iter=args.kmeans_iter)
    kmeans_s = time.time() - t2
    save_centroids(km_path, cent, feats.config())
    log(f"tokens[{variant}]: k-means {cent.shape} in {kmeans_s:.1f}s")

    bundle = build_tokenizers(cfg)
    fps = bundle.fingerprints()
    out_dir = token_shard_dir(os.path.join(args.out, "shards"), DATASET, fps)
    t3 = time.time()
    sem = []
    for b in batches(clips, 16):
        res = bundle.tokenize([torch.from_numpy(c["wav"]) for c in b], sample_rate=b[0]["sr"], entries=["semantic.npy"])
        sem += [r["semantic.npy"] for r in res]
    tok_s = time.time() - t3
    total_seconds = sum(len(c["wav"]) / c["sr"] for c in clips)
    shards = []
    for split in sorted({c["split"] for c in clips}):
        idx = [i for i, c in enumerate(clips) if c["split"] == split]
        with ShardWriter(out_dir, split, kind="tokens", max_samples=100) as w:
            for i in idx:
                c = clips[i]
                js = dict(c["json"])
                js["split"] = split
                js["segment"] = int(c["key"].rsplit("__", 1)[-1]) if "__" in c["key"] else 0
                w.write(
                    {
                        "__key__": c["key"],
                        "json": js,
                        "acoustic.npy": z["acoustic"][i],
                        "semantic.npy": sem[i],
                        "mulan.npy": z["mulan"][i],
                        "cond.npy": z["cond"][i],
                    }
                )
        shards += w.shards
    counts = np.bincount(np.concatenate(sem).astype(np.int64), minlength=cent.shape[0])
    p = counts[counts > 0] / counts.sum()
    stats = {
        "variant": variant,
        "features": cfg["semantic"]["features"],
        "dim": int(cent.shape[1]),
        "clusters": int(cent.shape[0]),
        "kmeans_frames": int(x.shape[0]),
        "kmeans_s": round(kmeans_s, 1),
        "train_features_s": round(feat_s, 1),
        "tokenize_s": round(tok_s, 1),
        "tokenize_audio_seconds_per_s": round(total_seconds / tok_s, 1),
        "tokens_per_s": round(total_seconds * 25 / tok_s, 1),
        "clusters_used": int((counts > 0).sum()),
        "token_entropy_bits": round(float(-(p * np.log2(p)).sum()), 3),
        "mean_run_length_frames": round(float(np.mean([len(s) / (1 + np.count_nonzero(np.diff(s))) for s in sem])), 2),
        "native_frame_seconds": feats.native_frame_seconds,
        "shards": out_dir,
    }
    write_index(
        out_dir,
        shards,
        kind="tokens",
        fingerprints=fps,
        extra={
            "job": "scripts/semantic_features_experiment.py",
            "sample_rate": meta["sample_rate"],
            "frame_rates": bundle.frame_rates(),
            "experiment": stats,
        },
    )
    with open(os.path.join(args.out, f"tokenizers-{vname(variant)}.yaml"), "w") as f:
        yaml.safe_dump(
            {"segment_seconds": 10, "min_segment_seconds": 1.0, "sample_rate": 24000, "tokenizers": cfg},
            f,
            sort_keys=False,
        )
    with open(os.path.join(args.out, f"tokens-{vname(variant)}.json"), "w") as f:
        json.dump(stats, f, indent=1)
    log(f"tokens[{variant}]: {json.dumps(stats)} ({time.time() - t0:.1f}s)")
    return out_dir


def _shards_of(args, variant: str) -> str:
    with open(os.path.join(args.out, f"tokens-{vname(variant)}.json")) as f:
        return json.load(f)["shards"]


def _tokens_overrides(args) -> list[str]:
    return [
        f"tokens.semantic_vocab={args.clusters}",
        f"tokens.cond_levels={args.cond_levels}",
        f"tokens.cond_codebook={args.cond_codebook}",
    ]


def train_command(args, variant: str, port: int) -> list[str]:
    run_dir = os.path.join(args.out, "runs", rname(args, variant))
    ds = os.path.join(ROOT, ".venv", "bin", "deepspeed")
    return [
        ds if os.path.exists(ds) else "deepspeed",
        "--num_gpus",
        "1",
        "--master_port",
        str(port),
        "launch/train.py",
        "--stage",
        "semantic",
        "--config",
        "launch/configs/semantic.yaml",
        "--deepspeed_config",
        "deepspeed_configs/cpu.json",
        "--shards",
        _shards_of(args, variant),
        "--run_dir",
        run_dir,
        "--name",
        f"semfeat-{rname(args, variant)}",
        "--resume",
        "auto",
        "--max_steps",
        str(args.max_steps),
        "--set",
        f"train.max_minutes={args.minutes}",
        f"train.warmup_steps={args.warmup}",
        "train.eval_every=50",
        "train.eval_batches=8",
        "train.checkpoint_every=50",
        "train.log_every=10",
        *_tokens_overrides(args),
    ]


def step_train(args, variants: list[str]) -> dict:
    """Train every variant with the same budget: all at once (``--parallel-train``, so they share
    the machine's load equally) or one after the other."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    procs = {}
    results = {}
    t0 = time.time()
    for i, v in enumerate(variants):
        cmd = train_command(args, v, 29650 + i)
        log(f"train[{v}]: {' '.join(cmd)}")
        f = open(os.path.join(args.out, f"train-{rname(args, v)}.log"), "w")
        procs[v] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), f)
        if not args.parallel_train:
            procs[v][0].wait()
    for v, (proc, f) in procs.items():
        rc = proc.wait()
        f.close()
        if rc:
            raise SystemExit(f"training {v} failed (rc {rc}): see {args.out}/train-{rname(args, v)}.log")
        results[v] = train_summary(os.path.join(args.out, "runs", rname(args, v)))
        results[v]["wall_s_all"] = round(time.time() - t0, 1)
        results[v]["parallel"] = bool(args.parallel_train)
        log(f"train[{v}]: {results[v]}")
    return results


def train_summary(run_dir: str) -> dict:
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    last = train[-10:]
    return {
        "steps": max((r["step"] for r in rows), default=0),
        "train_loss_last10_mean": round(float(np.mean([r["train/loss"] for r in last])), 4) if last else None,
        "train_accuracy_last10_mean": round(float(np.mean([r.get("train/accuracy", np.nan) for r in last])), 4)
        if last
        else None,
        "eval": [
            {
                "step": r["step"],
                "loss": round(r["eval/loss"], 4),
                "accuracy": round(r.get("eval/accuracy", float("nan")), 4),
            }
            for r in evals
        ],
    }


def step_export(args, variant: str) -> str:
    out = os.path.join(args.out, "export", f"{rname(args, variant)}.safetensors")
    run_dir = os.path.join(args.out, "runs", rname(args, variant))
    cmd = [sys.executable, "-m", "musiclm.cli", "export", run_dir, "--out", out]
    log(f"export[{variant}]: {' '.join(cmd)}")
    subprocess.check_call(cmd, cwd=ROOT)
    return out


def step_eval(args, variant: str) -> dict:
    cfg = tokenizers_config(args, variant)
    out_dir = os.path.join(args.out, "eval", rname(args, variant))
    cmd = [
        sys.executable,
        "-m",
        "musiclm.cli",
        "eval",
        "tempo",
        "--shards",
        _shards_of(args, variant),
        "--model",
        os.path.join(args.out, "export", f"{rname(args, variant)}.safetensors"),
        "--kmeans",
        cfg["semantic"]["kmeans"],
        "--mulan",
        os.path.abspath(args.mulan),
        "--quantizer",
        cfg["quantizer"]["path"],
        "--out",
        out_dir,
        "--samples",
        str(args.samples),
        "--cond-scale",
        str(args.cond_scale),
        "--temperature",
        str(args.temperature),
        "--seed",
        "0",
        "--label",
        rname(args, variant),
    ]
    if args.top_k:
        cmd += ["--top-k", str(args.top_k)]
    log(f"eval[{variant}]: {' '.join(cmd)}")
    subprocess.check_call(cmd, cwd=ROOT)
    with open(os.path.join(out_dir, "tempo.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--audio", default="/tmp/mulan_demo/audio", help="audio shard folder (index.json, train/eval)")
    p.add_argument("--mulan", default="/tmp/mulan_demo/run5/model", help="save_mulan directory (or export)")
    p.add_argument("--out", default="/tmp/semfeat")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget per semantic LM")
    p.add_argument("--max-steps", type=int, default=400, help="cosine horizon and step cap per LM (same for all)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument(
        "--tag",
        default="",
        help="suffix of the LM run / export / eval names and summary keys "
        "(e.g. a second budget on the same token shards)",
    )
    p.add_argument("--parallel-train", action="store_true", help="train the variants at the same time")
    p.add_argument("--variants", nargs="+", default=["mfcc", "mulan:2"], help="mfcc | logmel | mulan:<layer>")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--clusters", type=int, default=512, help="k-means size (semantic vocabulary), every variant")
    p.add_argument("--frames-per-clip", type=int, default=64, help="random frames per train clip for k-means")
    p.add_argument("--kmeans-iter", type=int, default=50)
    p.add_argument("--cond-levels", type=int, default=8)
    p.add_argument("--cond-codebook", type=int, default=64)
    p.add_argument("--samples", type=int, default=2, help="generations per eval caption")
    p.add_argument("--cond-scale", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    summary_path = os.path.join(args.out, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    summary["args"] = vars(args)
    if "prep" in args.steps:
        step_prep(args)

    def save():
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1, default=str)

    for v in args.variants:
        entry = summary.setdefault(v, {})
        if "tokens" in args.steps:
            step_tokens(args, v)
        if os.path.exists(os.path.join(args.out, f"tokens-{vname(v)}.json")):
            entry["tokens"] = json.load(open(os.path.join(args.out, f"tokens-{vname(v)}.json")))
        save()
    sfx = f"-{args.tag}" if args.tag else ""
    if "train" in args.steps:
        for v, r in step_train(args, args.variants).items():
            summary[v]["train" + sfx] = r
        save()
    for v in args.variants:
        if "export" in args.steps:
            summary[v]["export" + sfx] = step_export(args, v)
        if "eval" in args.steps:
            summary[v]["tempo" + sfx] = step_eval(args, v)
        save()
    print_table(summary, args.variants, f"-{args.tag}" if args.tag else "")
    log(f"summary: {summary_path}")
    return 0


def print_table(summary: dict, variants: list[str], sfx: str = "") -> None:
    """One line per variant and method: raw / octave-folded tempo errors (BPM)."""
    for v in variants:
        e = summary.get(v) or {}
        tok, tr, te = e.get("tokens") or {}, e.get("train" + sfx) or {}, e.get("tempo" + sfx) or {}
        ev = (tr.get("eval") or [{}])[-1]
        print(
            f"== {v}{sfx}: k-means {tok.get('clusters')} x {tok.get('dim')}, "
            f"tokenize {tok.get('tokenize_audio_seconds_per_s')} audio-s/s, "
            f"mean run {tok.get('mean_run_length_frames')} frames; LM steps {tr.get('steps')}, "
            f"train loss {tr.get('train_loss_last10_mean')}, eval loss {ev.get('loss')} acc {ev.get('accuracy')}"
        )
        gain = (te.get("info") or {}).get("following_gain_folded_bpm")
        if gain:
            print(
                f"   tempo following gain (mismatched - matched folded error): {gain['mean']} BPM, "
                f"95% CI {gain['ci95']}"
            )
        for m, r in (te.get("methods") or {}).items():
            print(
                f"   {m:22s} MAE {r.get('mae', float('nan')):6.2f}  median {r.get('median_ae', float('nan')):6.2f}  "
                f"| folded MAE {r.get('mae_octave_folded', float('nan')):6.2f} median "
                f"{r.get('median_ae_octave_folded', float('nan')):6.2f}  acc4 {r.get('acc4', float('nan')):.3f} "
                f"folded {r.get('acc4_octave_folded', float('nan')):.3f}  r {r.get('pearson_r')}"
            )


if __name__ == "__main__":
    sys.exit(main())
