"""Storage helpers over local paths and remote URLs (``s3://`` through fsspec/s3fs).

Every part of musiclm that touches manifests, shards or indexes goes through these functions, so
the same code runs on a laptop (``shards/...``) and on a cluster (``s3://bucket/prefix/...``).

S3 settings come from the usual AWS environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION`` and, for S3-compatible stores (MinIO, Ceph, moto in the tests),
``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``. Extra s3fs options can be given per call
(``storage_options``) or process-wide with :func:`set_storage_options`.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from typing import Any, BinaryIO, Iterable, Iterator

_SCHEME_SEP = "://"
_extra_options: dict[str, dict[str, Any]] = {}


def is_remote(url: str) -> bool:
    """True for ``scheme://...`` URLs other than ``file://``."""
    url = os.fspath(url)
    return _SCHEME_SEP in url and not url.startswith("file://")


def _local(url: str) -> str:
    url = os.fspath(url)
    return url[len("file://"):] if url.startswith("file://") else url


def _scheme(url: str) -> str:
    return url.split(_SCHEME_SEP, 1)[0]


def set_storage_options(scheme: str, **options: Any) -> None:
    """Process-wide fsspec options for one scheme (e.g. ``set_storage_options("s3", anon=True)``)."""
    _extra_options[scheme] = dict(options)


def storage_options(url: str, overrides: dict | None = None) -> dict:
    """fsspec options used for ``url``: the environment's S3 endpoint, then process-wide options,
    then ``overrides``."""
    scheme = _scheme(url)
    opts: dict[str, Any] = {}
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        # Listings must be fresh: shards are written by other processes (Ray workers) while this
        # one lists them.
        opts["use_listings_cache"] = False
    opts.update(_extra_options.get(scheme, {}))
    if overrides:
        opts.update(overrides)
    return opts


def get_fs(url: str, options: dict | None = None):
    """(fsspec filesystem, path inside it) for a remote URL."""
    import fsspec

    scheme = _scheme(url)
    fs = fsspec.filesystem("s3" if scheme == "s3a" else scheme, **storage_options(url, options))
    return fs, fs._strip_protocol(url)


def join(url: str, *parts: str) -> str:
    """Join path components; '/' separators for URLs, os.path.join for local paths."""
    url = os.fspath(url)
    if is_remote(url):
        out = url.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out = f"{out}/{p}"
        return out
    return os.path.join(url, *[str(p) for p in parts])


def dirname(url: str) -> str:
    url = os.fspath(url)
    if is_remote(url):
        scheme, rest = url.split(_SCHEME_SEP, 1)
        head = posixpath.dirname(rest.rstrip("/"))
        return f"{scheme}{_SCHEME_SEP}{head}"
    return os.path.dirname(os.path.abspath(_local(url)))


def basename(url: str) -> str:
    url = os.fspath(url)
    return posixpath.basename(url.rstrip("/")) if is_remote(url) else os.path.basename(_local(url))


def open_file(url: str, mode: str = "rb", *, options: dict | None = None, **kwargs) -> BinaryIO:
    """Open a local path or remote URL. Use as a context manager.

    Remote files opened for writing become visible only when closed (S3 PUT/multipart upload);
    for atomic shard and index writes use :func:`write_bytes_atomic`, :func:`atomic_path` or
    :func:`put_file`."""
    url = os.fspath(url)
    if not is_remote(url):
        return open(_local(url), mode, **kwargs)
    fs, path = get_fs(url, options)
    return fs.open(path, mode, **kwargs)


def exists(url: str, *, options: dict | None = None) -> bool:
    url = os.fspath(url)
    if not is_remote(url):
        return os.path.exists(_local(url))
    fs, path = get_fs(url, options)
    return fs.exists(path)


def isdir(url: str, *, options: dict | None = None) -> bool:
    url = os.fspath(url)
    if not is_remote(url):
        return os.path.isdir(_local(url))
    fs, path = get_fs(url, options)
    return fs.isdir(path)


def makedirs(url: str, *, options: dict | None = None) -> None:
    """Create a directory (and parents). On object stores prefixes need no creating: no-op."""
    url = os.fspath(url)
    if not is_remote(url):
        os.makedirs(_local(url), exist_ok=True)


def listdir(url: str, *, options: dict | None = None) -> list[str]:
    """Names (not paths) of the entries directly under ``url``, sorted; [] if it does not exist."""
    url = os.fspath(url)
    if not is_remote(url):
        try:
            return sorted(os.listdir(_local(url)))
        except FileNotFoundError:
            return []
    fs, path = get_fs(url, options)
    try:
        entries = fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})


def list_sizes(url: str, *, options: dict | None = None) -> dict[str, int]:
    """{name: size in bytes} of the files directly under ``url`` in one listing (one request on
    S3, not one per file); {} if it does not exist."""
    url = os.fspath(url)
    if not is_remote(url):
        try:
            with os.scandir(_local(url)) as it:
                return {e.name: e.stat().st_size for e in it if e.is_file()}
        except FileNotFoundError:
            return {}
    fs, path = get_fs(url, options)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
            for e in entries if e.get("type") != "directory"}


def size(url: str, *, options: dict | None = None) -> int:
    url = os.fspath(url)
    if not is_remote(url):
        return os.path.getsize(_local(url))
    fs, path = get_fs(url, options)
    return int(fs.size(path))


def rename(src: str, dst: str, *, options: dict | None = None) -> None:
    """Move ``src`` to ``dst``, replacing it. Atomic locally (os.replace); on S3 a copy then a
    delete (the copy is atomic: ``dst`` appears whole or not at all)."""
    if not is_remote(src) and not is_remote(dst):
        os.replace(_local(src), _local(dst))
        return
    if is_remote(src) and is_remote(dst):
        fs, p_src = get_fs(src, options)
        _, p_dst = get_fs(dst, options)
        fs.mv(p_src, p_dst)
        return
    raise ValueError(f"rename between local and remote storage: {src} -> {dst}")


def remove(url: str, *, options: dict | None = None, missing_ok: bool = True) -> None:
    url = os.fspath(url)
    if not is_remote(url):
        try:
            os.remove(_local(url))
        except FileNotFoundError:
            if not missing_ok:
                raise
        return
    fs, path = get_fs(url, options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def put_file(local_path: str, url: str, *, options: dict | None = None) -> None:
    """Upload (or, for a local ``url``, atomically move) a finished local file to ``url``.

    S3: one PUT, or a multipart upload for large files; either way the object becomes visible
    under its key only once the upload completes, so readers never see a partial file."""
    url = os.fspath(url)
    if not is_remote(url):
        os.replace(local_path, _local(url))
        return
    fs, path = get_fs(url, options)
    fs.put_file(local_path, path)


def read_bytes(url: str, *, options: dict | None = None) -> bytes:
    url = os.fspath(url)
    if not is_remote(url):
        with open(_local(url), "rb") as f:
            return f.read()
    fs, path = get_fs(url, options)
    return fs.cat_file(path)


@contextlib.contextmanager
def atomic_path(url: str, *, options: dict | None = None, fsync: bool = True) -> Iterator[str]:
    """A temporary local path to write the new content of ``url`` to (for writers that take a
    path: safetensors, soundfile, tokenizers); when the block ends without an error the file
    replaces ``url`` in one step, so readers see the old content or all of the new one.

    Local: a hidden temp file in the same folder (``.<name>.<random>.tmp``, permissions of a new
    file under the umask), fsynced (unless ``fsync=False``), then ``os.replace``. Remote: a local
    temp file uploaded with :func:`put_file`. On an error the temp file is removed and ``url``
    is left as it was."""
    url = os.fspath(url)
    if is_remote(url):
        tmp_dir = tempfile.mkdtemp(prefix="musiclm-upload-")
        try:
            tmp = os.path.join(tmp_dir, basename(url))
            yield tmp
            put_file(tmp, url, options=options)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    path = _local(url)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.fchmod(fd, file_mode())  # mkstemp makes 0600 files; published files follow the umask
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bytes_atomic(url: str, data: bytes, *, options: dict | None = None) -> None:
    """Write ``data`` so that ``url`` holds either its old content or all of ``data``.

    Local: through :func:`atomic_path` (temp file in the same directory, fsync, os.replace).
    S3: a single PUT."""
    url = os.fspath(url)
    if is_remote(url):
        fs, path = get_fs(url, options)
        fs.pipe_file(path, data)
        return
    with atomic_path(url) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomic(url: str, text: str, *, options: dict | None = None) -> None:
    """:func:`write_bytes_atomic` of ``text`` encoded as UTF-8."""
    write_bytes_atomic(url, text.encode("utf-8"), options=options)


def write_json_atomic(url: str, obj: Any, *, options: dict | None = None, **dumps_kwargs: Any) -> None:
    """:func:`write_text_atomic` of ``json.dumps(obj, **dumps_kwargs)``."""
    write_text_atomic(url, json.dumps(obj, **dumps_kwargs), options=options)


def cache_root() -> str:
    """Local cache of copies of remote files: ``$MUSICLM_CACHE``, else ``~/.cache/musiclm``."""
    return os.environ.get("MUSICLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "musiclm")


def local_copy(url: str, *, options: dict | None = None) -> str:
    """A local path holding the content of ``url``, for loaders that open files by path
    (safetensors, transformers directories, a MuLaN or SoundStream folder). A local path is
    returned unchanged; a remote file or folder is downloaded once into
    ``cache_root()/remote/<key>/<name>``, where the key hashes the URL with every object's size and
    ETag: a changed object gives a new copy, an unchanged one is reused by later processes on the
    same machine. FileNotFoundError when nothing is there."""
    import hashlib

    url = os.fspath(url)
    if not is_remote(url):
        return url
    fs, root = get_fs(url, options)
    root = root.rstrip("/")
    if fs.isdir(root):
        found = fs.find(root, detail=True)
        files = {p[len(root) :].lstrip("/"): info for p, info in found.items() if p[len(root) :].lstrip("/")}
        if not files:
            raise FileNotFoundError(f"{url}: an empty folder")
    else:
        files = {"": fs.info(root)}  # FileNotFoundError when missing
    stamp = sorted(
        (rel, info.get("size"), str(info.get("ETag") or info.get("LastModified") or "")) for rel, info in files.items()
    )
    key = hashlib.sha256(json.dumps([url.rstrip("/"), stamp]).encode()).hexdigest()[:20]
    parent = os.path.join(cache_root(), "remote", key)
    dest = os.path.join(parent, basename(url) or "data")
    if os.path.exists(dest):
        return dest
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=parent)
    try:
        for rel in files:
            local = os.path.join(tmp, "data", *rel.split("/")) if rel else os.path.join(tmp, "data")
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(f"{root}/{rel}" if rel else root, local)
        try:
            os.replace(os.path.join(tmp, "data"), dest)
        except OSError:
            if not os.path.exists(dest):  # else another process published the same copy first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------------------------
# webdataset: open s3:// (and other fsspec) URLs

READ_BLOCK_SIZE = 8 * 2**20


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode != "rb":
        raise ValueError(f"{url}: only reading is supported through gopen (mode {mode!r})")
    fs, path = get_fs(url)
    # Sequential tar streaming: large read-ahead blocks, few requests.
    return fs.open(path, "rb", block_size=READ_BLOCK_SIZE, cache_type="readahead")


def register_s3_gopen(schemes: Iterable[str] = ("s3", "s3a")) -> None:
    """Let webdataset open ``s3://`` URLs (and any other fsspec scheme passed) through fsspec.

    Stock webdataset 1.0 has no handler for s3 (``no gopen handler defined``). Idempotent."""
    from webdataset.gopen import gopen_schemes

    for scheme in schemes:
        gopen_schemes[scheme] = _fsspec_gopen


def file_mode() -> int:
    """Permissions of a newly created file under the current umask (0644 with the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish_dir(src: str, dst: str) -> None:
    """Move a fully written local directory ``src`` to ``dst``, replacing an existing ``dst``.

    Readers see either the old or the new directory under ``dst``, never a half-written one (the
    old one is moved aside first, then removed)."""
    if os.path.isdir(dst):
        old = os.path.join(os.path.dirname(os.path.abspath(dst)), f".old-{os.path.basename(dst)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
