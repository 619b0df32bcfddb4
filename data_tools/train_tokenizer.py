"""Train a SentencePiece tokenizer (byte fallback, lossless) on text corpora.

    python -m data_tools.train_tokenizer --input 'data/owt/*.parquet' --vocab-size 32000 \
        --out s3://bucket/tok/owt32k [--model-type bpe|unigram] [--text-field text] \
        [--sample-bytes 200000000]

Writes PREFIX.model and PREFIX.vocab (local path or any fsspec URL). The tokenizer keeps text
exactly: no normalisation, whitespace kept, and any character outside the vocabulary falls back to
its UTF-8 bytes, so decode(encode(text)) == text. Ids: 0 <unk>, 1 <s>, 2 </s> (the EOS that
separates documents when sharding). Training reads the first --sample-bytes of the inputs.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import sentencepiece as spm
from tqdm import tqdm

from data_tools.cli import run
from md4_dist.data.sources import all_documents, expand
from md4_dist.data.storage import write_bytes

# SentencePiece skips training sentences longer than this; documents are fed line by line.
MAX_SENTENCE_BYTES = 16384


def sentences(urls: list[str], text_field: str, sample_bytes: int, bar: tqdm):
    fed = 0
    for doc in all_documents(urls, text_field):
        for line in doc.split("\n"):
            if not line.strip():
                continue
            size = len(line.encode("utf-8"))
            if size > MAX_SENTENCE_BYTES:
                line = line[:MAX_SENTENCE_BYTES // 4]  # a prefix is still good training text
                size = len(line.encode("utf-8"))
            yield line
            fed += size
            bar.update(size)
            if fed >= sample_bytes:
                return


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.train_tokenizer",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files or globs (local or fsspec URLs)")
    ap.add_argument("--vocab-size", type=int, required=True,
                    help="pieces, the 256 byte pieces and the special tokens included (>= 260)")
    ap.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                    help="SentencePiece's model type (default: %(default)s)")
    ap.add_argument("--text-field", default="text",
                    help="JSONL field / parquet column with the text (default: %(default)s)")
    ap.add_argument("--sample-bytes", type=int, default=200_000_000,
                    help="train on this much text, in bytes (default: %(default)s)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.vocab_size < 260:
        ap.error("--vocab-size must be >= 260 (256 byte pieces plus the special tokens)")
    urls = expand(args.input)
    model = io.BytesIO()
    with tqdm(total=args.sample_bytes, unit="B", unit_scale=True, desc="tokenizer text",
              file=sys.stderr) as bar:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(urls, args.text_field, args.sample_bytes, bar),
            model_writer=model, vocab_size=args.vocab_size, model_type=args.model_type,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
            max_sentence_length=MAX_SENTENCE_BYTES, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    write_bytes(args.out + ".model", model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    write_bytes(args.out + ".vocab", vocab.encode("utf-8"))
    print(f"wrote {args.out}.model ({sp.get_piece_size()} pieces, {args.model_type}) from "
          f"{len(urls)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
