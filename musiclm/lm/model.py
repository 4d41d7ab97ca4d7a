"""One decoder-only transformer for every MusicLM stage (semantic, coarse, fine).

Written nanoGPT-style, to be read top to bottom:

- pre-norm blocks (LayerNorm -> attention -> residual, LayerNorm -> MLP -> residual),
- rotary position embeddings on queries and keys (pairs of channels rotated, in real arithmetic),
- attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU,
  the fused CPU kernel on CPU),
- optional activation checkpointing per block (``TransformerConfig.checkpointing``),
- a simple per-layer KV cache for generation: ``forward(tokens, cache=cache)`` appends the new
  keys/values and attends to everything cached so far,
- GPT-2 weight init (N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)), tied or
  untied input/output embeddings,
- ``maybe_compile(model, enabled)``: ``torch.compile`` in place (the engine's ``train.compile``,
  generation's flag); nothing in the forward breaks the graph (no complex ops, no data-dependent
  Python branches),
- dtype aware: whatever dtype the parameters have (fp32, bf16, fp16) is the compute dtype; rotary
  rotations are applied in fp32 from an fp32 table that model.to(dtype) never rounds, sampling works
  on fp32 logits, the stage loss upcasts logits.

A stage is only a sequence layout (``musiclm.lm.stages``); the model knows nothing about audio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Sizes only; vocab_size and max_seq_len come from the stage (Stage.model_config).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, d_model=64),  # unit tests
    "small": dict(n_layer=4, n_head=4, d_model=256),  # the demo: trains on 2 CPU cores in minutes
    "base": dict(n_layer=12, n_head=12, d_model=768),
    "paper": dict(n_layer=24, n_head=16, d_model=1024),  # MusicLM / AudioLM stage models
}


@dataclass
class TransformerConfig:
    vocab_size: int = 1024
    max_seq_len: int = 1024  # rotary tables are built for this length (extended on demand)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm (GPT-2 has them)
    tie_embeddings: bool = True  # lm_head.weight is tok_emb.weight
    checkpointing: bool = False  # activation checkpointing per block (training only)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TransformerConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TransformerConfig keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_frequencies(head_dim: int, length: int, base: float, device=None) -> torch.Tensor:
    """Rotation tables for positions 0..length-1: cos and sin of pos * theta_j, fp32
    [length, head_dim // 2, 2] (real arithmetic: torch.compile fuses it, it cannot fuse complex ops)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, hd] (any float dtype); freqs [L, hd/2, 2] (cos, sin). Rotates the pairs
    (x[2j], x[2j+1]) by pos * theta_j in fp32: the complex product (a + ib)(cos + i sin)."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs[:, None, :, 0], freqs[:, None, :, 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


# --------------------------------------------------------------------------------------------
# KV cache


class LayerKV:
    """Preallocated key/value buffers of one layer: [B, H, max_len, hd]."""

    def __init__(self, batch_size: int, n_head: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache overflow: position {end} > max_len {self.k.size(2)}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One LayerKV per block plus the number of positions filled (``length``)."""

    def __init__(self, cfg: TransformerConfig, batch_size: int, max_len: int, device=None, dtype=None):
        self.layers = [
            LayerKV(batch_size, cfg.n_head, cfg.head_dim, max_len, device, dtype) for _ in range(cfg.n_layer)
        ]
        self.length = 0
        self.max_len = max_len


# --------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.head_dim, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, freqs, kv: LayerKV | None = None, start_pos: int = 0):
        B, L, D = x.shape
        H, hd = self.n_head, self.head_dim
        qk, v = self.qkv(x).split([2 * D, D], dim=2)
        qk = apply_rope(qk.view(B, L, 2 * H, hd), freqs)  # queries and keys rotated together
        q, k = qk.transpose(1, 2).split(H, dim=1)  # [B, H, L, hd]
        v = v.view(B, L, H, hd).transpose(1, 2)
        if kv is not None:
            k, v = kv.update(k, v, start_pos)  # everything cached so far, this chunk included
        Lk = k.size(2)
        mask, causal = None, False
        if Lk == L:
            causal = True  # plain training / prefill from position 0
        elif L > 1:  # a chunk appended to a cache: query i sits at absolute position start_pos + i
            q_pos = torch.arange(start_pos, start_pos + L, device=x.device)
            mask = torch.arange(Lk, device=x.device)[None, :] <= q_pos[:, None]
        # (L == 1 with a cache: the new token attends to every cached position; no mask)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, L, D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, freqs, kv: LayerKV | None = None, start_pos: int = 0):
        x = x + self.attn(self.norm1(x), freqs, kv, start_pos)
        x = x + self.mlp(self.norm2(x))
        return x


# --------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Rotary table: a plain attribute, not a buffer, so that casting the model to bf16/fp16
        # never rounds it; built (and moved) lazily on the device of the activations.
        self._rope_freqs: torch.Tensor | None = None
        # GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- sizes ---------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied embedding counts once). non_embedding drops the input table
        (and with it the tied output projection)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N_matmul + 12 * n_layer * d_model * seq_len (PaLM, appendix B).

        N_matmul = parameters that take part in a matmul: everything but the input lookup table,
        plus the output projection (which is that table again when embeddings are tied). The
        attention term counts the full (not causally halved) score and value matmuls."""
        c = self.cfg
        n = self.num_params(non_embedding=True) + c.vocab_size * c.d_model
        return 6.0 * n + 12.0 * c.n_layer * c.d_model * seq_len

    def compile(self, *args, **kwargs) -> None:
        """``nn.Module.compile`` (in place; DeepSpeed's ``engine.compile()`` calls it), with the
        rotary table built first: building it inside the compiled forward changes the module's
        state, and the next call would compile a second graph."""
        self._rope(0, self.cfg.max_seq_len, self.tok_emb.weight.device)
        super().compile(*args, **kwargs)

    # -- forward -------------------------------------------------------------------------------

    def _rope(self, start: int, length: int, device) -> torch.Tensor:
        f, end = self._rope_freqs, start + length
        if f is None or f.device != device or f.size(0) < end:  # also extends past max_seq_len
            n = max(end, self.cfg.max_seq_len, 0 if f is None else 2 * f.size(0))
            f = self._rope_freqs = rope_frequencies(self.cfg.head_dim, n, self.cfg.rope_base, device)
        return f[start:end]

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens [B, L] -> logits [B, L, V] (or [B, 1, V] with last_only).

        With a cache, ``tokens`` continue the cached sequence at ``start_pos`` (default: the
        cache's current length) and the cache is extended by L positions."""
        B, L = tokens.shape
        if start_pos is None:
            start_pos = cache.length if cache is not None else 0
        x = self.drop(self.tok_emb(tokens))
        freqs = self._rope(start_pos, L, x.device)
        use_ckpt = self.cfg.checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            kv = cache.layers[i] if cache is not None else None
            if use_ckpt:
                x = checkpoint(block, x, freqs, None, start_pos, use_reentrant=False)
            else:
                x = block(x, freqs, kv, start_pos)
        if cache is not None:
            cache.length = start_pos + L
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm_f(x))

    # -- generation ----------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, max_len, device=device or p.device, dtype=dtype or p.dtype)

    @torch.no_grad()
    def sample(
        self,
        prefix: torch.Tensor,
        n_new: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        cond_scale: float = 1.0,
        logits_mask: torch.Tensor | None = None,
        null_prefix: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        return_logits: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sample ``n_new`` tokens after ``prefix`` [B, L] (or [L]); returns only the new tokens [B, n_new].

        - temperature <= 0 is greedy decoding; top_k keeps the k most likely allowed tokens; top_p
          (nucleus) keeps the smallest set of most likely tokens whose probability reaches top_p.
        - logits_mask: bool [V] or [n_new, V], True = allowed at that step (e.g. the vocabulary range
          of acoustic level q at step t: ``Stage.target_logits_mask``).
        - classifier-free guidance when cond_scale != 1: ``null_prefix`` is the same prefix with the
          conditioning tokens replaced by NULL_COND (``Stage.prefix(cond=None, ...)``). Both run as
          one batch of 2B through the KV cache; logits = null + cond_scale * (cond - null).
        - use_cache=False recomputes the whole sequence at every step (the reference the KV cache
          must match, and the baseline of ``musiclm bench generate``).
        - return_logits: also return the guided fp32 logits of every step [B, n_new, V] (before the
          mask, temperature and truncation).
        - on_token: called with 1 after every sampled step (a progress bar's ``update``).
        """
        if prefix.dim() == 1:
            prefix = prefix[None]
            null_prefix = null_prefix[None] if null_prefix is not None and null_prefix.dim() == 1 else null_prefix
        B, L = prefix.shape
        guided = cond_scale != 1.0
        x = prefix
        if guided:
            if null_prefix is None or null_prefix.shape != prefix.shape:
                raise ValueError("cond_scale != 1 needs null_prefix with the shape of prefix")
            x = torch.cat([prefix, null_prefix.to(prefix.device)], dim=0)
        if logits_mask is not None:
            logits_mask = logits_mask.to(prefix.device)
            if logits_mask.dim() == 2 and logits_mask.size(0) < n_new:
                raise ValueError(f"logits_mask has {logits_mask.size(0)} rows for {n_new} steps")
        was_training = self.training
        self.eval()
        try:
            cache = self.new_cache(x.size(0), L + n_new) if use_cache else None
            logits = self(x, cache=cache, last_only=True)[:, -1]
            out, raw = [], []
            for t in range(n_new):
                lg = logits.float()
                if guided:
                    cond, null = lg[:B], lg[B:]
                    lg = null + cond_scale * (cond - null)
                if return_logits:
                    raw.append(lg)
                if logits_mask is not None:
                    allowed = logits_mask[t] if logits_mask.dim() == 2 else logits_mask
                    lg = lg.masked_fill(~allowed, float("-inf"))
                if temperature is None or temperature <= 0:
                    nxt = lg.argmax(dim=-1, keepdim=True)
                else:
                    lg = lg / temperature
                    if top_k is not None and top_k > 0:
                        kth = torch.topk(lg, min(top_k, lg.size(-1)), dim=-1).values[:, -1:]
                        lg = lg.masked_fill(lg < kth, float("-inf"))
                    if top_p is not None and 0 < top_p < 1:
                        lg = _top_p_filter(lg, top_p)
                    nxt = torch.multinomial(F.softmax(lg, dim=-1), 1, generator=generator)
                out.append(nxt)
                if on_token is not None:
                    on_token(1)
                if t + 1 < n_new:
                    step = torch.cat([nxt, nxt]) if guided else nxt
                    if use_cache:
                        logits = self(step, cache=cache)[:, -1]
                    else:
                        x = torch.cat([x, step], dim=1)
                        logits = self(x, last_only=True)[:, -1]
            tokens = torch.cat(out, dim=1) if out else prefix.new_zeros(B, 0)
            if return_logits:
                V = self.cfg.vocab_size
                return tokens, (torch.stack(raw, dim=1) if raw else logits.new_zeros(B, 0, V).float())
            return tokens
        finally:
            self.train(was_training)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of [B, V] logits: keep the most likely tokens until their probability
    reaches top_p (always at least the most likely one); the rest become -inf."""
    sorted_lg, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_lg, dim=-1)
    # drop a token when the tokens before it already reach top_p
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    drop[:, 0] = False
    sorted_lg = sorted_lg.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_lg)


def maybe_compile(model: nn.Module, enabled: bool, **kwargs) -> nn.Module:
    """``torch.compile`` the model in place (``nn.Module.compile``) when ``enabled``; returns it.

    In place, so ``state_dict`` keys keep their names (no ``_orig_mod.`` prefix) and the object
    others hold a reference to is the compiled one. Compilation happens on the first call (and
    again for each new kind of call: training vs ``no_grad``, a new shape): tens of seconds on a
    CPU, hence off by default there (``train.compile`` / generation's ``compile`` flag). kwargs go
    to ``torch.compile`` (e.g. ``mode="max-autotune"``, ``dynamic=True``)."""
    if enabled:
        model.compile(**kwargs)
    return model


def load_stage_model(weights: str, config: dict | str | None = None, map_location="cpu") -> Transformer:
    """A stage Transformer from exported weights (``musiclm export``): safetensors (or a ``.pt`` read
    with ``weights_only=True``) plus the config JSON written beside it."""
    from musiclm.weights import load_exported

    state, meta = load_exported(weights, config)
    model = Transformer(TransformerConfig.from_dict(meta["model"]))
    model.load_state_dict(state, strict=True)
    return model.to(map_location)
