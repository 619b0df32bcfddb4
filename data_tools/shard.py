"""Tokenize text corpora into packed, fixed-length WebDataset shards plus a manifest.

    python -m data_tools.shard --input 'data/owt/*.parquet' --tokenizer tok/gpt2/tokenizer.json \
        --seq-len 1024 --out s3://bucket/owt-gpt2-1024 --val-fraction 0.005 --workers 16

--tokenizer is a SentencePiece .model (data_tools.train_tokenizer) or a Hugging Face
tokenizer.json (GPT-2's byte-level BPE: V = 50257, EOS 50256), told apart by content; a file of
neither kind is refused at once, naming it.

Documents are tokenized in --workers processes, each followed by the tokenizer's EOS, and packed
back to back into sequences of --seq-len tokens (a document may span two sequences; only the very
last sequence of a split is padded, with EOS). A document goes to the validation split with
probability --val-fraction (seeded, so the split is reproducible). manifest.json is written last,
with the tokenizer's URL, sha256 and kind and the source text bytes of each split (for bits per
byte). The last line gives the start-up (to the first tokenized batch) and the rate after it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

# Nothing more at module level: spawn imports this module again in each tokenizing worker (as
# __mp_main__), which needs none of the parent's tools (fsspec, tqdm, the shard writer).


def build_parser() -> argparse.ArgumentParser:
    from data_tools.cli import add_output_args

    ap = argparse.ArgumentParser(prog="python -m data_tools.shard", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files or globs (local or fsspec URLs)")
    ap.add_argument("--tokenizer", required=True,
                    help="a SentencePiece .model or a Hugging Face tokenizer.json (local or fsspec URL)")
    ap.add_argument("--seq-len", type=int, required=True, help="tokens per packed sequence")
    add_output_args(ap)
    ap.add_argument("--workers", type=int, default=max(1, mp.cpu_count() - 1),
                    help="tokenizing processes (default: %(default)s, this machine's CPUs less one)")
    ap.add_argument("--text-field", default="text",
                    help="JSONL field / parquet column with the text (default: %(default)s)")
    return ap


def main(argv=None) -> int:
    from data_tools.cli import Progress, check_output_args
    from md4_dist.data.sharding import shard_corpus

    ap = build_parser()
    args = ap.parse_args(argv)
    check_output_args(ap, args)
    if args.workers < 1:
        ap.error("--workers must be >= 1")

    start = time.monotonic()
    first = {}  # the time and bytes of the first tokenized batch: start-up ends there
    with Progress(unit="doc", desc="shard") as bar:
        def show(counts):
            now = time.monotonic()
            first.setdefault("t", now)
            first.setdefault("bytes", counts.bytes)
            mb_s = counts.bytes / 1e6 / max(now - start, 1e-9)
            bar.to(counts.docs, tokens=f"{counts.tokens:,}", MB_s=f"{mb_s:.1f}")

        manifest, counts = shard_corpus(
            args.input, args.tokenizer, args.out, seq_len=args.seq_len, val_fraction=args.val_fraction,
            sequences_per_shard=args.sequences_per_shard, workers=args.workers,
            text_field=args.text_field, overwrite=args.overwrite, progress=show)
    elapsed = time.monotonic() - start
    startup = first["t"] - start
    steady = (counts.bytes - first["bytes"]) / 1e6 / max(elapsed - startup, 1e-9)
    print(f"{counts.docs:,} documents, {counts.tokens:,} tokens in {elapsed:.1f} s "
          f"({counts.bytes / 1e6 / elapsed:.2f} MB/s of text); start-up {startup:.2f} s to the first "
          f"tokenized batch, then {steady:.2f} MB/s ({steady / args.workers:.2f} MB/s per worker); "
          + ", ".join(f"{k}: {v.sequences:,} sequences" for k, v in manifest.splits.items())
          + f"; manifest {manifest.url}")
    return 0


if __name__ == "__main__":
    from data_tools.cli import run

    sys.exit(run(main))
