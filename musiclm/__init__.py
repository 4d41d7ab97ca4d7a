"""musiclm: train MusicLM-style text-to-music models on your own corpus.

Audio and captions are tokenized by Ray jobs (`ray_jobs/`) into WebDataset token shards, three
decoder-only transformers (semantic, coarse, fine) are trained on them with DeepSpeed
(`launch/train.py`), and `musiclm generate` turns a caption into 24 kHz audio.
"""

__version__ = "0.1.0"
