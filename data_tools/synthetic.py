"""A corpus of exactly known entropy: sequences of a seeded stationary first-order Markov chain.

    python -m data_tools.synthetic --out data/markov --vocab-size 64 --seq-len 128 \
        --num-sequences 20000 --seed 0 --val-fraction 0.05

Each row of the transition matrix has a few random successors with random weights (plus the
successor i + 1 mod V, which makes the chain irreducible, and a self-loop at 0, which makes it
aperiodic); `--floor F` mixes each row with the uniform distribution at weight F, so that every
sequence is possible (a sample's log-likelihood under the chain is finite). Every sequence starts
from the stationary distribution pi, so each is an independent draw with entropy
H(X1) + (L - 1) H(X2 | X1); the manifest's `entropy_bits_per_token` is that over L, in bits,
computed exactly from the chain. A perfect model's NELBO reaches it, never less. Same arguments,
same bytes.
"""

from __future__ import annotations

import argparse
import sys

from data_tools.cli import Progress, add_output_args, check_output_args, run
from md4_dist.data.synthetic import describe, write_synthetic_corpus


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-size", type=int, required=True, help="the chain's states (token ids 0 to V-1)")
    ap.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    ap.add_argument("--num-sequences", type=int, required=True, help="sequences in all, val split included")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the chain and the sequences (default: %(default)s)")
    ap.add_argument("--successors", type=int, default=4,
                    help="random successors per token (default: %(default)s)")
    ap.add_argument("--floor", type=float, default=0.0,
                    help="weight of the uniform distribution mixed into every transition (> 0: "
                         "every sequence has a finite log-likelihood) (default: %(default)s)")
    add_output_args(ap)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_output_args(ap, args)
    if args.num_sequences < 1:
        ap.error("--num-sequences must be >= 1")

    with Progress(total=args.num_sequences, unit="seq", desc="markov") as bar:
        manifest = write_synthetic_corpus(
            args.out, vocab_size=args.vocab_size, seq_len=args.seq_len, num_sequences=args.num_sequences,
            seed=args.seed, successors=args.successors, floor=args.floor, val_fraction=args.val_fraction,
            sequences_per_shard=args.sequences_per_shard, overwrite=args.overwrite, progress=bar.update)
    print(describe(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
