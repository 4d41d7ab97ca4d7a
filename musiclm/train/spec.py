"""Training specs: what a stage contributes to the one training loop (torchtitan-style registry).

A stage is registered by name and contributes only its model, its batch layout and its
objective; everything else (DeepSpeed engines, data streaming, schedule, checkpoint/resume,
TensorBoard, SIGTERM handling, export) lives in :mod:`musiclm.train.engine` and is shared.

    from musiclm.train.spec import TrainSpec, register_train_spec

    register_train_spec(TrainSpec(
        name="mystage", data_kind="tokens",
        build_model=lambda cfg: MyModel(...),                     # nn.Module, built on every rank
        build_example=lambda sample, rng, cfg: {...tensors...},   # one shard sample -> one example
        collate=lambda examples: {...batched tensors...},
        loss=lambda model, batch, cfg: (loss, {"accuracy": acc}),  # model is the DeepSpeed engine
        config_keys=("mystage",),                                 # top-level config sections it reads
    ))

Contract of the callables:

- ``build_model(cfg) -> nn.Module``: called once per process with the full run config (dict).
- ``build_example(sample, rng, cfg) -> dict | None``: ``sample`` is a decoded shard sample (see
  musiclm.data.shards), ``rng`` a ``numpy.random.Generator`` seeded from (seed, epoch, sample key)
  so the example is the same after a resume; return None to skip a sample. During evaluation the
  engine passes ``cfg`` with ``cond_dropout`` set to 0.
- ``collate(list_of_examples) -> dict`` of tensors; the engine moves tensors to the device.
- ``loss(model, batch, cfg) -> (loss, metrics)``: ``metrics`` maps names to scalar tensors/floats;
  the same names every step (e.g. ``accuracy``, ``loss/level_1``). Logged as ``train/<name>`` and
  ``eval/<name>``. ``cfg`` is the run config (with ``cond_dropout`` 0 during evaluation).
- ``config_keys``: the top-level config sections the stage reads (``tokens``, ``model``, ...);
  with the engine's own (:mod:`musiclm.train.run_config`), any other key is refused before the run.
- ``custom_step(trainer, batch) -> (loss, metrics)`` (optional): replaces the default
  ``forward/backward/step``; it must run backward and ``step()`` on ``trainer.engine`` itself
  (and on any extra engine it created with ``trainer.make_engine``), e.g. generator +
  discriminator for the codec.

Optional hooks (defaults are fine for most specs):

- ``configure(cfg)``: called once before anything else (e.g. to build a stage layout).
- ``eval_step(model, batch, cfg) -> (loss, metrics)``: the held-out evaluation every
  ``train.eval_every`` steps (default: ``loss``); e.g. a GAN evaluates its reconstruction, not a
  discriminator step.
- ``expected_fingerprints(cfg) -> dict``: tokenizer fingerprint fields the shards must have,
  ``{"acoustic": {"frame_rate": 75, ...}, ...}``; checked against ``index.json`` before training.
- ``streams(cfg) -> tuple[str, ...]``: the token-shard streams the stage reads (of ``acoustic``,
  ``semantic``, ``mulan``, ``cond``; see ``musiclm.data.shards.STREAMS``). Shards that carry only
  these are accepted, and a folder without one of them is refused naming the stage, the stream
  and the folder; without the hook a stage reads whatever the shards carry.
- ``count_tokens(batch) -> int``: tokens processed in a batch (tokens/s, MFU); default: numel of
  ``batch["tokens"]`` when present, else the batch size.
- ``flops_per_token(model, cfg) -> float``: training FLOPs per token for MFU; default 6·N.
- ``model_config(cfg) -> dict``: JSON config written next to exported weights.
- ``eval_outputs(model, batch, cfg) -> dict`` and ``eval_summary(outputs, cfg) -> dict``: metrics that
  need the whole eval split at once (retrieval over every clip, a probe). Every
  ``train.split_eval_every`` steps (default: ``eval_every``) the engine runs ``eval_outputs`` on
  every batch of the eval split (at most ``train.split_eval_samples`` samples, default 1000), split
  across the ranks; it returns per-example rows (``{name: tensor [B, ...]}``). The rows of all
  batches and ranks are concatenated in split order and rank 0 calls ``eval_summary`` on them; its
  ``{name: float}`` is logged as ``eval/<name>`` (TensorBoard, metrics.jsonl).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainSpec", "register_train_spec", "get_train_spec", "list_train_specs"]


@dataclass
class TrainSpec:
    name: str
    data_kind: str  # "tokens" | "audio"
    build_model: Callable[[dict], Any]
    build_example: Callable[[dict, Any, dict], dict | None]
    collate: Callable[[list], dict]
    loss: Callable[[Any, dict, dict], tuple]
    custom_step: Callable[[Any, dict], tuple] | None = None
    config_keys: tuple[str, ...] = ()
    # optional hooks
    configure: Callable[[dict], None] | None = None
    eval_step: Callable[[Any, dict, dict], tuple] | None = None
    expected_fingerprints: Callable[[dict], dict] | None = None
    streams: Callable[[dict], tuple[str, ...]] | None = None
    count_tokens: Callable[[dict], int] | None = None
    flops_per_token: Callable[[Any, dict], float] | None = None
    model_config: Callable[[dict], dict] | None = None
    eval_outputs: Callable[[Any, dict, dict], dict] | None = None
    eval_summary: Callable[[dict, dict], dict] | None = None
    description: str = ""

    def __post_init__(self):
        if self.data_kind not in ("tokens", "audio"):
            raise ValueError(f"TrainSpec {self.name!r}: data_kind must be 'tokens' or 'audio', got {self.data_kind!r}")
        if (self.eval_outputs is None) != (self.eval_summary is None):
            raise ValueError(f"TrainSpec {self.name!r}: eval_outputs and eval_summary go together")


_REGISTRY: dict[str, TrainSpec] = {}


def register_train_spec(spec: TrainSpec, *, overwrite: bool = False) -> TrainSpec:
    """Register a spec under ``spec.name``; registering a different spec under a taken name is an
    error unless ``overwrite``."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old is not spec and not overwrite:
        raise ValueError(f"a TrainSpec named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin_specs() -> None:
    """Import the modules that register specs, ``musiclm/train/*_stage(s).py`` and ``*_spec.py``
    (lm_stages, mulan_stage), so ``--stage NAME`` works without the caller importing anything.
    Specs of your own: a run config's ``imports:`` (modules or .py files) registers them."""
    import importlib
    import pkgutil

    import musiclm.train as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name.endswith(("_stage", "_stages", "_spec")):
            importlib.import_module(f"musiclm.train.{m.name}")


def get_train_spec(name: str) -> TrainSpec:
    if name not in _REGISTRY:
        _load_builtin_specs()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown training stage {name!r}; registered: {sorted(_REGISTRY)}") from None


def list_train_specs() -> list[str]:
    _load_builtin_specs()
    return sorted(_REGISTRY)
