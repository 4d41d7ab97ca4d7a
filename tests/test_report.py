"""The run table that `make demo` prints (musiclm.train.report) from what runs write."""

from __future__ import annotations

import json

from musiclm.train.report import format_runs_table, format_timings_table, run_summary


def test_run_summary_and_tables(tmp_path):
    run = tmp_path / "semantic"
    run.mkdir()
    recs = [
        {"step": 1, "time": 100.0, "startup/process_to_first_step_s": 4.5},
        {"step": 1, "time": 100.0, "train/loss": 6.0},
        {"step": 2, "time": 130.0, "train/loss": 5.0},
        {"step": 3, "time": 160.0, "train/loss": 4.0, "perf/samples_per_s": 3.2},
        {"step": 3, "time": 161.0, "eval/loss": 4.4},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{cut off")
    (run / "startup.json").write_text(json.dumps({"process_to_first_step_s": 4.5}))
    (run / "config.yaml").write_text("train: {max_steps: 100, max_minutes: 3}\n")
    s = run_summary(str(run))
    assert (s["steps"], s["max_steps"], s["max_minutes"]) == (3, 100, 3)
    assert s["train_minutes"] == 1.0 and s["startup_s"] == 4.5
    assert (s["first_loss"], s["final_loss"], s["eval_loss"], s["samples_per_s"]) == (6.0, 4.0, 4.4, 3.2)
    table = format_runs_table([s, run_summary(str(tmp_path / "missing"))])
    assert f"| {run} | 3 | 100 steps / 3 min | 1.0 | 4.5 | 3.2 | 6.00 → 4.00 | 4.40 |" in table
    assert "| 0 | – | 0.0 | – | – | – → – | – |" in table  # a run that never started
    tsv = tmp_path / "t.tsv"
    tsv.write_text("1. corpus\t27\n2. shards\t13\n")
    assert format_timings_table(str(tsv)).splitlines()[-1] == "| **total** | **40** |"
