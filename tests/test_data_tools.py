"""Offline data tools as a user runs them: text -> tokenizer -> shards (local and S3) -> reader."""

import gzip
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from md4_dist.data import TokenStream, load_manifest, make_loader

WORDS = ("the of and to in is was for on that with as by at from his her an which or be are this "
         "had not but it have they one were all their there been has when who will more no if out "
         "so said what up its about into than them can only other new some could time these two").split()


def make_docs(n, seed=0):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 90))) + "."
        if i % 7 == 0:
            text += "\n\n  Über naïve café, 東京 — 3.14159 "  # bytes outside the vocabulary, spacing
        docs.append(text)
    return docs


def cli(*args):
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)
    return r


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    docs = make_docs(1200)
    with open(d / "a.jsonl", "w") as f:
        for doc in docs[:500]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        for doc in docs[500:800]:
            f.write(json.dumps({"text": doc}) + "\n")
    import zstandard
    lines = "".join(json.dumps({"text": doc}) + "\n" for doc in docs[800:900])
    (d / "b2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs[900:]}), d / "c.parquet")
    return d, docs


@pytest.fixture(scope="module")
def tokenizer(corpus):
    d, _ = corpus
    r = cli("data_tools.train_tokenizer", "--input", str(d / "*.jsonl*"), str(d / "c.parquet"),
            "--vocab-size", "320", "--out", str(d / "tok"))
    assert r.returncode == 0, r.stderr
    return str(d / "tok.model")


def test_tokenizer_is_lossless_with_byte_fallback(corpus, tokenizer):
    _, docs = corpus
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    assert sp.get_piece_size() == 320 and sp.eos_id() == 2
    for doc in docs[:50]:
        assert sp.decode(sp.encode(doc)) == doc


def test_round_trip_text_to_s3_shards_to_reader(corpus, tokenizer, s3_bucket):
    d, docs = corpus
    L = 48
    out = f"{s3_bucket}/ds"
    r = cli("data_tools.shard", "--input", str(d / "a.jsonl"), str(d / "b*.jsonl.*"), str(d / "c.parquet"),
            "--tokenizer", tokenizer, "--seq-len", str(L), "--out", out, "--sequences-per-shard", "50",
            "--workers", "2")
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    stream = [t for doc in docs for t in (*sp.encode(doc), sp.eos_id())]  # EOS after each document
    n_seq = -(-len(stream) // L)
    want = np.array(stream + [sp.eos_id()] * (n_seq * L - len(stream))).reshape(n_seq, L)

    m = load_manifest(out)
    assert m.vocab_size == 320 and m.seq_len == L and m.dtype == "uint16" and m.eos_id == 2
    split = m.split("train")
    assert split.sequences == n_seq and split.tokens == n_seq * L and len(split.shards) == -(-n_seq // 50)
    assert split.source_bytes == sum(len(doc.encode()) for doc in docs)
    assert m.tokenizer["url"] == tokenizer and len(m.tokenizer["sha256"]) == 64
    got = np.zeros_like(want)
    seen = 0
    for b in make_loader(TokenStream(m, "train", 16, loop=False), 2):
        got[b["ids"].numpy()] = b["tokens"].numpy()
        seen += len(b["ids"])
    assert seen == n_seq
    np.testing.assert_array_equal(got, want)  # exactly the packed token stream


def test_val_split_and_overwrite(corpus, tokenizer, tmp_path):
    d, docs = corpus
    out = tmp_path / "ds"
    args = ["data_tools.shard", "--input", str(d / "*.jsonl*"), "--tokenizer", tokenizer, "--seq-len", "32",
            "--out", str(out), "--val-fraction", "0.2", "--workers", "1"]
    assert cli(*args).returncode == 0
    m = load_manifest(str(out))
    train, val = m.split("train"), m.split("val")
    total = sum(len(doc.encode()) for doc in docs[:900])
    assert train.source_bytes + val.source_bytes == total
    assert 0.1 < val.source_bytes / total < 0.3
    r = cli(*args)
    assert r.returncode == 2 and "is not empty" in r.stderr and "--overwrite" in r.stderr
    assert load_manifest(str(out)).sha256 == m.sha256, "the refused run lost nothing"
    assert cli(*args, "--overwrite").returncode == 0
    assert load_manifest(str(out)).sha256 == m.sha256, "same inputs, same dataset"


def test_bad_inputs_name_the_culprit(corpus, tokenizer, tmp_path):
    d, _ = corpus
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9".encode("latin-1"))
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n{"body": "x"}\n')
    cases = [
        ([str(bad_utf8)], "latin1.txt is not UTF-8"),
        ([str(no_field)], "nofield.jsonl line 2: no field 'text'"),
        ([str(tmp_path / "none-*.jsonl")], "none-*.jsonl matches no file"),
    ]
    for inputs, message in cases:
        r = cli("data_tools.shard", "--input", *inputs, "--tokenizer", tokenizer, "--seq-len", "8",
                "--out", str(tmp_path / "o"), "--workers", "1")
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not (tmp_path / "o" / "manifest.json").exists()
    r = cli("data_tools.shard", "--input", str(d / "a.jsonl"), "--tokenizer", str(no_field),
            "--seq-len", "8", "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "nofield.jsonl is not a SentencePiece model" in r.stderr
