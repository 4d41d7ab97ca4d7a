"""Stale JIT build locks (musiclm.train.build_locks): a killed compile's lock is removed, a live
build's lock is kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from musiclm.train.build_locks import clear_stale_build_locks


def _lock(root, op: str, age_s: float) -> str:
    d = root / "py311_cpu" / op
    d.mkdir(parents=True)
    path = d / "lock"
    path.write_text("")
    t = time.time() - age_s
    os.utime(path, (t, t))
    return str(path)


def test_stale_lock_is_removed_with_a_message(tmp_path):
    stale = _lock(tmp_path, "fused_adam", age_s=600)
    fresh = _lock(tmp_path, "deepspeed_shm_comm", age_s=5)  # may be a build that has not started its compiler
    said = []
    removed = clear_stale_build_locks(str(tmp_path), log=said.append)
    assert removed == [stale] and not os.path.exists(stale) and os.path.exists(fresh)
    assert "stale JIT build lock" in said[0] and stale in said[0]


def test_lock_of_a_running_build_is_kept(tmp_path):
    lock = _lock(tmp_path, "fused_adam", age_s=600)
    # a "compiler" working in the build folder (ninja runs there)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=os.path.dirname(lock))
    try:
        time.sleep(0.2)
        assert clear_stale_build_locks(str(tmp_path), log=lambda m: None) == []
        assert os.path.exists(lock)
    finally:
        proc.kill()
        proc.wait()
    assert clear_stale_build_locks(str(tmp_path), log=lambda m: None) == [lock]
