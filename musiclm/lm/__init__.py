"""The stage language models: one transformer class (model.py), stage sequence layouts (stages.py)."""

from .model import PRESETS, KVCache, Transformer, TransformerConfig, load_stage_model
from .stages import (
    BOS,
    DEMO_WINDOWS,
    EOS,
    N_SPECIAL,
    NULL_COND,
    PAD,
    PAPER_WINDOWS,
    SEP,
    STAGES,
    Stage,
    TokenLayout,
    get_stage,
)

__all__ = [
    "PRESETS",
    "KVCache",
    "Transformer",
    "TransformerConfig",
    "load_stage_model",
    "Stage",
    "TokenLayout",
    "get_stage",
    "STAGES",
    "PAPER_WINDOWS",
    "DEMO_WINDOWS",
    "PAD",
    "BOS",
    "SEP",
    "EOS",
    "NULL_COND",
    "N_SPECIAL",
]
