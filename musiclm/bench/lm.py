"""`musiclm bench lm`: our stage transformer, eager and compiled, against a plain SDPA transformer
and transformers' GPT2LMHeadModel of the same shape.

Three models with the same depth, width, heads, vocabulary and sequence length, no dropout, tied
embeddings and SDPA attention:

- ``ours``: ``musiclm.lm.Transformer`` (rotary positions in real arithmetic, fused qkv),
- ``plain``: the textbook pre-norm GPT (learned position table, ``is_causal`` SDPA, GELU MLP;
  :class:`PlainGPT` below), the floor a stage model should not fall under,
- ``gpt2``: ``transformers.GPT2LMHeadModel`` (random init, ``attn_implementation="sdpa"``).

Each runs eager and ``torch.compile``d (inductor; the module compiled in place, as
``maybe_compile`` and the engine's ``train.compile`` do). One training step is forward +
cross-entropy + backward + AdamW step, fp32, one process. Every variant gets ``warmup`` steps
first (the first compiled one includes the compile: reported as ``compile_s``), then ``repeats``
rounds of ``steps`` steps each, the variants taking turns in a rotated order so that all of them
see the same machine conditions; tokens/s come from the median step time (and the best step, the
least disturbed by other processes on a shared machine).

    musiclm bench lm                                   # d=384, 6 layers, 6 heads, T=1024, B=4
    musiclm bench lm --set d_model=128 n_layer=2 n_head=2 seq_len=256 compile=false
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import time

import torch
import torch.nn as nn
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

MODELS = ("ours", "plain", "gpt2")

# The goals (a benchmark, not a test): ratio name -> minimum.
GOALS = {
    "ours_eager_vs_plain_eager": 1.0,
    "ours_compiled_vs_ours_eager": 1.2,
    "ours_compiled_vs_plain_compiled": 1.0,
}


# --------------------------------------------------------------------------------------------
# The plain SDPA transformer


class _PlainBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """nanoGPT's model without extras: token + learned position embeddings, pre-norm blocks,
    tied output projection."""

    def __init__(self, n_layer: int, n_head: int, d_model: int, vocab_size: int, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_PlainBlock(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


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


# --------------------------------------------------------------------------------------------
# One training step


class _Variant:
    """A model (eager or compiled in place) with its own AdamW."""

    def __init__(self, name: str, model: nn.Module, compiled: bool):
        self.name, self.model, self.compiled = name, model.train(), compiled
        self.gpt2 = name == "gpt2"
        if compiled:
            model.compile()  # in place (nn.Module.compile), as DeepSpeed's engine.compile() does
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        self.times: list[float] = []
        self.first_s: float | None = None

    def step(self, x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        logits = self.model(input_ids=x).logits if self.gpt2 else self.model(x)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss = loss.item()
        dt = time.perf_counter() - t0
        if self.first_s is None:
            self.first_s = dt
        return dt


def _cxx_compiler() -> str | None:
    for name in ("g++", "c++", "clang++", "gcc", "cc"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run(
    d_model: int = 384,
    n_layer: int = 6,
    n_head: int = 6,
    seq_len: int = 1024,
    batch_size: int = 4,
    vocab_size: int | None = None,
    steps: int = 2,
    repeats: int = 3,
    warmup: int = 2,
    threads: int | None = None,
    compile: bool = True,
    models: list[str] | tuple[str, ...] = MODELS,
    preset: str | None = None,
    seed: int = 0,
) -> dict:
    """Tokens/s of forward + backward + AdamW for each model, eager and (``compile``) compiled.

    vocab_size defaults to the coarse stage's vocabulary for the default token layout (13,376);
    ``preset`` (tiny/small/base/paper) replaces d_model/n_layer/n_head."""
    if threads:
        torch.set_num_threads(threads)
    if preset is not None:
        d_model, n_layer, n_head = (PRESETS[preset][k] for k in ("d_model", "n_layer", "n_head"))
    if vocab_size is None:
        vocab_size = get_stage("coarse", DEFAULT_TOKENS, 5.0).vocab_size
    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compiler = _cxx_compiler()
    if compile and device == "cpu" and compiler is None:
        raise RuntimeError(
            "torch.compile (inductor) on CPU needs a C++ compiler (g++); none on PATH: pass compile=false"
        )

    torch.manual_seed(seed)
    built = {
        "ours": lambda: Transformer(
            TransformerConfig(
                vocab_size=vocab_size, max_seq_len=seq_len, n_layer=n_layer, n_head=n_head, d_model=d_model
            )
        ),
        "plain": lambda: PlainGPT(n_layer, n_head, d_model, vocab_size, seq_len),
        "gpt2": lambda: _gpt2(n_layer, n_head, d_model, vocab_size, seq_len),
    }
    variants: list[_Variant] = []
    for name in [m for m in MODELS if m in models]:
        base = built[name]().to(device)
        variants.append(_Variant(name, base, compiled=False))
        if compile:
            variants.append(_Variant(name, copy.deepcopy(base), compiled=True))
    x = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)

    t_start = time.time()
    for v in variants:  # warm-up; the compiled variants compile here
        for _ in range(warmup):
            v.step(x)
    for r in range(repeats):  # rounds, each starting with another variant
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            for _ in range(steps):
                v.times.append(v.step(x))

    tokens = batch_size * seq_len
    result: dict = {
        "bench": "lm",
        "config": {
            "d_model": d_model,
            "n_layer": n_layer,
            "n_head": n_head,
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "steps": steps,
            "repeats": repeats,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "device": device,
            "dtype": "float32",
            "optimizer": "torch AdamW (foreach)",
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cxx_compiler": compiler,
            "compile": bool(compile),
        },
    }
    for v in variants:
        entry = result.setdefault(v.name, {"params": sum(p.numel() for p in v.model.parameters())})
        if v.name == "ours":
            entry["flops_per_token"] = v.model.flops_per_token(seq_len)
        if v.name == "gpt2":
            entry["attn_implementation"] = getattr(v.model.config, "_attn_implementation", None)
        med = statistics.median(v.times)
        fig = {"step_s": med, "tokens_per_s": tokens / med, "tokens_per_s_best": tokens / min(v.times)}
        if v.compiled:
            # the first step traces and generates code for forward and backward (one step of compute included)
            entry["compiled"] = {**fig, "compile_s": v.first_s}
        else:
            entry.update(fig)
    if "ours" in result:
        ours = result["ours"]
        ours["gflop_per_s"] = ours["tokens_per_s"] * ours["flops_per_token"] / 1e9
    result["bench_s"] = time.time() - t_start

    def tps(name: str, compiled: bool) -> float | None:
        e = result.get(name)
        if e is None:
            return None
        e = e.get("compiled") if compiled else e
        return None if e is None else e["tokens_per_s"]

    ratios = {}
    pairs = {
        "ours_eager_vs_plain_eager": (("ours", False), ("plain", False)),
        "ours_eager_vs_gpt2_eager": (("ours", False), ("gpt2", False)),
        "ours_compiled_vs_ours_eager": (("ours", True), ("ours", False)),
        "ours_compiled_vs_plain_compiled": (("ours", True), ("plain", True)),
        "ours_compiled_vs_gpt2_compiled": (("ours", True), ("gpt2", True)),
        "plain_compiled_vs_plain_eager": (("plain", True), ("plain", False)),
        "gpt2_compiled_vs_gpt2_eager": (("gpt2", True), ("gpt2", False)),
    }
    for key, (a, b) in pairs.items():
        ta, tb = tps(*a), tps(*b)
        if ta is not None and tb is not None:
            ratios[key] = ta / tb
    result["ratios"] = ratios
    result["goals"] = {
        k: {"min": g, "value": ratios.get(k), "met": ratios[k] >= g if k in ratios else None} for k, g in GOALS.items()
    }
    if "gpt2" in result and "ours" in result:
        result["speedup_vs_gpt2"] = ratios["ours_eager_vs_gpt2_eager"]
        result["speedup_vs_gpt2_best"] = result["ours"]["tokens_per_s_best"] / result["gpt2"]["tokens_per_s_best"]
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    r = run(
        a.d_model,
        a.n_layer,
        a.n_head,
        a.seq_len,
        a.batch_size,
        a.vocab_size,
        a.steps,
        a.repeats,
        a.warmup,
        a.threads,
        compile=not a.no_compile,
    )
    print(json.dumps(r, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    main()
