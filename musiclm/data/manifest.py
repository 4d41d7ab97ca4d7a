"""Corpus manifests: ``manifest.jsonl``, one clip per line.

Each line is a JSON object::

    {"id": "beat_0001", "audio": "audio/beat_0001.wav", "caption": "dusty boom bap ...",
     "start": 0.0, "end": 30.0, "split": "train", "bpm": 90}

- ``id`` (required): becomes part of shard keys (``<id>__<segment>``), so it may only contain
  letters, digits, ``_`` and ``-`` (no dots, slashes or spaces; YouTube ids fit), must not start
  with ``__`` and is at most 80 characters.
  A bad id is an error that names it; :func:`sanitize_id` gives a usable one (``from-csv`` applies
  it to ids it derives from file names).
- ``audio`` (required): a path relative to the manifest's folder, an absolute path, or a URL
  (``s3://...``). :func:`read_manifest` resolves it to an absolute path or URL.
- ``caption`` (required): non-empty text.
- ``start`` / ``end`` (optional): seconds inside the file; ``end > start >= 0``.
- ``split`` (optional): e.g. ``train`` / ``eval``. Without it the split comes from
  :func:`split_for` (sha1 of the id, 10 % eval), so it is stable across runs and machines.
- any other field is kept (``Clip.extra``) and written back unchanged.

Errors name the file, the line and the field: ``manifest.jsonl:12: field 'caption': missing``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import storage

log = logging.getLogger(__name__)

ID_RE = re.compile(r"^(?!__)[A-Za-z0-9_-]{1,80}$")
SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
KNOWN_FIELDS = ("id", "audio", "caption", "start", "end", "split")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".mp4", ".aac", ".aiff", ".aif")
AUDIO_COLUMNS = ("audio", "file", "path", "filename", "file_name", "filepath", "file_path", "audio_path", "wav")


class ManifestError(ValueError):
    """A manifest problem at ``path:line`` in ``field``."""

    def __init__(self, path: str, line: int | None, field: str | None, reason: str):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{reason}")


@dataclass
class Clip:
    id: str
    audio: str  # resolved: absolute local path or URL
    caption: str
    start: float | None = None
    end: float | None = None
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float | None:
        """Seconds between start and end when both are set."""
        if self.start is not None and self.end is not None:
            return self.end - self.start
        return None

    def to_json(self, base_dir: str | None = None) -> dict:
        d: dict[str, Any] = {"id": self.id, "audio": _relative_audio(self.audio, base_dir), "caption": self.caption}
        if self.start is not None:
            d["start"] = self.start
        if self.end is not None:
            d["end"] = self.end
        d["split"] = self.split
        for k, v in self.extra.items():
            if k not in d:
                d[k] = v
        return d


def split_for(clip_id: str, eval_fraction: float = 0.1) -> str:
    """"eval" for a stable ``eval_fraction`` of ids (sha1 of the id), else "train"."""
    h = int.from_bytes(hashlib.sha1(clip_id.encode("utf-8")).digest()[:8], "big")
    return "eval" if h / 2.0**64 < eval_fraction else "train"


def sanitize_id(text: str) -> str:
    """A shard-key-safe id from arbitrary text (e.g. a file name): characters other than letters,
    digits, '_' and '-' become '_'; ids longer than 80 characters are cut and get a short hash."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    if not s:
        s = "c"
    if len(s) > 80:
        s = s[:71] + "_" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return s


def check_id(clip_id: Any) -> str | None:
    """None if ``clip_id`` is usable in shard keys, else the reason."""
    if not isinstance(clip_id, str):
        return f"must be a string, got {type(clip_id).__name__}"
    if not clip_id:
        return "empty"
    if not ID_RE.match(clip_id):
        return (
            f"{clip_id!r} cannot be used in shard keys: only letters, digits, '_' and '-' (no dots), "
            f"not starting with '__', at most 80 characters (e.g. {sanitize_id(clip_id)!r})"
        )
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _resolve_audio(audio: str, base_dir: str) -> str:
    if storage.is_remote(audio):
        return audio
    if audio.startswith("file://"):
        audio = audio[len("file://"):]
    audio = os.path.expanduser(audio)
    if os.path.isabs(audio):
        return os.path.normpath(audio)
    if storage.is_remote(base_dir):
        return storage.join(base_dir, audio)
    return os.path.normpath(os.path.join(base_dir, audio))


def _relative_audio(audio: str, base_dir: str | None) -> str:
    if base_dir is None:
        return audio
    if storage.is_remote(audio) or storage.is_remote(base_dir):
        prefix = base_dir.rstrip("/") + "/"
        return audio[len(prefix):] if audio.startswith(prefix) else audio
    base = os.path.abspath(base_dir)
    a = os.path.abspath(audio)
    if a == base or a.startswith(base + os.sep):
        return os.path.relpath(a, base)
    return a


def parse_line(obj: Any, *, path: str, line: int, base_dir: str, eval_fraction: float = 0.1) -> Clip:
    """Validate one decoded manifest line and turn it into a :class:`Clip`."""
    if not isinstance(obj, dict):
        raise ManifestError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    for name in ("id", "audio", "caption"):
        if name not in obj or obj[name] is None:
            raise ManifestError(path, line, name, "missing")
    reason = check_id(obj["id"])
    if reason:
        raise ManifestError(path, line, "id", reason)
    audio = obj["audio"]
    if not isinstance(audio, str):
        raise ManifestError(path, line, "audio", f"must be a string, got {type(audio).__name__}")
    if not audio.strip():
        raise ManifestError(path, line, "audio", "empty")
    caption = obj["caption"]
    if not isinstance(caption, str):
        raise ManifestError(path, line, "caption", f"must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise ManifestError(path, line, "caption", "empty")
    times: dict[str, float | None] = {}
    for name in ("start", "end"):
        v = obj.get(name)
        if v is None:
            times[name] = None
            continue
        if not _is_number(v):
            raise ManifestError(path, line, name, f"must be a number of seconds, got {v!r}")
        if v < 0:
            raise ManifestError(path, line, name, f"must be >= 0, got {v}")
        times[name] = float(v)
    if times["start"] is not None and times["end"] is not None and times["end"] <= times["start"]:
        raise ManifestError(path, line, "end", f"must be greater than start ({times['end']} <= {times['start']})")
    split = obj.get("split")
    if split is None:
        split = split_for(obj["id"], eval_fraction)
    elif not isinstance(split, str) or not SPLIT_RE.match(split):
        raise ManifestError(
            path, line, "split", f"must be a name of letters, digits, '_' or '-' (e.g. train, eval), got {split!r}"
        )
    extra = {k: v for k, v in obj.items() if k not in KNOWN_FIELDS}
    return Clip(
        id=obj["id"],
        audio=_resolve_audio(audio, base_dir),
        caption=caption,
        start=times["start"],
        end=times["end"],
        split=split,
        extra=extra,
    )


def read_manifest(path_or_url: str, *, eval_fraction: float = 0.1) -> list[Clip]:
    """Read and validate a manifest (local or ``s3://``). Raises :class:`ManifestError` at the first
    bad line (bad JSON, missing/ill-typed field, unusable or duplicate id). Blank lines are skipped."""
    path = os.fspath(path_or_url)
    base_dir = storage.dirname(path)
    try:
        raw = _read_remote(path) if storage.is_remote(path) else storage.read_bytes(path)
    except FileNotFoundError:
        raise ManifestError(path, None, None, "file not found") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(path, None, None, f"not UTF-8 text ({e})") from None
    clips: list[Clip] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(path, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        clip = parse_line(obj, path=path, line=lineno, base_dir=base_dir, eval_fraction=eval_fraction)
        if clip.id in seen:
            raise ManifestError(path, lineno, "id", f"duplicate id {clip.id!r} (first on line {seen[clip.id]})")
        seen[clip.id] = lineno
        clips.append(clip)
    return clips


# botocore/s3fs settings for reading a manifest: fail in seconds, not after a minute of retries
_S3_FAST_CONFIG = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2, "mode": "standard"}}


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _read_remote(url: str) -> bytes:
    """Read an ``s3://`` (or other fsspec) manifest with short timeouts and few retries; an S3
    failure becomes a one-line :class:`ManifestError` naming the URL and what is missing."""
    import fsspec

    opts = dict(storage.storage_options(url)) if hasattr(storage, "storage_options") else {}
    scheme = url.split("://", 1)[0]
    if scheme in ("s3", "s3a"):
        scheme = "s3"
        if _s3_endpoint() and "endpoint_url" not in opts:
            opts["endpoint_url"] = _s3_endpoint()
        opts["config_kwargs"] = {**_S3_FAST_CONFIG, **(opts.get("config_kwargs") or {})}
    fs = fsspec.filesystem(scheme, skip_instance_cache=True, **opts)
    if scheme == "s3":
        fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    try:
        return fs.cat_file(fs._strip_protocol(url))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - every S3 failure gets one line, the original is chained
        if scheme != "s3":
            raise
        raise ManifestError(url, None, None, _s3_problem(e, opts.get("endpoint_url"))) from e


def _s3_problem(e: BaseException, endpoint: str | None) -> str:
    """What is wrong with the S3 setup, in words (botocore exception names, not imports: the
    classes differ between botocore and aiobotocore)."""
    names = {c.__name__ for c in type(e).__mro__}
    where = f"the endpoint {endpoint}" if endpoint else "AWS S3 (AWS_ENDPOINT_URL is not set)"
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return ("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
                + ("" if endpoint else ", and AWS_ENDPOINT_URL for an S3-compatible store (MinIO, Ceph, ...)"))
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
                "ClientConnectorError", "ServerDisconnectedError", "ConnectionError", "TimeoutError"}:
        return (f"cannot connect to {where}: "
                + ("check that the server is up and AWS_ENDPOINT_URL is right" if endpoint
                   else "set AWS_ENDPOINT_URL to your S3-compatible server, or check the network"))
    if isinstance(e, PermissionError) or names & {"ClientError"}:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"access refused by {where} ({msg}): check the credentials and the bucket's permissions"
    return f"cannot read it from {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def write_manifest(clips: Iterable[Clip], path: str) -> None:
    """Write clips as JSON lines, atomically. Audio paths under the manifest's folder are written
    relative to it (the manifest and its audio can move together); others stay absolute/URLs."""
    path = os.fspath(path)
    base_dir = storage.dirname(path)
    buf = io.StringIO()
    ids: set[str] = set()
    for c in clips:
        reason = check_id(c.id)
        if reason:
            raise ManifestError(path, None, "id", reason)
        if c.id in ids:
            raise ManifestError(path, None, "id", f"duplicate id {c.id!r}")
        ids.add(c.id)
        buf.write(json.dumps(c.to_json(base_dir), ensure_ascii=False) + "\n")
    storage.write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


# ------------------------------------------------------------------------------------------
# from-csv


def _index_audio_dir(audio_dir: str) -> dict[str, list[str]]:
    """Map of file stem -> paths for audio files under audio_dir (recursive)."""
    out: dict[str, list[str]] = {}
    for root, _dirs, files in os.walk(audio_dir):
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext.lower() in AUDIO_EXTENSIONS:
                out.setdefault(stem, []).append(os.path.join(root, f))
    for v in out.values():
        v.sort()
    return out


def _find_by_ytid(ytid: str, index: dict[str, list[str]]) -> str | None:
    """A file for a YouTube id: ``<ytid>.<ext>``, ``<ytid>_<anything>`` / ``<ytid>-...`` (e.g.
    ``<ytid>_30-40``), or yt-dlp's default ``<title> [<ytid>].<ext>``."""
    if ytid in index:
        return index[ytid][0]
    candidates = []
    for stem, paths in index.items():
        if (stem.startswith(ytid) and len(stem) > len(ytid) and stem[len(ytid)] in "_-. [(") or f"[{ytid}]" in stem:
            candidates.extend(paths)
    return sorted(candidates)[0] if candidates else None


def _audio_seconds(path: str) -> float | None:
    try:
        import soundfile as sf

        info = sf.info(path)
        return info.frames / float(info.samplerate)
    except Exception:
        return None


def _audio_header(path: str) -> tuple[float | None, str]:
    """(duration in seconds, "") of a local audio file from its header or container (nothing
    decoded), or (None, why not) with the reason every reader of the project gives."""
    from musiclm.audio import AudioError, duration_seconds

    try:
        dur = duration_seconds(path)
    except AudioError as e:
        return None, e.reason
    if not dur or dur <= 0:
        return None, "no audio frames"
    return dur, ""


def _num(v: str, *, path: str, line: int, field: str) -> float | None:
    v = (v or "").strip()
    if not v:
        return None
    try:
        x = float(v)
    except ValueError:
        raise ManifestError(path, line, field, f"not a number: {v!r}") from None
    if not math.isfinite(x) or x < 0:
        raise ManifestError(path, line, field, f"must be a finite number >= 0, got {v!r}")
    return x


def from_csv(
    csv_path: str,
    out_path: str,
    *,
    audio_dir: str | None = None,
    audio_column: str | None = None,
    caption_column: str = "caption",
    id_column: str | None = None,
    on_missing: str = "skip",
    trimmed: bool | None = None,
    eval_fraction: float = 0.1,
    stats: dict | None = None,
) -> int:
    """Build ``out_path`` (manifest.jsonl) from a CSV of audio files and captions; returns the
    number of clips written.

    Two shapes are recognised:

    (a) a file column (``audio_column``, else the first of audio/file/path/filename/...) and a
        caption column: paths are relative to ``audio_dir`` if given, else to the CSV's folder.
        Ids come from ``id_column`` if given (or an ``id`` column), else from the file name
        (:func:`sanitize_id`, made unique with ``_2``, ``_3`` ...). ``start``/``end``/``split``
        columns are used when present.
    (b) MusicCaps (``ytid,start_s,end_s,caption,...``) with ``audio_dir``: the file for a clip is
        ``<ytid>.<ext>``, ``<ytid>_...``/``<ytid>-...`` or yt-dlp's ``<title> [<ytid>].<ext>``
        anywhere under ``audio_dir``. If a file is already the 10 s excerpt (its duration is at
        most end_s - start_s + 1 s, or ``trimmed=True``) it is used whole and the YouTube times
        are kept as ``yt_start``/``yt_end``; otherwise ``start``/``end`` cut the excerpt from it.
        Files soundfile cannot read (m4a, webm) count as excerpts unless ``trimmed=False``.

    All other columns are kept as extra fields. Rows whose audio file does not exist are skipped
    and counted in a warning (``on_missing="skip"``, the default: a partial YouTube download
    still gives a usable manifest) or raise :class:`ManifestError` (``on_missing="error"``).
    A CSV without any usable row raises. Pass a dict as ``stats`` to get
    ``{"written", "skipped_missing", "missing": [names]}`` back.
    """
    if on_missing not in ("skip", "error"):
        raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
    csv_path = os.fspath(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        header = next(csv.reader(f), [])
    header = [h.strip() for h in header]
    rows = [{(k or "").strip(): (v if v is not None else "") for k, v in r.items()} for r in rows]
    if not header:
        raise ManifestError(csv_path, 1, None, "empty CSV (no header)")
    if caption_column not in header:
        raise ManifestError(csv_path, 1, caption_column, f"no caption column (columns: {', '.join(header)})")

    musiccaps = "ytid" in header and audio_column is None and not any(c in header for c in AUDIO_COLUMNS)
    if musiccaps:
        if audio_dir is None:
            raise ManifestError(csv_path, 1, "ytid", "a MusicCaps-style CSV needs audio_dir (the folder of clips)")
        index = _index_audio_dir(audio_dir)
    else:
        if audio_column is None:
            audio_column = next((c for c in AUDIO_COLUMNS if c in header), None)
            if audio_column is None:
                raise ManifestError(
                    csv_path, 1, None,
                    f"no audio column: name one (audio_column) or use one of {', '.join(AUDIO_COLUMNS)}; "
                    f"or a MusicCaps CSV (ytid,start_s,end_s,caption) with audio_dir",
                )
        elif audio_column not in header:
            raise ManifestError(csv_path, 1, audio_column, f"no such column (columns: {', '.join(header)})")
        if id_column is None and "id" in header:
            id_column = "id"
    if id_column is not None and id_column not in header:
        raise ManifestError(csv_path, 1, id_column, f"no such column (columns: {', '.join(header)})")
    base = audio_dir if audio_dir is not None else os.path.dirname(os.path.abspath(csv_path))

    clips: list[Clip] = []
    ids: set[str] = set()
    missing: list[str] = []
    used_columns = {caption_column, audio_column, id_column, "start", "end", "split"}
    if musiccaps:
        used_columns |= {"ytid", "start_s", "end_s"}
    for lineno, row in enumerate(rows, start=2):
        if not any((v or "").strip() for v in row.values()):
            continue
        caption = (row.get(caption_column) or "").strip()
        if not caption:
            raise ManifestError(csv_path, lineno, caption_column, "empty caption")
        extra = {k: v for k, v in row.items() if k and k not in used_columns and v != ""}
        start = end = None
        if musiccaps:
            ytid = (row.get("ytid") or "").strip()
            if not ytid:
                raise ManifestError(csv_path, lineno, "ytid", "empty")
            audio = _find_by_ytid(ytid, index)
            name = ytid
            if audio is None:
                if on_missing == "error":
                    raise ManifestError(csv_path, lineno, "ytid", f"no audio file for {ytid!r} under {audio_dir}")
                missing.append(ytid)
                continue
            s = _num(row.get("start_s", ""), path=csv_path, line=lineno, field="start_s")
            e = _num(row.get("end_s", ""), path=csv_path, line=lineno, field="end_s")
            is_trimmed = trimmed
            if is_trimmed is None:
                dur = _audio_seconds(audio)
                span = (e - s) if (s is not None and e is not None) else None
                is_trimmed = dur is None or span is None or dur <= span + 1.0
            if is_trimmed:
                if s is not None:
                    extra["yt_start"] = s
                if e is not None:
                    extra["yt_end"] = e
            else:
                start, end = s, e
            extra["source"] = f"youtube:{ytid}"
        else:
            rel = (row.get(audio_column) or "").strip()
            if not rel:
                raise ManifestError(csv_path, lineno, audio_column, "empty")
            audio = rel if storage.is_remote(rel) else os.path.normpath(os.path.join(base, os.path.expanduser(rel)))
            name = os.path.splitext(os.path.basename(rel.rstrip("/")))[0]
            if not storage.is_remote(audio) and not os.path.exists(audio):
                if on_missing == "error":
                    raise ManifestError(csv_path, lineno, audio_column, f"audio file not found: {audio}")
                missing.append(rel)
                continue
            start = _num(row.get("start", ""), path=csv_path, line=lineno, field="start")
            end = _num(row.get("end", ""), path=csv_path, line=lineno, field="end")
            if start is not None and end is not None and end <= start:
                raise ManifestError(csv_path, lineno, "end", f"must be greater than start ({end} <= {start})")
        if id_column is not None:
            cid = (row.get(id_column) or "").strip()
            reason = check_id(cid)
            if reason:
                raise ManifestError(csv_path, lineno, id_column, reason)
            if cid in ids:
                raise ManifestError(csv_path, lineno, id_column, f"duplicate id {cid!r}")
        else:
            cid = sanitize_id(name)
            if cid in ids:
                k = 2
                while f"{cid[:74]}_{k}" in ids:
                    k += 1
                cid = f"{cid[:74]}_{k}"
        ids.add(cid)
        split = (row.get("split") or "").strip() or split_for(cid, eval_fraction)
        if not SPLIT_RE.match(split):
            raise ManifestError(csv_path, lineno, "split", f"not a split name: {split!r}")
        clips.append(Clip(id=cid, audio=audio, caption=caption, start=start, end=end, split=split, extra=extra))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        log.warning("%s: skipped %d row(s) without an audio file: %s", csv_path, len(missing), shown)
    if not clips:
        raise ManifestError(
            csv_path, None, None, f"no usable rows ({len(missing)} without audio file)" if missing else "no rows"
        )
    write_manifest(clips, out_path)
    if stats is not None:
        stats.update(written=len(clips), skipped_missing=len(missing), missing=missing)
    return len(clips)


# ------------------------------------------------------------------------------------------
# check


def check_manifest(path: str, *, check_audio: bool = True, eval_fraction: float = 0.1, max_listed: int = 20) -> dict:
    """Validate a manifest and summarise it.

    Structural errors raise :class:`ManifestError` (via :func:`read_manifest`). With
    ``check_audio`` every audio file is checked for existence, and every local one is opened
    (header only: soundfile, else PyAV for m4a/webm/mp4) and contributes its duration; ``ok`` is
    False when files are missing or unreadable (empty, not audio, corrupt header).
    Returns ``{"manifest", "ok", "clips", "splits": {split: n}, "missing_audio": n,
    "missing": [first ids], "unreadable_audio": n, "unreadable": [{"id", "audio", "reason"}, first
    ones], "hours", "hours_known_for": n, "captions": {"mean_words", "max_words"}}``."""
    clips = read_manifest(path, eval_fraction=eval_fraction)
    splits: dict[str, int] = {}
    for c in clips:
        splits[c.split] = splits.get(c.split, 0) + 1
    missing: list[str] = []
    unreadable: list[dict] = []
    seconds = 0.0
    known = 0
    for c in clips:
        dur = c.duration
        if check_audio:
            if not storage.exists(c.audio):
                missing.append(c.id)
                continue
            if not storage.is_remote(c.audio):
                full, reason = _audio_header(c.audio)
                if full is None:
                    unreadable.append({"id": c.id, "audio": c.audio, "reason": reason})
                    continue
                if dur is None:
                    dur = full - (c.start or 0.0)
        if dur is not None:
            seconds += max(dur, 0.0)
            known += 1
    words = [len(c.caption.split()) for c in clips]
    return {
        "manifest": os.fspath(path),
        "ok": not missing and not unreadable,
        "clips": len(clips),
        "splits": dict(sorted(splits.items())),
        "missing_audio": len(missing),
        "missing": missing[:max_listed],
        "unreadable_audio": len(unreadable),
        "unreadable": unreadable[:max_listed],
        "hours": round(seconds / 3600.0, 4),
        "hours_known_for": known,
        "captions": {
            "mean_words": round(sum(words) / len(words), 2) if words else 0.0,
            "max_words": max(words) if words else 0,
        },
    }


__all__ = [
    "Clip",
    "ManifestError",
    "read_manifest",
    "write_manifest",
    "split_for",
    "sanitize_id",
    "check_id",
    "from_csv",
    "check_manifest",
]
