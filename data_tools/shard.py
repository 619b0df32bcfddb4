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
import hashlib
import multiprocessing as mp
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from data_tools import tokenize_worker
from data_tools.cli import add_output_args, check_output_args, run
from data_tools.shard_writer import SplitWriter, prepare_output
from data_tools.sources import all_documents, expand
from md4_dist.data.manifest import Manifest, save, token_dtype
from md4_dist.data.storage import read_bytes

DOCS_PER_TASK = 64
VAL_SEED = 20240521

class Packer:
    """Cuts a stream of tokens into [seq_len] sequences for one split's writer."""

    def __init__(self, writer: SplitWriter, seq_len: int, pad_id: int):
        self.writer, self.seq_len, self.pad_id = writer, seq_len, pad_id
        self.buffer = np.empty(0, dtype=np.int64)
        self.source_bytes = 0
        self.padded = 0

    def add(self, tokens: np.ndarray, text_bytes: int) -> None:
        self.source_bytes += text_bytes
        buf = np.concatenate([self.buffer, tokens])
        full = len(buf) // self.seq_len * self.seq_len
        for row in buf[:full].reshape(-1, self.seq_len):
            self.writer.write(row)
        self.buffer = buf[full:]

    def finish(self) -> None:
        if len(self.buffer):
            self.padded = self.seq_len - len(self.buffer)
            self.writer.write(np.concatenate([self.buffer, np.full(self.padded, self.pad_id)]))
            self.buffer = self.buffer[:0]
        self.writer.close()


def _tasks(urls, text_field, val_fraction):
    """Batches of (documents, the split of each)."""
    rng = np.random.default_rng(VAL_SEED)
    docs, splits = [], []
    for doc in all_documents(urls, text_field):
        split = "val" if val_fraction and rng.random() < val_fraction else "train"
        docs.append(doc)
        splits.append(split)
        if len(docs) == DOCS_PER_TASK:
            yield docs, splits
            docs, splits = [], []
    if docs:
        yield docs, splits


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

    model_proto = read_bytes(args.tokenizer)
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError on bad protos
        raise ValueError(f"{args.tokenizer} is not a SentencePiece model ({e})") from None
    if sp.eos_id() < 0:
        raise ValueError(f"{args.tokenizer} has no EOS token, needed to separate documents")
    V = sp.get_piece_size()
    dtype = token_dtype(V)
    urls = expand(args.input)
    prepare_output(args.out, args.overwrite)

    packers = {name: Packer(SplitWriter(args.out, name, args.seq_len, dtype, args.sequences_per_shard),
                            args.seq_len, sp.eos_id()) for name in ("train", "val")}
    counts = {"docs": 0, "tokens": 0, "bytes": 0}
    start = time.monotonic()

    def consume(splits, future):
        flat, lengths, sizes = future.result()
        for split, size, end, n in zip(splits, sizes, np.cumsum(lengths), lengths):
            packers[split].add(flat[end - n:end], size)
        counts["docs"] += len(lengths)
        counts["tokens"] += int(lengths.sum())
        counts["bytes"] += sum(sizes)
        bar.update(len(lengths))
        mb_s = counts["bytes"] / 1e6 / max(time.monotonic() - start, 1e-9)
        bar.set_postfix(tokens=f"{counts['tokens']:,}", MB_s=f"{mb_s:.1f}", refresh=False)

    # A process pool that raises (BrokenProcessPool) if a worker dies, and a bounded window of
    # tasks in flight, consumed in submission order so the output does not depend on timing.
    ctx = mp.get_context("spawn")  # workers need only sentencepiece: no fork of a large parent
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=tokenize_worker.init,
                             initargs=(model_proto,)) as pool, \
            tqdm(unit="doc", desc="shard", file=sys.stderr) as bar:
        inflight = deque()
        for docs, splits in _tasks(urls, args.text_field, args.val_fraction):
            inflight.append((splits, pool.submit(tokenize_worker.encode, docs)))
            if len(inflight) >= 4 * args.workers:
                consume(*inflight.popleft())
        while inflight:
            consume(*inflight.popleft())
    for p in packers.values():
        p.finish()
    if counts["docs"] == 0:
        raise ValueError(f"inputs {args.input} hold no documents")

    splits = {}
    for name, p in packers.items():
        if p.writer.sequences:
            splits[name] = p.writer.split
            splits[name].source_bytes = p.source_bytes
    manifest = Manifest(
        vocab_size=V, seq_len=args.seq_len, dtype=dtype, splits=splits, eos_id=sp.eos_id(),
        tokenizer={"url": args.tokenizer, "sha256": hashlib.sha256(model_proto).hexdigest()},
        created_by={"tool": "data_tools.shard", "inputs": urls, "val_fraction": args.val_fraction,
                    "val_seed": VAL_SEED, "padded_tokens": {k: p.padded for k, p in packers.items()}})
    url = save(manifest, args.out)
    elapsed = time.monotonic() - start
    print(f"{counts['docs']:,} documents, {counts['tokens']:,} tokens in {elapsed:.1f} s "
          f"({counts['bytes'] / 1e6 / elapsed:.2f} MB/s of text); "
          + ", ".join(f"{k}: {v.sequences:,} sequences" for k, v in splits.items()) + f"; manifest {url}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
