"""Data pipeline throughput on this machine's CPU (a benchmark, not a test).

    .venv/bin/python benchmarks/data_throughput.py [--text-mb 30] [--sequences 20000] [--repeats 3]
        [--skip-sharding] [--scale-sequences 32768] [--s3-scale-sequences 8192] [--per-shard 256]

1. Sharding: `data_tools.shard --workers 1` end to end (reading JSONL, tokenizing in one worker
   process, packing, writing tar shards, process start-up included) against raw SentencePiece
   `encode` of the same documents on one thread, as MB/s of text; the ratio is the sharding
   efficiency per worker. (SentencePiece's list `encode` uses every core unless told otherwise;
   that figure is printed too.)
2. Reader: `TokenStream` + DataLoader (2 workers, micro-batch 16, L = 1024, uint16 shards) over
   one epoch, tokens/s for one rank in steady state (timed from the first batch), from local disk and from a moto S3 server on 127.0.0.1;
   also rank 0 of 4, which fetches a quarter of the bytes.
3. The reader at scale: rank 0 of W = 1, 8, 64, 512 simulated ranks (its stream computed and read
   in this process: one worker), over one epoch of a corpus of L = 1024 uint16 sequences in small
   shards (--per-shard), on local disk and on moto S3: bytes and requests it fetches, W times that
   against the dataset's bytes (every rank's share is the same size), and its decode rate; a
   sequence at a time and in runs of --run-length (data.run_length, lanes of a global batch of
   512: a group of 512 runs needs 512 x run_length sequences in a window of 64 shards).
4. Mixing at owt_small's shape (global batch 512, 8.8M sequences of 1024 in shards of 10000, as
   data_tools.shard writes OpenWebText in input order, documents of about 1100 tokens packed back
   to back): distinct shards and documents per global batch, for mix = 1 (one shard at a time, the
   order before), mix = 64 (the default), and mix = 64 in runs of --run-length. Computed from the
   order alone: no data is read.
Each figure of 1 and 2: median over --repeats runs, with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

WORLDS = (1, 8, 64, 512)  # part 3's simulated world sizes: each divides a global batch of 512


def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt(s, unit, scale=1.0):
    return f"{s['median'] / scale:.2f} {unit} (min {s['min'] / scale:.2f}, max {s['max'] / scale:.2f})"


def make_text(path, mb, seed=0):
    """Zipf-distributed pseudo-words in documents of 50..2000 words: JSONL of about `mb` MB."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choice(letters[: rng.randint(6, 26)]) for _ in range(rng.randint(1, 10)))
             for _ in range(20000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    docs, size = [], 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            words = rng.choices(vocab, weights, k=rng.randint(50, 2000))
            doc = " ".join(words) + ".\n"
            f.write(json.dumps({"text": doc}) + "\n")
            docs.append(doc)
            size += len(doc)
    return docs, size


def bench_sharding(args, work):
    import sentencepiece as spm

    from data_tools import train_tokenizer

    text = os.path.join(work, "corpus.jsonl")
    docs, size = make_text(text, args.text_mb)
    prefix = os.path.join(work, "tok")
    train_tokenizer.main(["--input", text, "--vocab-size", "8000", "--out", prefix, "--sample-bytes", "20000000"])
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    raw, raw_all, shard, steady = [], [], [], []
    for r in range(args.repeats):
        for threads, out in ((1, raw), (os.cpu_count(), raw_all)):
            t = time.perf_counter()
            for i in range(0, len(docs), 64):
                sp.encode(docs[i:i + 64], num_threads=threads)
            out.append(size / 1e6 / (time.perf_counter() - t))
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "data_tools.shard", "--input", text, "--tokenizer",
                              prefix + ".model", "--seq-len", "1024", "--out", os.path.join(work, f"shards{r}"),
                              "--workers", "1"], check=True, capture_output=True, text=True).stdout
        shard.append(size / 1e6 / (time.perf_counter() - t))
        # the tool's own figure: from after its imports (about 2.7 s here) to the manifest
        steady.append(float(re.search(r"\(([\d.]+) MB/s of text\)", out).group(1)))
    ratio = [s / r for s, r in zip(shard, raw)]
    ratio_steady = [s / r for s, r in zip(steady, raw)]
    return {"text_mb": size / 1e6, "raw_sentencepiece_mb_s": spread(raw),
            "raw_sentencepiece_all_cores_mb_s": spread(raw_all), "shard_1_worker_mb_s": spread(shard),
            "shard_1_worker_after_startup_mb_s": spread(steady), "ratio": spread(ratio),
            "ratio_after_startup": spread(ratio_steady)}


def write_dataset(url, n, L=1024, per_shard=2000):
    from md4_dist.data.shard_writer import SplitWriter
    from md4_dist.data.manifest import Manifest, save

    rng = np.random.default_rng(0)
    with SplitWriter(url, "train", L, "uint16", per_shard) as w:
        for _ in range(n):
            w.write(rng.integers(0, 50257, L, dtype=np.uint16))
    save(Manifest(vocab_size=50257, seq_len=L, dtype="uint16", splits={"train": w.split}), url)


def bench_reader(url, repeats, world=1):
    from md4_dist.data import TokenStream, load_manifest, make_loader

    m = load_manifest(url)
    rates = []
    for _ in range(repeats):
        tokens, t = 0, None
        for b in make_loader(TokenStream(m, "train", 16, world_size=world, loop=False), 2):
            if t is None:  # steady state: from the first batch on, not the workers' start-up
                t = time.perf_counter()
                continue
            tokens += b["tokens"].numel()
        rates.append(tokens / (time.perf_counter() - t))
    return spread(rates)


def bench_scale(url, run_length, worlds=WORLDS):
    """{"W run_length": rank 0 of W's fetched bytes, requests, sequences, decode rate} over one
    epoch, a sequence at a time and in runs of `run_length` (lanes: a global batch of 512)."""
    from md4_dist.data import TokenStream, load_manifest

    m = load_manifest(url)
    dataset = sum(s.bytes for s in m.split("train").shards)
    out = {"dataset_bytes": dataset, "sequences": m.split("train").sequences}
    for W in worlds:
        for run in sorted({1, run_length}):
            stream = TokenStream(m, "train", 512 // W, world_size=W, loop=False, run_length=run, lanes=512)
            t, n = time.perf_counter(), 0
            for b in stream:
                n += len(b["ids"])
            dt = time.perf_counter() - t
            out[f"{W} {run}"] = {"bytes": stream.fetched["bytes"], "requests": stream.fetched["requests"],
                                 "sequences": n, "all_ranks_over_dataset": W * stream.fetched["bytes"] / dataset,
                                 "sequences_s": n / dt}
    return out


def owt_small_mixing(run_length, batches=200, global_batch=512, per_shard=10000, sequences=8_800_000, L=1024):
    """Distinct shards and documents per global batch at owt_small's shape, for mix = 1 and 64,
    and for mix = 64 in runs of `run_length` (lanes: the global batch)."""
    from md4_dist.data import TokenStream
    from md4_dist.data.manifest import Manifest, Shard, Split
    from md4_dist.data.ranges import Layout

    layout = Layout(L, "uint16")
    sizes = [min(per_shard, sequences - i) for i in range(0, sequences, per_shard)]
    split = Split(shards=[Shard(f"train-{i:06d}.tar", n, layout.shard_bytes(n)) for i, n in enumerate(sizes)],
                  sequences=sequences, tokens=sequences * L)
    m = Manifest(vocab_size=50257, seq_len=L, dtype="uint16", splits={"train": split})
    rng = np.random.default_rng(0)  # documents in corpus order, ~1100 tokens, packed back to back
    doc_ends = np.cumsum(np.maximum(1, rng.lognormal(np.log(700), 0.9, int(sequences * L / 900))).astype(np.int64) + 1)
    picks = rng.choice(sequences // global_batch, batches, replace=False)
    out = {}
    for mix, run in ((1, 1), (64, 1), (64, run_length)):
        s = TokenStream(m, "train", global_batch, mix=mix, run_length=run, lanes=global_batch)
        shards, docs = [], []
        for g in picks:
            shard, record = s.locate_many(np.arange(g * global_batch, (g + 1) * global_batch, dtype=np.int64))
            ids = s._starts[shard] + record
            first = np.searchsorted(doc_ends, ids * L, side="right")  # the documents each sequence holds
            last = np.searchsorted(doc_ends, (ids + 1) * L - 1, side="right")
            shards.append(len(np.unique(shard)))
            docs.append(len(set().union(*(range(a, b + 1) for a, b in zip(first, last)))))
        out[f"{mix} {run}"] = {"shards": spread(shards), "documents": spread(docs)}
    return out


def print_scale(name, r):
    print(f"reader at scale, {name}: {r['sequences']} sequences, {r['dataset_bytes'] / 1e6:.1f} MB of shards")
    print("    W  run   rank 0 MB  requests  W x rank 0 / dataset  decode seq/s (1 worker)")
    for key, x in r.items():
        if isinstance(x, dict):
            W, run = key.split()
            print(f"  {W:>3}  {run:>3}  {x['bytes'] / 1e6:9.3f}  {x['requests']:8d}  "
                  f"{x['all_ranks_over_dataset']:20.3f}  {x['sequences_s']:11.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-mb", type=float, default=30)
    ap.add_argument("--sequences", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-sharding", action="store_true", help="leave out part 1 (the tokenizer)")
    ap.add_argument("--scale-sequences", type=int, default=32768)
    ap.add_argument("--s3-scale-sequences", type=int, default=8192)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--run-length", type=int, default=16, help="data.run_length of parts 3 and 4's runs")
    ap.add_argument("--only-scale", action="store_true", help="parts 3 and 4 alone")
    args = ap.parse_args()
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as work:
        if not args.skip_sharding:
            results["sharding"] = bench_sharding(args, work)
        local = os.path.join(work, "tokens")
        if not args.only_scale:
            write_dataset(local, args.sequences)
            results["reader_local_tokens_s"] = bench_reader(local, args.repeats)
            results["reader_local_rank0_of_4_tokens_s"] = bench_reader(local, args.repeats, world=4)
        scale = os.path.join(work, "scale")
        write_dataset(scale, args.scale_sequences, per_shard=args.per_shard)
        results["scale_local"] = bench_scale(scale, args.run_length)

        import boto3
        from moto.server import ThreadedMotoServer
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server._server.server_address
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_ENDPOINT_URL_S3=f"http://{host}:{port}")
        boto3.client("s3").create_bucket(Bucket="bench")
        if not args.only_scale:
            write_dataset("s3://bench/tokens", args.sequences)
            results["reader_moto_s3_tokens_s"] = bench_reader("s3://bench/tokens", args.repeats)
        write_dataset("s3://bench/scale", args.s3_scale_sequences, per_shard=args.per_shard)
        results["scale_moto_s3"] = bench_scale("s3://bench/scale", args.run_length)
        server.stop()
    results["owt_small_mixing"] = owt_small_mixing(args.run_length)
    print(f"machine: {results['machine']}")
    if "sharding" in results:
        print_sharding(results["sharding"])
    if not args.only_scale:
        print(f"reader, local disk, 1 rank:          {fmt(results['reader_local_tokens_s'], 'M tokens/s', 1e6)}")
        print(f"reader, local disk, rank 0 of 4:     "
              f"{fmt(results['reader_local_rank0_of_4_tokens_s'], 'M tokens/s', 1e6)}")
        print(f"reader, moto S3 on 127.0.0.1, 1 rank: {fmt(results['reader_moto_s3_tokens_s'], 'M tokens/s', 1e6)}")
    print_scale("local disk", results["scale_local"])
    print_scale("moto S3 on 127.0.0.1", results["scale_moto_s3"])
    print("owt_small's shape, per global batch of 512 (200 batches): median (min, max)")
    for key, r in results["owt_small_mixing"].items():
        mix, run = key.split()
        print(f"  mix = {mix:>2}, run_length {run:>3}: shards {fmt(r['shards'], '')}, "
              f"documents {fmt(r['documents'], '')}")
    print(json.dumps(results, default=str))


def print_sharding(s):
    print(f"raw SentencePiece encode, 1 thread:  {fmt(s['raw_sentencepiece_mb_s'], 'MB/s')}")
    print(f"raw SentencePiece encode, all cores: {fmt(s['raw_sentencepiece_all_cores_mb_s'], 'MB/s')}")
    print(f"data_tools.shard --workers 1:       {fmt(s['shard_1_worker_mb_s'], 'MB/s')}")
    print(f"  same, after start-up (tool's rate): {fmt(s['shard_1_worker_after_startup_mb_s'], 'MB/s')}")
    print(f"sharding / raw, end to end:          {fmt(s['ratio'], '')}")
    print(f"sharding / raw, after start-up:      {fmt(s['ratio_after_startup'], '')}")


if __name__ == "__main__":
    main()
