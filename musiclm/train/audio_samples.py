"""Audio-shard samples for the stages that train on audio (MuLaN, the codec): decoding, and the
samples that cannot be used, skipped and recorded instead of stopping a run.

A bad sample (no flac entry, audio that does not decode, empty or non-finite audio, too short, no
caption) is skipped: ``build_example`` returns None, a warning is logged once per process, and
``{key, url, reason, rank}`` goes to ``SkippedSamples.samples()`` and to a JSONL file
(``<stage section>.skip_log``, default ``<run_dir>/skipped_samples.jsonl``: the engine puts
``run_dir`` in the config).
"""

from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np

__all__ = ["SkippedSamples", "decode_sample_audio"]

log = logging.getLogger(__name__)


class SkippedSamples:
    """The samples one stage skipped in this process (each once), also appended to a JSONL file."""

    MAX_KEPT = 10000

    def __init__(self, stage: str):
        self.stage = stage
        self._lock = threading.Lock()
        self._kept: list[dict] = []
        self._seen: set = set()

    def record(self, sample: dict, reason: str, cfg: dict, skip_log: str | None = None) -> None:
        rec = {
            "key": sample.get("__key__"),
            "url": sample.get("__url__"),
            "reason": reason,
            "rank": int(os.environ.get("RANK", "0")),
        }
        with self._lock:
            if (rec["key"], rec["url"]) in self._seen:
                return
            self._seen.add((rec["key"], rec["url"]))
            if len(self._kept) < self.MAX_KEPT:
                self._kept.append(rec)
        log.warning("%s: skipping sample %s (%s): %s", self.stage, rec["key"], rec["url"], reason)
        path = skip_log
        run_dir = cfg.get("run_dir")
        if not path and isinstance(run_dir, str) and run_dir and not run_dir.startswith("s3://"):
            path = os.path.join(run_dir, "skipped_samples.jsonl")
        if path:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with self._lock, open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:  # recording must never stop training
                log.warning("%s: cannot write %s: %s", self.stage, path, e)

    def samples(self, clear: bool = False) -> list[dict]:
        """``[{key, url, reason, rank}]`` skipped so far (``clear``: and forget them)."""
        with self._lock:
            out = list(self._kept)
            if clear:
                self._kept.clear()
                self._seen.clear()
        return out


def decode_sample_audio(
    sample: dict, skips: SkippedSamples, cfg: dict, skip_log: str | None = None
) -> tuple[np.ndarray, int] | None:
    """The sample's ``flac`` entry as mono float32 ``[T]`` at its own rate, or None when it has none,
    does not decode, or is empty or non-finite (skipped and recorded with the reason)."""
    from musiclm.audio import decode_bytes

    data = sample.get("flac")
    if data is None:
        skips.record(sample, "no flac entry", cfg, skip_log)
        return None
    try:
        wav, sr = decode_bytes(
            bytes(data), f"{sample.get('__key__', 'sample')}.flac", None, mono=True, allow_silent=True
        )
    except Exception as e:  # corrupt / truncated audio (AudioError names the reason)
        skips.record(sample, f"audio does not decode: {e}", cfg, skip_log)
        return None
    wav = wav.numpy().astype(np.float32, copy=False)
    if wav.size == 0 or not np.all(np.isfinite(wav)):
        skips.record(sample, "empty or non-finite audio", cfg, skip_log)
        return None
    return wav, int(sr)
