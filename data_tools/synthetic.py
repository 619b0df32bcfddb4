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

import numpy as np
from tqdm import tqdm

from data_tools.cli import add_output_args, check_output_args, run
from data_tools.shard_writer import SplitWriter, prepare_output
from md4_dist.data.manifest import Manifest, save, token_dtype


class MarkovChain:
    def __init__(self, vocab_size: int, seed: int, successors: int = 4, floor: float = 0.0):
        if vocab_size < 2:
            raise ValueError(f"--vocab-size must be >= 2, got {vocab_size}")
        if not 0 <= floor < 1:
            raise ValueError(f"--floor must lie in [0, 1), got {floor}")
        rng = np.random.default_rng([seed, 0])
        V = vocab_size
        P = np.zeros((V, V))
        for i in range(V):
            succ = rng.choice(V, size=min(successors, V), replace=False)
            P[i, succ] = rng.uniform(0.1, 1.0, size=len(succ))
            P[i, (i + 1) % V] += rng.uniform(0.1, 1.0)
        P[0, 0] += 0.5
        # floor > 0 mixes every row with the uniform distribution: every sequence is possible
        self.P = (1 - floor) * P / P.sum(1, keepdims=True) + floor / V  # [V, V], rows sum to 1
        # Stationary distribution: the left eigenvector of P for eigenvalue 1.
        w, vecs = np.linalg.eig(self.P.T)
        pi = np.real(vecs[:, np.argmin(np.abs(w - 1))])
        self.pi = pi / pi.sum()
        self.cum = np.cumsum(self.P, axis=1)
        self.cum[:, -1] = 1.0

    def entropy_bits_per_token(self, seq_len: int) -> float:
        """(H(X1) + (L - 1) H(X2 | X1)) / L, in bits."""
        def h(p):
            p = p[p > 0]
            return float(-(p * np.log2(p)).sum())
        h1 = h(self.pi)
        h21 = float(sum(self.pi[i] * h(self.P[i]) for i in range(len(self.pi))))
        return (h1 + (seq_len - 1) * h21) / seq_len

    def sample(self, n: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
        """[n, seq_len] int64."""
        x = np.empty((n, seq_len), dtype=np.int64)
        x[:, 0] = np.searchsorted(np.cumsum(self.pi), rng.random(n), side="right").clip(max=len(self.pi) - 1)
        for j in range(1, seq_len):
            u = rng.random(n)[:, None]
            x[:, j] = (u >= self.cum[x[:, j - 1]]).sum(1)
        return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--num-sequences", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--successors", type=int, default=4, help="random successors per token")
    ap.add_argument("--floor", type=float, default=0.0,
                    help="weight of the uniform distribution mixed into every transition (> 0: "
                         "every sequence has a finite log-likelihood)")
    add_output_args(ap)
    args = ap.parse_args(argv)
    check_output_args(ap, args)
    if args.num_sequences < 1:
        ap.error("--num-sequences must be >= 1")

    chain = MarkovChain(args.vocab_size, args.seed, args.successors, args.floor)
    n_val = round(args.val_fraction * args.num_sequences)
    counts = {"train": args.num_sequences - n_val, "val": n_val}
    dtype = token_dtype(args.vocab_size)
    prepare_output(args.out, args.overwrite)
    rng = np.random.default_rng([args.seed, 1])
    splits = {}
    with tqdm(total=args.num_sequences, unit="seq", desc="markov", file=sys.stderr) as bar:
        for name, n in counts.items():
            if n == 0:
                continue
            with SplitWriter(args.out, name, args.seq_len, dtype, args.sequences_per_shard) as w:
                for start in range(0, n, 4096):
                    for row in chain.sample(min(4096, n - start), args.seq_len, rng):
                        w.write(row)
                    bar.update(min(4096, n - start))
            splits[name] = w.split
    manifest = Manifest(
        vocab_size=args.vocab_size, seq_len=args.seq_len, dtype=dtype, splits=splits,
        entropy_bits_per_token=chain.entropy_bits_per_token(args.seq_len),
        created_by={"tool": "data_tools.synthetic", "seed": args.seed, "successors": args.successors,
                    "floor": args.floor})
    url = save(manifest, args.out)
    print(f"wrote {args.num_sequences} sequences ({', '.join(f'{k}: {v.sequences}' for k, v in splits.items())}); "
          f"entropy {manifest.entropy_bits_per_token:.4f} bits/token; manifest {url}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
