"""`musiclm bench scaling`: what the paper-sized stage models need on 8, 64 and 512 GPUs.

- Memory per GPU for model states (parameters, gradients, optimizer), from DeepSpeed's own
  estimators: ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``
  (the functions that ``estimate_zero{2,3}_model_states_mem_needs_all_cold`` print). ZeRO-1 has no
  estimator; we use the same byte counts with the 16-bit gradients replicated instead of sharded.
- Tokens of a 280k-hour corpus per stage and the GPU-hours one epoch takes at 40 % MFU.

The models are built on the meta device (no memory), so this runs anywhere in a second or two.

With ``simulate`` (``--simulate``; ``musiclm bench scaling --set simulate=true``), a synthetic
token corpus of many small shards is written locally and to moto S3 and the shard index, the
reader, the rank split, resume and S3 listing are measured and extrapolated to the corpus size
(:mod:`musiclm.bench.corpus_sim`; ``sim_shards=...`` etc. scale it; a minute or two at the defaults).

    python -m musiclm.bench.scaling --write docs/scaling.md
    python -m musiclm.bench.scaling --simulate --sim-shards 20000 --sim-json docs/scaling_simulation.json \
        --write docs/scaling.md
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from musiclm.lm import PAPER_WINDOWS, Transformer, get_stage
from musiclm.lm.stages import PAPER_TOKENS
from musiclm.train.estimate import zero_estimators

GiB = 1024**3

# The same with EnCodec 24 kHz (75 Hz, 6 kbps = 8 levels: 4 coarse + 4 fine).
ENCODEC_TOKENS = dict(PAPER_TOKENS, acoustic_levels=8, acoustic_rate=75)

PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0}  # dense bf16 tensor-core peak


def model_sizes(stage, preset: str = "paper") -> dict:
    """Parameter counts of the stage model, built on the meta device."""
    with torch.device("meta"):
        model = Transformer(stage.model_config(preset))
    total = model.num_params()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {
        "params": total,
        "largest_layer_params": largest,
        "flops_per_token": model.flops_per_token(stage.seq_len),
        "cfg": model.cfg,
    }


def activation_bytes(cfg, seq_len: int) -> dict:
    """bf16 activations of one sequence (Korthikanti et al. 2022, flash attention so no L^2 term):
    34 * T * d bytes per layer, plus bf16 logits and their fp32 copy for the loss (6 * T * V).
    With checkpointing: each block's 2-byte input is kept and one block is recomputed at a time."""
    T, d, L, V = seq_len, cfg.d_model, cfg.n_layer, cfg.vocab_size
    logits = 6 * T * V
    return {"full": 34 * T * d * L + logits, "checkpointed": 2 * T * d * L + 34 * T * d + logits}


def run(
    preset: str = "paper",
    gpus=(8, 64, 512),
    gpus_per_node: int = 8,
    hours: float = 280_000,
    mfu: float = 0.4,
    tokens: dict | None = None,
    windows: dict | None = None,
    encodec_tokens: dict | None = None,
    simulate: bool = False,
    sim_shards: int = 2048,
    sim_samples_per_shard: int = 8,
    sim_s3_shards: int = 512,
    sim_ranks: int = 512,
    sim_workers: int = 4,
) -> dict:
    z2, z3, source = zero_estimators()
    tokens = tokens or PAPER_TOKENS
    windows = windows or PAPER_WINDOWS
    seconds = hours * 3600.0
    result = {
        "bench": "scaling",
        "preset": preset,
        "estimator": source,
        "gpus_per_node": gpus_per_node,
        "hours": hours,
        "mfu": mfu,
        "peak_tflops": PEAK_TFLOPS,
        "tokens_config": tokens,
        "windows": windows,
        "stages": [],
        "memory": [],
        "compute": [],
    }
    variants = [("paper (SoundStream 50 Hz, 12 levels)", tokens)]
    variants.append(("EnCodec (75 Hz, 8 levels)", encodec_tokens or ENCODEC_TOKENS))
    for name in ("semantic", "coarse", "fine"):
        stage = get_stage(name, tokens, windows[name])
        sz = model_sizes(stage, preset)
        act = activation_bytes(sz["cfg"], stage.seq_len)
        result["stages"].append(
            {
                "stage": name,
                "vocab_size": stage.vocab_size,
                "seq_len": stage.seq_len,
                "window_seconds": stage.window_seconds,
                "params": sz["params"],
                "largest_layer_params": sz["largest_layer_params"],
                "activation_gib_per_seq": act["full"] / GiB,
                "activation_gib_per_seq_checkpointed": act["checkpointed"] / GiB,
            }
        )
        N, big = sz["params"], sz["largest_layer_params"]
        for n in gpus:
            nodes = max(1, n // gpus_per_node)
            per_node = min(n, gpus_per_node)
            _, z2_gpu = z2(N, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=False)
            _, z3_gpu, _ = z3(
                N, big, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=False, cpu_offload_params=False
            )
            z3o_cpu, z3o_gpu, _ = z3(
                N,
                big,
                num_gpus_per_node=per_node,
                num_nodes=nodes,
                cpu_offload=True,
                cpu_offload_params=True,
                zero_init=True,
            )
            # ZeRO-1: 16-bit params (2) and 16-bit grads (2) replicated; fp32 grads (4), fp32 master
            # params (4) and Adam moments (8) sharded -- the estimator's 18 bytes minus the 2 of the
            # 16-bit grads that ZeRO-2 shards.
            z1_gpu = 4 * N + 16 * N / n
            result["memory"].append(
                {
                    "stage": name,
                    "gpus": n,
                    "nodes": nodes,
                    "zero1_gb": z1_gpu / GiB,
                    "zero2_gb": z2_gpu / GiB,
                    "zero3_gb": z3_gpu / GiB,
                    "zero3_offload_gpu_gb": z3o_gpu / GiB,
                    "zero3_offload_cpu_per_node_gb": z3o_cpu / GiB,
                }
            )
        for label, toks in variants:
            st = get_stage(name, toks, windows[name])
            fl = model_sizes(st, preset)["flops_per_token"]
            windows_per_epoch = seconds / st.window_seconds
            seq_tokens = windows_per_epoch * st.seq_len
            target_tokens = windows_per_epoch * st.target_length()
            flops = seq_tokens * fl
            row = {
                "stage": name,
                "tokens": label,
                "seq_len": st.seq_len,
                "target_tokens_per_s": st.target_length() / st.window_seconds,
                "target_tokens": target_tokens,
                "sequence_tokens": seq_tokens,
                "flops_per_token": fl,
                "flops": flops,
            }
            for gpu, tf in PEAK_TFLOPS.items():
                row[f"gpu_hours_{gpu}"] = flops / (mfu * tf * 1e12) / 3600.0
            result["compute"].append(row)
    if simulate:
        from musiclm.bench.corpus_sim import extrapolate
        from musiclm.bench.corpus_sim import simulate as run_simulation

        sim = run_simulation(
            shards=sim_shards,
            samples_per_shard=sim_samples_per_shard,
            s3_shards=sim_s3_shards,
            ranks=sim_ranks,
            workers=sim_workers,
        )
        result["simulation"] = sim
        result["simulation_extrapolated"] = extrapolate(sim, hours, sim_ranks, sim_workers)
    return result


def _fmt_gb(x: float) -> str:
    return f"{x:.2f}" if x < 10 else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def _sci(x: float) -> str:
    return f"{x:.3g}"


def render_markdown(r: dict) -> str:
    t = r["tokens_config"]
    w = r["windows"]
    lines = [
        "# Scaling the stage models",
        "",
        "Generated by `python -m musiclm.bench.scaling --write docs/scaling.md`"
        + (
            " (the simulation section: add `--simulate --sim-shards N --sim-json docs/scaling_simulation.json`, or "
            "`--sim-from docs/scaling_simulation.json` to render saved figures)"
            if r.get("simulation")
            else ""
        )
        + "; do not edit by hand.",
        "",
        f"Preset `{r['preset']}`: 24 layers, 16 heads, d = 1024, tied embeddings, each stage with its own "
        "vocabulary (specials | its MuLaN namespace, 12 levels x 1024 | semantic 1024 | acoustic levels "
        "x 1024, rounded up to a multiple of 64; see `musiclm/lm/stages.py`). "
        f"Tokens: semantic {t['semantic_rate']} Hz, acoustic {t['acoustic_rate']} Hz x {t['acoustic_levels']} "
        f"levels ({t['coarse_levels']} coarse), windows {w['semantic']:g} / {w['coarse']:g} / {w['fine']:g} s.",
        "",
        "| stage | window s | vocab | seq len | params | largest layer "
        "| activations / seq (GiB, bf16) | checkpointed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in r["stages"]:
        lines.append(
            f"| {s['stage']} | {s['window_seconds']:g} | {s['vocab_size']:,} | {s['seq_len']:,} | "
            f"{s['params'] / 1e6:.1f} M | {s['largest_layer_params'] / 1e6:.1f} M | "
            f"{s['activation_gib_per_seq']:.2f} | {s['activation_gib_per_seq_checkpointed']:.2f} |"
        )
    lines += [
        "",
        "## Memory per GPU for model states (GiB)",
        "",
        f"Estimator: {r['estimator']} (`estimate_zero2_model_states_mem_needs`, "
        "`estimate_zero3_model_states_mem_needs` from `deepspeed.runtime.zero`, the numbers their "
        "`..._all_cold` wrappers print), no offload unless stated; "
        f"{r['gpus_per_node']} GPUs per node. Mixed precision with Adam: 2 bytes of 16-bit params, "
        "2 of 16-bit grads, 4 of fp32 grads, 4 of fp32 master params, 8 of Adam moments per parameter.",
        "",
        "- ZeRO-1: no DeepSpeed estimator; computed as 4·N + 16·N / GPUs (16-bit params and grads "
        "replicated, the rest sharded).",
        "- ZeRO-2: the estimator, 2·N + 18·N / GPUs.",
        "- ZeRO-3: the estimator, 4·largest layer + 18·N / GPUs.",
        "- ZeRO-3 + offload: optimizer and params on CPU (`offload_optimizer` and `offload_param` = cpu, "
        "zero_init); GPU holds the largest layer; CPU column is per node and includes the estimator's 1.5x buffer.",
        "",
        "Activations (table above) come on top, per sequence in the micro-batch.",
        "",
        "| stage | GPUs | ZeRO-1 | ZeRO-2 | ZeRO-3 | ZeRO-3 + offload: GPU | CPU per node |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in r["memory"]:
        lines.append(
            f"| {m['stage']} | {m['gpus']} | {_fmt_gb(m['zero1_gb'])} | {_fmt_gb(m['zero2_gb'])} | "
            f"{_fmt_gb(m['zero3_gb'])} | {_fmt_gb(m['zero3_offload_gpu_gb'])} | "
            f"{_fmt_gb(m['zero3_offload_cpu_per_node_gb'])} |"
        )
    lines += [
        "",
        f"## Tokens and GPU-hours per epoch of a {r['hours']:,.0f}-hour corpus",
        "",
        "An epoch shows every second of audio once, in that stage's window. *Target tokens* are the "
        "stream the stage predicts (semantic 25 Hz; coarse levels x acoustic rate; fine levels x acoustic "
        "rate); *sequence tokens* are every position the model processes (conditioning and prefix "
        "included): windows x seq len.",
        "",
        "FLOPs = sequence tokens x (6·N + 12·layers·d·seq len): 6·N for the matmul parameters (the "
        "output projection included, the input lookup not) plus the attention score/value matmuls "
        "(PaLM appendix B, not halved for causality). "
        f"GPU-hours at {r['mfu']:.0%} MFU on A100 ({r['peak_tflops']['A100']:g} TFLOP/s bf16) and H100 "
        f"({r['peak_tflops']['H100']:g} TFLOP/s bf16 dense).",
        "",
        "| stage | acoustic tokens | seq len | target tokens/s | target tokens | sequence tokens | FLOPs "
        "| A100 GPU-h | H100 GPU-h |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["compute"]:
        lines.append(
            f"| {c['stage']} | {c['tokens']} | {c['seq_len']:,} | {c['target_tokens_per_s']:g} | "
            f"{_sci(c['target_tokens'])} | {_sci(c['sequence_tokens'])} | {_sci(c['flops'])} | "
            f"{c['gpu_hours_A100']:,.0f} | {c['gpu_hours_H100']:,.0f} |"
        )
    lines += [
        "",
        "The semantic stage's rows are the same for both acoustic tokenizers (it sees no acoustic tokens).",
        "Wall-clock time for an epoch on G GPUs is GPU-hours / G (at the same MFU).",
        "",
    ]
    if r.get("simulation"):
        from musiclm.bench.corpus_sim import render_markdown as render_simulation

        lines.append(render_simulation(r["simulation"], r["hours"]))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Memory and compute of the paper-sized stage models.")
    ap.add_argument("--write", metavar="PATH", help="write the markdown report here (e.g. docs/scaling.md)")
    ap.add_argument("--json", action="store_true", help="print the JSON result instead of markdown")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--hours", type=float, default=280_000)
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--simulate", action="store_true", help="also write and measure a synthetic corpus")
    ap.add_argument("--sim-shards", type=int, default=2048, help="local shards of the simulated corpus")
    ap.add_argument("--sim-samples-per-shard", type=int, default=8)
    ap.add_argument("--sim-s3-shards", type=int, default=512, help="shards written to moto S3 (0: skip S3)")
    ap.add_argument("--sim-json", metavar="PATH", help="also write the simulation's figures here as JSON")
    ap.add_argument(
        "--sim-from", metavar="PATH", help="render a simulation saved with --sim-json instead of running one"
    )
    a = ap.parse_args(argv)
    r = run(
        preset=a.preset,
        hours=a.hours,
        mfu=a.mfu,
        simulate=a.simulate and not a.sim_from,
        sim_shards=a.sim_shards,
        sim_samples_per_shard=a.sim_samples_per_shard,
        sim_s3_shards=a.sim_s3_shards,
    )
    if a.sim_from:
        from musiclm.bench.corpus_sim import extrapolate

        with open(a.sim_from) as f:
            r["simulation"] = json.load(f)["simulation"]
        r["simulation_extrapolated"] = extrapolate(r["simulation"], r["hours"])
    if a.sim_json and r.get("simulation"):
        with open(a.sim_json, "w") as f:
            json.dump(
                {"simulation": r["simulation"], "extrapolation": r["simulation_extrapolated"]}, f, indent=1, default=str
            )
            f.write("\n")
    md = render_markdown(r)
    if a.write:
        with open(a.write, "w") as f:
            f.write(md)
    if a.json:
        json.dump(r, sys.stdout, indent=2, default=str)
        print()
    elif not a.write:
        print(md)
    return r


if __name__ == "__main__":
    main()
