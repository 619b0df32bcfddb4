"""Tokenize text corpora into packed, fixed-length WebDataset shards plus a manifest.

    python -m data_tools.shard --input 'data/owt/*.parquet' --tokenizer tok/owt32k.model \
        --seq-len 1024 --out s3://bucket/owt-1024 --val-fraction 0.005 --workers 16

Documents are tokenized in --workers processes, each followed by the tokenizer's EOS, and packed
back to back into sequences of --seq-len tokens (a document may span two sequences; only the very
last sequence of a split is padded, with EOS). A document goes to the validation split with
probability --val-fraction (seeded, so the split is reproducible). manifest.json is written last,
with the tokenizer's URL and sha256 and the source text bytes of each split (for bits per byte).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

from data_tools.cli import Progress, add_output_args, check_output_args, run
from md4_dist.data.sharding import shard_corpus


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.shard", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files or globs (local or fsspec URLs)")
    ap.add_argument("--tokenizer", required=True, help="a SentencePiece .model (local or fsspec URL)")
    ap.add_argument("--seq-len", type=int, required=True)
    add_output_args(ap)
    ap.add_argument("--workers", type=int, default=max(1, mp.cpu_count() - 1))
    ap.add_argument("--text-field", default="text", help="JSONL field / parquet column with the text")
    args = ap.parse_args(argv)
    check_output_args(ap, args)
    if args.workers < 1:
        ap.error("--workers must be >= 1")

    start = time.monotonic()
    with Progress(unit="doc", desc="shard") as bar:
        def show(counts):
            mb_s = counts.bytes / 1e6 / max(time.monotonic() - start, 1e-9)
            bar.to(counts.docs, tokens=f"{counts.tokens:,}", MB_s=f"{mb_s:.1f}")

        manifest, counts = shard_corpus(
            args.input, args.tokenizer, args.out, seq_len=args.seq_len, val_fraction=args.val_fraction,
            sequences_per_shard=args.sequences_per_shard, workers=args.workers,
            text_field=args.text_field, overwrite=args.overwrite, progress=show)
    elapsed = time.monotonic() - start
    print(f"{counts.docs:,} documents, {counts.tokens:,} tokens in {elapsed:.1f} s "
          f"({counts.bytes / 1e6 / elapsed:.2f} MB/s of text); "
          + ", ".join(f"{k}: {v.sequences:,} sequences" for k, v in manifest.splits.items())
          + f"; manifest {manifest.url}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
