"""Fit the MuLaN conditioning-token quantizer (MuLaNEmbedQuantizer) on MuLaN embeddings of the corpus.

    python ray_jobs/fit_quantizer.py --manifest data/rapbeats/manifest.jsonl --config launch/configs/tokenizers.yaml
    ray job submit --working-dir . -- python ray_jobs/fit_quantizer.py --manifest M --config C --out /shared/quantizer

Ray Data decodes and segments the clips (segments as long as the token shards' segments, so the
quantizer sees the embeddings ``tokenize.py`` will quantize) in CPU tasks; an actor pool of the
configured embedder (``tokenizers.mulan``: CLAP or our MuLaN) computes one L2-normalised embedding
per segment (mean over MuLaN windows); the driver fits the residual VQ of every namespace and
saves the quantizer directory (default: the ``tokenizers.quantizer`` path of the config).
With ``tokenizers.quantizer.source: text`` the embeddings are those of the segments' captions
(what ``tokenize.py`` then quantizes, :mod:`musiclm.tokenizers`).
Failed clips are skipped and listed in ``<out>.errors.jsonl``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

from musiclm.data import segments as S  # noqa: E402
from musiclm.logs import get_logger  # noqa: E402
from ray_jobs.cluster import resolve_device  # noqa: E402
from ray_jobs.job import Job, run_job  # noqa: E402
from ray_jobs.job_args import tokenizers_section  # noqa: E402
from ray_jobs.output import save_dir_output  # noqa: E402
from ray_jobs.stages import actor_stage, actor_stamp, fit_record, pack_arrays, segment_batches, unpack_arrays  # noqa: E402

log = get_logger("ray_jobs.fit_quantizer")


class EmbedActor:
    """MuLaN embedder replica: group of segments -> embeddings [N, D] (one per segment): of the
    audio, or of the clip's caption when ``source`` is ``"text"``."""

    def __init__(self, mulan_cfg: dict, device: str, threads: int, batch_size: int, source: str = "audio"):
        import torch

        from musiclm.mulan import build_embedder

        torch.set_num_threads(threads)
        self.embedder = build_embedder(mulan_cfg, device=resolve_device(device))
        self.batch_size = max(1, batch_size)
        self.source = source
        self.ready = actor_stamp()

    def __call__(self, batch: dict) -> dict:
        out = {"record": [], "arrays": []}
        for group_json, blob, meta_json in zip(batch["group"], batch["audio"], batch["meta"]):
            t0 = time.time()
            group, meta, audio = S.Group.from_json(group_json), json.loads(meta_json), unpack_arrays(blob)
            clips = {c["id"]: c for c in group.clips}
            errors = list(meta["errors"])
            got: list[tuple[str, np.ndarray, float]] = []
            for chunk, wav in segment_batches(meta["segments"], audio, self.batch_size):
                try:
                    if self.source == "text":
                        emb = self.embedder.embed_text([clips[s["clip_id"]]["caption"] for s in chunk])
                    else:
                        emb = self.embedder.embed_audio(wav)
                    emb = emb.float().numpy()  # [B, D]
                except Exception as e:
                    for s in chunk:
                        errors.append(
                            S.error_record(
                                clips[s["clip_id"]], "tokenize_failed", f"{type(e).__name__}: {e}", stage="embed"
                            )
                        )
                    continue
                got += [(s["clip_id"], e, s["end"] - s["start"]) for s, e in zip(chunk, emb)]
            failed = {e["clip_id"] for e in errors}
            kept = [(c, e, sec) for c, e, sec in got if c not in failed]
            emb = np.stack([e for _, e, _ in kept]) if kept else np.zeros((0, 0), np.float32)
            rec = fit_record(
                group,
                meta,
                {c for c, _, _ in kept},
                errors,
                sum(sec for _, _, sec in kept),
                {"decode_s": round(meta["decode_s"], 4), "model_s": round(time.time() - t0, 4), "actor": self.ready},
            )
            out["record"].append(json.dumps(rec))
            out["arrays"].append(pack_arrays({"embeddings": emb.astype(np.float32)}))
        return out


def _add_arguments(p) -> None:
    p.add_argument("--out", default=None, help="quantizer directory (default: tokenizers.quantizer of the config)")
    p.add_argument("--max-samples", type=int, default=100_000, help="embeddings used for the fit at most")


def _setup(job: Job) -> None:
    from musiclm.mulan import build_embedder
    from musiclm.tokenizers import cond_source_of

    args, cfg = job.args, job.cfg
    tok = tokenizers_section(cfg)
    if not tok.get("mulan"):
        job.parser.error("the config has no tokenizers.mulan section (the embedder to quantize)")
    q = tok.get("quantizer")
    out = args.out or (q if isinstance(q, str) else (q or {}).get("path"))
    if not out:
        job.parser.error("--out is required when the config has no tokenizers.quantizer path")
    fit = dict(cfg.get("fit_quantizer") or {})
    if args.max_clips is None and fit.get("max_clips"):
        args.max_clips = int(fit["max_clips"])
    job.segment_seconds = float(args.segment_seconds or cfg.get("segment_seconds") or 10.0)
    mulan_cfg = dict(tok["mulan"])
    job.sample_rate = int(build_embedder(mulan_cfg).sample_rate)
    source = cond_source_of(q)  # validated: audio | text
    job.describe = f"embedder {mulan_cfg.get('type', 'clap')} at {job.sample_rate} Hz, {source} embeddings -> {out}"
    job.data.update(out=out, quantizer_cfg=q, mulan_cfg=mulan_cfg, source=source)


def _stages(job: Job, ds):
    wp = job.worker_plan()
    return actor_stage(
        ds,
        EmbedActor,
        wp,
        dict(
            mulan_cfg=job.data["mulan_cfg"],
            device=wp["device"],
            threads=wp["threads"],
            batch_size=job.args.batch_size,
            source=job.data["source"],
        ),
    )


def _complete(job: Job) -> dict:
    from musiclm.tokenizers import build_tokenizers

    args, out = job.args, job.data["out"]
    embs = [a["embeddings"] for a in job.arrays if a["embeddings"].size]
    if not embs:
        raise SystemExit("[fit_quantizer] no embeddings: every clip failed (see the errors above)")
    x = np.concatenate(embs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer vectors than codes" on small corpora: reported below
        # Only the quantizer section: its preset / levels / codebook_size / namespaces; no model loads.
        # codebook_size: auto -> sized to len(x) (musiclm.quantize.auto_codebook_size)
        quant = build_tokenizers({"quantizer": job.data["quantizer_cfg"]}).new_quantizer(
            dim=int(x.shape[1]), num_embeddings=len(x)
        )
        t_fit = time.time()
        quant.fit(x, seed=args.seed, max_samples=args.max_samples)
    fit_s = time.time() - t_fit
    save_dir_output(out, quant.save)
    summary = job.fit_summary(out)
    cos = quant.reconstruction_cosine(x[: min(len(x), 2048)])
    summary.update(
        embeddings=int(len(x)),
        source=job.data["source"],
        dim=int(x.shape[1]),
        fit_s=round(fit_s, 3),
        levels=int(quant.levels),
        codebook_size=int(quant.codebook_size),
        reconstruction_cosine={k: round(float(v), 4) for k, v in cos.items()},
        fingerprint_weights_sha256=quant.fingerprint().get("weights_sha256"),
    )
    if len(x) < 4 * quant.codebook_size:
        log.info(
            f"[fit_quantizer] note: {len(x)} embeddings for codebooks of {quant.codebook_size} codes: many "
            f"codes stay empty and text/audio rarely share tokens; `codebook_size: auto` sizes them to the corpus"
        )
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run_job(
        "fit_quantizer", __doc__, argv, setup=_setup, stages=_stages, complete=_complete, add_arguments=_add_arguments
    )


if __name__ == "__main__":
    main()
