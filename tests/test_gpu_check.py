"""scripts/gpu_check.sh on a machine without a GPU, and the pure parts of musiclm.bench.gpu_check.

On a CPU the script must say so in one line, write {"gpu": false, ...} and exit 3. The MFU
arithmetic and the peak table are checked against hand-computed values; the wheel install step
with a real (tiny) wheel and pip; the time budget with a dry run whose budget runs out at once.
The @slow dry run sends every part through its child process on the CPU (figures mean nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from musiclm.bench.gpu_check import (
    NO_GPU_EXIT,
    NO_GPU_LINE,
    install_missing_wheels,
    mfu,
    peak_bf16_flops,
    wheel_distribution,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")


def _script(*args: str, env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    env.update(env_extra or {})
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@needs_no_gpu
def test_on_a_cpu_machine_the_script_says_so_writes_json_and_exits_3(tmp_path):
    out = tmp_path / "check.json"
    proc = _script("--out", str(out))
    assert proc.returncode == NO_GPU_EXIT == 3, proc.stdout + proc.stderr
    assert proc.stdout.strip() == NO_GPU_LINE
    doc = json.loads(out.read_text())
    assert doc["gpu"] is False
    assert doc["message"] == NO_GPU_LINE
    assert doc["device"]["torch"] == torch.__version__
    assert "parts" not in doc  # nothing ran


@needs_no_gpu
def test_the_json_goes_to_OUT_when_the_device_machine_sets_it(tmp_path):
    proc = _script(env_extra={"OUT": str(tmp_path)})
    assert proc.returncode == 3
    assert json.loads((tmp_path / "gpu_check.json").read_text())["gpu"] is False


def test_no_torch_counts_as_no_gpu(tmp_path):
    """A Python without torch (say, the system one) is told apart from a crash: exit 3, a reason."""
    out = tmp_path / "check.json"
    code = "import sys; sys.modules['torch'] = None; from musiclm.bench.gpu_check import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    assert "torch does not import" in json.loads(out.read_text())["device"]["reason"]


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H200", 989),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L4", 121),
        ("NVIDIA L40S", 181),  # not the L4's figure although the name starts alike
        ("NVIDIA A10G", 125),
        ("Tesla K80", None),
    ],
)
def test_peak_lookup_by_device_name(name, tflops):
    peak = peak_bf16_flops(name)
    assert (peak / 1e12 if peak else None) == tflops


def test_mfu_against_a_hand_computed_value():
    # 20,000 tokens/s x 6 x 85M parameters = 1.02e13 FLOP/s; over an H100's 989e12 FLOP/s: 0.0103134479...
    assert mfu(20_000, 6 * 85e6, 989e12) == pytest.approx(1.02e13 / 989e12, rel=1e-12)
    assert mfu(20_000, 6 * 85e6, 989e12) == pytest.approx(0.01031344793, rel=1e-9)
    assert mfu(20_000, 6 * 85e6, 989e12, devices=2) == pytest.approx(0.01031344793 / 2, rel=1e-9)
    assert mfu(20_000, 6 * 85e6, None) == "unknown"  # a GPU not in the table
    assert mfu(None, 6 * 85e6, 989e12) is None  # no throughput measured


def test_wheel_distribution_names():
    assert wheel_distribution("scikit_learn-1.9.1-cp312-cp312-manylinux_2_28_x86_64.whl") == "scikit-learn"
    assert wheel_distribution("/w/PyYAML-6.0.2-cp312-cp312-manylinux2014_x86_64.whl") == "pyyaml"
    assert wheel_distribution("ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl") == "ray"


def _tiny_wheel(folder, name: str) -> str:
    path = os.path.join(folder, f"{name}-0.1-py3-none-any.whl")
    info = f"{name}-0.1.dist-info"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_only_the_wheels_this_python_lacks_are_installed(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _tiny_wheel(str(wheels), "musiclm_gpu_check_probe")
    _tiny_wheel(str(wheels), "numpy")  # installed here: must be left alone, not replaced
    target = tmp_path / "site"
    res = install_missing_wheels(str(wheels), str(target))
    assert res["ok"], res
    assert res["installed"] == ["musiclm-gpu-check-probe"]
    assert res["already_installed"] == ["numpy"]
    assert (target / "musiclm_gpu_check_probe.py").read_text() == "VALUE = 42\n"
    assert not (target / "numpy.py").exists()


def test_a_spent_budget_skips_the_rest_and_keeps_the_json(tmp_path):
    """Dry run (--allow_cpu) with a budget that is gone at once: the first part is killed at its
    limit, every other planned part is recorded as skipped, the exit code says a part failed."""
    out = tmp_path / "dry.json"
    cmd = [sys.executable, "-m", "musiclm.bench.gpu_check", "run", "--allow_cpu", "--out", str(out)]
    cmd += ["--work", str(tmp_path / "work"), "--budget", "1", "--stages", "coarse,codec", "--zero", "2,3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["gpu"] is False and "dry_run" in doc
    parts = doc["parts"]
    assert parts["shards"]["ok"] is False
    expected = ["matmul", "nccl", "train/coarse/zero2", "train/codec/zero2", "generate", "tokenize"]
    expected += ["train/coarse/zero3", "train/codec/zero3"]
    assert list(parts) == ["shards", *expected]
    assert all(parts[k]["skipped"].startswith("out of time") for k in expected)


@pytest.mark.slow  # DeepSpeed launcher, a local Ray, generation: ~2 minutes on 2 cores
@needs_no_gpu
def test_dry_run_on_the_cpu_sends_every_part_through_its_child_process(tmp_path):
    """The plumbing a GPU machine would run, on the CPU (DS_ACCELERATOR=cpu, gloo, small sizes):
    every part reports ok, the train part through the real launcher, tokenize through Ray."""
    out = tmp_path / "dry.json"
    cmd = [sys.executable, "-m", "musiclm.bench.gpu_check", "run", "--allow_cpu", "--out", str(out)]
    cmd += ["--work", str(tmp_path / "work"), "--budget", "500", "--stages", "coarse", "--zero", "2"]
    cmd += ["--preset", "tiny", "--steps", "4", "--log_every", "2", "--micro_batch", "2"]
    cmd += ["--gen_preset", "tiny", "--duration", "1", "--clips", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    doc = json.loads(out.read_text())
    assert proc.returncode == 0, json.dumps(doc["parts"], indent=1)[-4000:]
    parts = doc["parts"]
    assert list(parts) == ["shards", "matmul", "nccl", "train/coarse/zero2", "generate", "tokenize"]
    assert parts["nccl"]["all_reduce_correct"] and parts["nccl"]["world_size"] == 2
    train = parts["train/coarse/zero2"]
    assert train["rc"] == 0 and train["zero_engine"] == 2 and train["tokens_per_s"] > 0
    assert train["mfu"] == "unknown"  # no GPU peak on a CPU
    assert parts["generate"]["fp32"]["rtf"] > 0
    assert parts["tokenize"]["clips_ok"] == 2 and parts["tokenize"]["clips_failed"] == 0
