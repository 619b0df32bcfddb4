"""Text corpora tokenized into packed, fixed-length WebDataset shards plus a manifest.

    manifest, counts = shard_corpus(["data/owt/*.parquet"], "tok/gpt2/tokenizer.json", "s3://bucket/owt-1024",
                                    seq_len=1024, val_fraction=0.005, workers=16)

The tokenizer is a SentencePiece .model or a Hugging Face tokenizer.json (md4_dist.tokenizer).

Documents are tokenized in `workers` processes, each followed by the tokenizer's EOS, and packed
back to back into sequences of seq_len tokens (a document may span two sequences; only the very
last sequence of a split is padded, with EOS). A document goes to the validation split with
probability val_fraction (seeded, so the split is reproducible). manifest.json is written last,
with the tokenizer's URL, sha256 and kind and the source text bytes of each split (for bits per
byte).

The workers are spawned processes that import md4_dist.data.packing, the tokenizer libraries and
the caller's __main__ module (spawn imports it again in each), so nothing here imports torch: with
torch among data_tools.shard's imports, each of 14 workers paid for it, together half a minute
before the first document. The shard writer writes its tars with the standard library for the
same reason (shard_writer.py).
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from md4_dist.data.manifest import Manifest, save, token_dtype
from md4_dist.data.packing import Packer, init_worker, worker_encode
from md4_dist.data.shard_writer import SplitWriter, prepare_output
from md4_dist.data.sources import all_documents, expand
from md4_dist.data.storage import read_bytes
from md4_dist.tokenizer import parse_tokenizer, tokenizer_record

DOCS_PER_TASK = 64
VAL_SEED = 20240521


@dataclass
class ShardCounts:
    """What shard_corpus has read so far: documents, their tokens (EOS included) and UTF-8 bytes."""

    docs: int = 0
    tokens: int = 0
    bytes: int = 0


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


def _tokenized(pool: ProcessPoolExecutor, workers: int, urls, text_field, val_fraction):
    """(splits, tokens, lengths, sizes) of each batch of documents, in input order."""
    # A bounded window of tasks in flight, consumed in submission order so the output does not
    # depend on timing.
    inflight = deque()
    for docs, splits in _tasks(urls, text_field, val_fraction):
        inflight.append((splits, pool.submit(worker_encode, docs)))
        if len(inflight) >= 4 * workers:
            splits, done = inflight.popleft()
            yield splits, *done.result()
    while inflight:
        splits, done = inflight.popleft()
        yield splits, *done.result()


def shard_corpus(inputs: list[str], tokenizer: str, out: str, *, seq_len: int,
                 val_fraction: float = 0.0, sequences_per_shard: int = 10000, workers: int = 1,
                 text_field: str = "text", overwrite: bool = False,
                 progress: Callable[[ShardCounts], None] | None = None) -> tuple[Manifest, ShardCounts]:
    """Shards the documents of `inputs` (files or globs) at `out`; returns the saved manifest
    (its url set) and the counts. `progress` is called with the running counts after each batch."""
    data = read_bytes(tokenizer)
    tok = parse_tokenizer(data, tokenizer)  # neither kind: a TokenizerError naming the file
    if tok.eos_id is None:
        raise ValueError(f"{tokenizer} has no EOS token, needed to separate documents")
    V = tok.vocab_size
    dtype = token_dtype(V)
    urls = expand(inputs)

    # A process pool that raises (BrokenProcessPool) if a worker dies. Spawned, not forked: the
    # workers need only the tokenizer, not a copy of a large parent.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=init_worker,
                             initargs=(data, tokenizer)) as pool:
        prepare_output(out, overwrite)
        packers = {name: Packer(SplitWriter(out, name, seq_len, dtype, sequences_per_shard),
                                seq_len, tok.eos_id) for name in ("train", "val")}
        counts = ShardCounts()
        for splits, flat, lengths, sizes in _tokenized(pool, workers, urls, text_field, val_fraction):
            for split, size, end, n in zip(splits, sizes, np.cumsum(lengths), lengths):
                packers[split].add(flat[end - n:end], size)
            counts.docs += len(lengths)
            counts.tokens += int(lengths.sum())
            counts.bytes += sum(sizes)
            if progress is not None:
                progress(counts)
    for p in packers.values():
        p.finish()
    if counts.docs == 0:
        raise ValueError(f"inputs {inputs} hold no documents")

    splits = {}
    for name, p in packers.items():
        if p.writer.sequences:
            splits[name] = p.writer.split
            splits[name].source_bytes = p.source_bytes
    manifest = Manifest(
        vocab_size=V, seq_len=seq_len, dtype=dtype, splits=splits, eos_id=tok.eos_id,
        tokenizer=tokenizer_record(data, tokenizer, tok),
        # provenance: the command line whose options these are
        created_by={"tool": "data_tools.shard", "inputs": urls, "val_fraction": val_fraction,
                    "val_seed": VAL_SEED, "padded_tokens": {k: p.padded for k, p in packers.items()}})
    manifest.url = save(manifest, out)
    return manifest, counts
