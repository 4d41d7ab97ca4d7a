"""Shared pytest fixtures.

``moto_s3``: a real S3 endpoint for tests without network. One ``moto_server`` subprocess on a
free 127.0.0.1 port per test session (started on first use, stopped at the end: only that
process); each test gets a fresh bucket and the AWS_* environment pointing at the server.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

HIDDEN_BINARIES = ("ffmpeg", "ffprobe")


def _hide_binaries(names=HIDDEN_BINARIES) -> None:
    """Run the suite as on a fresh machine, whatever this one has installed: every PATH folder that
    holds one of `names` is replaced by a folder of links to its other programs. Set at import, so
    every subprocess (Ray workers, the deepspeed launcher) inherits it."""
    shadow_root = None
    parts = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and any(os.path.exists(os.path.join(d, n)) for n in names):
            shadow_root = shadow_root or tempfile.mkdtemp(prefix="musiclm-path-")
            shadow = os.path.join(shadow_root, str(len(parts)))
            os.makedirs(shadow)
            for entry in os.listdir(d):
                if entry not in names:
                    os.symlink(os.path.join(d, entry), os.path.join(shadow, entry))
            d = shadow
        parts.append(d)
    os.environ["PATH"] = os.pathsep.join(parts)
    assert all(shutil.which(n) is None for n in names)


_hide_binaries()


@pytest.fixture(scope="session")
def moto_server():
    from musiclm.testing import MotoServer

    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def moto_s3(moto_server, monkeypatch) -> str:
    """URL of a new, empty bucket (``s3://musiclm-<random>``) on the session's moto server."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    return moto_server.create_bucket()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for in-process tests. On 2 cores shared with Ray / DeepSpeed subprocesses,
    OpenMP threads spin against each other (tiny-model steps measured 20-100x slower with two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
