"""Training: one DeepSpeed loop for every stage.

- ``spec``: the TrainSpec registry (``register_train_spec``, ``get_train_spec``); stages register
  from ``lm_stages`` (semantic, coarse, fine) and other ``*_stage`` modules (mulan, codec, ...);
- ``engine``: the loop (``Trainer``, ``train_main`` = ``launch/train.py``);
- ``data``: shard batches per rank/worker with an exact resume position;
- ``checkpoint``: complete-or-invisible checkpoints, resume, universal conversion;
- ``monitor``: TensorBoard, metrics.jsonl, loss.png;
- ``export``: ``export(run_dir, out_path)`` -> consolidated safetensors + config JSON.

Only this package imports deepspeed, lazily inside the functions that need it, so importing
``musiclm.train.spec`` to register a stage stays cheap.
"""

from .spec import TrainSpec, get_train_spec, list_train_specs, register_train_spec

__all__ = ["TrainSpec", "get_train_spec", "list_train_specs", "register_train_spec", "train_main"]


def train_main(argv=None) -> int:
    """``launch/train.py``'s main (run it under the deepspeed launcher)."""
    from .engine import train_main as _main

    return _main(argv)
