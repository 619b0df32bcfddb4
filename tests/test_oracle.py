"""Exact sample scoring against the chain that made a synthetic corpus (md4_dist.inference.oracle):
the chain's own draws match its entropy and its pair law within their errors; another chain's draws
and i.i.d. draws do not; impossible sequences are counted; bad samples name file and line."""

import json

import numpy as np
import pytest

from md4_dist.data.manifest import Manifest
from md4_dist.data.synthetic import MarkovChain
from md4_dist.inference.oracle import OracleError, chain_of, read_samples, score

V, L, N = 16, 64, 400


def chain(seed=0, floor=0.0):
    return MarkovChain(V, seed, successors=2, floor=floor)


def test_the_chains_own_draws_score_as_an_exact_sampler():
    c = chain()
    s = score(c, c.sample(N, L, np.random.default_rng(1)))
    assert s["impossible"] == 0 and s["samples"] == N and s["seq_len"] == L
    assert abs(s["gap_bits_per_token"]) < 4 * s["stderr_bits_per_token"], s
    # the pooled KL sits at the exact sampler's finite-sample floor, within its bootstrap error
    assert abs(s["bigram_kl_bits"] - s["bigram_kl_exact_sampler_bits"]) < 4 * s["bigram_kl_stderr_bits"] + 1e-3, s


def test_other_laws_are_far_from_the_chain():
    c = chain(floor=0.05)  # every sequence possible, so nothing is rejected
    exact = score(c, c.sample(N, L, np.random.default_rng(1)))
    iid = score(c, np.random.default_rng(2).choice(V, size=(N, L), p=c.pi))
    assert iid["impossible"] == 0
    assert iid["gap_bits_per_token"] > 10 * iid["stderr_bits_per_token"] + exact["gap_bits_per_token"]
    assert iid["bigram_kl_bits"] > 10 * exact["bigram_kl_bits"]


def test_impossible_sequences_are_counted_and_left_out():
    c = chain()  # no floor: most transitions have probability 0
    good = c.sample(50, L, np.random.default_rng(3))
    bad = good[:7].copy()
    i = int(np.argmin(c.P[bad[0, 0]]))  # a successor the chain never takes from bad[0, 0]
    assert c.P[bad[0, 0], i] == 0
    bad[:, 0], bad[:, 1] = bad[0, 0], i
    s = score(c, np.concatenate([good, bad]))
    assert s["impossible"] == 7 and s["samples"] == 57
    assert s == score(c, good) | {"samples": 57, "impossible": 7}  # the rest scored as without them


def test_chain_is_rebuilt_from_the_manifest_and_bad_input_is_named(tmp_path):
    from data_tools import synthetic

    out = tmp_path / "markov"
    assert synthetic.main(["--out", str(out), "--vocab-size", str(V), "--seq-len", str(L), "--num-sequences",
                           "100", "--seed", "0", "--successors", "2"]) == 0
    from md4_dist.data import load_manifest

    m = load_manifest(str(out))
    assert np.array_equal(chain_of(m).P, chain().P)
    assert chain_of(m).entropy_bits_per_token(L) == pytest.approx(m.entropy_bits_per_token)
    other = Manifest(vocab_size=V, seq_len=L, dtype="uint8", splits={}, created_by={"tool": "data_tools.shard"})
    other.url = "s3://b/owt"
    with pytest.raises(OracleError, match="s3://b/owt: not a data_tools.synthetic corpus"):
        chain_of(other)
    line = lambda t: json.dumps({"sample": 0, "tokens": t})  # noqa: E731
    with pytest.raises(OracleError, match=r"f.jsonl line 2: token 16 lies outside the oracle's vocabulary of 16"):
        read_samples("f.jsonl", line([1, 2]) + "\n" + line([3, 16]), V)
    with pytest.raises(OracleError, match="f.jsonl line 2: 3 tokens where the first sample has 2"):
        read_samples("f.jsonl", line([1, 2]) + "\n" + line([3, 4, 5]), V)
    with pytest.raises(OracleError, match="f.jsonl line 1: not a sample's JSON object"):
        read_samples("f.jsonl", "1 2 3", V)
    assert read_samples("f.jsonl", line([1, 2]) + "\n\n" + line([3, 4]), V).tolist() == [[1, 2], [3, 4]]
