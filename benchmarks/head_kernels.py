"""The output layer's two V-wide kernels on one GPU (a benchmark, not a test).

    python benchmarks/head_kernels.py [--rows 8192] [--vocab 50257] [--genmd4] [--reps 50]

Times `reduce_logits` (logsumexp, the target's logit, GenMD4's expectation) and `grad_logits`
(their gradient in the logits) as train.compile runs them (`HeadKernels(compiled=True)`: dynamo's
default, symbolic only in the row count after the second row count) against the same functions
under `torch.compile(dynamic=True)` (every size symbolic, as before 2026-12-07), on bf16 logits
[rows, V_pad]. The row count moves by a few rows between calls, as the masked-row count does
between steps, so both variants run their row-symbolic kernels. Each kernel's bytes (logits read,
gradient written) over its median time is set beside a plain copy of the logits, the rate the
device's memory gives such a kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from md4_dist.output_head import HeadKernels, grad_logits, padded_vocab, reduce_logits  # noqa: E402


def _median_ms(fn, reps: int) -> tuple[float, float, float]:
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--genmd4", action="store_true", help="with GenMD4's exponents w [V]")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    dev, V = torch.device("cuda"), args.vocab
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = [args.rows - k for k in range(4)]  # a few row counts, as the masked count varies
    logits = {n: torch.randn(n, padded_vocab(V), device=dev, dtype=torch.bfloat16, generator=gen) * 3
              for n in rows}
    x = {n: torch.randint(0, V, (n,), device=dev, generator=gen) for n in rows}
    w = torch.rand(V, device=dev, generator=gen) if args.genmd4 else None
    ones = {n: torch.ones(n, device=dev) for n in rows}
    variants = {"rows symbolic (HeadKernels)": HeadKernels(compiled=True),
                "all sizes symbolic (dynamic=True)": SimpleNamespace(
                    reduce=torch.compile(reduce_logits, dynamic=True),
                    grad=torch.compile(grad_logits, dynamic=True))}

    def grad(k, n, reduced):  # an upstream gradient of ones for each of the three reductions
        lse, _, expected = reduced
        return k.grad(logits[n], x[n], w, lse, ones[n] if expected is None else expected, ones[n], ones[n],
                      ones[n], V)

    n0 = rows[0]
    bytes_reduce = logits[n0].numel() * 2
    bytes_grad = logits[n0].numel() * 4  # bf16 read, bf16 written
    copy = _median_ms(lambda i: logits[rows[i % 4]].clone(), args.reps)
    print(f"{torch.cuda.get_device_name()}: rows {n0}, V {V} (padded {padded_vocab(V)}), "
          f"{'GenMD4' if w is not None else 'MD4'}; ms median (min-max) of {args.reps}")
    print(f"  copy of the logits: {copy[0]:.3f} ms ({copy[1]:.3f}-{copy[2]:.3f}), "
          f"{bytes_grad / copy[0] / 1e6:.0f} GB/s")
    for name, k in variants.items():
        stats = {}
        for n in rows:  # compile (and, for HeadKernels, recompile row-symbolic) before timing
            stats[n] = k.reduce(logits[n], x[n], w, V)
            grad(k, n, stats[n])

        def reduce(i, k=k):
            n = rows[i % 4]
            return k.reduce(logits[n], x[n], w, V)

        r = _median_ms(reduce, args.reps)
        g = _median_ms(lambda i, k=k: grad(k, rows[i % 4], stats[rows[i % 4]]), args.reps)
        print(f"  {name}: reduce {r[0]:.3f} ms ({r[1]:.3f}-{r[2]:.3f}), {bytes_reduce / r[0] / 1e6:.0f} GB/s; "
              f"grad {g[0]:.3f} ms ({g[1]:.3f}-{g[2]:.3f}), {bytes_grad / g[0] / 1e6:.0f} GB/s")


if __name__ == "__main__":
    main()
