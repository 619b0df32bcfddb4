"""The tokenizer a model was trained with: a SentencePiece .model or a Hugging Face tokenizer.json
(GPT-2's byte-level BPE, say), told apart by the file's content, not its name. A dataset's
manifest records it as {"url", "sha256", "kind"}; loading checks the sha256, so another file is
refused. Text is turned into rows exactly as sharding does (md4_dist.data.packing).

    tok = load_tokenizer(record)                         # the file the record names
    tok = load_tokenizer(record, "tok/gpt2.json")        # a copy elsewhere: same bytes, checked
    tok.encode("text"), tok.decode(ids), tok.vocab_size, tok.eos_id, tok.kind
    rows, text_bytes = pack_documents(tok, ["a document", "another"], seq_len=1024)
    text = decode(rows[0].tolist(), tok, tok.eos_id)     # the documents, a blank line between
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from md4_dist.data.storage import StorageConfig, StorageError, read_bytes

SENTENCEPIECE, HF_JSON = "sentencepiece", "hf_tokenizer_json"
FILE_NAMES = {SENTENCEPIECE: "tokenizer.model", HF_JSON: "tokenizer.json"}  # as exported
# The special tokens taken as a tokenizer.json's end of document, in this order of preference:
# GPT-2's (id 50256 of V = 50257), then the usual names of others.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")


class TokenizerError(ValueError):
    """A tokenizer is missing, unreadable or not the one a model was trained with; names it."""


class SentencePieceTokenizer:
    kind = SENTENCEPIECE

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)  # RuntimeError if not one
        self.vocab_size = self._sp.get_piece_size()
        if self.vocab_size == 0:  # sentencepiece accepts an empty file as an empty model
            raise ValueError("no pieces")
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        """threads = 1: one core (sharding's workers each take one); 0: every core."""
        return self._sp.encode(list(texts), num_threads=threads or -1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer:
    """A Hugging Face tokenizer.json. Encoding adds no special tokens, and the text of a special
    token inside a document ("<|endoftext|>" in a web page) is encoded as the text it is: only
    packing puts EOS between documents, so a document boundary is never invented."""

    kind = HF_JSON

    def __init__(self, data: bytes):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(data.decode("utf-8"))  # raises if it is no tokenizer.json
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.eos_id = next((specials[n] for n in EOS_NAMES if n in specials), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        """threads = 1: this thread only (sharding's workers each take one core); else the
        library's thread pool. The batch call is about 1.5 times faster per core than a call per
        text, but stays on one thread only where TOKENIZERS_PARALLELISM=false (which the library
        reads at each call, and sharding's workers set)."""
        if threads == 1 and os.environ.get("TOKENIZERS_PARALLELISM", "").lower() not in ("false", "0"):
            return [self._tok.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


Tokenizer = SentencePieceTokenizer | HFTokenizer


def parse_tokenizer(data: bytes, name: str) -> Tokenizer:
    """The tokenizer in `data` (the bytes of the file `name`), by its content: JSON is a
    tokenizer.json, anything else must be a SentencePiece model proto."""
    is_json = data.lstrip()[:1] == b"{"
    try:
        return HFTokenizer(data) if is_json else SentencePieceTokenizer(data)
    except Exception as e:  # noqa: BLE001 - both libraries raise bare Exception/RuntimeError
        why = (f"JSON, but not a tokenizer.json: {e}" if is_json else
               f"not JSON, and sentencepiece cannot read it: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}")
        raise TokenizerError(f"{name} is neither a SentencePiece .model nor a Hugging Face "
                             f"tokenizer.json ({why})") from None


def tokenizer_record(data: bytes, url: str, tok: Tokenizer) -> dict:
    """What a manifest keeps of the tokenizer a dataset was made with."""
    return {"url": url, "sha256": hashlib.sha256(data).hexdigest(), "kind": tok.kind}


def load_tokenizer(record: dict | None, url: str | None = None,
                   storage: StorageConfig | None = None) -> Tokenizer:
    """The tokenizer of `record`, read from `url` when given (else the record's own URL)."""
    return parse_tokenizer(read_tokenizer(record, url, storage), url or record["url"])


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
        data = read_bytes(url, storage)
    except StorageError as e:
        raise TokenizerError(f"cannot read the tokenizer: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["sha256"]:
        raise TokenizerError(f"tokenizer {url} (sha256 {digest[:12]}...) does not match the one the "
                             f"model was trained with ({record['url']}, sha256 "
                             f"{record['sha256'][:12]}...)")
    return data


def pack_documents(tok: Tokenizer, docs: list[str], seq_len: int) -> tuple[np.ndarray, int]:
    """Documents as training saw them: each followed by EOS, back to back in rows of seq_len,
    the last row padded with EOS. Returns the rows [N, seq_len] int64 and the text's UTF-8 bytes."""
    from md4_dist.data.packing import Packer, encode_documents

    class Rows(list):  # the packer's writer, in memory
        def write(self, row):
            self.append(row)

        def close(self):
            pass

    if tok.eos_id is None:
        raise TokenizerError(f"the {tok.kind} tokenizer has no EOS token, needed to separate documents")
    flat, _, sizes = encode_documents(tok, docs, threads=0)
    rows = Rows()
    packer = Packer(rows, seq_len, tok.eos_id)
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
