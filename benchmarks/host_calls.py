"""The host's work in one trainer step, counted on the CPU (a benchmark, not a test).

    DS_ACCELERATOR=cpu python benchmarks/host_calls.py [--zero 1 3] [--units block trunk]
        [--kind md4|genmd4] [--steps 5] [--top 15]

A ZeRO-3 step on a GPU is host-bound: after each of DeepSpeed's waits the GPU idles while Python
queues the next work (benchmarks/RESULTS.md). This counts that Python with cProfile, per step, at
MD4-S's module structure (12 blocks, the same parameters per block) with tiny widths so the CPU's
arithmetic stays small: the function calls of the trainer's step (`loop.micro_step` in the
trainer's DeepSpeed engine, eager, bf16, one process over gloo), grouped by where the function
lives (deepspeed, torch, md4_dist, the rest: builtins and tensor methods), and DeepSpeed's
functions with the most self time. Call counts are exact; the times are cProfile's and this
CPU's, for ranking only.
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


def one(zero: int, unit: str, kind: str, steps: int, top: int) -> None:
    import deepspeed
    import torch

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from throughput import set_up_distributed

    from md4_dist.config import config_from_dict
    from md4_dist.diffusion.objectives import masks_per_sequence
    from md4_dist.trainer.engine import build_engine
    from md4_dist.trainer.loop import micro_step
    from md4_dist.trainer.noise import TRAIN, NoiseByPosition

    B, L, V = 4, 128, 512
    cfg = config_from_dict({
        "model": {"vocab_size": V, "dim": 64, "n_layers": 12, "n_heads": 4, "time_dim": 16},
        "diffusion": {"kind": kind, "schedule": "learnable_poly" if kind == "genmd4" else "linear"},
        "data": {"manifest": "unused", "seq_len": L},
        "train": {"global_batch": B, "micro_batch": B, "steps": 10**6, "ema": 0.0, "compile_unit": unit},
        "optim": {"lr": 1e-4, "warmup_steps": 10},
        "cluster": {"num_workers": 1, "use_gpu": False},
        "deepspeed": {"zero_stage": zero, "precision": "bf16"}}, [])
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
        calls[_where(path)] += ncalls / steps
        if _where(path) == "deepspeed":
            ds_self.append((self_s / steps * 1e3, ncalls / steps, f"{path.split('site-packages/')[-1]}:{line}({name})"))
    groups = ", ".join(f"{k} {v:,.0f}" for k, v in calls.most_common())
    print(f"ZeRO-{zero}, compile_unit {unit}, {kind}: {sum(calls.values()):,.0f} Python calls a step ({groups})")
    for ms, n, where in sorted(ds_self, reverse=True)[:top]:
        print(f"    {n:6.0f} calls {ms:7.3f} ms self  {where}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zero", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--units", nargs="+", default=["block", "trunk"])
    ap.add_argument("--kind", default="md4", choices=["md4", "genmd4"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--one", nargs=2, metavar=("ZERO", "UNIT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(int(args.one[0]), args.one[1], args.kind, args.steps, args.top)
        return
    env = os.environ | {"DS_ACCELERATOR": "cpu"}
    for zero in args.zero:
        for unit in args.units:  # a process each: one DeepSpeed engine per process
            out = subprocess.run([sys.executable, __file__, "--one", str(zero), unit, "--kind", args.kind,
                                  "--steps", str(args.steps), "--top", str(args.top)],
                                 env=env, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if "Python calls" in ln or " ms self " in ln]
            print("\n".join(lines) if out.returncode == 0 and lines else out.stderr[-3000:], flush=True)


if __name__ == "__main__":
    main()
