"""Manifest -> token shards (acoustic codes, semantic ids, MuLaN embedding + conditioning tokens).

    python ray_jobs/tokenize.py --manifest data/rapbeats/manifest.jsonl --out shards \\
        --config launch/configs/tokenizers.yaml
    ray job submit --working-dir . -- python ray_jobs/tokenize.py --manifest s3://b/m.jsonl \\
        --out s3://b/shards --config launch/configs/tokenizers.yaml

Output: ``<out>/<dataset>/tokens-<hash of the tokenizer fingerprints>/<split>-%06d.tar``,
``errors.jsonl``, ``index.json`` (written last). Other tokenizers -> another folder.

``--streams semantic,cond`` (any of acoustic, semantic, mulan, cond; default all four) writes only
those entries, loads only the tokenizers they need (no codec for semantic + cond; ``cond`` needs the
MuLaN model and the quantizer) and goes to a folder of its own: the hash covers those tokenizers'
fingerprints and the stream list, and ``index.json`` names the streams. The semantic stage trains
on semantic + cond, the fine stage on acoustic + cond, the coarse stage needs acoustic, semantic
and cond.

Pipeline (Ray Data): one row per group of clips (sorted clip ids per split; one group = one
shard), then (``--pipeline``):

* ``split``: ``map`` decode + check + segment (CPU tasks) -> ``map_batches`` with an actor pool of
  :class:`TokenizeActor` (``workers`` actors, ``num_gpus`` when the cluster has GPUs, batched
  inference inside the group) -> ``map`` write the group's shard + its record (CPU tasks);
* ``fused``: a pool of plain Ray actors (:class:`FusedTokenizeActor`, no Ray Data), each call one
  group: decode, segment, tokenize, write the shard + its record, all in the actor;
* ``auto`` (default): fused when the actors get no GPU, split when they do (:func:`choose_pipeline`).

Both write a group's shard atomically and then its record, and a rerun with the same arguments
skips the groups whose record exists (exactly-once after a kill).
"""

from __future__ import annotations

import os
import sys

# This folder must not be on sys.path: ray_jobs/tokenize.py would shadow the standard library's
# `tokenize` (and Ray would put the folder on its workers' paths too). Import via the repo root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import json  # noqa: E402
import time  # noqa: E402

from musiclm.data import segments as S  # noqa: E402
from musiclm.data.shards.schema import ALL_STREAMS  # noqa: E402
from musiclm.logs import get_logger  # noqa: E402
from ray_jobs.cluster import resolve_device, uses_gpus  # noqa: E402
from ray_jobs.job import Job, run_job  # noqa: E402
from ray_jobs.job_args import dataset_name, tokenizers_section  # noqa: E402
from ray_jobs.output import finish, write_group  # noqa: E402
from ray_jobs.stages import (  # noqa: E402
    actor_pool_rows,
    actor_stage,
    actor_stamp,
    decode_clips,
    pack_arrays,
    sample_json,
    unpack_arrays,
)

ENTRIES = ("acoustic.npy", "semantic.npy", "mulan.npy", "cond.npy")  # every stream (--streams: a subset)
log = get_logger("ray_jobs.tokenize")


class TokenizeActor:
    """One model replica: builds the tokenizer bundle once, then tokenizes groups of segments."""

    def __init__(
        self,
        tok_cfg: dict,
        device: str,
        threads: int,
        batch_size: int,
        expected_hash: str,
        entries: tuple[str, ...] = ENTRIES,
    ):
        import torch

        from musiclm.data.shards import fingerprint_hash
        from musiclm.tokenizers import build_tokenizers

        torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.bundle = build_tokenizers(tok_cfg, device=self.device)
        got = fingerprint_hash(self.bundle.fingerprints())
        if got != expected_hash:  # a node whose model files differ from the driver's
            raise RuntimeError(
                f"tokenizers on this worker fingerprint to {got}, the driver's to {expected_hash}: "
                f"model files differ between nodes"
            )
        self.batch_size = max(1, int(batch_size))
        self.entries = tuple(entries)
        self.ready = actor_stamp()

    def _tokenize(self, wavs: list, captions: list) -> list[dict]:
        return self.bundle.tokenize(
            wavs, sample_rate=self.bundle.sample_rate, entries=list(self.entries), captions=captions
        )

    def tokenize_group(self, group: S.Group, audio: dict, meta: dict) -> tuple[dict, dict]:
        """A decoded group's segments -> (token arrays keyed ``"<sample key>|<entry>"``, meta).

        A batch that fails is retried one segment at a time: the clip whose segment fails goes to
        the errors (``tokenize_failed``) with all its segments, the rest of the group is kept."""
        import torch

        t0 = time.time()
        segs = meta["segments"]
        clips = {c["id"]: c for c in group.clips}
        tokens: dict = {}
        failed: dict[str, str] = {}
        for i in range(0, len(segs), self.batch_size):
            chunk = [s for s in segs[i : i + self.batch_size] if s["clip_id"] not in failed]
            wavs = [torch.from_numpy(S.from_int16(audio[s["key"]])) for s in chunk]
            captions = [clips[s["clip_id"]].get("caption") for s in chunk]  # quantizer.source: text
            try:
                results = self._tokenize(wavs, captions)
            except Exception:
                results = []
                for s, w, c in zip(chunk, wavs, captions):  # find the culprit, keep the rest
                    try:
                        results.append(self._tokenize([w], [c])[0])
                    except Exception as e:
                        failed.setdefault(s["clip_id"], f"{type(e).__name__}: {e}")
                        results.append(None)
            for s, r in zip(chunk, results):
                if r is not None:
                    for name in self.entries:
                        tokens[f"{s['key']}|{name}"] = r[name]
        errors = meta["errors"] + [
            S.error_record(clips[cid], "tokenize_failed", why, stage="tokenize") for cid, why in sorted(failed.items())
        ]
        meta = dict(
            meta,
            segments=[s for s in segs if s["clip_id"] not in failed],
            errors=errors,
            model_s=time.time() - t0,
            actor=self.ready,
        )
        # a clip that failed on a later segment drops the tokens of its earlier ones too
        tokens = {k: v for k, v in tokens.items() if S.parse_segment_key(k.split("|")[0])[0] not in failed}
        return tokens, meta

    def __call__(self, batch: dict) -> dict:
        """Split pipeline: decoded groups (``audio`` npz, ``meta`` JSON) -> their tokens (npz)."""
        out = {"group": [], "tokens": [], "meta": []}
        for group_json, blob, meta_json in zip(batch["group"], batch["audio"], batch["meta"]):
            tokens, meta = self.tokenize_group(
                S.Group.from_json(group_json), unpack_arrays(blob), json.loads(meta_json)
            )
            out["group"].append(group_json)
            out["tokens"].append(pack_arrays(tokens))
            out["meta"].append(json.dumps(meta))
        return out


class FusedTokenizeActor(TokenizeActor):
    """Fused pipeline (CPU clusters): one call = one group, decoded, segmented, tokenized and written
    (shard, then its record: the same protocol as :func:`write_tokens`) in this actor, so no audio
    or tokens cross the object store and no decode / write task competes with the model for a core."""

    def __init__(
        self,
        tok_cfg: dict,
        device: str,
        threads: int,
        batch_size: int,
        expected_hash: str,
        entries: tuple[str, ...] = ENTRIES,
        *,
        decode: dict,
        out_dir: str,
        delay: float = 0.0,
        streams: tuple[str, ...] | None = None,
    ):
        super().__init__(tok_cfg, device, threads, batch_size, expected_hash, entries)
        self.decode, self.out_dir, self.delay, self.streams = dict(decode), out_dir, delay, streams

    def run_group(self, group_json: str) -> dict:
        """One group: decode, segment, tokenize, write its shard and then its record -> {"record"}."""
        group = S.Group.from_json(group_json)
        audio, meta = decode_clips(group, **self.decode)
        tokens, meta = self.tokenize_group(group, audio, meta)
        record = write_token_group(group, meta, tokens, out_dir=self.out_dir, delay=self.delay, streams=self.streams)
        return {"record": json.dumps(record)}


def write_token_group(
    group: S.Group,
    meta: dict,
    arrays: dict,
    *,
    out_dir: str,
    delay: float = 0.0,
    streams: tuple[str, ...] | None = None,
) -> dict:
    """A group's token arrays (``"<sample key>|<entry>"``) -> its shard, then its record (returned)."""
    from musiclm.data.shards import parse_streams, stream_entries

    streams = parse_streams(streams)
    clips = {c["id"]: c for c in group.clips}
    sr = int(meta["sample_rate"])
    samples = []
    for seg in meta["segments"]:
        s = {"__key__": seg["key"], "json": sample_json(clips[seg["clip_id"]], seg, sr)}
        for name in stream_entries(streams):
            s[name] = arrays[f"{seg['key']}|{name}"]
        samples.append(s)
    timings = {
        "decode_s": round(meta["decode_s"], 4),
        "model_s": round(meta.get("model_s", 0.0), 4),
        "actor": meta.get("actor"),
    }
    return write_group(
        group, samples, meta["errors"], out_dir=out_dir, kind="tokens", timings=timings, delay=delay, streams=streams
    )


def write_tokens(row: dict, *, out_dir: str, delay: float = 0.0, streams: tuple[str, ...] | None = None) -> dict:
    """Ray Data `map` (CPU task) of the split pipeline: the group's token samples (the entries of
    ``streams``, default all) -> its shard and record."""
    record = write_token_group(
        S.Group.from_json(row["group"]),
        json.loads(row["meta"]),
        unpack_arrays(row["tokens"]),
        out_dir=out_dir,
        delay=delay,
        streams=streams,
    )
    return {"record": json.dumps(record)}


def streams_config(tok_cfg: dict, streams) -> dict:
    """The ``tokenizers:`` section reduced to the tokenizers ``streams`` are made by (acoustic ->
    acoustic, semantic -> semantic, mulan -> mulan, cond -> mulan + quantizer): the others are
    neither loaded nor fingerprinted."""
    from musiclm.data.shards import STREAMS, stream_tokenizers

    every = {t for _entry, toks in STREAMS.values() for t in toks}
    needed = set(stream_tokenizers(streams))
    return {k: v for k, v in tok_cfg.items() if k not in every or k in needed}


def build_bundle(tok_cfg: dict, entries: tuple[str, ...] = ENTRIES):
    """The driver's bundle: fingerprints (the output folder name) and frame rates."""
    from musiclm.tokenizers import build_tokenizers

    bundle = build_tokenizers(tok_cfg, device="cpu")
    missing = [e for e in entries if e not in bundle.available()]
    if missing:
        hints = {
            "semantic.npy": "semantic k-means (ray_jobs/fit_kmeans.py)",
            "cond.npy": "MuLaN quantizer (ray_jobs/fit_quantizer.py)",
            "mulan.npy": "a `mulan:` section",
            "acoustic.npy": "an `acoustic:` section",
        }
        raise SystemExit(
            "the tokenizer config cannot produce "
            + ", ".join(missing)
            + ": it needs "
            + "; ".join(hints[m] for m in missing)
        )
    return bundle


PIPELINES = ("auto", "fused", "split")


def _add_arguments(p) -> None:
    p.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default="auto",
        help="fused: each actor call decodes, tokenizes and writes one group (no decode / write tasks); "
        "split: decode tasks -> model actors -> write tasks, so CPUs decode and write while GPUs run "
        "the model; auto: fused when the actors get no GPU, else split (measured: README section 4)",
    )
    p.add_argument(
        "--streams",
        default=",".join(ALL_STREAMS),
        help="token streams to write, comma-separated, of: acoustic (codec codes), semantic (k-means ids), "
        "mulan (the MuLaN audio embedding), cond (its conditioning tokens: MuLaN model + quantizer). "
        "A subset loads only the tokenizers it needs and writes a folder of its own; e.g. semantic,cond "
        "is what the semantic stage reads",
    )


def _setup(job: Job) -> None:
    from musiclm.data.shards import parse_streams, stream_entries, token_shard_dir

    args, cfg = job.args, job.cfg
    if not args.config:
        job.parser.error("--config is required (the tokenizers: section, e.g. launch/configs/tokenizers.yaml)")
    try:
        streams = parse_streams(args.streams)
    except ValueError as e:
        job.parser.error(f"--streams: {e}")
    entries = stream_entries(streams)
    tok_cfg = streams_config(tokenizers_section(cfg), streams)
    bundle = build_bundle(tok_cfg, entries)
    fingerprints = bundle.fingerprints()
    rates = bundle.frame_rates()
    job.grid_seconds = S.time_grid(rates.values())
    job.sample_rate = int(bundle.sample_rate)
    job.segment_seconds = float(args.segment_seconds or cfg.get("segment_seconds") or 10.0)
    job.min_seconds = float(
        args.min_segment_seconds if args.min_segment_seconds is not None else cfg.get("min_segment_seconds", 1.0)
    )
    S.segment_bounds(
        0, job.sample_rate, job.segment_seconds, grid_seconds=job.grid_seconds
    )  # validates the length vs the grid
    job.out_dir = token_shard_dir(args.out, dataset_name(args), fingerprints, streams)
    job.params = {
        "sample_rate": job.sample_rate,
        "segment_seconds": job.segment_seconds,
        "min_segment_seconds": job.min_seconds,
        "grid_seconds": job.grid_seconds,
    }
    job.data.update(tok_cfg=tok_cfg, fingerprints=fingerprints, rates=rates, streams=streams, entries=entries)
    job.decodes_itself = choose_pipeline


def choose_pipeline(job: Job) -> bool:
    """``--pipeline`` -> True for the fused pipeline (called by run_job once Ray is up).

    auto: fused when the model actors get no GPU. On CPUs the model and the decode / write tasks
    share the cores, and the split pipeline's extra processes and object-store copies cost more
    than its overlap gains (``musiclm bench tokenize``: README section 4); with GPUs the model runs
    beside CPU tasks that decode and write, which only the split pipeline overlaps."""
    mode = job.args.pipeline
    if mode == "auto":
        mode = "split" if uses_gpus(job.args, job.ray_info) else "fused"
    job.data["pipeline"] = mode
    return mode == "fused"


def _stages(job: Job, ds):
    from musiclm.data.shards import fingerprint_hash

    args, ray_info, wp = job.args, job.ray_info, job.worker_plan()
    log.info(
        f"[tokenize] ray {ray_info['mode']} ({ray_info['cpus']:g} CPU, {ray_info['gpus']:g} GPU): "
        f"{wp['workers']} tokenizer worker(s) x {wp['cpus_per_worker']:g} CPU x {wp['gpus_per_worker']:g} GPU "
        f"on {wp['device']}, batch {args.batch_size}, {job.data['pipeline']} pipeline"
    )
    model = dict(
        tok_cfg=job.data["tok_cfg"],
        device=wp["device"],
        threads=wp["threads"],
        batch_size=args.batch_size,
        expected_hash=fingerprint_hash(job.data["fingerprints"]),
        entries=job.data["entries"],
    )
    write = dict(out_dir=job.out_dir, delay=job.group_delay, streams=job.data["streams"])
    if job.fused:
        # plain Ray actors fed by the driver, two groups queued per actor: the next group is at hand
        # when one finishes, and the last groups are not stuck behind a long queue on one actor
        return actor_pool_rows(
            FusedTokenizeActor,
            wp,
            dict(model, decode=job.decode_kwargs(), **write),
            [g.to_json() for g in job.pending],
            method="run_group",
        )
    ds = actor_stage(ds, TokenizeActor, wp, model)
    return ds.map(write_tokens, num_cpus=args.task_cpus, fn_kwargs=write)


def _complete(job: Job) -> dict:
    summary = finish(
        job="tokenize",
        out_dir=job.out_dir,
        kind="tokens",
        fingerprints=job.data["fingerprints"],
        streams=job.data["streams"],
        groups=job.groups,
        plan_errors=job.plan_errors,
        state=job.state,
        extra={
            "manifest": job.args.manifest,
            "sample_rate": job.sample_rate,
            "params": job.params,
            "frame_rates": job.data["rates"],
        },
        progress=job.progress,
        workers=job.worker_plan()["workers"] if job.pending else 0,
        ray_info=job.ray_info,
        t_start=job.t_start,
    )
    summary["streams"] = list(job.data["streams"])
    summary["pipeline"] = job.data.get("pipeline")  # None: nothing was left to do
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run_job(
        "tokenize",
        __doc__,
        argv,
        setup=_setup,
        stages=_stages,
        complete=_complete,
        add_arguments=_add_arguments,
        shard_clips=32,
    )


if __name__ == "__main__":
    main()
