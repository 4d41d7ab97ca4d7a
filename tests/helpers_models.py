"""Tiny random transformers models saved with ``save_pretrained`` (no network), for tests.

Each ``make_tiny_*`` writes a directory that loads through the same ``from_pretrained`` calls
that users with network make with a hub id, and returns the directory path. All are seeded.

    make_tiny_encodec(dir)      EncodecModel, 24 kHz, hop 320 (75 Hz), bandwidths 1.5/3/6 (2/4/8 levels x 1024)
    make_tiny_hubert(dir)       HubertModel (2 layers, 50 Hz) + Wav2Vec2FeatureExtractor, 16 kHz
    make_tiny_w2v_bert(dir)     Wav2Vec2BertModel (2 layers) + SeamlessM4TFeatureExtractor, 16 kHz
    make_tiny_clap(dir)         ClapModel (projection 32-d) + ClapProcessor (1 s windows at 48 kHz,
                                byte-level RoBERTa tokenizer)
    make_tiny_tokenizer_config(root)  the config section of musiclm.tokenizers.build_tokenizers
                                with all of the above plus fitted k-means and quantizer
    random_encodec_24khz(dir)   the real facebook/encodec_24khz config with random weights
    sine_batch(...)             test audio (sines + a little noise)
"""

from __future__ import annotations

import os

import numpy as np
import torch

from musiclm.codec.encodec import random_encodec_24khz, randomize_codebooks

__all__ = [
    "make_tiny_clap",
    "make_tiny_encodec",
    "make_tiny_hubert",
    "make_tiny_tokenizer_config",
    "make_tiny_w2v_bert",
    "random_encodec_24khz",
    "sine_batch",
]


def _prep(directory) -> str:
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    return directory


def make_tiny_encodec(directory, seed: int = 0, target_bandwidths=(1.5, 3.0, 6.0)) -> str:
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(seed)
    config = EncodecConfig(
        target_bandwidths=list(target_bandwidths),
        sampling_rate=24_000,
        hidden_size=16,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 2],
        num_lstm_layers=1,
        codebook_size=1024,
        codebook_dim=16,
    )
    model = EncodecModel(config).eval()
    randomize_codebooks(model, seed, scale=0.3)
    directory = _prep(directory)
    model.save_pretrained(directory)
    return directory


def make_tiny_hubert(directory, seed: int = 0) -> str:
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(seed)
    config = HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16, 16, 16, 16, 16, 16),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        vocab_size=32,
    )
    model = HubertModel(config).eval()
    fe = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )
    directory = _prep(directory)
    model.save_pretrained(directory)
    fe.save_pretrained(directory)
    return directory


def make_tiny_w2v_bert(directory, seed: int = 0) -> str:
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    torch.manual_seed(seed)
    config = Wav2Vec2BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        feature_projection_input_dim=160,
        conv_depthwise_kernel_size=3,
        left_max_position_embeddings=8,
        right_max_position_embeddings=4,
        vocab_size=32,
    )
    model = Wav2Vec2BertModel(config).eval()
    fe = SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, sampling_rate=16_000, stride=2)
    directory = _prep(directory)
    model.save_pretrained(directory)
    fe.save_pretrained(directory)
    return directory


def _tiny_roberta_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=64)


def make_tiny_clap(directory, seed: int = 0, projection_dim: int = 32, window_seconds: int = 1) -> str:
    """Tiny ClapModel + ClapProcessor. The feature extractor's ``max_length_s`` (the CLAP window)
    is ``window_seconds`` (10 s in the real model) so tests exercise multi-window averaging."""
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        ClapTextConfig,
    )

    torch.manual_seed(seed)
    tokenizer = _tiny_roberta_tokenizer()
    text_config = ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=80,
        pad_token_id=1,
    )
    audio_config = ClapAudioConfig(
        num_mel_bins=16,
        window_size=4,
        spec_size=64,
        patch_size=2,
        patch_stride=2,
        freq_ratio=2,
        hidden_size=256,
        patch_embeds_hidden_size=32,
        projection_dim=projection_dim,
        num_hidden_layers=4,
        depths=[1, 1, 1, 1],
        num_attention_heads=[2, 2, 2, 2],
        intermediate_size=37,
        enable_fusion=False,
    )
    config = ClapConfig(
        text_config=text_config.to_dict(), audio_config=audio_config.to_dict(), projection_dim=projection_dim
    )
    model = ClapModel(config).eval()
    fe = ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=48_000,
        hop_length=480,
        max_length_s=window_seconds,
        fft_window_size=1024,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    processor = ClapProcessor(feature_extractor=fe, tokenizer=tokenizer)
    directory = _prep(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def sine_batch(
    batch: int = 2, seconds: float = 2.0, sample_rate: int = 24_000, seed: int = 0, noise: float = 0.01
) -> torch.Tensor:
    """float32 ``[batch, seconds * sample_rate]``: a different chord of sines per row + noise."""
    g = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    rows = []
    for _ in range(batch):
        freqs = 110.0 * 2 ** (g.integers(0, 36, size=3) / 12.0)
        x = sum(0.2 * np.sin(2 * np.pi * f * t + g.uniform(0, 6.28)) for f in freqs)
        x = x + noise * g.standard_normal(n)
        rows.append(x)
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def make_tiny_tokenizer_config(root, *, semantic: str = "mfcc", seed: int = 0, levels: int = 4) -> dict:
    """Build every tiny model under ``root`` and return the tokenizers config section:
    tiny EnCodec (6 kbps = 8 levels), ``semantic`` features ("mfcc", "logmel" or "hf" = tiny
    HuBERT) with k-means (16 clusters) fitted on sine audio, tiny CLAP and a MuLaNEmbedQuantizer
    (``levels`` tokens per namespace, 1024 codes) fitted on CLAP embeddings of sine audio."""
    from musiclm.mulan import build_embedder
    from musiclm.quantize import MuLaNEmbedQuantizer
    from musiclm.semantic import SemanticFeatures, fit_kmeans, save_centroids

    root = _prep(root)
    enc = make_tiny_encodec(os.path.join(root, "encodec"), seed=seed)
    clap = make_tiny_clap(os.path.join(root, "clap"), seed=seed)
    if semantic == "hf":
        feats_cfg = {
            "type": "hf",
            "model": make_tiny_hubert(os.path.join(root, "hubert"), seed=seed),
            "layer": 1,
            "rate": 25,
        }
    else:
        feats_cfg = {"type": semantic, "rate": 25}
    feats = SemanticFeatures.from_config(feats_cfg)
    wav = sine_batch(4, 2.0, feats.sample_rate, seed=seed + 1)
    centroids = fit_kmeans([feats(wav)], n_clusters=16, seed=seed)
    kmeans = save_centroids(os.path.join(root, "kmeans.safetensors"), centroids, feats.config())

    embedder = build_embedder({"type": "clap", "model": clap})
    emb = embedder.embed_audio(sine_batch(12, 1.0, embedder.sample_rate, seed=seed + 2))
    quant = MuLaNEmbedQuantizer(dim=embedder.dim, levels=levels, codebook_size=1024)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.fit(emb, seed=seed)
    qdir = quant.save(os.path.join(root, "quantizer"))
    return {
        "acoustic": {"type": "encodec", "model": enc, "bandwidth": 6.0},
        "semantic": {"features": feats_cfg, "kmeans": kmeans},
        "mulan": {"type": "clap", "model": clap},
        "quantizer": qdir,
    }
