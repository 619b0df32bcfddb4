"""Documents into rows as training sees them: each document's tokens followed by EOS, packed back
to back into rows of seq_len (a document may span two rows; only the last row is padded, with
EOS). Only numpy and sentencepiece, so the tokenizing workers sharding spawns (init_worker,
worker_encode) start in a fraction of a second, and md4_dist.tokenizer stays free of torch.

    flat, lengths, sizes = encode_documents(sp, ["a document", "another"])
    packer = Packer(writer, seq_len=1024, pad_id=sp.eos_id())   # writer: a SplitWriter, say
    packer.add(flat, sum(sizes))
    packer.finish()                                             # pads the last row, closes writer
"""

from __future__ import annotations

import itertools
from typing import Protocol

import numpy as np
import sentencepiece as spm

_SP: spm.SentencePieceProcessor | None = None


def init_worker(model_proto: bytes) -> None:
    global _SP
    _SP = spm.SentencePieceProcessor(model_proto=model_proto)


def worker_encode(docs: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    return encode_documents(_SP, docs)


def encode_documents(sp: spm.SentencePieceProcessor,
                     docs: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Token ids of a batch of documents, each followed by EOS, concatenated; each document's
    length in tokens (EOS included) and in UTF-8 bytes."""
    ids = sp.encode(docs, num_threads=1)  # one core per worker: --workers W uses W cores
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    flat = np.insert(body, np.cumsum(lengths), sp.eos_id())  # EOS after each document
    return flat, lengths + 1, [len(d.encode("utf-8")) for d in docs]


class RowWriter(Protocol):
    def write(self, tokens: np.ndarray) -> None: ...

    def close(self) -> None: ...


class Packer:
    """Cuts a stream of tokens into [seq_len] sequences for one split's writer."""

    def __init__(self, writer: RowWriter, seq_len: int, pad_id: int):
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
