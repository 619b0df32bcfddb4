"""The SentencePiece tokenizer a model was trained with, found by the record its dataset's
manifest keeps ({"url", "sha256"}), and text turned into rows exactly as sharding does
(md4_dist.data.packing).

    sp = load_tokenizer(record)                         # the file the record names
    sp = load_tokenizer(record, "tok/owt32k.model")     # a copy elsewhere: same bytes, checked
    rows, text_bytes = pack_documents(sp, ["a document", "another"], seq_len=1024)
    text = decode(rows[0].tolist(), sp, sp.eos_id())    # the documents, a blank line between
"""

from __future__ import annotations

import hashlib

import numpy as np
import sentencepiece as spm

from md4_dist.data.packing import Packer, encode_documents
from md4_dist.data.storage import StorageConfig, StorageError, read_bytes


class TokenizerError(ValueError):
    """A tokenizer is missing, unreadable or not the one a model was trained with; names it."""


def load_tokenizer(record: dict | None, url: str | None = None,
                   storage: StorageConfig | None = None) -> spm.SentencePieceProcessor:
    """The tokenizer of `record`, read from `url` when given (else the record's own URL)."""
    proto = read_tokenizer(record, url, storage)
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError on bad protos
        raise TokenizerError(f"{url or record['url']} is not a SentencePiece model ({e})") from None


def read_tokenizer(record: dict | None, url: str | None = None,
                   storage: StorageConfig | None = None) -> bytes:
    """The bytes of `record`'s tokenizer, read from `url` when given (else the record's own URL).
    They must hash to the record's sha256: another tokenizer would pair token ids with the wrong
    pieces without any error."""
    if record is None:
        raise TokenizerError("the model's training data has no tokenizer (a synthetic corpus of "
                             "token ids): text cannot be encoded or decoded for it")
    url = url or record["url"]
    try:
        proto = read_bytes(url, storage)
    except StorageError as e:
        raise TokenizerError(f"cannot read the tokenizer: {e}") from None
    digest = hashlib.sha256(proto).hexdigest()
    if digest != record["sha256"]:
        raise TokenizerError(f"tokenizer {url} (sha256 {digest[:12]}...) does not match the one the "
                             f"model was trained with ({record['url']}, sha256 "
                             f"{record['sha256'][:12]}...)")
    return proto


def pack_documents(sp: spm.SentencePieceProcessor, docs: list[str],
                   seq_len: int) -> tuple[np.ndarray, int]:
    """Documents as training saw them: each followed by EOS, back to back in rows of seq_len,
    the last row padded with EOS. Returns the rows [N, seq_len] int64 and the text's UTF-8 bytes."""
    class Rows(list):  # the packer's writer, in memory
        def write(self, row):
            self.append(row)

        def close(self):
            pass

    flat, _, sizes = encode_documents(sp, docs)
    rows = Rows()
    packer = Packer(rows, seq_len, sp.eos_id())
    packer.add(flat, sum(sizes))
    packer.finish()
    return np.stack(rows).astype(np.int64), packer.source_bytes


def decode(tokens: list[int], tokenizer, eos_id: int | None) -> str:
    """The text of one sample: its documents (split at EOS) joined by blank lines; the ids
    themselves when there is no tokenizer."""
    if tokenizer is None:
        return " ".join(map(str, tokens))
    docs, current = [], []
    for tok in tokens:
        if tok == eos_id:
            docs.append(current)
            current = []
        else:
            current.append(tok)
    docs.append(current)
    return "\n\n".join(tokenizer.decode(d) for d in docs if d)
