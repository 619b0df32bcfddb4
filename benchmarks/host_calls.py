"""The host's work in one trainer step, counted on the CPU (a benchmark, not a test).

    python benchmarks/host_calls.py [--zero 1 3] [--units block trunk] [--model md4-s|genmd4-s]
        [--steps 5] [--top 15]

A ZeRO-3 step on a GPU is host-bound: after each of DeepSpeed's waits the GPU idles while Python
queues the next work (benchmarks/RESULTS.md). This counts that Python with cProfile, per step, at
MD4-S's module structure (throughput.py's config: 12 blocks, the same parameters per block) with
tiny widths so the CPU's arithmetic stays small: the function calls of the trainer's step
(`loop.micro_step` in the trainer's DeepSpeed engine, eager, bf16, one process over gloo,
DeepSpeed's CPU accelerator), grouped by where the function lives (deepspeed, torch, md4_dist,
the rest: builtins and tensor methods), and DeepSpeed's functions with the most self time. Call
counts are exact; the times are cProfile's and this CPU's, for ranking only.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import os
import pstats
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _where(path: str) -> str:
    for name in ("deepspeed", "torch"):
        if f"site-packages/{name}/" in path:
            return name
    return "md4_dist" if os.path.join(ROOT, "md4_dist") in path else "other"


def one(model: str, zero: int, unit: str, steps: int, top: int) -> None:
    import deepspeed
    import torch

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from throughput import config, set_up_distributed

    from md4_dist.diffusion.objectives import masks_per_sequence
    from md4_dist.trainer.engine import build_engine
    from md4_dist.trainer.loop import micro_step
    from md4_dist.trainer.noise import TRAIN, NoiseByPosition

    B, L, V = 4, 128, 512  # throughput.py's shape (its layers and parameters), at tiny widths
    # ZeRO-3 keeps a tensor of at most deepspeed.persistence_threshold (100,000) elements whole. At
    # full width only GenMD4's schedule (V entries) is that small; at these widths every tensor
    # is, so the threshold is V here: the same tensors partitioned as on the GPU.
    cfg = config(model, zero, B, "off", [f"model.vocab_size={V}", "model.dim=64", "model.n_heads=4",
                                         "model.time_dim=16", f"data.seq_len={L}", "cluster.use_gpu=false",
                                         f"train.compile_unit={unit}", f"deepspeed.persistence_threshold={V}"])
    set_up_distributed()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    engine = build_engine(cfg, 1)[0]
    device = torch.device("cpu")
    noise = NoiseByPosition(0, TRAIN, B, L, masks_per_sequence(cfg.diffusion), True, device)
    g = torch.Generator().manual_seed(0)

    def step(i):
        batch = {"tokens": torch.randint(0, V, (B, L), generator=g), "positions": torch.arange(i * B, (i + 1) * B)}
        micro_step(engine, batch, noise, device, B)

    for i in range(3):  # warm-up: the optimizer's state, DeepSpeed's first-step traces
        step(i)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(3, 3 + steps):
        step(i)
    prof.disable()
    calls, ds_self = collections.Counter(), []
    for (path, line, name), (_, ncalls, self_s, _, _) in pstats.Stats(prof).stats.items():
        where = _where(path)
        calls[where] += ncalls / steps
        if where == "deepspeed":
            ds_self.append((self_s / steps * 1e3, ncalls / steps, f"{path.split('site-packages/')[-1]}:{line}({name})"))
    groups = ", ".join(f"{k} {v:,.0f}" for k, v in calls.most_common())
    print(f"ZeRO-{zero}, compile_unit {unit}, {model}: {sum(calls.values()):,.0f} Python calls a step ({groups})")
    for ms, n, where in sorted(ds_self, reverse=True)[:top]:
        print(f"    {n:6.0f} calls {ms:7.3f} ms self  {where}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zero", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--units", nargs="+", default=["block", "trunk"])
    ap.add_argument("--model", default="md4-s", choices=["md4-s", "genmd4-s"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--one", nargs=2, metavar=("ZERO", "UNIT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.model, int(args.one[0]), args.one[1], args.steps, args.top)
        return
    env = os.environ | {"DS_ACCELERATOR": "cpu"}
    for zero in args.zero:
        for unit in args.units:  # a process each: one DeepSpeed engine per process
            out = subprocess.run([sys.executable, __file__, "--one", str(zero), unit, "--model", args.model,
                                  "--steps", str(args.steps), "--top", str(args.top)],
                                 env=env, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if "Python calls" in ln or " ms self " in ln]
            print("\n".join(lines) if out.returncode == 0 and lines else out.stderr[-3000:], flush=True)


if __name__ == "__main__":
    main()
