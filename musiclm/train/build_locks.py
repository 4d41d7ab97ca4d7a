"""Stale locks of torch's JIT extension builds.

DeepSpeed compiles some ops on first use through ``torch.utils.cpp_extension``, which takes
``<TORCH_EXTENSIONS_DIR>/<op>/lock`` (a ``FileBaton``: a file created exclusively, holding no
process id) and makes every later process wait for it to disappear. A compile that was killed
(Ctrl-C, OOM, a CI timeout) leaves the file behind, and every later run hangs in
``FileBaton.wait`` with no message. ``clear_stale_build_locks`` removes a lock when no running
process is building in its folder and it is older than a compile's start-up, and says so.
"""

from __future__ import annotations

import glob
import os
import time

# A lock younger than this may belong to a build that has not started its compiler yet.
MIN_AGE_S = 60.0


def extensions_root() -> str:
    """Where torch puts JIT builds: $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "torch_extensions"
    )


def _processes_using(folder: str) -> list[int]:
    """Pids of processes whose working directory or command line is inside `folder` (ninja, cc1plus)."""
    folder = os.path.realpath(folder)
    users = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cwd = os.path.realpath(os.readlink(f"/proc/{pid}/cwd"))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if cwd == folder or cwd.startswith(folder + os.sep) or folder in cmdline:
            users.append(int(pid))
    return users


def clear_stale_build_locks(root: str | None = None, *, min_age_s: float = MIN_AGE_S, log=print) -> list[str]:
    """Remove build locks under `root` that no live build holds; returns their paths.

    Without /proc (not Linux) nothing can be checked: a lock older than an hour is reported with
    the command to remove it, and left in place."""
    root = root or extensions_root()
    removed = []
    for lock in sorted(
        set(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")))
    ):
        try:
            age = time.time() - os.path.getmtime(lock)
        except OSError:
            continue
        if age < min_age_s:
            continue
        folder = os.path.dirname(lock)
        if not os.path.isdir("/proc"):
            if age > 3600:
                log(
                    f"a JIT build lock is {age / 60:.0f} min old: {lock}; if no build is running, "
                    f"remove it (`rm {lock}`), or the next build of this op waits forever"
                )
            continue
        users = _processes_using(folder)
        if users:
            continue
        try:
            os.unlink(lock)
        except FileNotFoundError:
            continue
        removed.append(lock)
        log(
            f"removed a stale JIT build lock left by a killed compile ({age / 60:.1f} min old, "
            f"no process building in {folder}): {lock}"
        )
    return removed
