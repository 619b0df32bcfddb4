"""The tokenizing worker process of data_tools.shard: only numpy and sentencepiece, so a spawned
worker starts in a fraction of a second (the shard writer's imports pull in torch)."""

from __future__ import annotations

import itertools

import numpy as np
import sentencepiece as spm

_SP: spm.SentencePieceProcessor | None = None


def init(model_proto: bytes) -> None:
    global _SP
    _SP = spm.SentencePieceProcessor(model_proto=model_proto)


def encode(docs: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    return encode_with(_SP, docs)


def encode_with(sp: spm.SentencePieceProcessor, docs: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Token ids of a batch of documents, each followed by EOS, concatenated; each document's
    length in tokens (EOS included) and in UTF-8 bytes."""
    ids = sp.encode(docs, num_threads=1)  # one core per worker: --workers W uses W cores
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    flat = np.insert(body, np.cumsum(lengths), sp.eos_id())  # EOS after each document
    return flat, lengths + 1, [len(d.encode("utf-8")) for d in docs]
