"""Training metrics: TensorBoard event files, ``metrics.jsonl`` and a loss PNG (rank 0 only).

Scalars (TensorBoard tags = ``metrics.jsonl`` keys)::

    train/loss, train/accuracy, train/loss/level_<q>     objective of the stage (per acoustic level)
    train/lr, train/grad_norm
    perf/tokens_per_s, perf/samples_per_s, perf/mfu, perf/step_time_s, perf/data_wait_s,
    perf/peak_memory_gb                                  all ranks together; tokens = non-padding
                                                         input tokens; MFU = FLOPs/token (6·N +
                                                         attention) x tokens/s / (peak x world size)
    progress/tokens_seen, progress/samples_seen
    eval/loss, eval/accuracy, eval/loss/level_<q>        held-out split every K steps

On resume, records after the resumed step are dropped from ``metrics.jsonl`` and TensorBoard's
``purge_step`` discards events after it, so the curves show one history.
"""

from __future__ import annotations

import json
import math
import os
import time

__all__ = ["Monitor", "read_metrics", "plot_losses", "peak_memory_gb", "device_peak_flops"]


def read_metrics(path: str) -> list[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut off by a kill
    except FileNotFoundError:
        pass
    return out


class Monitor:
    def __init__(self, run_dir: str, *, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        # one history: drop what a killed run logged after the checkpoint we resume from
        keep_until = resume_step if resume_step is not None else -1
        old = read_metrics(self.metrics_path)
        kept = [r for r in old if int(r.get("step", 0)) <= keep_until]
        with open(self.metrics_path + ".tmp", "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(self.metrics_path + ".tmp", self.metrics_path)
        self._f = open(self.metrics_path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            kw = {"purge_step": resume_step + 1} if resume_step else {}
            self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tb"), **kw)

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in scalars.items():
            if v is None:
                continue
            v = float(v)
            rec[k] = v
            if self.writer is not None and math.isfinite(v):
                self.writer.add_scalar(k, v, int(step))
        self._f.write(json.dumps(rec) + "\n")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.enabled:
            self._f.flush()
            if self.writer is not None:
                self.writer.flush()

    def close(self, png: bool = True) -> str | None:
        if not self.enabled:
            return None
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._f.close()
        if png:
            try:
                return plot_losses(self.metrics_path, os.path.join(self.run_dir, "loss.png"))
            except Exception as e:  # a plot must never fail a run
                print(f"[musiclm] loss plot failed: {e}")
        return None


def plot_losses(metrics_path: str, out_png: str) -> str | None:
    """PNG of train/eval loss (and per-level losses and accuracy when present)."""
    recs = read_metrics(metrics_path)
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in recs if key in r and r[key] is not None and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    keys = sorted({k for r in recs for k in r})
    level_keys = [k for k in keys if k.startswith("train/loss/level_")]
    panels = 1 + bool(level_keys) + ("train/accuracy" in keys)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    xs, ys = series("train/loss")
    if xs:
        ax.plot(xs, ys, lw=0.8, alpha=0.5, label="train")
        if len(ys) >= 20:
            k = max(2, len(ys) // 50)
            sm = [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, lw=1.5, label=f"train (mean of {k})")
    xs, ys = series("eval/loss")
    if xs:
        ax.plot(xs, ys, "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    i = 1
    if level_keys:
        ax = axes[0][i]
        i += 1
        for k in level_keys:
            xs, ys = series(k)
            ax.plot(xs, ys, lw=1, label=k.split("/")[-1])
        ax.set_title("train loss per acoustic level")
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    if "train/accuracy" in keys:
        ax = axes[0][i]
        for k, lab in (("train/accuracy", "train"), ("eval/accuracy", "eval")):
            xs, ys = series(k)
            if xs:
                ax.plot(xs, ys, lw=1, label=lab)
        ax.set_title("target token accuracy")
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out_png)
    except BaseException:  # e.g. disk full: leave no half-written temp file
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return out_png


def peak_memory_gb(device) -> float:
    """Peak accelerator memory of this process (GPU), else the peak resident set size (CPU)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:
        return float("nan")


# dense bf16 tensor-core peaks (FLOP/s) by device name; the config's train.peak_flops overrides
_GPU_PEAKS = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def device_peak_flops(device, configured: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the configured value, else a table for known GPUs, else None."""
    if configured:
        return float(configured)
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAKS:
            if key in name:
                return peak
    return None
