"""Sampling speed against exact sample quality (a benchmark, not a test).

    # CPU: write the oracle corpus, train a small MD4 on it with the real train command (11 to
    # 16 minutes on 2 shared cores), then draw with every sampler and score every draw against
    # the chain (42 minutes of CPU)
    python benchmarks/sampling.py --train runs/bench-sampling
    # the same model again (the run directory the first command trained)
    python benchmarks/sampling.py --checkpoint runs/bench-sampling/run
    # GPU, speed only: an MD4-S-shaped model with random weights, batch 64 at L = 1024, bf16
    python benchmarks/sampling.py --device cuda --shape md4-s --thresholds 0.9 \
        [--samplers ...] [--compile]
    # the same mode on the CPU at a small shape (what tests/test_sampling_benchmark.py runs)
    python benchmarks/sampling.py --shape tiny --num-samples 8 --steps 8 16

Options: --samplers (default all of sampling.SAMPLERS), --steps (8 16 32 64 128 256 1024),
--thresholds (0.1 0.2 0.3 0.5 0.7 0.9 0.99), --num-samples (256; 64 with --shape), --batch (64),
--seed (0), --top-p (0.9), --dtype (bf16 autocast on cuda, fp32 on cpu), --threads (1 on cpu),
--compile (generate's compile=True: the trunk compiled; the warm-up draw pays for it), --out, --plot.

What it measures. One model, every sampler of md4_dist.sampling.generate (its public interface
only, with its defaults: cosine grid, temperature 1):
- ancestral, topp: at each of --steps (steps + 1 model calls: the last fills what is left).
- confidence, margin, entropy: at each of --steps up to L (past L a step would unmask nothing).
- threshold: at each of --thresholds with steps = L as the cap; its model calls depend on the
  data, so the row reports the mean calls per sample (`calls_per_sample`).
Every row draws --num-samples sequences of the model's length in batches of --batch from one
generator seeded with --seed (the same seed for every row) and times them by the wall clock
(cuda: synchronised), after one untimed warm-up draw. samples/s = samples / wall seconds. On the
CPU the rows also carry the process's CPU seconds (`cpu_s`, `samples_per_cpu_s`): on one thread
that is the work done, which other processes' load does not stretch as it does the wall clock.

Quality (a model trained on a data_tools.synthetic corpus: --train, or --checkpoint of such a
run): each row's samples are scored by md4_dist.inference.oracle.score against the Markov chain
that wrote the corpus: the exact NLL in bits per token with its standard error, its gap to the
chain's entropy rate, and the bigram KL (with its bootstrap error and the floor an exact sampler
shows at that sample size). Per sampler, `steps_to_1pct` is the fewest model calls from which on
every row's NLL lies within 1% of the NLL of that sampler's row with the most calls (1024 steps
for ancestral and topp, L for the ordered samplers, the highest threshold).
A random-weight model (--shape) has no quality: its rows are speed only (its output layer starts
at zero, so every probability is 1/V and the threshold sampler takes one position per call, L
calls whatever the threshold: one threshold is enough).

Writes benchmarks/results/sampling-<device>-<date>.json (every row, the machine, the command),
prints a table and, with quality, plots the NLL gap and the bigram KL against the model calls and
against samples/s, one line per sampler, to benchmarks/sampling_tradeoff.png (matplotlib: the
`bench` extra). The GPU's MD4-S rows at 1024 steps take minutes each: split a run by --samplers
to stay under a time limit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from md4_dist.diffusion.objectives import DiffusionConfig  # noqa: E402
from md4_dist.diffusion_model import DiffusionModel  # noqa: E402
from md4_dist.model import ModelConfig  # noqa: E402
from md4_dist.sampling import SAMPLERS, generate  # noqa: E402

ORDERED = ("confidence", "margin", "entropy")
STEPS = (8, 16, 32, 64, 128, 256, 1024)
# Low thresholds too: this chain's conditionals are rarely sure (1.65 bits of entropy per token), so
# above 0.5 the threshold sampler unmasks about one position per call.
THRESHOLDS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99)
SHAPES = {  # random-weight models for speed only: (model, seq_len)
    "md4-s": (ModelConfig(), 1024),  # MD4-S with the GPT-2 vocabulary, the paper's OpenWebText shape
    "tiny": (ModelConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4, time_dim=32), 128),
}
# The oracle corpus and the model --train makes: a chain of entropy 1.65 bits/token (log2 V = 5);
# tiny.json's 2-layer, 64-wide MD4 reaches a validation NELBO 0.18 bits above it in 2000 steps
# (11 to 16 minutes on 2 shared cores); a model call on a batch of 64 costs 100 to 160 ms of CPU.
# All the rows: 42 minutes of CPU (benchmarks/RESULTS.md, "Sampling").
CORPUS = {"vocab-size": 32, "seq-len": 128, "num-sequences": 40000, "val-fraction": 0.025, "seed": 0,
          "successors": 2, "floor": 0.02}
TRAIN = {"diffusion.kind": "md4", "diffusion.schedule": "linear", "optim.lr": 1e-2,
         "train.global_batch": 64, "train.micro_batch": 32, "train.steps": 2000, "checkpoint.every": 1000,
         "eval.every": 500, "logging.every": 50, "logging.sample_every": 0}


def train_oracle_model(out: str) -> str:
    """The corpus (out/data) and a model trained on it (out/run) by the real commands; returns the
    run directory. A finished run is reused (the train command resumes it and stops at once)."""
    out = os.path.abspath(out)  # the commands run in the repository's root
    data, run = os.path.join(out, "data"), os.path.join(out, "run")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        _command([sys.executable, "-m", "data_tools.synthetic", "--out", data,
                  *[a for k, v in CORPUS.items() for a in (f"--{k}", str(v))]])
    sets = {"train.run_dir": run, "data.manifest": data, "data.seq_len": CORPUS["seq-len"],
            "model.vocab_size": CORPUS["vocab-size"], **TRAIN}
    _command([sys.executable, "-m", "md4_dist.train", os.path.join(ROOT, "configs", "tiny.json"),
              *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    return run


def _command(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".build", "torch_extensions"))
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")


def plans(seq_len: int, samplers=SAMPLERS, steps=STEPS, thresholds=THRESHOLDS) -> list[dict]:
    """The (sampler, steps, threshold) of every row, in the order they run."""
    out = []
    for sampler in samplers:
        if sampler == "threshold":
            out += [{"sampler": sampler, "steps": seq_len, "threshold": th} for th in sorted(thresholds)]
        else:
            out += [{"sampler": sampler, "steps": s, "threshold": None} for s in sorted(steps)
                    if sampler not in ORDERED or s <= seq_len]
    return out


def measure(denoiser, schedule, seq_len: int, rows: list[dict], num_samples: int, batch: int,
            seed: int = 0, device: str | torch.device = "cpu", chain=None, top_p: float = 0.9,
            precision: str = "fp32", compile: bool = False, progress=print) -> list[dict]:
    """Draw, time and (given the oracle `chain`) score each of `rows` (`plans`' dicts); returns
    them with their figures added."""
    device = torch.device(device)
    # the model itself, not a wrapper: generate projects only the rows a step can change
    options = {"precision": precision, "compile": compile}

    def draw(row, n, generator):
        return generate(denoiser, schedule, n, seq_len, row["steps"], sampler=row["sampler"],
                        threshold=row["threshold"] or 0.9, top_p=top_p, generator=generator,
                        device=device, **options)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    draw({"sampler": "ancestral", "steps": 2, "threshold": None}, min(batch, num_samples),
         torch.Generator(device).manual_seed(seed))  # warm-up: allocations, kernels' first launch
    out = []
    for row in rows:
        generator = torch.Generator(device).manual_seed(seed)
        tokens, calls, per_row = [], 0, []
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        for first in range(0, num_samples, batch):
            got = draw(row, min(batch, num_samples - first), generator)
            tokens.append(got.tokens)
            calls += got.denoiser_calls
            per_row.append(got.calls_per_row)
        sync()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        tokens = torch.cat(tokens).cpu().numpy()  # [N, L]
        r = dict(row, top_p=top_p if row["sampler"] == "topp" else None, num_samples=num_samples,
                 batch=batch, seq_len=seq_len, wall_s=wall, samples_per_s=num_samples / wall,
                 cpu_s=cpu, samples_per_cpu_s=num_samples / cpu if device.type == "cpu" else None,
                 model_calls=calls, calls_per_sample=float(torch.cat(per_row).double().mean()),
                 load_average=os.getloadavg()[0])  # the machine's, over the last minute: others' work
        if chain is not None:
            from md4_dist.inference.oracle import score
            r |= score(chain, tokens, seed)
        out.append(r)
        progress(line(r))
    return out


def steps_to_within(rows: list[dict], tolerance: float = 0.01) -> dict:
    """Per sampler: its row of the most model calls (the reference) and the row of the fewest calls
    from which on every row's NLL lies within `tolerance` (relative) of the reference's NLL."""
    out = {}
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == sampler and "nll_bits_per_token" in r),
                      key=lambda r: r["calls_per_sample"])
        if not mine:
            continue
        ref = mine[-1]
        first = len(mine) - 1
        while first > 0 and abs(mine[first - 1]["nll_bits_per_token"] - ref["nll_bits_per_token"]) \
                <= tolerance * ref["nll_bits_per_token"]:
            first -= 1
        hit = mine[first]
        out[sampler] = {"reference_steps": ref["steps"], "reference_threshold": ref["threshold"],
                        "reference_nll": ref["nll_bits_per_token"], "reference_calls": ref["calls_per_sample"],
                        "steps": hit["steps"], "threshold": hit["threshold"],
                        "calls_per_sample": hit["calls_per_sample"], "nll": hit["nll_bits_per_token"],
                        "tolerance": tolerance}
    return out


def setting(r: dict) -> str:
    return f"th {r['threshold']:g}" if r["threshold"] is not None else f"{r['steps']} steps"


HEADER = (f"{'sampler':10s} {'setting':>10s} {'calls':>7s} {'wall s':>8s} {'samples/s':>10s} {'cpu s':>8s} "
          f"{'NLL bits/tok':>15s} {'gap':>8s} {'bigram KL':>16s} {'(exact)':>8s} {'imp':>4s}")


def line(r: dict) -> str:
    s = (f"{r['sampler']:10s} {setting(r):>10s} {r['calls_per_sample']:7.1f} {r['wall_s']:8.2f} "
         f"{r['samples_per_s']:10.2f} {r['cpu_s']:8.2f}")
    if "nll_bits_per_token" in r:
        s += (f" {r['nll_bits_per_token']:7.4f} ± {r['stderr_bits_per_token']:.4f} "
              f"{r['gap_bits_per_token']:+8.4f} {r['bigram_kl_bits']:7.4f} ± {r['bigram_kl_stderr_bits']:.4f} "
              f"{r['bigram_kl_exact_sampler_bits']:8.4f} {r['impossible']:4d}")
    return s


def plot(rows: list[dict], entropy: float, path: str, title: str) -> None:
    """NLL gap (± standard error) and bigram KL against model calls and samples/s, a line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # on the CPU, the samples per CPU second: the work, which others' load does not stretch
    speed = "samples_per_cpu_s" if rows[0].get("samples_per_cpu_s") else "samples_per_s"
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for i, sampler in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["calls_per_sample"])
        style = dict(marker="os^vDP"[i % 6], capsize=3, label=sampler, color=f"C{i}")
        gap = [r["gap_bits_per_token"] for r in mine]
        err = [r["stderr_bits_per_token"] for r in mine]
        axes[0].errorbar([r["calls_per_sample"] for r in mine], gap, err, **style)
        axes[1].errorbar([r[speed] for r in mine], gap, err, **style)
        axes[2].errorbar([r["calls_per_sample"] for r in mine], [r["bigram_kl_bits"] for r in mine],
                         [r["bigram_kl_stderr_bits"] for r in mine], **style)
    floor = float(np.mean([r["bigram_kl_exact_sampler_bits"] for r in rows]))
    axes[2].axhline(floor, color="k", ls="--", lw=1, label="exact sampler, same N")
    speed_label = "samples per CPU second (1 thread)" if speed == "samples_per_cpu_s" else "samples / s"
    for ax, x in zip(axes, ("model calls per sample", speed_label, "model calls per sample")):
        ax.set_xscale("log", base=2 if "calls" in x else 10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:2]:
        ax.axhline(0, color="k", lw=1)
        ax.set_ylabel(f"NLL - entropy (bits/token; entropy {entropy:.4f})")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("bigram KL(samples || chain), bits")
    axes[0].legend()
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(device: torch.device) -> dict:
    m = {"host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
         "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    # the samplers measured: the commit, and whether sampling.py differed from it
    m["commit"] = git("rev-parse", "HEAD") or None
    m["sampling_py_modified"] = bool(git("status", "--porcelain", "--", "md4_dist/sampling.py"))
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--train", metavar="DIR", help="write the oracle corpus to DIR/data and train on it "
                       "in DIR/run (a finished run is reused), then measure it")
    model.add_argument("--checkpoint", metavar="RUN_DIR", help="a trained run (or checkpoint) to measure")
    model.add_argument("--shape", choices=SHAPES, help="a random-weight model of this shape: speed only")
    ap.add_argument("--oracle", default=None, help="the data_tools.synthetic corpus the checkpoint's model "
                    "learnt (default: its run's data.manifest)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                    help="the model's compute: bf16 autocast or fp32 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS),
                    help="(default: all)")
    ap.add_argument("--steps", nargs="+", type=int, default=list(STEPS), help="(default: %(default)s)")
    ap.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS),
                    help="the threshold sampler's (default: %(default)s)")
    ap.add_argument("--num-samples", type=int, default=None, help="per row (default: 256; 64 with --shape)")
    ap.add_argument("--batch", type=int, default=64, help="samples drawn together (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's CPU threads (default: 1 on cpu, where a shared machine's load makes "
                         "more threads wait on each other; torch's own on cuda)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--compile", action="store_true", help="sampling.generate's compile=True")
    ap.add_argument("--top-p", type=float, default=0.9, help="the topp sampler's (default: %(default)s)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="(default: %(default)s)")
    ap.add_argument("--plot", default=os.path.join(ROOT, "benchmarks", "sampling_tradeoff.png"),
                    help="the PNG, written when the rows have quality (default: %(default)s)")
    args = ap.parse_args(argv)
    num_samples = args.num_samples or (64 if args.shape else 256)
    if num_samples < 1 or args.batch < 1 or min(args.steps) < 1:
        ap.error("--num-samples, --batch and every --steps must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this machine has no CUDA device")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)

    chain, about = None, {}
    if args.shape:
        cfg, seq_len = SHAPES[args.shape]
        torch.manual_seed(args.seed)
        with device:
            net = DiffusionModel(cfg, DiffusionConfig(kind="md4", schedule="linear")).eval()
        about = {"shape": args.shape, "weights": "random", "model": vars(cfg)}
    else:
        from md4_dist.data import load_manifest
        from md4_dist.inference.consolidate import open_checkpoint
        from md4_dist.inference.oracle import chain_of

        run = train_oracle_model(args.train) if args.train else args.checkpoint
        with open_checkpoint(run) as ckpt:
            cfg, step = ckpt.config, ckpt.step
            net = ckpt.model(ema=True).to(device)
        seq_len = cfg.data.seq_len
        manifest = load_manifest(args.oracle or cfg.data.manifest, cfg.storage)
        chain = chain_of(manifest)
        about = {"checkpoint": os.path.abspath(run), "step": step, "weights": "ema", "model": vars(cfg.model),
                 "diffusion": vars(cfg.diffusion), "oracle": manifest.url,
                 "entropy_bits_per_token": chain.entropy_bits_per_token(seq_len)}

    rows = plans(seq_len, args.samplers, args.steps, args.thresholds)
    print(f"{len(rows)} rows of {num_samples} samples, L = {seq_len}, batch {args.batch}, {device} {dtype}, "
          f"{torch.get_num_threads()} threads", flush=True)
    print(HEADER, flush=True)
    rows = measure(net.denoiser, net.schedule, seq_len, rows, num_samples, args.batch, args.seed, device,
                   chain, args.top_p, dtype, args.compile,
                   progress=lambda s: print(s, flush=True))
    within = steps_to_within(rows) if chain is not None else {}
    for sampler, w in within.items():
        where = f"threshold {w['threshold']:g}" if w["threshold"] is not None else f"{w['steps']} steps"
        ref = (f"threshold {w['reference_threshold']:g}" if w["reference_threshold"] is not None
               else f"{w['reference_steps']} steps")
        print(f"{sampler}: within 1% of its NLL at {ref} ({w['reference_nll']:.4f}) from {where} on "
              f"({w['calls_per_sample']:.1f} calls per sample, NLL {w['nll']:.4f})")

    name = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-",
                                                     torch.cuda.get_device_name(device).lower())
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sampling-{name}-{stamp}.json")
    command = " ".join(["python", "benchmarks/sampling.py", *(sys.argv[1:] if argv is None else argv)])
    with open(path, "w") as f:
        json.dump({"date": stamp, "command": command, "machine": machine(device), "device": str(device),
                   "dtype": dtype, "compile": args.compile, **about, "rows": rows,
                   "steps_to_1pct": within}, f, indent=1, default=str)
    print(f"wrote {path}")
    if chain is not None:
        plot(rows, about["entropy_bits_per_token"], args.plot,
             f"{num_samples} samples per point, L = {seq_len}, V = {cfg.model.vocab_size}: "
             f"MD4 ({cfg.model.n_layers} layers x {cfg.model.dim}, step {about['step']}) on a Markov chain, "
             f"{device} {dtype}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
