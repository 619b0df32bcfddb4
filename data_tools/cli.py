"""Shared entry-point behaviour of the data tools: expected failures print one clear line."""

from __future__ import annotations

import sys

from tqdm import tqdm

from md4_dist.data.manifest import ManifestError
from md4_dist.data.storage import StorageError


def run(main) -> int:
    """Call main(); a user error (bad input, storage, existing output) prints `error: ...`, exits 2."""
    try:
        return main()
    except (FileExistsError, FileNotFoundError, StorageError, ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no manifest was written, so the output is not a dataset", file=sys.stderr)
        return 130


def add_output_args(ap) -> None:
    """The options every dataset-writing tool takes."""
    ap.add_argument("--out", required=True, help="output directory: local path, s3://, gs://")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="the share of documents (sequences for synthetic) in the 'val' split, "
                         "seeded (default: %(default)s)")
    ap.add_argument("--sequences-per-shard", type=int, default=10000,
                    help="sequences per .tar shard (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")


def check_output_args(ap, args) -> None:
    if args.seq_len < 1 or args.sequences_per_shard < 1:
        ap.error("--seq-len and --sequences-per-shard must be >= 1")
    if not 0 <= args.val_fraction < 1:
        ap.error(f"--val-fraction must lie in [0, 1), got {args.val_fraction}")


class Progress:
    """A tqdm bar on stderr, drawn at its first update, so that a tool failing on its inputs
    prints only its error line.

        with Progress(total=n, unit="seq", desc="markov") as bar:
            write_synthetic_corpus(..., progress=bar.update)   # or bar.to(done, tokens="1,024")
    """

    def __init__(self, **tqdm_args):
        self._args, self._bar = tqdm_args, None

    def update(self, n: int) -> None:
        self.to((self._bar.n if self._bar else 0) + n)

    def to(self, n: int, **postfix) -> None:
        if self._bar is None:
            self._bar = tqdm(file=sys.stderr, **self._args)
        self._bar.update(n - self._bar.n)
        if postfix:
            self._bar.set_postfix(refresh=False, **postfix)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        if self._bar is not None:
            self._bar.close()
