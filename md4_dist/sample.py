"""Samples of a trained model, decoded with its tokenizer. One process, CPU or GPU.

    python -m md4_dist.sample --checkpoint runs/owt --num-samples 4 --steps 256
    python -m md4_dist.sample --checkpoint runs/owt --num-samples 8 --steps 512 --sampler topp \
        --top-p 0.9 --prefix "The meaning of life is" --seed 1 --out samples.jsonl

Writes the decoded text of each sample (a header line before each) to stdout or `--out FILE`;
a FILE ending in .jsonl gets one {"sample", "tokens", "text"} object per line instead. A sample
spans the model's sequence length and may hold several documents: their text is separated by a
blank line, where the model put an EOS. Models of token-id corpora (no tokenizer) give the ids.
`--prefix` fixes a sample's first tokens to the prefix's and generates the rest. On a GPU the model
runs under bf16 autocast (`--precision`), its trunk compiled with `--compile`.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from md4_dist import cli
from md4_dist.inference.consolidate import open_checkpoint
from md4_dist.data.storage import exists, write_bytes
from md4_dist.sampling import PRECISIONS, SAMPLERS, generate, prefix_condition, row_seeds
from md4_dist.tokenizer import decode, load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m md4_dist.sample", description=__doc__.split("\n\n")[0])
    cli.add_checkpoint_args(ap)
    ap.add_argument("--num-samples", type=int, default=4, help="how many samples (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=256,
                    help="denoising steps from all-masked to clean; with --sampler threshold, the most "
                         "model calls (default: %(default)s)")
    ap.add_argument("--sampler", choices=SAMPLERS, default="ancestral",
                    help="ancestral, topp: MD4's; confidence, margin, entropy: unmask the positions the "
                         "model is surest of, as many per step as the schedule unmasks (LLaDA, Dream); "
                         "threshold: every position surer than --threshold, at least one per step "
                         "(Fast-dLLM) (default: %(default)s)")
    ap.add_argument("--top-p", type=float, default=0.9,
                    help="with --sampler topp: the mass kept (default: %(default)s)")
    ap.add_argument("--threshold", type=float, default=0.9,
                    help="with --sampler threshold: the confidence in (0, 1] that unmasks a position "
                         "(default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="confidence, margin, entropy, threshold: the candidates' temperature; 0 takes "
                         "the most likely token (default: %(default)s)")
    ap.add_argument("--block-length", type=int, default=0,
                    help="confidence, margin, entropy, threshold: decode blocks of this many positions "
                         "one after another from the left, --steps shared among them (LLaDA's "
                         "semi-autoregressive decoding); 0: the whole sequence at once (default: %(default)s)")
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="end each sample at its first generated EOS; the rest is EOS")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="run the model one sample at a time, so that a sample does not depend on "
                         "--batch-size (slower)")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="the model's arithmetic: bf16 (autocast) or fp32; auto: bf16 on a GPU, fp32 "
                         "on the CPU. The sampling itself is float32 (default: %(default)s)")
    ap.add_argument("--compile", action="store_true",
                    help="compile the model's trunk with torch.compile (pays on a GPU for many steps)")
    ap.add_argument("--grid", choices=("cosine", "uniform"), default="cosine",
                    help="the times of the steps (default: %(default)s)")
    ap.add_argument("--prefix", default=None, help="text every sample starts with")
    ap.add_argument("--seq-len", type=int, default=0,
                    help="tokens per sample; 0: the training length (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="samples drawn together (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="sample i's randomness comes from (seed, i) alone (default: %(default)s)")
    ap.add_argument("--out", default=None, help="a file (local or object storage); .jsonl: JSON lines")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.num_samples < 1 or args.steps < 1 or args.batch_size < 1 or args.seq_len < 0:
        ap.error("--num-samples, --steps and --batch-size must be >= 1, --seq-len >= 0")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p must lie in (0, 1], got {args.top_p}")
    if not 0 < args.threshold <= 1:
        ap.error(f"--threshold must lie in (0, 1], got {args.threshold}")
    if args.temperature < 0:
        ap.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.block_length < 0:
        ap.error(f"--block-length must be >= 0, got {args.block_length}")
    if args.block_length and args.sampler in ("ancestral", "topp"):
        ap.error(f"--block-length applies to the confidence, margin, entropy and threshold "
                 f"samplers; --sampler {args.sampler} unmasks by time")
    dev = cli.device(args.device)
    if args.out is not None and not args.overwrite and exists(args.out):
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")

    with open_checkpoint(args.checkpoint) as ckpt:
        cfg = ckpt.config
        model = ckpt.model(ema=not args.no_ema).to(dev)
    L = args.seq_len or cfg.data.seq_len
    if args.block_length > L or args.block_length and args.steps < -(-L // args.block_length):
        ap.error(f"--block-length {args.block_length}: it must be at most the length ({L}), and "
                 f"--steps ({args.steps}) at least the number of blocks")
    tokenizer = None
    if ckpt.tokenizer is not None or args.prefix is not None:
        tokenizer = load_tokenizer(ckpt.tokenizer, args.tokenizer, cfg.storage)  # names what is wrong
    eos_id = ckpt.state["eos_id"]
    if args.stop_at_eos and eos_id is None:
        ap.error(f"--stop-at-eos: the corpus of {args.checkpoint} has no EOS id")
    given = fixed = None
    if args.prefix is not None:
        ids = tokenizer.encode(args.prefix)
        if not 0 < len(ids) < L:
            raise ValueError(f"--prefix is {len(ids)} tokens; it must be 1 to {L - 1} (--seq-len {L})")
        given, fixed = prefix_condition(ids, args.batch_size, L)

    samples, calls = [], 0
    with tqdm(total=args.num_samples, unit="sample", desc="sample", file=sys.stderr) as bar:
        while len(samples) < args.num_samples:
            n = min(args.batch_size, args.num_samples - len(samples))
            out = generate(model.denoiser, model.schedule, n, L, args.steps, sampler=args.sampler,
                           top_p=args.top_p, threshold=args.threshold, temperature=args.temperature,
                           grid=args.grid, device=dev, seeds=row_seeds(args.seed, len(samples), n),
                           batch_invariant=args.batch_invariant, precision=args.precision,
                           compile=args.compile, eos_id=eos_id if args.stop_at_eos else None,
                           block_length=args.block_length or None,
                           given=None if given is None else given[:n].to(dev),
                           fixed=None if fixed is None else fixed[:n].to(dev))
            samples += out.tokens.cpu().tolist()
            calls += out.denoiser_calls
            bar.update(n)
    print(f"{calls} model calls for {len(samples)} samples ({args.sampler})", file=sys.stderr)

    texts = [decode(s, tokenizer, eos_id) for s in samples]
    if args.out is not None and args.out.endswith(".jsonl"):
        body = "".join(json.dumps({"sample": i, "tokens": s, "text": t}) + "\n"
                       for i, (s, t) in enumerate(zip(samples, texts)))
    else:
        body = "".join(f"=== sample {i} (step {ckpt.step}) ===\n{t}\n" for i, t in enumerate(texts))
    if args.out is None:
        sys.stdout.write(body)
    else:
        write_bytes(args.out, body.encode(), cfg.storage)
        print(f"wrote {len(samples)} samples to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
