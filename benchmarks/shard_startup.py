"""data_tools.shard's start-up and steady rate at several worker counts (a benchmark, not a test).

    .venv/bin/python benchmarks/shard_startup.py [--text-mb 20] [--workers 1 2 14] [--repeats 2] \
        [--kind sentencepiece|hf] [--tree DIR] [--json out.json]

Writes about --text-mb MB of JSONL (Zipf pseudo-words, as benchmarks/data_throughput.py), trains
an 8k tokenizer on it (--kind sentencepiece: data_tools.train_tokenizer's BPE; hf: a byte-level
BPE tokenizer.json like GPT-2's, with <|endoftext|> last), then runs `python -m data_tools.shard`
as a user does, once per worker count and repeat. For each it reports:
  start-up   seconds from launching the command to its first tokenized batch (the interpreter,
             imports, reading the tokenizer, spawning the workers and their imports)
  steady     MB/s of text after that batch, and that divided by the workers
Both come from the tool's own last line plus the wall time measured here. --tree runs the tool
of another checkout (an older commit extracted with `git archive`, to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_throughput import make_text  # noqa: E402 - the same text as the sharding benchmark

VOCAB = 8000


def make_tokenizer(kind, text, docs, work):
    if kind == "sentencepiece":
        from data_tools import train_tokenizer

        prefix = os.path.join(work, "tok")
        train_tokenizer.main(["--input", text, "--vocab-size", str(VOCAB), "--out", prefix,
                              "--sample-bytes", "20000000"])
        return prefix + ".model"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs[:5000], trainers.BpeTrainer(
        vocab_size=VOCAB - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<|endoftext|>"])  # last, as GPT-2's 50256 of 50257
    path = os.path.join(work, "tokenizer.json")
    tok.save(path)
    return path


def run_shard(tree, text, tokenizer, out, workers):
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "data_tools.shard", "--input", text, "--tokenizer", tokenizer,
                        "--seq-len", "1024", "--out", out, "--workers", str(workers), "--overwrite"],
                       cwd=tree, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t
    if r.returncode != 0:
        sys.exit(f"data_tools.shard --workers {workers} failed:\n{r.stderr[-3000:]}")
    m = re.search(r"in ([\d.]+) s .*start-up ([\d.]+) s to the first tokenized batch, then ([\d.]+) MB/s",
                  r.stdout)
    elapsed, startup, steady = map(float, m.groups())
    return {"startup_s": wall - elapsed + startup, "tool_startup_s": startup, "steady_mb_s": steady,
            "steady_mb_s_per_worker": steady / workers, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-mb", type=float, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 14])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kind", choices=("sentencepiece", "hf"), default="sentencepiece")
    ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        text = os.path.join(work, "corpus.jsonl")
        docs, size = make_text(text, args.text_mb)
        tokenizer = make_tokenizer(args.kind, text, docs, work)
        results = {}
        for w in args.workers:
            runs = [run_shard(args.tree, text, tokenizer, os.path.join(work, "out"), w)
                    for _ in range(args.repeats)]
            results[w] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            r = results[w]
            print(f"{w:3d} workers: start-up {r['startup_s']:5.2f} s (tool's own {r['tool_startup_s']:5.2f} s), "
                  f"then {r['steady_mb_s']:6.2f} MB/s = {r['steady_mb_s_per_worker']:.2f} MB/s per worker "
                  f"(median of {args.repeats})", flush=True)
    info = {"text_mb": size / 1e6, "kind": args.kind, "tree": args.tree, "cpus": os.cpu_count(),
            "vocab": VOCAB, "by_workers": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
