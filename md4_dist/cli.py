"""What the md4_dist commands that read a trained model share: their checkpoint options, the
device, and one clear line (exit status 2) for a user's error instead of a traceback."""

from __future__ import annotations

import sys

import torch

from md4_dist.data.manifest import ManifestError
from md4_dist.data.storage import StorageError
from md4_dist.strict_config import ConfigError
from md4_dist.trainer.checkpoint import CheckpointError

USER_ERRORS = (CheckpointError, ConfigError, ManifestError, StorageError, FileNotFoundError,
               FileExistsError, ValueError)  # TokenizerError is a ValueError


def run(main, argv=None) -> int:
    try:
        return main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_checkpoint_args(ap) -> None:
    ap.add_argument("--checkpoint", required=True,
                    help="a run directory (its latest checkpoint) or one checkpoint directory; "
                         "local path, s3://, gs://")
    ap.add_argument("--no-ema", action="store_true",
                    help="the trained weights instead of their exponential moving average")
    ap.add_argument("--tokenizer", default=None,
                    help="where the training data's tokenizer is now, if it moved (its sha256 must "
                         "match the one recorded)")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")


def device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device")
    return dev
