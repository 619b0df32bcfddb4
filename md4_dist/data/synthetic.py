"""A corpus of exactly known entropy: sequences of a seeded stationary first-order Markov chain.

    m = write_synthetic_corpus("data/markov", vocab_size=64, seq_len=128, num_sequences=20000,
                               seed=0, val_fraction=0.05)
    m.entropy_bits_per_token           # the least NELBO a model can reach on it, in bits

Each row of the transition matrix has a few random successors with random weights (plus the
successor i + 1 mod V, which makes the chain irreducible, and a self-loop at 0, which makes it
aperiodic); `floor=F` mixes each row with the uniform distribution at weight F, so that every
sequence is possible (a sample's log-likelihood under the chain is finite). Every sequence starts
from the stationary distribution pi, so each is an independent draw with entropy
H(X1) + (L - 1) H(X2 | X1); the manifest's `entropy_bits_per_token` is that over L, in bits,
computed exactly from the chain. A perfect model's NELBO reaches it, never less. Same arguments,
same bytes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from md4_dist.data.manifest import Manifest, save, token_dtype
from md4_dist.data.shard_writer import SplitWriter, prepare_output

BATCH = 4096  # sequences sampled at once


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


def write_synthetic_corpus(out: str, *, vocab_size: int, seq_len: int, num_sequences: int,
                           seed: int = 0, successors: int = 4, floor: float = 0.0,
                           val_fraction: float = 0.0, sequences_per_shard: int = 10000,
                           overwrite: bool = False,
                           progress: Callable[[int], None] | None = None) -> Manifest:
    """Writes the corpus at `out` (local path or fsspec URL), val_fraction of its sequences as a
    val split; returns its saved manifest (url set). `progress` gets each batch's sequence count."""
    chain = MarkovChain(vocab_size, seed, successors, floor)
    n_val = round(val_fraction * num_sequences)
    counts = {"train": num_sequences - n_val, "val": n_val}
    dtype = token_dtype(vocab_size)
    prepare_output(out, overwrite)
    rng = np.random.default_rng([seed, 1])
    splits = {}
    for name, n in counts.items():
        if n == 0:
            continue
        with SplitWriter(out, name, seq_len, dtype, sequences_per_shard) as w:
            for start in range(0, n, BATCH):
                for row in chain.sample(min(BATCH, n - start), seq_len, rng):
                    w.write(row)
                if progress is not None:
                    progress(min(BATCH, n - start))
        splits[name] = w.split
    manifest = Manifest(
        vocab_size=vocab_size, seq_len=seq_len, dtype=dtype, splits=splits,
        entropy_bits_per_token=chain.entropy_bits_per_token(seq_len),
        # provenance: the command line whose options these are
        created_by={"tool": "data_tools.synthetic", "seed": seed, "successors": successors,
                    "floor": floor})
    manifest.url = save(manifest, out)
    return manifest


def describe(manifest: Manifest) -> str:
    """The line the tools print after writing a corpus: its splits, exact entropy and manifest."""
    splits = ", ".join(f"{k}: {v.sequences}" for k, v in manifest.splits.items())
    total = sum(v.sequences for v in manifest.splits.values())
    return (f"wrote {total} sequences ({splits}); entropy {manifest.entropy_bits_per_token:.4f} "
            f"bits/token; manifest {manifest.url}")
