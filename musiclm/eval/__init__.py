"""Evaluation families, one module each, run as ``musiclm eval <family>``.

* :mod:`musiclm.eval.retrieval` -- text<->audio Recall@1/5/10, median rank, a similarity-matrix PNG
  and a tempo probe for any :class:`~musiclm.mulan.embedder.AudioTextEmbedder` (our MuLaN, CLAP).
* :mod:`musiclm.eval.tempo` -- tempo following of the semantic stage: BPM estimated from semantic
  tokens (ground truth and generated from captions) against the caption BPM, with baselines.
* :mod:`musiclm.eval.codec` -- an acoustic codec's reconstruction (SI-SNR, multi-scale mel, log-mel
  L1 overall and below 150 Hz, tempo kept) per number of levels, against EnCodec and low-pass copies.
* :mod:`musiclm.eval.fad` -- FAD and unbiased KID between generated and real audio on 1-s segment
  embeddings of :mod:`musiclm.eval.musicnn` (the pretrained musicnn tagger ported to PyTorch, its
  MagnaTagATune weights vendored), with clip and segment counts and clip-bootstrap intervals
  (:mod:`musiclm.eval.stats`).
* :mod:`musiclm.eval.memorization` -- the MusicLM paper's memorization analysis: the semantic stage
  prompted with training samples, the share of exact and approximate (token-histogram transport)
  copies of their continuations, greedy and sampled, and the longest generated run found verbatim in
  the train shards (suffix array).
* :mod:`musiclm.eval.report` -- ``musiclm eval report``: generates an evaluation set
  (:mod:`musiclm.eval.generated`), checks every model against its trivial baseline and writes
  report.md with MCC (:mod:`musiclm.eval.mcc`), tag KL (:mod:`musiclm.eval.tagkl`), style accuracy
  (:mod:`musiclm.eval.style`), tempo (:mod:`musiclm.eval.audio_tempo`) and FAD/KID.

Each module exposes ``add_arguments(parser)`` and ``run_from_args(args)`` for the CLI and a plain
function (e.g. :func:`musiclm.eval.retrieval.evaluate_retrieval`) returning a JSON-able dict.
Modules are imported on demand (``importlib.import_module(f"musiclm.eval.{family}")``) so
``import musiclm.eval`` stays cheap.
"""

FAMILIES = ("retrieval", "tempo", "codec", "fad", "memorization", "report")
