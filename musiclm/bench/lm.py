"""`musiclm bench lm`: our stage transformer against transformers' GPT2LMHeadModel.

Both models get the same depth, width, heads, vocabulary and sequence length, no dropout, tied
embeddings and SDPA attention; GPT-2 additionally has its learned position table. We time
forward + cross-entropy + backward (no optimizer step) in fp32 on this machine's CPU, alternating
the two models step by step (and which goes first) so that both see the same machine conditions,
and report tokens/s from the median step time (and from the best step: the least disturbed by
other processes on a shared machine).

    python -m musiclm.bench.lm --preset small --seq-len 512 --batch-size 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from musiclm.lm import PRESETS, Transformer, TransformerConfig, get_stage

# The default `tokens:` section of the token shards (shards/README.md): EnCodec 75 Hz, 8 levels;
# 8 MuLaN tokens per namespace.
DEFAULT_TOKENS = dict(
    acoustic_levels=8,
    acoustic_codebook=1024,
    acoustic_rate=75,
    coarse_levels=4,
    semantic_vocab=1024,
    semantic_rate=25,
    cond_levels=8,
    cond_codebook=1024,
)


def _gpt2(n_layer, n_head, d_model, vocab_size, seq_len):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=d_model,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    try:
        return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    except (TypeError, ValueError, AttributeError):
        return GPT2LMHeadModel(cfg)


def _step(model, x, gpt2: bool):
    logits = model(input_ids=x).logits if gpt2 else model(x)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss.item()


def run(
    preset: str = "small",
    seq_len: int = 512,
    batch_size: int = 4,
    steps: int = 5,
    warmup: int = 2,
    threads: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> dict:
    """Tokens/s of forward + backward for both models. vocab_size defaults to the coarse stage's
    vocabulary for the default token layout (13,376)."""
    if threads:
        torch.set_num_threads(threads)
    if vocab_size is None:
        vocab_size = get_stage("coarse", DEFAULT_TOKENS, 5.0).vocab_size
    sizes = PRESETS[preset]
    torch.manual_seed(seed)
    ours = Transformer(TransformerConfig.from_preset(preset, vocab_size=vocab_size, max_seq_len=seq_len)).train()
    gpt2 = _gpt2(sizes["n_layer"], sizes["n_head"], sizes["d_model"], vocab_size, seq_len).train()
    attn_impl = getattr(gpt2.config, "_attn_implementation", None)
    x = torch.randint(0, vocab_size, (batch_size, seq_len))
    times = {"ours": [], "gpt2": []}
    pair = [("ours", ours), ("gpt2", gpt2)]
    for i in range(warmup + steps):
        for name, model in pair if i % 2 == 0 else pair[::-1]:  # alternate who goes first
            t0 = time.perf_counter()
            _step(model, x, name == "gpt2")
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = batch_size * seq_len
    result = {
        "bench": "lm",
        "preset": preset,
        "config": {
            **sizes,
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "steps": steps,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "dtype": "float32",
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "gpt2_attn_implementation": attn_impl,
        },
    }
    for name, model in (("ours", ours), ("gpt2", gpt2)):
        med = statistics.median(times[name])
        result[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "step_s": med,
            "tokens_per_s": tokens / med,
            "tokens_per_s_best": tokens / min(times[name]),  # least disturbed by other processes
        }
    result["ours"]["flops_per_token"] = ours.flops_per_token(seq_len)
    result["ours"]["gflop_per_s"] = result["ours"]["tokens_per_s"] * ours.flops_per_token(seq_len) / 1e9
    result["speedup_vs_gpt2"] = result["ours"]["tokens_per_s"] / result["gpt2"]["tokens_per_s"]
    result["speedup_vs_gpt2_best"] = result["ours"]["tokens_per_s_best"] / result["gpt2"]["tokens_per_s_best"]
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None)
    a = ap.parse_args(argv)
    r = run(a.preset, a.seq_len, a.batch_size, a.steps, a.warmup, a.threads, a.vocab_size)
    print(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
