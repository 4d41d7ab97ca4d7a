"""Make `import torchaudio` work beside a CPU build of torch.

PyPI's torchaudio 2.11 is a CUDA build: its compiled extension links libc10_cuda.so, so importing
it next to a CPU torch fails with OSError. torchaudio's pure-PyTorch parts (transforms, functional:
MelSpectrogram, MFCC, resample) need no extension, and import once the extension's `.so` files are
gone. This script does that, loudly, and only when the import really fails: on a CUDA machine with a
matching torch, the extension imports and is left alone.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys


def _import_ok() -> tuple[bool, str]:
    proc = subprocess.run(
        [sys.executable, "-c", "import torchaudio, torchaudio.transforms"],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0, (proc.stderr.strip().splitlines() or [""])[-1]


def main() -> int:
    ok, err = _import_ok()
    if ok:
        print("torchaudio: imports fine, extension kept")
        return 0
    if "libc10_cuda" not in err and "Could not load this library" not in err:
        print(f"torchaudio: import fails for another reason, not touching it: {err}", file=sys.stderr)
        return 1
    import importlib.util

    spec = importlib.util.find_spec("torchaudio")
    assert spec is not None and spec.submodule_search_locations
    lib = pathlib.Path(list(spec.submodule_search_locations)[0]) / "lib"
    removed = sorted(p.name for p in lib.glob("*.so"))
    for p in lib.glob("*.so"):
        p.unlink()
    print(
        "torchaudio: its CUDA extension cannot load beside this CPU torch "
        f"({err}); removed {removed} from {lib} so the pure-PyTorch transforms import"
    )
    ok, err = _import_ok()
    if not ok:
        print(f"torchaudio: still fails to import: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
