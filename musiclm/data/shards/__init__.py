"""WebDataset shards: the contract between the Ray jobs that tokenize audio and training.

One module per concern: :mod:`.schema` (names, entries, dtypes, layout, errors), :mod:`.encoding`
(validating and encoding writer inputs), :mod:`.writer` (:class:`ShardWriter`), :mod:`.index`
(``index.json``, listing, fingerprint checks), :mod:`.reader` (:func:`shard_reader`) and
:mod:`.verify` (``inspect`` / ``verify``). Import from ``musiclm.data.shards``.

Layout (see ``shards/README.md`` for the full schema)::

    <root>/<dataset>/tokens-<fingerprint hash>/<split>-000000.tar ... index.json
    <root>/<dataset>/audio/<split>-000000.tar ... index.json

``<root>`` is a local folder or an ``s3://bucket/prefix`` URL. One sample = one segment of one
clip, key ``<clip-id>__<segment:04d>`` (no dots). Token samples hold ``acoustic.npy`` (int16
[Q, T_a]), ``semantic.npy`` (int16 [T_s]), ``mulan.npy`` (float16 [D]), ``cond.npy`` (int16
[namespaces, K]) and ``json``, or the entries of a subset of those streams that index.json names
(``"streams"``, :data:`STREAMS`); audio samples hold ``flac`` (mono) and ``json``.

Atomic visibility: a shard is written to a hidden temp file (``.<name>.<random>.partial``, in the
shard folder locally, in the system temp folder for S3) and only then appears under its final
name: ``os.replace`` locally; for S3 the finished file is uploaded with one PUT (a multipart
upload above s3fs's chunk size), and S3 makes an object visible only when its upload completes.
A writer that raises, is garbage-collected unclosed, or is killed leaves no file that
:func:`list_shards` (or a reader) would pick up.

Readers decode only ``.npy`` (``allow_pickle=False``), ``.json`` and ``.txt``; other entries
(``flac``) are returned as raw bytes. Nothing from a shard is ever unpickled.
"""

from __future__ import annotations

from .encoding import encode_sample, required_entries, sample_seconds, validate_sample
from .index import check_fingerprints, list_shards, read_index, write_index
from .reader import ShardReader, decode_sample, shard_reader
from .schema import (ALL_STREAMS, EXTRA_EXTENSIONS, INDEX_NAME, KEY_RE, MAX_TAR_NAME, PARTIAL_SUFFIX, REQUIRED,
                     SHARD_RE, SPLIT_RE, STREAMS, TOKEN_ARRAYS, FingerprintMismatch, ShardError, audio_shard_dir,
                     fingerprint_hash, index_streams, json_default, parse_streams, sample_key, shard_name,
                     stream_entries, stream_tokenizers, token_shard_dir)
from .verify import inspect, verify
from .writer import ShardWriter, remove_partials

__all__ = [
    "ShardError",
    "FingerprintMismatch",
    "ShardWriter",
    "fingerprint_hash",
    "token_shard_dir",
    "audio_shard_dir",
    "shard_name",
    "sample_key",
    "validate_sample",
    "required_entries",
    "encode_sample",
    "decode_sample",
    "write_index",
    "read_index",
    "list_shards",
    "check_fingerprints",
    "shard_reader",
    "ShardReader",
    "remove_partials",
    "inspect",
    "verify",
    # schema constants and helpers
    "EXTRA_EXTENSIONS",
    "INDEX_NAME",
    "KEY_RE",
    "MAX_TAR_NAME",
    "PARTIAL_SUFFIX",
    "REQUIRED",
    "SHARD_RE",
    "SPLIT_RE",
    "TOKEN_ARRAYS",
    "json_default",
    "STREAMS",
    "ALL_STREAMS",
    "parse_streams",
    "stream_entries",
    "stream_tokenizers",
    "index_streams",
    "sample_seconds",
]
