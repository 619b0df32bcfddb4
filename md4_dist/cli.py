"""What the md4_dist commands that read a trained model share: their checkpoint options, the
device, and one clear line (exit status 2) for a user's error instead of a traceback."""

from __future__ import annotations

import sys

import torch

from md4_dist.checkpoint_format import CheckpointError
from md4_dist.data.manifest import ManifestError
from md4_dist.data.storage import StorageError
from md4_dist.strict_config import ConfigError

USER_ERRORS = (CheckpointError, ConfigError, ManifestError, StorageError, FileNotFoundError,
               FileExistsError, ValueError)  # TokenizerError is a ValueError


def run(main, argv=None) -> int:
    try:
        return main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_checkpoint_args(ap, required: bool = True) -> None:
    ap.add_argument("--checkpoint", required=required,
                    help="a run directory (its latest checkpoint) or one checkpoint directory; "
                         "local path, s3://, gs://")
    ap.add_argument("--no-ema", action="store_true",
                    help="the trained weights instead of their exponential moving average")
    ap.add_argument("--tokenizer", default=None,
                    help="where the training data's tokenizer (a SentencePiece .model or a Hugging Face "
                         "tokenizer.json) is now, if it moved (its sha256 must match the one recorded)")
    ap.add_argument("--device", default="auto",
                    help="auto (cuda when there is one), cpu, cuda, cuda:1, ... (default: %(default)s)")


def device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is no device: auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: these commands run on cpu or cuda")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no CUDA device")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return dev
