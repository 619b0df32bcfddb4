"""Documents into rows as training sees them: each document's tokens followed by EOS, packed back
to back into rows of seq_len (a document may span two rows; only the last row is padded, with
EOS). Only numpy and the tokenizer libraries, so the tokenizing workers sharding spawns
(init_worker, worker_encode) start in a fraction of a second, and md4_dist.tokenizer stays free
of torch.

    flat, lengths, sizes = encode_documents(tok, ["a document", "another"])  # an md4_dist.tokenizer
    packer = Packer(writer, seq_len=1024, pad_id=tok.eos_id)   # writer: a SplitWriter, say
    packer.add(flat, sum(sizes))
    packer.finish()                                             # pads the last row, closes writer
"""

from __future__ import annotations

import itertools
import os
from typing import Protocol

import numpy as np

_TOK = None  # a worker's tokenizer (md4_dist.tokenizer.Tokenizer), built once by init_worker


def init_worker(data: bytes, name: str) -> None:
    # imported here: md4_dist.tokenizer imports this module for pack_documents
    from md4_dist.tokenizer import parse_tokenizer

    # one core per worker: a tokenizer.json's batch encoding then stays on this thread
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _TOK
    _TOK = parse_tokenizer(data, name)


def worker_encode(docs: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    return encode_documents(_TOK, docs)


def encode_documents(tok, docs: list[str], threads: int = 1) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Token ids of a batch of documents, each followed by `tok`'s EOS, concatenated; each
    document's length in tokens (EOS included) and in UTF-8 bytes. threads = 1 by default: one
    core per worker, so --workers W uses W cores; 0: every core."""
    ids = tok.encode_batch(docs, threads)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    flat = np.insert(body, np.cumsum(lengths), tok.eos_id)  # EOS after each document
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
