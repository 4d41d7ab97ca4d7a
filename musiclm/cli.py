"""The `musiclm` command: one list of subcommands, each a thin wrapper over a library function.

Ray entry points live in `ray_jobs/` and training in `launch/train.py`; everything a user runs
by hand on one machine is here. Heavy modules are imported inside each handler so `musiclm --help`
stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


# --- demo corpus -----------------------------------------------------------------------------


def _demo_corpus(args: argparse.Namespace) -> int:
    from musiclm.data.demo_corpus import generate_corpus, plot_spectrograms

    summary = generate_corpus(args.out, clips=args.clips, seed=args.seed, seconds=args.seconds, workers=args.workers)
    if args.spectrograms:
        plot_spectrograms(f"{args.out}/manifest.jsonl", args.spectrograms)
        summary["spectrograms"] = args.spectrograms
    _print_json(summary)
    return 0


# --- manifests -------------------------------------------------------------------------------


def _manifest_from_csv(args: argparse.Namespace) -> int:
    from musiclm.data.manifest import from_csv

    stats: dict = {}
    written = from_csv(
        args.csv,
        args.out,
        audio_dir=args.audio_dir,
        audio_column=args.audio_column,
        caption_column=args.caption_column,
        id_column=args.id_column,
        on_missing="error" if args.strict else "skip",
        stats=stats,
    )
    _print_json({"manifest": args.out, "clips": written, **stats})
    return 0


def _manifest_check(args: argparse.Namespace) -> int:
    from musiclm.data.manifest import ManifestError, check_manifest

    try:
        report = check_manifest(args.manifest, check_audio=not args.no_audio)
    except ManifestError as err:  # one line, also for S3 (no credentials, no endpoint)
        print(f"manifest check failed: {err}", file=sys.stderr)
        return 1
    _print_json(report)
    if report.get("ok", True):
        return 0
    first = (report.get("unreadable") or [None])[0]
    print(
        f"manifest check failed: {args.manifest}: {report.get('missing_audio', 0)} missing and "
        f"{report.get('unreadable_audio', 0)} unreadable audio files"
        + (f" (first unreadable: {first['audio']}: {first['reason']})" if first else "")
        + (f" (first missing: {report['missing'][0]})" if report.get("missing") else ""),
        file=sys.stderr,
    )
    return 1


# --- shards ----------------------------------------------------------------------------------


def _stages_for_streams(streams) -> list[str]:
    """The LM stages whose streams (musiclm.lm.stages.STAGE_STREAMS) a token-shard folder carries."""
    from musiclm.lm.stages import STAGE_STREAMS

    return [name for name, need in STAGE_STREAMS.items() if set(need) <= set(streams or ())]


def _shards_inspect(args: argparse.Namespace) -> int:
    from musiclm.data.shards import inspect

    info = inspect(args.dir)
    if info.get("streams") is not None:
        info["stages"] = _stages_for_streams(info["streams"])  # which stages can train on this folder
    _print_json(info)
    return 0


def _shards_layout(args: argparse.Namespace) -> int:
    import yaml

    from musiclm.data.shards import index_streams, read_index
    from musiclm.lm.stages import TokenLayout

    index = read_index(args.dir)
    fields = TokenLayout.fields_from_fingerprints(index.get("fingerprints") or {})
    if args.as_set:  # for `launch/train.py --set ...`
        print(" ".join(f"tokens.{k}={json.dumps(v, separators=(',', ':'))}" for k, v in fields.items()))
    else:
        streams = index_streams(index)  # a subset fixes only its streams' fields
        print(f"# streams: {', '.join(streams)} (stages: {', '.join(_stages_for_streams(streams)) or 'none'})")
        print(yaml.safe_dump({"tokens": fields}, sort_keys=False, default_flow_style=None).rstrip())
    return 0


def _shards_verify(args: argparse.Namespace) -> int:
    from musiclm.data.shards import ShardError, verify

    try:
        report = verify(args.dir)
    except ShardError as err:
        print(f"verify failed: {err}", file=sys.stderr)
        return 1
    _print_json(report)
    return 0


# --- training outputs ------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from musiclm.train.export import export

    _print_json(export(args.run_dir, args.out, tag=args.tag))
    return 0


def _package(args: argparse.Namespace) -> int:
    from musiclm.generate import sampling_overrides
    from musiclm.package import PACKAGE_FILE, package_model

    card = {k: v for k, v in (("license", args.license), ("name", args.name)) if v}
    if args.sampling_note:
        card["sampling_note"] = args.sampling_note
    sampling = sampling_overrides(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cond_scale=args.cond_scale
    )
    out = package_model(
        semantic=args.semantic,
        coarse=args.coarse,
        fine=args.fine,
        tokenizers=args.tokenizers,
        codec=args.codec,
        out=args.out,
        tokens_dir=args.tokens,
        extra_card=card,
        sampling=sampling,
    )
    from musiclm.data import storage

    doc = json.loads(storage.read_bytes(storage.join(out, PACKAGE_FILE)))
    _print_json(
        {
            "out": out,
            "name": doc["name"],
            "license": doc["license"],
            "stages": {
                n: {k: s[k] for k in ("step", "num_params", "window_seconds", "vocab_size", "source")}
                for n, s in doc["stages"].items()
            },
            "windows": doc["windows"],
            "fingerprint_hash": doc["fingerprint_hash"],
            "data": doc["data"],
            "sampling": doc["sampling"],
        }
    )
    return 0


# --- evaluation ------------------------------------------------------------------------------


def _eval_retrieval(args: argparse.Namespace) -> int:
    from musiclm.eval.retrieval import run_from_args

    return run_from_args(args)


def _eval_tempo(args: argparse.Namespace) -> int:
    from musiclm.eval.tempo import run_from_args

    return run_from_args(args)


def _eval_chain(args: argparse.Namespace) -> int:
    from musiclm.eval.chain import run_from_args

    return run_from_args(args)


def _eval_codec(args: argparse.Namespace) -> int:
    from musiclm.eval.codec import run_from_args

    return run_from_args(args)


def _eval_fad(args: argparse.Namespace) -> int:
    from musiclm.eval.fad import run_from_args

    return run_from_args(args)


def _eval_memorization(args: argparse.Namespace) -> int:
    from musiclm.eval.memorization import run_from_args

    return run_from_args(args)


def _eval_report(args: argparse.Namespace) -> int:
    from musiclm.eval.report import run_from_args

    return run_from_args(args)


# --- generation ------------------------------------------------------------------------------


def _generate(args: argparse.Namespace) -> int:
    from musiclm.generate import (
        GenerationRequestError,
        MusicLM,
        check_request,
        parse_story_prompt,
        sampling_overrides,
        slugify,
    )

    try:
        if args.prompt and args.caption:
            raise GenerationRequestError("give a caption or --prompt SECONDS:CAPTION (story mode), not both")
        caption = [parse_story_prompt(p) for p in args.prompt] if args.prompt else args.caption
        sampling = sampling_overrides(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cond_scale=args.cond_scale
        )
        check_request(  # before loading anything
            caption,
            duration=args.duration,
            num_samples=args.num_samples,
            prompt_audio=args.prompt_audio,
            unconditional=args.unconditional,
            sampling=sampling,
        )
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        try:
            model = MusicLM.from_pretrained(args.model, device=args.device, compile=args.compile)
        except ValueError as err:  # not a package, or a newer format: one line, not a traceback
            raise GenerationRequestError(f"cannot load the model {args.model}: {err}") from None
        result = model.generate(
            caption,
            duration=args.duration,
            num_samples=args.num_samples,
            seed=args.seed,
            prompt_audio=args.prompt_audio,
            unconditional=args.unconditional,
            sampling=sampling,
            overlap=args.overlap,
            progress=not args.no_progress,
        )
    except (GenerationRequestError, FileNotFoundError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # musiclm.package.PackageMismatch: parts that disagree
        if type(err).__name__ != "PackageMismatch":
            raise
        print(f"generate: {err}", file=sys.stderr)
        return 2
    slug = args.slug or slugify(result.request["caption"] or "unconditional")
    doc = result.save(args.out, slug=slug)
    _print_json(
        {
            "best": f"{args.out}/{doc['candidates'][0]['file']}",
            "files": [c["file"] for c in doc["candidates"]] + [f"{slug}.json", doc.get("spectrogram")],
            "scores": [c["score"] for c in doc["candidates"]],
            "timings_seconds": doc["timings_seconds"],
            "rtf": doc["rtf"],
        }
    )
    return 0


# --- benchmarks ------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"musiclm.bench.{args.part}")
    extra = dict(kv.split("=", 1) for kv in args.set)
    result = module.run(**{k: _parse_value(v) for k, v in extra.items()})
    _print_json(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


def _parse_value(text: str) -> Any:
    """A --set value, parsed as YAML like every other --set (3, 1e-3, true, [1, 2], /tmp/x)."""
    import yaml

    return yaml.safe_load(text)


# --- the one list ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musiclm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help: str, parent=sub):
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = add("demo-corpus", _demo_corpus, "synthesise the rap-instrumental demo corpus + manifest")
    p.add_argument("--out", default="data/rapbeats")
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--spectrograms", default=None, help="also write a PNG grid of spectrograms")

    man = sub.add_parser("manifest", help="build or validate a manifest.jsonl")
    man_sub = man.add_subparsers(dest="manifest_command", required=True)
    p = add(
        "from-csv",
        _manifest_from_csv,
        "manifest.jsonl from a CSV of files and captions (or MusicCaps ytid,start_s,end_s,caption with --audio-dir)",
        man_sub,
    )
    p.add_argument("csv")
    p.add_argument("--out", required=True)
    p.add_argument("--audio-dir", default=None)
    p.add_argument("--audio-column", default=None)
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--id-column", default=None)
    p.add_argument("--strict", action="store_true", help="fail on a missing audio file instead of skipping it")
    p = add("check", _manifest_check, "validate a manifest (errors name file, line and field)", man_sub)
    p.add_argument("manifest")
    p.add_argument("--no-audio", action="store_true", help="skip checking the audio files")

    sh = sub.add_parser("shards", help="look at token or audio shards")
    sh_sub = sh.add_subparsers(dest="shards_command", required=True)
    p = add("inspect", _shards_inspect, "summary of a shard folder as JSON", sh_sub)
    p.add_argument("dir")
    p = add("verify", _shards_verify, "read every sample; fail naming shard and key", sh_sub)
    p.add_argument("dir")
    p = add("layout", _shards_layout, "the tokens: section a token-shard folder's tokenizers fix", sh_sub)
    p.add_argument("dir")
    p.add_argument("--as-set", action="store_true", help="as `--set tokens.key=value ...` arguments")

    p = add("export", _export, "consolidated safetensors + config from a training run")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")

    p = add("package", _package, "the model directory generation loads: stages, tokenizers, config, model card")
    for stage in ("semantic", "coarse", "fine"):
        p.add_argument(f"--{stage}", required=True, help=f"{stage} stage: exported weights (file or folder) or run")
    p.add_argument("--tokenizers", required=True, help="tokenizer bundle directory or tokenizers config (YAML)")
    p.add_argument("--codec", default=None, help="SoundStream directory replacing the bundle's acoustic tokenizer")
    p.add_argument("--out", required=True, help="package directory (local or s3://), e.g. models/rapbeats-demo")
    p.add_argument("--tokens", default=None, help="token shard folder the stages trained on (for the model card)")
    p.add_argument("--license", default=None, help="license field of the model card (default: unspecified)")
    p.add_argument("--name", default=None, help="model name in the card (default: the folder name)")
    for flag in ("--temperature", "--top-k", "--top-p", "--cond-scale"):  # the package's sampling defaults
        p.add_argument(flag, default=None, help="default for generation: VALUE (every stage) or semantic=V,coarse=V")
    p.add_argument("--sampling-note", default=None, help="why the sampling defaults differ (model card)")

    ev = sub.add_parser("eval", help="evaluation families")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    p = add(
        "retrieval",
        _eval_retrieval,
        "text<->audio Recall@k, median rank, similarity PNG, "
        "tempo probe, quantizer agreement for any AudioTextEmbedder",
        ev_sub,
    )
    from musiclm.eval import retrieval

    retrieval.add_arguments(p)
    p = add(
        "tempo",
        _eval_tempo,
        "tempo following of the semantic stage: BPM from semantic tokens "
        "(ground truth, generated from captions) vs the caption BPM, baselines, PNG",
        ev_sub,
    )
    from musiclm.eval import tempo

    tempo.add_arguments(p)
    p = add(
        "chain",
        _eval_chain,
        "where the caption is lost: style and tempo probes on MuLaN embeddings and tokens, on generated "
        "semantic tokens (BPM sweep, temperature x cond_scale grid) and on decoded audio",
        ev_sub,
    )
    from musiclm.eval import chain

    chain.add_arguments(p)
    p = add("codec", _eval_codec, "codec reconstruction per level count vs EnCodec and low-pass baselines", ev_sub)
    from musiclm.eval import codec as codec_eval

    codec_eval.add_arguments(p)
    p = add("fad", _eval_fad, "FAD and KID of generated vs real audio on musicnn 1-s segment embeddings", ev_sub)
    from musiclm.eval import fad as fad_eval

    fad_eval.add_arguments(p)
    p = add(
        "memorization",
        _eval_memorization,
        "semantic stage prompted with training clips: exact / approximate copies, longest match in the shards",
        ev_sub,
    )
    from musiclm.eval import memorization as memorization_eval

    memorization_eval.add_arguments(p)
    p = add(
        "report",
        _eval_report,
        "the evaluation report: baselines check, generated vs real (MCC, tag KL, style, tempo, FAD/KID) -> report.md",
        ev_sub,
    )
    from musiclm.eval import report as report_eval

    report_eval.add_arguments(p)

    p = add("generate", _generate, "caption in, music out: N candidates reranked by MuLaN -> wav + json + png")
    p.add_argument(
        "caption", nargs="?", default=None, help="what the music should be (or use --prompt / --unconditional)"
    )
    p.add_argument("--model", required=True, help="a `musiclm package` directory (local or s3://)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of audio (with --prompt-audio: clip included)")
    p.add_argument("--num-samples", type=int, default=4, help="candidates generated as one batch, best kept first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="folder for <slug>.wav, <slug>-2.wav ..., <slug>.json, <slug>.png")
    p.add_argument("--slug", default=None, help="file name stem (default: from the caption)")
    p.add_argument(
        "--prompt", action="append", default=[], metavar="SECONDS:CAPTION", help="story mode, e.g. '0:calm' '15:drums'"
    )
    p.add_argument(
        "--prompt-audio", default=None, metavar="CLIP", help="continue this clip (its tokens start the piece)"
    )
    p.add_argument("--unconditional", action="store_true", help="no caption: NULL_COND in every stage")
    for flag, what in (
        ("--temperature", "0 = greedy"),
        ("--top-k", "0 = off"),
        ("--top-p", "1 = off"),
        ("--cond-scale", "classifier-free guidance, 1 = off"),
    ):
        p.add_argument(flag, default=None, metavar="V|STAGE=V,...", help=f"all stages or per stage ({what})")
    p.add_argument("--overlap", type=float, default=0.5, help="fraction of each window kept as context")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the stage LMs (GPU; slow start on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = add("bench", _bench, "benchmarks, printed as JSON")
    p.add_argument("part", choices=["shards", "tokenize", "train", "startup", "lm", "scaling", "codec", "generate"])
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for the benchmark's run(), value parsed as YAML (repeatable)",
    )
    p.add_argument("--out", default=None, help="also write the JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    from musiclm.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
