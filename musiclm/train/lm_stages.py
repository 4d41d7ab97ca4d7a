"""The three MusicLM stage LMs (semantic, coarse, fine) as TrainSpecs.

Each wraps a ``musiclm.lm.stages.Stage``: the stage gives the batch layout (``example`` /
``collate``) and the objective (``loss``); the model is the one ``Transformer`` class sized by a
preset. Config keys read here (the rest belong to the engine)::

    tokens:            # the shard token layout (musiclm.lm.stages.TokenLayout) + windows
      acoustic_levels: 8
      ...
      window_seconds: {semantic: 10, coarse: 5, fine: 2}
    window_seconds: 5  # optional: overrides tokens.window_seconds[stage]
    model:
      preset: small    # tiny | small | base | paper
      dropout: 0.0     # any TransformerConfig field overrides the preset
    cond_dropout: 0.1  # classifier-free guidance: P(conditioning tokens -> NULL_COND)
"""

from __future__ import annotations

import json

from musiclm.lm.model import Transformer
from musiclm.lm.stages import PAD, STAGES, Stage, get_stage

from .spec import TrainSpec, register_train_spec

_CACHE: dict[str, Stage] = {}


def stage_for(name: str, cfg: dict) -> Stage:
    """The Stage of ``name`` under ``cfg`` (memoised on the relevant config keys)."""
    window = cfg.get("window_seconds")
    if isinstance(window, dict):
        window = window.get(name)
    key = json.dumps([name, cfg.get("tokens") or {}, window], sort_keys=True, default=str)
    st = _CACHE.get(key)
    if st is None:
        st = _CACHE[key] = get_stage(name, cfg.get("tokens") or {}, window)
    return st


def model_config_for(name: str, cfg: dict):
    m = dict(cfg.get("model") or {})
    preset = m.pop("preset", "small")
    return stage_for(name, cfg).model_config(preset, **m)


def _make_spec(name: str) -> TrainSpec:
    def configure(cfg):
        stage_for(name, cfg)  # builds (and checks) the layout before any work

    def build_model(cfg):
        return Transformer(model_config_for(name, cfg))

    def build_example(sample, rng, cfg):
        return stage_for(name, cfg).example(sample, rng, float(cfg.get("cond_dropout", 0.0) or 0.0))

    def loss(model, batch, cfg):
        logits = model(batch["tokens"])
        return stage_for(name, cfg).loss(logits, batch)

    def expected_fingerprints(cfg):
        # the whole tokens: section, not only this stage's streams: the three stages usually train
        # on the same shards, and a glob must resolve to the same folder. The engine asks only for
        # the tokenizers a folder was made with or this stage's streams need (streams below), so
        # semantic-only shards need no acoustic fingerprint.
        out: dict = {}
        for other in STAGES:
            for tok, fields_ in stage_for(other, cfg).expected_fingerprint_fields().items():
                out.setdefault(tok, {}).update(fields_)
        return out

    def streams(cfg):
        return stage_for(name, cfg).streams

    def count_tokens(batch):
        # tokens the model actually runs on (padding excluded)
        return int((batch["tokens"] != PAD).sum())

    def flops_per_token(model, cfg):
        return float(model.flops_per_token(stage_for(name, cfg).seq_len))

    def model_config(cfg):
        st = stage_for(name, cfg)
        return {
            "kind": "musiclm.stage_lm",
            "stage": name,
            "model": model_config_for(name, cfg).to_dict(),
            "tokens": {k: v for k, v in (cfg.get("tokens") or {}).items()},
            "window_seconds": st.window_seconds,
            "layout": st.describe(),
        }

    return TrainSpec(
        name=name,
        data_kind="tokens",
        build_model=build_model,
        build_example=build_example,
        collate=Stage.collate,
        loss=loss,
        configure=configure,
        expected_fingerprints=expected_fingerprints,
        streams=streams,
        config_keys=("tokens", "model", "cond_dropout", "window_seconds"),
        count_tokens=count_tokens,
        flops_per_token=flops_per_token,
        model_config=model_config,
        description=f"MusicLM {name} stage LM (musiclm.lm.stages)",
    )


for _name in STAGES:
    register_train_spec(_make_spec(_name), overwrite=True)


__all__ = ["stage_for", "model_config_for"]
