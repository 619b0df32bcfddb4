"""Sampling speed per denoising step (a benchmark, not a test): today's full-logits path against
the rows-only path, in fp32, bf16 and compiled.

    # GPU: MD4-S shape (V = 50257, 12 layers of width 768), 64 samples of L = 1024
    python benchmarks/sampling_speed.py
    python benchmarks/sampling_speed.py --samplers ancestral --configs bf16 bf16-compiled
    # CPU, a small shape, to try the script (the figures say nothing about a GPU)
    python benchmarks/sampling_speed.py --small

Configurations (--configs), each a call of md4_dist.sampling.generate with per-row seeds:
- fp32-full: float32, every position projected to V and its [B, L, V] logits taken (today's
  path before the rows-only one; `full_logits=True`).
- bf16-full: the same under bf16 autocast.
- fp32, bf16: only the rows a step can change projected (the default path), float32 or bf16.
- bf16-compiled: bf16 with the trunk compiled (`compile=True`).
Samplers (--samplers): ancestral (--steps steps, the sample command's default 256) and threshold
(0.9, at most L calls); a random-weight model's output layer is drawn at random (std
--logit-std / sqrt(D)), so that its distributions are not all uniform.

A step's time is the time between two consecutive calls of the denoiser's output layer (a CUDA
event recorded in a forward pre-hook: no host wait inside the timed window): the trunk, the
projection, the sampling arithmetic and the uniforms of one step. Per configuration, after one
untimed warm-up draw of 2 steps (compilation, allocations): the median, min and max over the
timed steps, their mean, the rows projected per step, the peak GPU memory, and the mean's speed-up
over fp32-full's in the same command (`x_fp32_full`; the issue's target: 10x for ancestral). The ancestral
rows-only path projects about B x L / steps rows per step, so it runs the whole draw (steps + 1
calls) and reports every step; a path whose steps all cost the same (the full-logits ones), or
the threshold sampler (whose first steps, with every position masked, cost the most), stops
after 1 + --measure calls. Writes benchmarks/results/sampling-speed-<device>-<date>.json and
prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from md4_dist.diffusion.schedules import build  # noqa: E402
from md4_dist.model import Denoiser, ModelConfig  # noqa: E402
from md4_dist.sampling import generate, row_seeds  # noqa: E402

CONFIGS = {  # name -> generate's options
    "fp32-full": dict(precision="fp32", full_logits=True),
    "bf16-full": dict(precision="bf16", full_logits=True),
    "fp32": dict(precision="fp32"),
    "bf16": dict(precision="bf16"),
    "bf16-compiled": dict(precision="bf16", compile=True),
}
SHAPES = {  # (model, batch, seq_len)
    "md4-s": (ModelConfig(), 64, 1024),
    "small": (ModelConfig(vocab_size=2048, dim=128, n_layers=2, n_heads=4, time_dim=32), 8, 128),
}


class _Enough(Exception):
    """Raised by the timing hook once the calls to time have been made."""


class StepClock:
    """Times the steps of a draw: a pre-hook on the denoiser's output layer records an event
    (CUDA) or the wall clock (CPU) and the rows about to be projected at each call; it stops the
    draw with _Enough after `max_calls` calls."""

    def __init__(self, denoiser: Denoiser, device: torch.device):
        self.device, self.marks, self.rows, self.max_calls = device, [], [], None
        self.handle = denoiser.out.register_forward_pre_hook(self._mark)

    def _mark(self, module, args):
        if self.max_calls is not None and len(self.marks) >= self.max_calls:
            raise _Enough
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        self.rows.append(args[0].shape[:-1].numel())

    def start(self, max_calls: int | None):
        self.marks, self.rows, self.max_calls = [], [], max_calls

    def step_ms(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def model_for(shape: str, device: torch.device, logit_std: float) -> tuple[Denoiser, int, int]:
    cfg, batch, seq_len = SHAPES[shape]
    torch.manual_seed(0)
    den = Denoiser(cfg)
    with torch.no_grad():  # the output layer starts at zero: every probability would be 1 / V
        den.out.weight.normal_(0, logit_std / cfg.dim ** 0.5)
    return den.to(device).eval(), batch, seq_len


def measure(den, sched, batch, seq_len, sampler, steps, config, clock, measure_steps, device):
    """One configuration: a warm-up draw, then the timed one."""
    kw = dict(sampler=sampler, threshold=0.9, device=device, seeds=row_seeds(0, 0, batch),
              **CONFIGS[config])
    full_draw = sampler == "ancestral" and not CONFIGS[config].get("full_logits", False)
    clock.start(None)
    generate(den, sched, batch, seq_len, 2, **kw)  # warm-up: compilation, allocations
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    clock.start(None if full_draw else 1 + measure_steps)
    start = time.perf_counter()
    try:
        generate(den, sched, batch, seq_len, steps if sampler == "ancestral" else seq_len, **kw)
    except _Enough:
        pass
    times = clock.step_ms()
    wall = time.perf_counter() - start
    return {"sampler": sampler, "config": config, **CONFIGS[config],
            "steps": steps if sampler == "ancestral" else seq_len, "timed_steps": len(times),
            "whole_draw": full_draw, "ms_per_step_median": statistics.median(times),
            "ms_per_step_min": min(times), "ms_per_step_max": max(times),
            "ms_per_step_mean": statistics.fmean(times),
            "rows_projected_per_step": statistics.fmean(clock.rows[:len(times)]),
            "wall_s": wall,
            "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 1e9
                               if device.type == "cuda" else None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the small CPU shape (default: MD4-S)")
    ap.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    ap.add_argument("--samplers", nargs="+", default=["ancestral", "threshold"],
                    choices=["ancestral", "threshold"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=256, help="the ancestral sampler's steps")
    ap.add_argument("--measure", type=int, default=16,
                    help="timed steps of the paths that do not run the whole draw")
    ap.add_argument("--schedule", default="linear", help="the masking schedule (default linear)")
    ap.add_argument("--logit-std", type=float, default=4.0,
                    help="the random output layer's std times sqrt(D)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="the JSON file (default: benchmarks/results/...)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = "small" if args.small else "md4-s"
    den, batch, seq_len = model_for(shape, device, args.logit_std)
    sched = build(args.schedule, vocab_size=den.cfg.vocab_size).to(device)
    clock = StepClock(den, device)
    rows = []
    print(f"{shape}: V={den.cfg.vocab_size} L={seq_len} B={batch} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or platform.machine())})")
    print(f"{'sampler':10} {'config':14} {'median ms':>10} {'min':>8} {'max':>8} {'mean':>8} "
          f"{'steps':>6} {'rows/step':>10} {'peak GB':>8} {'x fp32-full':>11}")
    for sampler in args.samplers:
        for config in args.configs:
            r = measure(den, sched, batch, seq_len, sampler, args.steps, config, clock,
                        args.measure, device)
            # the speed-up over today's path, both measured by this command (mean per step)
            base = [b for b in rows if b["sampler"] == sampler and b["config"] == "fp32-full"]
            r["x_fp32_full"] = (base[0]["ms_per_step_mean"] / r["ms_per_step_mean"]) if base else None
            rows.append(r)
            peak = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
            speedup = "-" if r["x_fp32_full"] is None else f"{r['x_fp32_full']:.1f}"
            print(f"{sampler:10} {config:14} {r['ms_per_step_median']:10.1f} "
                  f"{r['ms_per_step_min']:8.1f} {r['ms_per_step_max']:8.1f} "
                  f"{r['ms_per_step_mean']:8.1f} {r['timed_steps']:6d} "
                  f"{r['rows_projected_per_step']:10.0f} {peak:>8} {speedup:>11}", flush=True)
    result = {"shape": shape, "vocab_size": den.cfg.vocab_size, "seq_len": seq_len, "batch": batch,
              "schedule": args.schedule, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              (platform.processor() or platform.machine()), "threads": torch.get_num_threads(), "host": socket.gethostname(),
              "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows}
    date = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"sampling-speed-{shape}-{device.type}-{date}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
