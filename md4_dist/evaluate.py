"""The NELBO of a trained model on held-out data: an upper bound on its negative log-likelihood,
with the standard error of the estimate. One process, CPU or GPU; no Ray, no DeepSpeed engine.

    python -m md4_dist.evaluate --checkpoint runs/owt                       # its data's val split
    python -m md4_dist.evaluate --checkpoint runs/owt --data s3://bucket/owt-1024 --split val
    python -m md4_dist.evaluate --checkpoint runs/owt --text wikitext-103/wiki.test.raw.txt
    python -m md4_dist.evaluate --samples samples.jsonl --oracle data/markov   # exact sample quality

Prints one JSON line: nelbo_bits_per_token, stderr_bits_per_token, ppl_bound (2 ** the bound),
bits_per_byte (when the text's UTF-8 bytes are known), entropy_bits_per_token and
gap_bits_per_token (when the manifest gives the corpus's exact entropy), tokens, sequences, and
what was evaluated. Progress goes to stderr.

`--samples FILE --oracle DATASET` scores the `sample` command's JSON lines instead, exactly, under
the Markov chain that wrote a `data_tools.synthetic` corpus (md4_dist/inference/oracle.py): the
mean NLL per token against the chain's entropy, the bigram KL from the chain's, with standard
errors, and the count of impossible samples. No model is loaded.

Each sequence's NELBO is the mean over `--t-samples` diffusion times, spread antithetically over
(0, 1] (one draw shifts an evenly spaced grid), each with its own masks: an unbiased estimate whose
noise falls with the count. Sequences are independent, so the standard error is the per-sequence
spread over sqrt(n), data and noise together. `--text` files are tokenized with the model's
tokenizer and packed as training packed its data: documents (one per .txt file, or a line of
.jsonl, a row of .parquet) each followed by EOS, back to back, the last row padded with EOS.
Bits per byte are the bits per token times the tokens per UTF-8 byte of the whole text or split
(with --max-sequences or --skip-sequences, an estimate from the sequences evaluated).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterator

import torch
from tqdm import tqdm

from md4_dist import cli
from md4_dist.data import TokenStream, load_manifest
from md4_dist.inference.consolidate import open_checkpoint
from md4_dist.inference.nelbo import sequence_nelbos, summary
from md4_dist.tokenizer import TokenizerError, load_tokenizer, pack_documents


def _manifest_rows(manifest, split: str, batch: int, seed: int, skip: int, limit: int,
                   storage) -> Iterator[torch.Tensor]:
    """The split's sequences in the seeded order training uses: `limit` of them after the first
    `skip`."""
    stream = TokenStream(manifest, split, batch, seed=seed, loop=False, storage=storage)
    left = limit
    for b in stream:
        x = b["tokens"][skip:skip + left]
        skip = max(0, skip - len(b["tokens"]))
        left -= len(x)
        if len(x):
            yield x
        if left == 0:
            return


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m md4_dist.evaluate", description=__doc__.split("\n\n")[0])
    cli.add_checkpoint_args(ap, required=False)  # required unless --samples
    ap.add_argument("--samples", default=None, metavar="FILE.jsonl",
                    help="score these samples (the sample command's --out FILE.jsonl) under --oracle "
                         "instead of evaluating a model")
    ap.add_argument("--oracle", default=None, metavar="DATASET",
                    help="with --samples: the data_tools.synthetic corpus whose chain scores them")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--data", default=None,
                        help="a dataset (directory or manifest.json URL); default: the one the model trained on")
    source.add_argument("--text", nargs="+", default=None, metavar="PATH",
                        help="text files or globs: .txt (a document each), .jsonl[.gz|.zst] and .parquet (their "
                             "'text' field), tokenized with the model's tokenizer")
    ap.add_argument("--split", default="val",
                    help="the dataset's split (with --data or the default) (default: %(default)s)")
    ap.add_argument("--t-samples", type=int, default=4,
                    help="diffusion times per sequence (default: %(default)s)")
    ap.add_argument("--max-sequences", type=int, default=0,
                    help="the first N sequences only; 0: all (default: %(default)s)")
    ap.add_argument("--skip-sequences", type=int, default=0, help="start after the first N sequences "
                    "(with --max-sequences, disjoint parts of a split can be evaluated apart) "
                    "(default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="sequences x t-samples per forward pass (GenMD4 doubles the rows: two masks "
                         "each) (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the diffusion times and masks (default: %(default)s)")
    return ap


def score_samples(samples: str, oracle: str) -> dict:
    """`--samples FILE --oracle DATASET`: the oracle's figures for the file's samples."""
    from md4_dist.data.storage import read_bytes
    from md4_dist.inference.oracle import chain_of, read_samples, score

    manifest = load_manifest(oracle)
    chain = chain_of(manifest)
    tokens = read_samples(samples, read_bytes(samples).decode(), manifest.vocab_size)
    return score(chain, tokens) | {"samples_file": samples, "oracle": manifest.url}


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.samples is not None or args.oracle is not None:
        if args.samples is None or args.oracle is None or args.checkpoint is not None:
            ap.error("--samples and --oracle go together, without --checkpoint")
        print(json.dumps(score_samples(args.samples, args.oracle)), flush=True)
        return 0
    if args.checkpoint is None:
        ap.error("the following arguments are required: --checkpoint (or --samples with --oracle)")
    if args.t_samples < 1 or args.max_sequences < 0 or args.skip_sequences < 0 or args.batch_size < 1:
        ap.error("--t-samples and --batch-size must be >= 1, --max-sequences and --skip-sequences >= 0")
    dev = cli.device(args.device)

    with open_checkpoint(args.checkpoint) as ckpt:
        cfg = ckpt.config
        model = ckpt.model(ema=not args.no_ema).to(dev)
    V, L = cfg.model.vocab_size, cfg.data.seq_len
    per_forward = max(1, args.batch_size // args.t_samples)  # sequences
    tokens_per_byte = entropy = None  # known for text, and for some datasets
    if args.text is not None:
        from md4_dist.data.sources import all_documents, expand

        tok = load_tokenizer(ckpt.tokenizer, args.tokenizer, cfg.storage)
        docs = list(all_documents(expand(args.text)))
        if not docs:
            raise ValueError(f"--text {' '.join(args.text)} holds no documents")
        rows, text_bytes = pack_documents(tok, docs, L)
        tokens_per_byte = rows.size / text_bytes  # of all the text
        available, source = len(rows), f"--text {' '.join(args.text)}"
        rows = torch.from_numpy(rows[args.skip_sequences:][:args.max_sequences or None])
        total, batches, data = len(rows), rows.split(per_forward), {"text": args.text}
    else:
        manifest = load_manifest(args.data or cfg.data.manifest, cfg.storage)
        manifest.check_compatible(V, L)
        trained_with = (ckpt.tokenizer or {}).get("sha256")
        if (manifest.tokenizer or {}).get("sha256") != trained_with:
            raise TokenizerError(f"dataset {manifest.url} was tokenized with "
                                 f"{(manifest.tokenizer or {}).get('url', 'no tokenizer')}, not the "
                                 f"model's {(ckpt.tokenizer or {}).get('url', 'token ids')}")
        split = manifest.split(args.split)
        available, source = split.sequences, f"{manifest.url}, split {args.split}"
        total = max(0, min(args.max_sequences or available, available - args.skip_sequences))
        batches = _manifest_rows(manifest, args.split, per_forward, cfg.train.seed, args.skip_sequences,
                                 total, cfg.storage)
        data = {"data": manifest.url, "split": args.split}
        if split.source_bytes:
            tokens_per_byte = split.tokens / split.source_bytes
        entropy = manifest.entropy_bits_per_token

    if total == 0:
        raise ValueError(f"--skip-sequences {args.skip_sequences} leaves none of the {available} "
                         f"sequences of {source}")
    generator = torch.Generator().manual_seed(args.seed)
    with tqdm(total=total, unit="seq", desc="evaluate", file=sys.stderr) as bar:
        bits = sequence_nelbos(model, batches, args.t_samples, generator, dev, bar)
    out = summary(bits)
    if tokens_per_byte is not None:
        out["bits_per_byte"] = out["nelbo_bits_per_token"] * tokens_per_byte
    if entropy is not None:
        out["entropy_bits_per_token"] = entropy
        out["gap_bits_per_token"] = out["nelbo_bits_per_token"] - entropy
    if args.skip_sequences:
        out["skipped_sequences"] = args.skip_sequences
    out.update(tokens=out["sequences"] * L, checkpoint=ckpt.url, step=ckpt.step,
               weights="trained" if args.no_ema else "ema", t_samples=args.t_samples, seed=args.seed, **data)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
