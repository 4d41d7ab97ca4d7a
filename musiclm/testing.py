"""Synthetic data and local services for tests and benchmarks (not used by training or tokenizing).

* Token shards with learnable structure: :func:`make_synthetic_token_shards` (train/eval shards +
  ``index.json`` in the layout of real token shards), :func:`synthetic_sample` (one sample) and
  :func:`synthetic_fingerprints` (made-up tokenizer fingerprints matching a ``tokens:`` section).
* Audio shards of demo-corpus beats with their captions: :func:`make_synthetic_audio_shards`.
* S3: :class:`MotoServer`, a ``moto_server`` subprocess on a free 127.0.0.1 port (the real S3 HTTP
  protocol, in memory), and :func:`environ` to point s3fs/boto at it for a block of code.
* ``MUSICLM_TEST_GROUP_DELAY=<seconds>``: the Ray jobs that write shards (``ray_jobs/pack_audio.py``,
  ``ray_jobs/tokenize.py``) sleep that long before writing each group, so a test can kill a job
  midway and check that a rerun resumes. Read by :func:`group_delay_seconds` in the job's driver
  (which passes it to its Ray tasks); unset or 0 in normal use.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import numpy as np

from musiclm.net import free_port

__all__ = [
    "GROUP_DELAY_ENV",
    "MotoServer",
    "environ",
    "group_delay_seconds",
    "make_synthetic_audio_shards",
    "make_synthetic_token_shards",
    "synthetic_fingerprints",
    "synthetic_sample",
]

GROUP_DELAY_ENV = "MUSICLM_TEST_GROUP_DELAY"


def group_delay_seconds() -> float:
    """Seconds the shard-writing Ray jobs wait before writing each group (``MUSICLM_TEST_GROUP_DELAY``)."""
    value = os.environ.get(GROUP_DELAY_ENV, "").strip()
    return float(value) if value else 0.0


# -----------------------------------------------------------------------------------------------
# Synthetic token shards with learnable structure (tests, benchmarks, smoke runs)


def synthetic_fingerprints(tokens: dict) -> dict:
    """Fingerprints of a made-up tokenizer set matching a ``tokens:`` config section."""
    t = dict(tokens)
    ns = list(t.get("cond_namespaces", ["semantic", "coarse", "fine"]))
    return {
        "acoustic": {
            "kind": "acoustic",
            "name": "synthetic",
            "config": {},
            "weights_sha256": "0" * 64,
            "sample_rate": 24000,
            "frame_rate": float(t["acoustic_rate"]),
            "levels": int(t["acoustic_levels"]),
            "codebook_size": int(t["acoustic_codebook"]),
        },
        "semantic": {
            "kind": "semantic",
            "name": "synthetic",
            "config": {},
            "weights_sha256": "0" * 64,
            "sample_rate": 16000,
            "frame_rate": float(t["semantic_rate"]),
            "vocab_size": int(t["semantic_vocab"]),
        },
        "mulan": {
            "kind": "mulan",
            "name": "synthetic",
            "config": {},
            "weights_sha256": "0" * 64,
            "sample_rate": 24000,
            "dim": 8,
        },
        "quantizer": {
            "kind": "quantizer",
            "name": "synthetic",
            "config": {},
            "weights_sha256": "0" * 64,
            "sample_rate": 0,
            "namespaces": ns,
            "levels": int(t["cond_levels"]),
            "codebook_size": int(t["cond_codebook"]),
        },
    }


def synthetic_sample(key: str, rng: np.random.Generator, tokens: dict, seconds: float) -> dict:
    """One token-shard sample whose streams are predictable from each other:

    - cond tokens: random; semantic id t = (start + t * stride) mod V with start and stride given
      by the semantic namespace's first two cond tokens (learnable from cond + previous token);
    - acoustic level q, frame t = (semantic id at that time * (q + 1) + q) mod codebook for the
      coarse levels, and (coarse level 0 + coarse level 1 + q) mod codebook for the fine levels,
      so coarse codes follow from semantic ids and fine codes from coarse codes."""
    t = tokens
    Vs, C = int(t["semantic_vocab"]), int(t["acoustic_codebook"])
    Q, Qc = int(t["acoustic_levels"]), int(t["coarse_levels"])
    K, Cc = int(t["cond_levels"]), int(t["cond_codebook"])
    ns = list(t.get("cond_namespaces", ["semantic", "coarse", "fine"]))
    n_s = int(round(seconds * float(t["semantic_rate"])))
    n_a = int(round(seconds * float(t["acoustic_rate"])))
    cond = rng.integers(0, Cc, size=(len(ns), K))
    start, stride = int(cond[0, 0]) % Vs, 1 + int(cond[0, 1 % K]) % 3
    sem = (start + stride * np.arange(n_s)) % Vs
    ratio = float(t["acoustic_rate"]) / float(t["semantic_rate"])
    sem_at_a = sem[np.minimum((np.arange(n_a) / ratio).astype(np.int64), n_s - 1)]
    ac = np.zeros((Q, n_a), dtype=np.int64)
    for q in range(Qc):
        ac[q] = (sem_at_a * (q + 1) + q) % C
    for q in range(Qc, Q):
        ac[q] = (ac[0] + ac[min(1, Qc - 1)] + q) % C
    return {
        "__key__": key,
        "acoustic.npy": ac.astype(np.int16),
        "semantic.npy": sem.astype(np.int16),
        "mulan.npy": rng.standard_normal(8).astype(np.float16),
        "cond.npy": cond.astype(np.int16),
        "json": {
            "clip_id": key.split("__")[0],
            "caption": "synthetic",
            "source": "synthetic",
            "start": 0.0,
            "end": float(seconds),
            "sample_rate": 24000,
            "tags": {},
        },
    }


def make_synthetic_token_shards(
    directory: str,
    tokens: dict,
    *,
    n_train: int = 64,
    n_eval: int = 16,
    seconds: float = 4.0,
    samples_per_shard: int = 16,
    seed: int = 0,
    fingerprints: dict | None = None,
    streams=None,
) -> dict:
    """Write train/eval token shards + index.json of synthetic samples into ``directory``.

    ``streams`` (e.g. ``"semantic,cond"``; default all four): the folder carries only those
    entries, and its fingerprints only the tokenizers they are made by, as
    ``ray_jobs/tokenize.py --streams`` writes them. The samples' values do not depend on it."""
    from musiclm.data.shards import (
        ALL_STREAMS,
        ShardWriter,
        parse_streams,
        stream_entries,
        stream_tokenizers,
        write_index,
    )

    streams = parse_streams(streams)
    keep = set(stream_entries(streams)) | {"__key__", "json"}
    rng = np.random.default_rng(seed)
    all_shards = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        if n <= 0:
            continue
        w = ShardWriter(directory, split, kind="tokens", max_samples=samples_per_shard, streams=streams)
        for i in range(n):
            sample = synthetic_sample(f"{split}{i:05d}__0000", rng, tokens, seconds)
            w.write({k: v for k, v in sample.items() if k in keep})
        all_shards.extend(w.close())
    fps = fingerprints or synthetic_fingerprints(tokens)
    if streams != ALL_STREAMS:
        fps = {k: v for k, v in fps.items() if k in stream_tokenizers(streams)}
    return write_index(directory, all_shards, kind="tokens", fingerprints=fps, streams=streams)


def make_synthetic_audio_shards(
    directory: str, *, n_train: int = 32, n_eval: int = 8, seconds: float = 10.0, sample_rate: int = 24000
) -> dict:
    """Audio shards (train + eval) of demo-corpus beats with their captions, for MuLaN/codec runs."""
    import soundfile as sf

    from musiclm.data.demo_corpus import make_clip
    from musiclm.data.shards import ShardWriter, write_index

    shards = []
    for split, lo, hi in (("train", 0, n_train), ("eval", n_train, n_train + n_eval)):
        with ShardWriter(directory, split, kind="audio", max_samples=16) as w:
            for i in range(lo, hi):
                rec, wav = make_clip(0, i, seconds=seconds, sample_rate=sample_rate)
                buf = io.BytesIO()
                sf.write(buf, wav, sample_rate, format="FLAC", subtype="PCM_16")
                w.write(
                    {
                        "__key__": f"{rec['id']}__0000",
                        "flac": buf.getvalue(),
                        "json": {
                            "clip_id": rec["id"],
                            "caption": rec["caption"],
                            "source": "synthetic",
                            "start": 0.0,
                            "end": seconds,
                            "sample_rate": sample_rate,
                            "tags": {"bpm": rec["bpm"], "style": rec["style"]},
                        },
                    }
                )
        shards.extend(w.close())
    return write_index(directory, shards, kind="audio", fingerprints={})


# -----------------------------------------------------------------------------------------------
# S3 in memory


class MotoServer:
    """``moto_server -H 127.0.0.1 -p <free port>`` as a subprocess (the real S3 HTTP protocol, in
    memory). ``start()`` waits until it answers; ``stop()`` ends only this process.
    ``env()`` gives the AWS_* variables that point s3fs/boto at it."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0):
        self.host = host
        self.port = port or free_port(host)
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def _command(self) -> list[str]:
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        if not os.path.exists(exe):
            exe = shutil.which("moto_server") or ""
        if exe:
            return [exe, "-H", self.host, "-p", str(self.port)]
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen(
            self._command(), stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(
                    f"moto_server exited with {self.proc.returncode}: "
                    f"{self.log.read()[-2000:].decode(errors='replace')}"
                )
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=1):
                    return self
            except Exception:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {self.timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.close()

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket; returns ``s3://<name>``."""
        import s3fs

        name = name or f"musiclm-{uuid.uuid4().hex[:10]}"
        fs = s3fs.S3FileSystem(
            key="testing",
            secret="testing",
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
        )
        fs.mkdir(name)
        return f"s3://{name}"

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """Set environment variables for the block; restore the old values (or their absence) after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
