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
    assert r.returncode == 2 and "nofield.jsonl is neither a SentencePiece .model nor a Hugging Face" in r.stderr


# --- A Hugging Face tokenizer.json: GPT-2's kind (byte-level BPE, <|endoftext|> last), built here.

@pytest.fixture(scope="module")
def bpe_json(corpus):
    """A byte-level BPE tokenizer.json made as GPT-2's is, small: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d, docs = corpus
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<|endoftext|>"])  # the last id, as GPT-2's 50256 of V = 50257
    tok.save(str(d / "bpe.json"))  # not named tokenizer.json: the kind is read from the content
    return str(d / "bpe.json"), tok.get_vocab_size()


def test_tokenizer_json_round_trips_through_shards_reader_and_decode(corpus, bpe_json, tmp_path):
    from md4_dist.tokenizer import decode, load_tokenizer, pack_documents
    from md4_dist.trainer.samples import as_markdown

    d, docs = corpus
    path, V = bpe_json
    # a document holding the EOS token's text stays one document: it is text, not a boundary
    extra = ["a page about GPT-2: <|endoftext|> ends its documents", "   ", "last\n"]
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in extra))
    docs = docs[:500] + extra
    L = 40
    r = cli("data_tools.shard", "--input", str(d / "a.jsonl"), str(tmp_path / "extra.jsonl"), "--tokenizer", path,
            "--seq-len", str(L), "--out", str(tmp_path / "ds"), "--sequences-per-shard", "64", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "start-up" in r.stdout and "MB/s per worker" in r.stdout

    m = load_manifest(str(tmp_path / "ds"))
    assert m.vocab_size == V == 401 and m.eos_id == V - 1 and m.dtype == "uint16"
    assert m.tokenizer["kind"] == "hf_tokenizer_json" and m.tokenizer["url"] == path
    split = m.split("train")
    assert split.source_bytes == sum(len(doc.encode()) for doc in docs)
    rows = np.zeros((split.sequences, L), dtype=np.int64)
    for b in make_loader(TokenStream(m, "train", 16, loop=False), 2):
        rows[b["ids"].numpy()] = b["tokens"].numpy()

    tok = load_tokenizer(m.tokenizer)  # as evaluate, sample and the trainer's samples load it
    assert tok.kind == "hf_tokenizer_json" and tok.eos_id == V - 1 and tok.vocab_size == V
    flat = rows.reshape(-1)
    ends = np.flatnonzero(flat == tok.eos_id)
    pieces = np.split(flat, ends + 1)[:len(docs)]  # the rest: the last row's EOS padding
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs, "exactly the text, document by document"
    assert (flat[ends[len(docs) - 1] + 1:] == tok.eos_id).all()

    # evaluate --text packs as sharding did; samples decode to the documents, a blank line between
    packed, text_bytes = pack_documents(tok, docs, L)
    np.testing.assert_array_equal(packed, rows)
    assert text_bytes == split.source_bytes
    assert decode(flat[:ends[len(docs) - 1] + 1].tolist(), tok, m.eos_id) == "\n\n".join(docs)
    first_row = decode(rows[0].tolist(), tok, m.eos_id)
    assert docs[0].startswith(first_row) and first_row.splitlines()[0] in as_markdown([rows[0].tolist()], tok, m.eos_id)
    assert tok.eos_id not in tok.encode(extra[0]) and tok.decode(tok.encode(extra[0])) == extra[0]  # --prefix

    other = tmp_path / "other.json"  # another tokenizer.json: refused as a different SentencePiece file is
    other.write_text(open(path).read().replace('"<|endoftext|>"', '"<|end|>"'))
    with pytest.raises(ValueError, match=f"tokenizer {other} .* does not match"):
        load_tokenizer(m.tokenizer, str(other))


def test_a_tokenizer_of_neither_kind_is_refused_naming_it(corpus, tmp_path):
    d, _ = corpus
    cases = {"notes.json": '{"text": "a JSON file, not a tokenizer"}', "garbage.model": "\x00\x01 not a model",
             "empty.model": ""}
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        r = cli("data_tools.shard", "--input", str(d / "a.jsonl"), "--tokenizer", str(tmp_path / name),
                "--seq-len", "8", "--out", str(tmp_path / "o"))
        assert r.returncode == 2, r.stderr
        assert f"{tmp_path / name} is neither a SentencePiece .model nor a Hugging Face tokenizer.json" in r.stderr
        assert not (tmp_path / "o").exists(), "refused before anything was written"


def test_shard_tool_imports_no_torch(corpus, tokenizer, tmp_path):
    """The tokenizing workers spawn starts import data_tools.shard again (as their __main__): with
    torch among its imports, 14 workers spent half a minute before tokenizing anything. The tool
    itself shards a corpus without importing torch (or webdataset, which imports it)."""
    d, _ = corpus
    code = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_module('data_tools.shard', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, "shard", "--input", str(d / "a.jsonl"), "--tokenizer", tokenizer,
                        "--seq-len", "64", "--out", str(tmp_path / "o"), "--workers", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr
    assert load_manifest(str(tmp_path / "o")).splits["train"].sequences > 0
    # what each worker imports again as its __main__: not even the parent's tools
    r = subprocess.run([sys.executable, "-c", "import sys, data_tools.shard; print(sorted(m for m in "
                        "('torch', 'webdataset', 'fsspec', 'tqdm', 'numpy') if m in sys.modules))"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_shards_are_the_bytes_webdatasets_writer_writes(tmp_path):
    """SplitWriter writes its tars with the standard library, byte for byte what webdataset's
    ShardWriter writes with the options it used before (the reader's byte ranges rely on it)."""
    import webdataset as wds

    from md4_dist.data.shard_writer import SplitWriter, npy_bytes

    rows = np.random.default_rng(0).integers(0, 50000, size=(7, 33)).astype(np.uint16)
    with SplitWriter(str(tmp_path / "ours"), "train", 33, "uint16", per_shard=3) as w:
        for row in rows:
            w.write(row)
    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "train-%06d.tar"), maxcount=3, maxsize=float("inf"), verbose=0,
                         encoder=False, mtime=0) as ref:
        for i, row in enumerate(rows):
            ref.write({"__key__": f"train-{i:09d}", "tokens.npy": npy_bytes(row)})
    names = sorted(p.name for p in (tmp_path / "wds").iterdir())
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == names
    for name in names:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "wds" / name).read_bytes(), name
    assert [(s.name, s.sequences, s.bytes) for s in w.split.shards] == \
        [(n, k, (tmp_path / "wds" / n).stat().st_size) for n, k in zip(names, (3, 3, 1))]
