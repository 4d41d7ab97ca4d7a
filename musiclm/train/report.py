"""A table of training runs from their folders: steps, training time, start-up, throughput, losses.

    python -m musiclm.train.report runs/demo/mulan runs/demo/tokens-*/semantic ... [--timings T.tsv]

Reads only what a run writes (``metrics.jsonl``, ``startup.json``, ``config.yaml``), so it works
on a finished, a stopped or a running run. ``make demo`` prints it at the end; ``--timings`` adds
the wall time of every pipeline step (a TSV of ``step<TAB>seconds`` lines).
"""

from __future__ import annotations

import json
import os
import sys

from .monitor import read_metrics

__all__ = ["run_summary", "format_runs_table", "format_timings_table"]


def _last(recs: list[dict], key: str):
    return next((r[key] for r in reversed(recs) if key in r), None)


def run_summary(run_dir: str) -> dict:
    """Steps, budgets and final figures of one run folder."""
    recs = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    steps = [r["step"] for r in recs if "train/loss" in r]
    startup = {}
    path = os.path.join(run_dir, "startup.json")
    if os.path.exists(path):
        with open(path) as f:
            startup = json.load(f)
    max_steps = max_minutes = None
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(cfg_path):
        import yaml

        with open(cfg_path) as f:
            train = (yaml.safe_load(f) or {}).get("train") or {}
        max_steps, max_minutes = train.get("max_steps"), train.get("max_minutes")
    timed = [r["time"] for r in recs if "train/loss" in r and "time" in r]
    first_loss = next((r["train/loss"] for r in recs if "train/loss" in r), None)
    return {
        "run": run_dir,
        "steps": max(steps) if steps else 0,
        "max_steps": max_steps,
        "max_minutes": max_minutes,
        "train_minutes": (timed[-1] - timed[0]) / 60.0 if len(timed) > 1 else 0.0,
        "startup_s": startup.get("process_to_first_step_s"),
        "tokens_per_s": _last(recs, "perf/tokens_per_s"),
        "samples_per_s": _last(recs, "perf/samples_per_s"),
        "first_loss": first_loss,
        "final_loss": _last(recs, "train/loss"),
        "eval_loss": _last(recs, "eval/loss"),
    }


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def format_runs_table(rows: list[dict]) -> str:
    """Markdown table of run_summary rows."""
    out = [
        "| run | steps | budget | training (min) | start-up to first step (s) | samples/s | "
        "train loss first → last | eval loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = []
        if r["max_steps"]:
            budget.append(f"{r['max_steps']} steps")
        if r["max_minutes"]:
            budget.append(f"{r['max_minutes']:g} min")
        out.append(
            f"| {r['run']} | {r['steps']} | {' / '.join(budget) or '–'} | {r['train_minutes']:.1f} | "
            f"{_fmt(r['startup_s'], '.1f')} | {_fmt(r['samples_per_s'], '.1f')} | "
            f"{_fmt(r['first_loss'], '.2f')} → {_fmt(r['final_loss'], '.2f')} | {_fmt(r['eval_loss'], '.2f')} |"
        )
    return "\n".join(out)


def format_timings_table(path: str) -> str:
    """Markdown table of a ``step<TAB>seconds`` TSV, with the total."""
    rows = []
    with open(path) as f:
        for line in f:
            if "\t" in line:
                name, secs = line.rstrip("\n").rsplit("\t", 1)
                rows.append((name, float(secs)))
    out = ["| step | wall (s) |", "|---|---|"]
    out += [f"| {n} | {s:.0f} |" for n, s in rows]
    out.append(f"| **total** | **{sum(s for _, s in rows):.0f}** |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="run folders")
    p.add_argument("--timings", help="TSV of pipeline step<TAB>seconds (make demo writes one)")
    args = p.parse_args(argv)
    if args.timings and os.path.exists(args.timings):
        print(format_timings_table(args.timings))
        print()
    rows = [run_summary(d) for d in args.runs if os.path.isdir(d)]
    if rows:
        print(format_runs_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
