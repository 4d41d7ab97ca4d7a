"""The model directory generation loads: ``musiclm package`` writes it, :func:`load_package` reads it.

A package is one self-contained folder (local, or ``s3://bucket/prefix``) with everything
``musiclm generate`` needs and nothing that points outside it::

    package.json                  format/version, parts, the stages' token layout and windows,
                                  sampling defaults per stage, the tokenizer fingerprints
    semantic/model.safetensors    the three stage LMs as exported by ``musiclm export``
    semantic/model.json           (musiclm.weights format: weights + their config)
    coarse/...  fine/...
    tokenizers/                   a TokenizerBundle directory: acoustic codec, semantic features +
                                  k-means, MuLaN, conditioning quantizer (``tokenizers.json``)
    README.md                     model card: training data and its hash, configs, steps, final
                                  metrics, intended use, license, how to generate

Consistency is checked when packaging and again when loading: every stage's ``tokens:`` layout
must agree with the other stages (the fields both use) and with the bundle's tokenizers (rates,
levels, codebook and vocabulary sizes), and the tokenizer weights a stage was trained on (the
shard fingerprints ``musiclm export`` records) must be the bundle's. A disagreement raises
:class:`PackageMismatch` naming the parts and fields; a missing file raises
``FileNotFoundError`` naming it.

Inference code: this module imports nothing from ``musiclm.train`` (or DeepSpeed). Packaging a
training *run folder* exports it first, through ``musiclm.train.export`` imported inside
:func:`package_model` only for that case (packaging is a build step).
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields

from musiclm.data import storage
from musiclm.fingerprint import canonical_hash, canonical_json
from musiclm.lm.model import Transformer, TransformerConfig
from musiclm.lm.stages import STAGES, Stage, TokenLayout, get_stage
from musiclm.logs import get_logger
from musiclm.tokenizers import BUNDLE_FILE, TokenizerBundle

__all__ = [
    "PACKAGE_FILE",
    "SAMPLING_DEFAULTS",
    "PackageMismatch",
    "PackagedModel",
    "check_consistency",
    "load_package",
    "package_model",
]

_log = get_logger(__name__)

FORMAT = "musiclm-package"
VERSION = 1
PACKAGE_FILE = "package.json"
CARD_FILE = "README.md"
TOKENIZERS_DIR = "tokenizers"
WEIGHTS, CONFIG = "model.safetensors", "model.json"
TRAIN_CONFIG = "train_config.yaml"  # the run's resolved config.yaml, when the run folder is known

# Sampling defaults per stage. Temperatures: MusicLM (arXiv 2301.11325, section 4, "temperature
# sampling ... 1.0, 0.95 and 0.4 for the semantic, coarse and fine acoustic modeling stages"),
# the same schedule AudioLM uses. The paper samples from the full distribution: no top-k / top-p
# (None = off). Classifier-free guidance is not in the MusicLM paper; 3.0 is MusicGen's
# coefficient (arXiv 2306.05284) and the default of the open audiolm/musiclm-pytorch samplers; our
# stages learned the unconditional model from conditioning dropout (``cond_dropout``).
SAMPLING_DEFAULTS: dict[str, dict] = {
    "semantic": {"temperature": 1.0, "top_k": None, "top_p": None, "cond_scale": 3.0},
    "coarse": {"temperature": 0.95, "top_k": None, "top_p": None, "cond_scale": 3.0},
    "fine": {"temperature": 0.4, "top_k": None, "top_p": None, "cond_scale": 3.0},
}
SAMPLING_SOURCE = (
    "temperatures: MusicLM (arXiv 2301.11325) section 4 (1.0 / 0.95 / 0.4, as AudioLM); top_k / top_p: off "
    "(the paper samples the full distribution); cond_scale 3.0: MusicGen (arXiv 2306.05284), the paper has no CFG"
)


def package_sampling(overrides: dict | None = None, note: str | None = None) -> dict:
    """``package.json``'s ``sampling``: :data:`SAMPLING_DEFAULTS` with per-stage ``overrides``
    (unknown stages or keys refused) and where each value comes from."""
    out = copy.deepcopy(SAMPLING_DEFAULTS)
    changed = []
    for stage, values in (overrides or {}).items():
        if stage not in out:
            raise ValueError(f"sampling: unknown stage {stage!r} (stages: {', '.join(out)})")
        for key, value in (values or {}).items():
            if key not in out[stage]:
                raise ValueError(f"sampling.{stage}: unknown setting {key!r} (settings: {', '.join(out[stage])})")
            out[stage][key] = value
            changed.append(f"{stage}.{key}={value}")
    source = SAMPLING_SOURCE
    if changed:
        source += "; set at packaging: " + ", ".join(changed) + (f" ({note})" if note else "")
    return {**out, "source": source}


# TokenLayout fields each stage's vocabulary depends on (a stage ignores the streams it never sees)
_COND = ("cond_levels", "cond_codebook", "cond_namespaces")
_SEM = ("semantic_vocab", "semantic_rate")
_AC = ("acoustic_levels", "acoustic_codebook", "acoustic_rate", "coarse_levels")
STAGE_FIELDS = {"semantic": _COND + _SEM, "coarse": _COND + _SEM + _AC, "fine": _COND + _AC}
# tokenizers whose weights decide the tokens a stage reads or writes
STAGE_TOKENIZERS = {
    "semantic": ("mulan", "quantizer", "semantic"),
    "coarse": ("mulan", "quantizer", "semantic", "acoustic"),
    "fine": ("mulan", "quantizer", "acoustic"),
}
# fingerprint fields compared between a stage's training shards and the bundle: weights and the
# token-defining numbers (``config`` is left out: it carries file locations, not token identity)
_FP_FIELDS = ("weights_sha256", "frame_rate", "levels", "codebook_size", "vocab_size", "namespaces", "dim")


class PackageMismatch(RuntimeError):
    """The parts of a package (stages, tokenizers) disagree; the message names parts and fields."""


@dataclass
class PackagedModel:
    """A loaded package: everything generation needs, on one device, in eval mode."""

    directory: str  # local directory the parts were read from (the cache copy for s3://)
    config: dict  # package.json
    stages: dict[str, tuple[Stage, Transformer]] = field(default_factory=dict)
    tokenizers: TokenizerBundle | None = None
    fingerprints: dict = field(default_factory=dict)  # the bundle's, checked against what the stages trained on

    def sampling(self, stage: str) -> dict:
        """The package's sampling defaults of ``stage`` (temperature, top_k, top_p, cond_scale)."""
        return dict((self.config.get("sampling") or {}).get(stage) or SAMPLING_DEFAULTS[stage])

    @property
    def windows(self) -> dict[str, float]:
        return {name: st.window_seconds for name, (st, _m) in self.stages.items()}


# ---------------------------------------------------------------------------------------------- helpers


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} is missing")
    with open(path) as f:
        return json.load(f)


def _stage_meta(weights: str, part: str) -> dict:
    """The config of exported stage weights (model.json beside them, else the safetensors metadata)."""
    cfg_path = os.path.splitext(weights)[0] + ".json"
    if os.path.isfile(cfg_path):
        return _read_json(cfg_path, part)
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        md = f.metadata() or {}
    if "musiclm_config" not in md:
        raise FileNotFoundError(f"{part}: no config for {weights} (expected {cfg_path})")
    return json.loads(md["musiclm_config"])


def _layout_of(meta: dict) -> TokenLayout:
    return TokenLayout.from_config(meta.get("tokens") or {})


def _jsonable_layout(layout: TokenLayout) -> dict:
    return {f.name: (list(v) if isinstance(v := getattr(layout, f.name), tuple) else v) for f in fields(layout)}


def _stage_of(name: str, meta: dict) -> Stage:
    return get_stage(name, meta.get("tokens") or {}, meta.get("window_seconds"))


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def _check_meta(name: str, meta: dict, part: str) -> None:
    if meta.get("kind") not in (None, "musiclm.stage_lm") or "model" not in meta:
        raise PackageMismatch(f"{part}: not stage LM weights (kind {meta.get('kind')!r})")
    if meta.get("stage") not in (None, name):
        raise PackageMismatch(f"{part}: the weights are of the {meta.get('stage')!r} stage, not {name!r}")
    if "tokens" not in meta:
        raise PackageMismatch(f"{part}: model.json has no tokens: layout (export it with `musiclm export`)")
    st = _stage_of(name, meta)
    vocab = TransformerConfig.from_dict(meta["model"]).vocab_size
    if vocab != st.vocab_size:
        raise PackageMismatch(
            f"{part}: model vocab_size {vocab} differs from its tokens: layout's {name} vocabulary {st.vocab_size}"
        )


def check_consistency(metas: dict[str, dict], bundle_fps: dict | None, parts: dict[str, str] | None = None) -> None:
    """Refuse stages whose layouts or training tokenizers disagree with each other or the bundle.

    ``metas``: stage name -> exported config (model.json); ``bundle_fps``: the tokenizer bundle's
    fingerprints; ``parts``: display names of the parts (stage name / "tokenizers" -> path).
    Raises :class:`PackageMismatch` listing every disagreement as ``part A vs part B: field a != b``."""
    parts = dict(parts or {})
    label = {n: parts.get(n, f"{n} stage") for n in list(metas) + ["tokenizers"]}
    problems: list[str] = []
    layouts = {n: _layout_of(m) for n, m in metas.items()}
    names = [n for n in STAGES if n in metas]
    # stages vs each other: the layout fields both stages use, then the tokenizer weights both trained on
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = [f for f in STAGE_FIELDS[a] if f in STAGE_FIELDS[b]]
            diff = [
                f"{f} {getattr(layouts[a], f)!r} != {getattr(layouts[b], f)!r}"
                for f in shared
                if _norm(getattr(layouts[a], f)) != _norm(getattr(layouts[b], f))
            ]
            fa, fb = metas[a].get("fingerprints") or {}, metas[b].get("fingerprints") or {}
            for tok in (t for t in STAGE_TOKENIZERS[a] if t in STAGE_TOKENIZERS[b]):
                if tok in fa and tok in fb:
                    diff += [
                        f"{tok}.{k} {fa[tok].get(k)!r} != {fb[tok].get(k)!r}"
                        for k in _FP_FIELDS
                        if k in fa[tok] and k in fb[tok] and _norm(fa[tok][k]) != _norm(fb[tok][k])
                    ]
            if diff:
                problems.append(f"{label[a]} vs {label[b]}: " + "; ".join(diff))
    # stages vs the bundle
    if bundle_fps is not None:
        want = TokenLayout.fields_from_fingerprints(bundle_fps)
        for n in names:
            diff = []
            for f in STAGE_FIELDS[n]:
                if f in want and _norm(getattr(layouts[n], f)) != _norm(want[f]):
                    diff.append(f"tokens.{f} {getattr(layouts[n], f)!r} != {want[f]!r}")
            for tok in STAGE_TOKENIZERS[n]:
                if tok not in bundle_fps:
                    diff.append(f"{tok} tokenizer missing from the bundle")
            trained = metas[n].get("fingerprints") or {}
            for tok in STAGE_TOKENIZERS[n]:
                if tok in trained and tok in bundle_fps:
                    diff += [
                        f"{tok}.{k} {trained[tok].get(k)!r} != {bundle_fps[tok].get(k)!r}"
                        for k in _FP_FIELDS
                        if k in trained[tok]
                        and k in bundle_fps[tok]
                        and _norm(trained[tok][k]) != _norm(bundle_fps[tok][k])
                    ]
            if diff:
                problems.append(f"{label[n]} vs {label['tokenizers']}: " + "; ".join(diff))
    if problems:
        raise PackageMismatch("package parts disagree:\n  " + "\n  ".join(problems))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_metrics(path: str) -> list[dict]:
    """metrics.jsonl records (a line cut off by a kill is skipped); the training monitor's format."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def final_metrics(run_dir: str | None) -> dict:
    """The last logged value of every train/ and eval/ scalar of a run (with the step it was logged at)."""
    if not run_dir:
        return {}
    last: dict = {}
    for rec in _read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        for k, v in rec.items():
            if k.startswith(("train/loss", "train/accuracy", "eval/")) and isinstance(v, (int, float)):
                last[k] = {"value": float(v), "step": int(rec.get("step", 0))}
    return last


def _run_config(run_dir: str | None) -> dict:
    if not run_dir or not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return {}
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f) or {}


def _roots(run_dirs: list[str]) -> list[str]:
    """Folders a relative path of a run's config may be relative to: this process's working
    directory, then every ancestor of the run folders (training ran from the repository root)."""
    out = [os.getcwd()]
    for rd in run_dirs:
        d = os.path.abspath(rd)
        while os.path.dirname(d) != d:
            d = os.path.dirname(d)
            if d not in out:
                out.append(d)
    return out


def _locate(path: str, roots: list[str], probe: str = "") -> tuple[str, str | None]:
    """(readable location, the root it was found under) of a path from a run's config or index."""
    if storage.is_remote(path) or os.path.isabs(path):
        return path, None
    for r in roots:
        cand = os.path.join(r, path)
        if os.path.exists(os.path.join(cand, probe) if probe else cand):
            return cand, r
    return path, None


def _data_record(run_dirs: list[str], tokens_dir: str | None) -> dict:
    """Where the stages' training data came from: the token shard folder's index.json (its manifest,
    hours, fingerprint hash) and the manifest's sha256 when the file is readable here."""
    shard_dirs: list[str] = [tokens_dir] if tokens_dir else []
    if not shard_dirs:
        for rd in run_dirs:
            shards = (_run_config(rd).get("data") or {}).get("shards")
            for s in [shards] if isinstance(shards, str) else list(shards or []):
                if s not in shard_dirs:
                    shard_dirs.append(s)
    out: dict = {"shards": shard_dirs or None, "manifest": None, "manifest_sha256": None}
    roots = _roots(run_dirs)
    for d in shard_dirs:
        where, root = _locate(d, roots, "index.json")
        try:
            index = json.loads(storage.read_bytes(storage.join(where, "index.json")))
        except Exception:  # noqa: BLE001 - the card says "unknown" rather than failing the package
            continue
        out.update(
            {
                "index": storage.join(where, "index.json"),
                "fingerprint_hash": index.get("fingerprint_hash"),
                "hours": index.get("hours"),
                "samples": index.get("samples"),
                "clips": index.get("clips"),
                "manifest": index.get("manifest"),
                "created": index.get("created"),
            }
        )
        man = index.get("manifest")
        if man:
            # the tokenize job ran from the same folder as training, most likely
            man_path, _ = _locate(man, ([root] if root else []) + roots)
            try:
                out["manifest_sha256"] = hashlib.sha256(storage.read_bytes(man_path)).hexdigest()
            except Exception:  # noqa: BLE001
                pass
        break
    return out


def _is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def _find_weights(path: str, part: str) -> str | None:
    """Exported weights given as the file or its folder -> the file; None for a training run folder."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        cand = os.path.join(path, WEIGHTS)
        if os.path.isfile(cand):
            return cand
        if _is_run_dir(path):
            return None
        raise FileNotFoundError(f"{part}: {path} has neither {WEIGHTS} nor checkpoints/ (a training run)")
    raise FileNotFoundError(f"{part}: {path} does not exist")


def _tokenizer_bundle(tokenizers: str, codec: str | None) -> TokenizerBundle:
    """A bundle from a saved bundle directory or a tokenizers config (YAML/JSON, whole file or
    the ``tokenizers:`` section), with the acoustic tokenizer replaced by a SoundStream ``codec``."""
    from musiclm.tokenizers import build_tokenizers, load_bundle

    if os.path.isdir(tokenizers):
        if not os.path.isfile(os.path.join(tokenizers, BUNDLE_FILE)):
            raise FileNotFoundError(f"tokenizers: {os.path.join(tokenizers, BUNDLE_FILE)} is missing")
        bundle = load_bundle(tokenizers)
    elif os.path.isfile(tokenizers):
        from musiclm.config import load_config

        cfg = load_config(tokenizers)
        bundle = build_tokenizers(cfg.get("tokenizers", cfg))
    else:
        raise FileNotFoundError(f"tokenizers: {tokenizers} does not exist")
    if codec:
        from musiclm.codec import build_acoustic

        if not os.path.exists(codec):
            raise FileNotFoundError(f"codec: {codec} does not exist")
        bundle.acoustic = build_acoustic({"type": "soundstream", "model": codec})
        bundle.config["acoustic"] = {"type": "soundstream"}
    missing = [
        name
        for name, part in (
            ("acoustic", bundle.acoustic),
            ("semantic (k-means)", bundle.semantic),
            ("mulan", bundle.embedder),
            ("quantizer", bundle.quantizer),
        )
        if part is None
    ]
    if missing:
        raise FileNotFoundError(f"tokenizers {tokenizers}: no {', '.join(missing)} (fit them before packaging)")
    return bundle


# ---------------------------------------------------------------------------------------------- package


def package_model(
    *,
    semantic: str,
    coarse: str,
    fine: str,
    tokenizers: str,
    out: str,
    codec: str | None = None,
    tokens_dir: str | None = None,
    extra_card: dict | None = None,
    sampling: dict | None = None,
) -> str:
    """Write a package directory ``out`` (local path or ``s3://...``) and return ``out``.

    ``semantic`` / ``coarse`` / ``fine``: exported weights (``model.safetensors`` or its folder,
    from ``musiclm export``) or a training run folder (exported here from its newest checkpoint).
    ``tokenizers``: a saved TokenizerBundle directory or a tokenizers config file (e.g.
    ``launch/configs/demo/tokenizers.yaml``). ``codec``: a SoundStream directory replacing the
    bundle's acoustic tokenizer. ``tokens_dir``: the token shard folder the stages trained on (its
    index.json and manifest go into the model card; default: read from the runs' config.yaml).
    ``extra_card``: more model-card fields (``license``, ``name``, ``intended_use``, ``notes``).
    ``sampling``: per-stage overrides of :data:`SAMPLING_DEFAULTS` stored as the package's defaults
    (e.g. ``{"semantic": {"cond_scale": 6.0}}``, chosen from a ``musiclm eval chain`` grid), with
    ``sampling_note`` in ``extra_card`` saying why.
    Refuses parts that disagree (:class:`PackageMismatch`) before anything is written."""
    extra_card = dict(extra_card or {})
    out = os.fspath(out)
    remote = storage.is_remote(out)
    if not remote and os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, PACKAGE_FILE)):
        # a package replaces its folder whole: never a folder of other things (e.g. models/demo's tokenizer parts)
        raise FileExistsError(f"--out {out} exists and is not a package (no {PACKAGE_FILE}): choose another folder")
    parent = tempfile.gettempdir() if remote else os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".package-", dir=parent)
    try:
        metas, sources, run_dirs = {}, {}, {}
        for name, src in (("semantic", semantic), ("coarse", coarse), ("fine", fine)):
            part = f"{name} stage ({src})"
            os.makedirs(os.path.join(tmp, name))
            dst = os.path.join(tmp, name, WEIGHTS)
            weights = _find_weights(src, part)
            if weights is None:  # a run folder: export its newest checkpoint (a build step, so train/ is fine here)
                from musiclm.train.export import export

                export(src, dst)
                run_dirs[name] = os.path.abspath(src)
            else:
                shutil.copyfile(weights, dst)
            meta = _stage_meta(dst if weights is None else weights, part)
            _check_meta(name, meta, part)
            storage.write_json_atomic(os.path.join(tmp, name, CONFIG), meta, indent=1, default=str)
            metas[name], sources[name] = meta, os.path.abspath(src)
            run_dirs.setdefault(name, (meta.get("source") or {}).get("run_dir"))
            rd = run_dirs[name]
            if rd and os.path.isfile(os.path.join(rd, "config.yaml")):  # the resolved training config, for the card
                shutil.copyfile(os.path.join(rd, "config.yaml"), os.path.join(tmp, name, TRAIN_CONFIG))
        bundle = _tokenizer_bundle(tokenizers, codec)
        fps = bundle.fingerprints()
        check_consistency(
            metas, fps, {n: f"{n} stage ({sources[n]})" for n in metas} | {"tokenizers": f"tokenizers ({tokenizers})"}
        )
        bundle.save(os.path.join(tmp, TOKENIZERS_DIR))
        saved_fps = _read_json(os.path.join(tmp, TOKENIZERS_DIR, BUNDLE_FILE), "tokenizers")["fingerprints"]

        # the coarse stage reads every stream (cond, semantic, acoustic): its layout is the package's, in
        # full (a stage trained on a token folder without some streams keeps defaults for those fields)
        tokens = _jsonable_layout(_layout_of(metas["coarse"]))
        stages_doc = {}
        for name, meta in metas.items():
            st = _stage_of(name, meta)
            stages_doc[name] = {
                "weights": f"{name}/{WEIGHTS}",
                "config": f"{name}/{CONFIG}",
                "step": meta.get("step"),
                "num_params": meta.get("num_params"),
                "window_seconds": st.window_seconds,
                "vocab_size": st.vocab_size,
                "seq_len": st.seq_len,
                "model": meta.get("model"),
                "source": sources[name],
                "run_dir": run_dirs.get(name),
                "trained_fingerprint_hash": meta.get("fingerprint_hash"),
            }
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "name": extra_card.get("name") or storage.basename(out),
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "license": extra_card.get("license", "unspecified"),
            "tokens": tokens,
            "windows": {n: stages_doc[n]["window_seconds"] for n in STAGES},
            "stages": stages_doc,
            "tokenizers": {
                "dir": TOKENIZERS_DIR,
                "config": BUNDLE_FILE,
                "codec": os.path.abspath(codec) if codec else None,
            },
            "fingerprints": saved_fps,
            "fingerprint_hash": canonical_hash(saved_fps, 10),
            "sampling": package_sampling(sampling, extra_card.get("sampling_note")),
            "data": _data_record([d for d in run_dirs.values() if d], tokens_dir),
        }
        storage.write_json_atomic(os.path.join(tmp, PACKAGE_FILE), doc, indent=1, default=str)
        with open(os.path.join(tmp, CARD_FILE), "w") as f:
            f.write(model_card(doc, metas, run_dirs, {"path": out, **extra_card}))
        if remote:
            _upload_dir(tmp, out)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            storage.publish_dir(tmp, os.path.abspath(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log.info("packaged %s", out)
    return out


def _upload_dir(local: str, url: str) -> None:
    """Every file of ``local`` to ``url`` (package.json last: its presence means complete)."""
    files = []
    for root, _dirs, names in os.walk(local):
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), local))
    files.sort(key=lambda p: p == PACKAGE_FILE)
    for rel in files:
        storage.put_file(os.path.join(local, rel), storage.join(url, *rel.split(os.sep)))


# ---------------------------------------------------------------------------------------------- model card


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "unknown"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _json_rows(d: dict) -> list[str]:
    """A dict as JSON with one line per key (readable in a card, still valid JSON)."""
    items = list(d.items())
    rows = [
        f" {json.dumps(k)}: {json.dumps(v, default=str)}" + ("," if i < len(items) - 1 else "")
        for i, (k, v) in enumerate(items)
    ]
    return ["{", *rows, "}"]


def _training_summary(run_dir: str | None) -> dict | str:
    """The settings of a run a reader of the card asks for first (steps, batch, optimizer, dropout)."""
    cfg = _run_config(run_dir)
    if not cfg:
        return "unknown"
    train, ds = cfg.get("train") or {}, cfg.get("deepspeed") or {}
    ds_path = os.path.join(run_dir, "ds_config.json")  # the DeepSpeed config the run used (file + overrides)
    if os.path.isfile(ds_path):
        with open(ds_path) as f:
            ds = {**ds, **json.load(f)}
    keep = ("max_steps", "warmup_steps", "min_lr_ratio", "max_minutes")
    return {
        "train": {k: train[k] for k in keep if k in train},
        "micro_batch": ds.get("train_micro_batch_size_per_gpu"),
        "gradient_accumulation": ds.get("gradient_accumulation_steps"),
        "optimizer": ds.get("optimizer"),
        "cond_dropout": cfg.get("cond_dropout"),
        "model": cfg.get("model"),
        "shards": (cfg.get("data") or {}).get("shards"),
        "seed": cfg.get("seed"),
    }


def model_card(doc: dict, metas: dict[str, dict], run_dirs: dict[str, str | None], extra: dict | None = None) -> str:
    """The package's README.md: YAML front matter (license, tags) + what a user needs to know."""
    extra = dict(extra or {})
    data = doc.get("data") or {}
    fps = doc.get("fingerprints") or {}
    name = doc["name"]
    where = extra.get("path") or name  # how the user named the folder (e.g. models/rapbeats-demo)
    lines = [
        "---",
        f"license: {doc.get('license') or 'unspecified'}",
        "library_name: musiclm",
        "pipeline_tag: text-to-audio",
        "tags: [musiclm, text-to-music, audiolm]",
        "---",
        "",
        f"# {name}",
        "",
        extra.get(
            "description",
            "A MusicLM text-to-music model: MuLaN conditioning tokens -> semantic stage -> coarse acoustic stage -> "
            "fine acoustic stage -> codec decode, 24 kHz mono. Written by `musiclm package`.",
        ),
        "",
        "## How to generate",
        "",
        "```bash",
        f'musiclm generate "hard-hitting trap beat at 70 bpm with dark piano" --model {where} \\',
        "    --duration 10 --num-samples 4 --seed 0 --out out/",
        "```",
        "",
        "```python",
        "from musiclm.generate import MusicLM",
        "",
        f'model = MusicLM.from_pretrained("{where}")   # a local folder or s3://bucket/prefix',
        'result = model.generate("caption", duration=10, num_samples=4, seed=0)',
        "```",
        "",
        "Lower level: `musiclm.package.load_package(dir)` returns the stages, tokenizers and fingerprints.",
        "",
        "## Intended use",
        "",
        extra.get(
            "intended_use",
            "Research and personal music sketching in the style of the training corpus. The model imitates its "
            "training clips: check generated audio for near copies before publishing it, and respect the licenses "
            "of the training audio. Not for identifying or imitating specific artists' voices.",
        ),
        "",
        f"License: **{doc.get('license') or 'unspecified'}** (set with `musiclm package --license`).",
        "",
        "## Training data",
        "",
        f"- manifest: `{_fmt(data.get('manifest'))}`",
        f"- manifest sha256: `{_fmt(data.get('manifest_sha256'))}`",
        f"- token shards: `{_fmt(data.get('shards'))}`",
        f"- tokenizer fingerprint hash of the shards: `{_fmt(data.get('fingerprint_hash'))}`",
        f"- hours: {_fmt(data.get('hours'))}, samples: {_fmt(data.get('samples'))}, clips: {_fmt(data.get('clips'))}",
        "",
        "## Stages",
        "",
        "| stage | steps | parameters | window (s) | vocab | seq len | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in STAGES:
        s = doc["stages"][n]
        np_ = s.get("num_params")
        lines.append(
            f"| {n} | {_fmt(s.get('step'))} | {f'{np_ / 1e6:.2f}M' if np_ else 'unknown'} | {s['window_seconds']:g} | "
            f"{s['vocab_size']} | {s['seq_len']} | `{_fmt(run_dirs.get(n))}` |"
        )
    lines += ["", "## Final metrics", ""]
    any_metrics = False
    for n in STAGES:
        m = final_metrics(run_dirs.get(n))
        if not m:
            lines.append(f"- {n}: unknown (no metrics.jsonl found for the run)")
            continue
        any_metrics = True
        keys = [k for k in ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy") if k in m]
        keys += sorted(k for k in m if k.startswith("eval/loss/"))
        shown = ", ".join(f"{k} {m[k]['value']:.4g} (step {m[k]['step']})" for k in keys)
        lines.append(f"- {n}: {shown}")
    if any_metrics:
        lines.append("")
        lines.append("(last logged values of each run's metrics.jsonl)")
    lines += [
        "",
        "## Tokenizers",
        "",
        "| part | name | rate (Hz) | levels / vocab | weights sha256 |",
        "|---|---|---|---|---|",
    ]
    for part in ("acoustic", "semantic", "mulan", "quantizer"):
        fp = fps.get(part) or {}
        size = (
            f"{fp.get('levels')} x {fp.get('codebook_size')}"
            if "levels" in fp
            else fp.get("vocab_size", fp.get("dim", ""))
        )
        lines.append(
            f"| {part} | {fp.get('name', '')} | {_fmt(fp.get('frame_rate'))} | {size} | "
            f"`{str(fp.get('weights_sha256') or 'unknown')[:16]}` |"
        )
    sampling = {k: v for k, v in (doc.get("sampling") or {}).items() if k != "source"}
    lines += [
        "",
        "## Configs",
        "",
        "Token layout (`tokens:`) and windows:",
        "",
        "```json",
        *_json_rows({"tokens": doc["tokens"], "windows": doc["windows"]}),
        "```",
        "",
        "Models (TransformerConfig per stage):",
        "",
        "```json",
        *_json_rows({n: metas[n].get("model") for n in STAGES}),
        "```",
        "",
        "Training (from each run's resolved config, copied as `<stage>/train_config.yaml` when the run was found):",
        "",
        "```json",
        *_json_rows({n: _training_summary(run_dirs.get(n)) for n in STAGES}),
        "```",
        "",
        "Sampling defaults (`package.json` `sampling`; " + (doc.get("sampling") or {}).get("source", "") + "):",
        "",
        "```json",
        *_json_rows(sampling),
        "```",
        "",
    ]
    if extra.get("notes"):
        lines += ["## Notes", "", str(extra["notes"]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- load


def _local_copy(url: str) -> str:
    """A local copy of a remote package (reused while its package.json is unchanged)."""
    try:
        head = storage.read_bytes(storage.join(url, PACKAGE_FILE))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"not a musiclm package: {storage.join(url, PACKAGE_FILE)} is missing") from err
    key = hashlib.sha256(url.rstrip("/").encode() + b"\0" + head).hexdigest()[:20]
    dest = os.path.join(storage.cache_root(), "packages", key)
    if os.path.isfile(os.path.join(dest, PACKAGE_FILE)):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(dest))
    try:
        fs, root = storage.get_fs(url)
        root = root.rstrip("/")
        for path in fs.find(root):
            rel = path[len(root) :].lstrip("/")
            if not rel or rel == PACKAGE_FILE:
                continue
            local = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(path, local)
        with open(os.path.join(tmp, PACKAGE_FILE), "wb") as f:  # the version we keyed the cache on
            f.write(head)
        storage.publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log.info("copied %s to %s", url, dest)
    return dest


def load_package(directory: str, device: str = "cpu") -> PackagedModel:
    """Load a package (local directory or ``s3://...``, copied to ``$MUSICLM_CACHE`` first) on
    ``device``: the three stage Transformers in eval mode with their Stage layouts, the tokenizer
    bundle (its own fingerprints checked) and the fingerprints. Refuses a package whose parts
    disagree (:class:`PackageMismatch`) or miss a file (``FileNotFoundError`` naming it)."""
    from musiclm.tokenizers import load_bundle
    from musiclm.weights import load_exported

    directory = os.fspath(directory)
    if storage.is_remote(directory):
        directory = _local_copy(directory)
    directory = os.path.abspath(directory)
    pkg_file = os.path.join(directory, PACKAGE_FILE)
    if not os.path.isfile(pkg_file):
        raise FileNotFoundError(f"not a musiclm package: {pkg_file} is missing (write one with `musiclm package`)")
    doc = _read_json(pkg_file, "package")
    if doc.get("format") != FORMAT:
        raise ValueError(f"{pkg_file}: format {doc.get('format')!r} is not {FORMAT!r}")
    if int(doc.get("version", 0)) > VERSION:
        raise ValueError(f"{pkg_file}: version {doc.get('version')} is newer than this musiclm reads ({VERSION})")
    metas, paths = {}, {}
    for name in STAGES:
        entry = (doc.get("stages") or {}).get(name) or {}
        weights = os.path.join(directory, entry.get("weights", f"{name}/{WEIGHTS}"))
        cfg_path = os.path.join(directory, entry.get("config", f"{name}/{CONFIG}"))
        for p in (weights, cfg_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(
                    f"package {directory}: {name} stage part {os.path.relpath(p, directory)} is missing"
                )
        metas[name] = _read_json(cfg_path, f"{name} stage")
        paths[name] = (weights, cfg_path)
    tok_dir = os.path.join(directory, (doc.get("tokenizers") or {}).get("dir", TOKENIZERS_DIR))
    if not os.path.isfile(os.path.join(tok_dir, BUNDLE_FILE)):
        raise FileNotFoundError(
            f"package {directory}: tokenizers part {os.path.relpath(tok_dir, directory)}/{BUNDLE_FILE} is missing"
        )
    labels = {n: f"{n} stage ({n}/{CONFIG})" for n in STAGES} | {
        "tokenizers": f"tokenizers ({TOKENIZERS_DIR}/{BUNDLE_FILE})"
    }
    for name in STAGES:
        _check_meta(name, metas[name], labels[name])
    saved_fps = _read_json(os.path.join(tok_dir, BUNDLE_FILE), "tokenizers").get("fingerprints") or {}
    # cheap checks first (no model loaded): the stages against each other and the bundle's recorded fingerprints
    check_consistency(metas, saved_fps, labels)
    if doc.get("fingerprints") and canonical_json(doc["fingerprints"]) != canonical_json(saved_fps):
        differs = sorted(
            k
            for k in set(doc["fingerprints"]) | set(saved_fps)
            if canonical_json(doc["fingerprints"].get(k)) != canonical_json(saved_fps.get(k))
        )
        raise PackageMismatch(f"package.json vs {labels['tokenizers']}: fingerprints differ in {differs}")
    bundle = load_bundle(tok_dir, device=device)  # rebuilds every tokenizer and checks it against saved_fps
    stages: dict[str, tuple[Stage, Transformer]] = {}
    for name in STAGES:
        state, meta = load_exported(paths[name][0], paths[name][1])
        model = Transformer(TransformerConfig.from_dict(meta["model"]))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise PackageMismatch(
                f"{labels[name]}: weights do not fit its model config: {str(err).splitlines()[0]}"
            ) from err
        stages[name] = (_stage_of(name, meta), model.to(device).eval())
    return PackagedModel(
        directory=directory, config=doc, stages=stages, tokenizers=bundle, fingerprints=bundle.fingerprints()
    )
