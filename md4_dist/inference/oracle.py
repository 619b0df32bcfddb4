"""Exact sample quality on a corpus of known law: samples of a model trained on a
`data_tools.synthetic` Markov corpus, scored by their probability under the chain that made it.

    python -m md4_dist.evaluate --samples samples.jsonl --oracle data/markov

Generative perplexity under another model is noisy and bound to a tokenizer; here the truth is
known. Two figures, each with its standard error over the samples:
- NLL: each sample's exact negative log2-likelihood per token under the chain, averaged. The
  chain's entropy rate for that length is what an exact model with an exact sampler reaches in
  expectation; `gap` is the mean NLL minus it. A sampler that favours likely tokens (low
  temperature, confident-first orders) can go below the entropy: a negative gap is lost diversity,
  not a better model, which the bigram KL shows.
- Bigram KL: KL(q || p) in bits between the samples' distribution of adjacent pairs q (all pairs
  of all samples, pooled) and the chain's p(a, b) = pi(a) P(a, b) (every sequence starts from the
  stationary pi, so every position's pair has that law). Pooled counts make it biased upwards at a
  finite sample size; `bigram_kl_exact_sampler_bits` is the same KL for as many sequences drawn
  from the chain itself (the floor an exact sampler would show), and its standard error comes from
  a bootstrap over the samples.
A sample with a transition the chain cannot make (probability 0: a corpus written without
`--floor`) has log-likelihood -inf: it is rejected, counted in `impossible`, and left out of both.
"""

from __future__ import annotations

import json
import math

import numpy as np

from md4_dist.data.manifest import Manifest
from md4_dist.data.synthetic import MarkovChain

BOOTSTRAP = 200  # resamples of the samples for the KL's standard error
REFERENCE_DRAWS = 5  # exact-sampler draws averaged for the KL floor


class OracleError(ValueError):
    """Samples or a corpus that cannot be scored; the message names the file and what is wrong."""


def chain_of(manifest: Manifest) -> MarkovChain:
    """The chain that wrote a `data_tools.synthetic` corpus, rebuilt from its manifest."""
    made = manifest.created_by or {}
    if made.get("tool") != "data_tools.synthetic":
        raise OracleError(f"--oracle {manifest.url}: not a data_tools.synthetic corpus (made by "
                          f"{made.get('tool', 'an unknown tool')}), so no chain gives its sequences' "
                          "exact probability")
    return MarkovChain(manifest.vocab_size, made["seed"], made["successors"], made.get("floor", 0.0))


def read_samples(path: str, text: str, vocab_size: int) -> np.ndarray:
    """[N, L] int64 from the `sample` command's JSON lines ({"tokens": [...]} per line)."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tokens = json.loads(line)["tokens"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise OracleError(f"{path} line {n}: not a sample's JSON object with a 'tokens' list ({e})") from None
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise OracleError(f"{path} line {n}: 'tokens' must be a non-empty list of integers")
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise OracleError(f"{path} line {n}: token {bad[0]} lies outside the oracle's vocabulary "
                              f"of {vocab_size}: these samples are not of this corpus's model")
        if rows and len(tokens) != len(rows[0]):
            raise OracleError(f"{path} line {n}: {len(tokens)} tokens where the first sample has "
                              f"{len(rows[0])}; score samples of one length at a time")
        rows.append(tokens)
    if not rows:
        raise OracleError(f"{path}: no samples")
    return np.asarray(rows, dtype=np.int64)


def log2_likelihoods(chain: MarkovChain, tokens: np.ndarray) -> np.ndarray:
    """[N] exact log2 p(x) of each row under the chain (-inf for an impossible one)."""
    with np.errstate(divide="ignore"):
        return np.log2(chain.pi[tokens[:, 0]]) + np.log2(chain.P[tokens[:, :-1], tokens[:, 1:]]).sum(1)


def _bigram_kl(pairs: np.ndarray, weights: np.ndarray, log2_p: np.ndarray) -> float:
    """KL(q || p) in bits, q the weighted pooled counts of `pairs` ([N, L-1] flat pair indices)."""
    counts = np.bincount(pairs.ravel(), weights=np.repeat(weights, pairs.shape[1]), minlength=log2_p.size)
    q = counts / counts.sum()
    seen = q > 0
    return float((q[seen] * (np.log2(q[seen]) - log2_p[seen])).sum())


def _pair_log2_law(chain: MarkovChain) -> np.ndarray:
    """[V * V] log2 pi(a) P(a, b), the law of every adjacent pair, indexed a * V + b."""
    with np.errstate(divide="ignore"):
        return np.log2(chain.pi[:, None] * chain.P).ravel()


def bigram_kl(chain: MarkovChain, tokens: np.ndarray) -> float:
    """KL in bits of the pooled adjacent pairs of rows [N, L] from the chain's pair law."""
    V = len(chain.pi)
    return _bigram_kl(tokens[:, :-1] * V + tokens[:, 1:], np.ones(len(tokens)), _pair_log2_law(chain))


def score(chain: MarkovChain, tokens: np.ndarray, seed: int = 0) -> dict:
    """The figures of the module docstring for samples [N, L] (pure; `seed` drives the bootstrap
    and the exact-sampler reference)."""
    N, L = tokens.shape
    if L < 2:
        raise OracleError(f"samples of {L} token(s) have no pairs to score; sample longer sequences")
    ll = log2_likelihoods(chain, tokens)
    possible = np.isfinite(ll)
    kept, nll = tokens[possible], -ll[possible] / L
    n = len(kept)
    entropy = chain.entropy_bits_per_token(L)
    out = {"samples": N, "impossible": int(N - n), "seq_len": L, "entropy_bits_per_token": entropy}
    if n == 0:
        return out | {"nll_bits_per_token": math.inf, "gap_bits_per_token": math.inf}
    stderr = float(nll.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    V, log2_p = len(chain.pi), _pair_log2_law(chain)
    pairs = kept[:, :-1] * V + kept[:, 1:]
    kl = _bigram_kl(pairs, np.ones(n), log2_p)
    rng = np.random.default_rng([seed, 2])
    boots = [_bigram_kl(pairs, rng.multinomial(n, np.full(n, 1 / n)).astype(float), log2_p)
             for _ in range(BOOTSTRAP)]
    reference = [bigram_kl(chain, chain.sample(n, L, rng)) for _ in range(REFERENCE_DRAWS)]
    return out | {
        "nll_bits_per_token": float(nll.mean()), "stderr_bits_per_token": stderr,
        "gap_bits_per_token": float(nll.mean()) - entropy,
        "bigram_kl_bits": kl, "bigram_kl_stderr_bits": float(np.std(boots, ddof=1)),
        "bigram_kl_exact_sampler_bits": float(np.mean(reference)),
    }
