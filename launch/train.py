#!/usr/bin/env python
"""Train one stage with DeepSpeed: the entry point for the `deepspeed` launcher.

    deepspeed --num_gpus 8 launch/train.py --stage coarse \
        --config launch/configs/coarse.yaml --deepspeed_config deepspeed_configs/zero2.json

    # several nodes (passwordless ssh, shared run folder):
    deepspeed --hostfile launch/hostfile launch/train.py --stage fine ...

    # CPU (no GPU): DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/train.py ... \
    #     --deepspeed_config deepspeed_configs/cpu.json

Resumes from the newest complete checkpoint of the run by default (`--resume auto`), also at
another world size (converted to a DeepSpeed universal checkpoint first). SIGTERM/SIGINT:
checkpoint at the next step boundary, exit 0. See musiclm/train/engine.py for the config keys.
"""

import os
import sys

# `deepspeed launch/train.py` puts launch/ first on sys.path; make the repo importable without an install
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

from musiclm.train.engine import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
