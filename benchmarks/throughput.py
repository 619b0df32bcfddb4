"""Training throughput on one GPU (a benchmark, not a test).

    python benchmarks/throughput.py [--models md4-s genmd4-s genmd4-1.3b configs/owt_small.json]
        [--paths trainer bare] [--zero 0 1 3] [--batch 16] [--steps 20] [--warmup 5]
        [--compile off|default|reduce-overhead]
        [--profile [--sync-stacks]] [--set KEY=VALUE ...] [--official] [--repeats 1]
        [--unsynced-fetch] [--unsynced-norm]

Paths:
- trainer: the step exactly as the trainer runs it: `DiffusionModel` in a DeepSpeed engine built
  from our DeepSpeed config (the ZeRO stage given, bf16 with fp32 master weights, FusedAdam), one
  `loop.micro_step` per micro-batch, noise keyed by stream position.
- bare: the same model and objective in plain PyTorch: fp32 weights, bf16 autocast,
  `torch.optim.AdamW(fused=True)`.
A config file in --models gives rows at that file's settings (its model, objective, optimizer,
DeepSpeed section and how train compiles the step; its ZeRO stage and compile mode unless --zero
or --compile say otherwise), at --batch: what a run of that file does per GPU.
Tokens/s counts clean tokens (batch x seq_len) per optimizer step time; GenMD4 runs each sequence
twice (its two masks), which the FLOPs below count.

MFU = tokens/s x FLOPs per token / peak: the trainer's own count (md4_dist/trainer/perf.py, the
same as every training record's `mfu`), the peak by --peak-tflops, else perf's measured figure for
the GPU. Each run also measures the GPU's bf16 dense matrix-product rate and records it.

--official runs the official md4 training step (benchmarks/official_step.py, JAX, float32) first,
at the same batch, in its own process, and records its tokens/s in every row of the same model
(`official_tokens_per_s`, `x_official`): only a ratio measured in one command holds.

Step times come from CUDA events recorded between steps (no host wait inside the timed window).
--profile adds, per run, the top kernels of 3 steps, the GPU's busy share, the host's waits
for the GPU, and the GPU's idle time between kernels with its longest gaps (the kernels either
side, and for the three longest what the host ran while the GPU waited for the next launch);
--sync-stacks, where in the Python code each wait comes from.
Writes one JSON per run to benchmarks/results/ and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from md4_dist.config import Config, config_from_dict, load_config  # noqa: E402
from md4_dist.diffusion.checks import value_checks  # noqa: E402
from md4_dist.diffusion.objectives import DiffusionConfig, masks_per_sequence  # noqa: E402
from md4_dist.model import ModelConfig  # noqa: E402
from md4_dist.strict_config import to_dict  # noqa: E402
from md4_dist.trainer import perf  # noqa: E402
from md4_dist.trainer.noise import TRAIN, NoiseByPosition  # noqa: E402

SHAPES = {  # the OpenWebText shape of the paper, and the ~1.3B preset of configs/owt_large.json
    "md4-s": (ModelConfig(), DiffusionConfig(kind="md4", schedule="linear")),
    "genmd4-s": (ModelConfig(), DiffusionConfig(kind="genmd4", schedule="learnable_poly")),
    "genmd4-1.3b": (ModelConfig(dim=2048, n_layers=22, n_heads=16),
                    DiffusionConfig(kind="genmd4", schedule="learnable_poly")),
}
SEQ_LEN = 1024


OFFICIAL = {"md4-s": "md4", "genmd4-s": "genmd4"}  # our shape -> the official step's MODELS name


# A config file's keys a row takes from it (train's: how the step is compiled and run); the rest
# of the file (data, cluster, run directory, checkpoints, logging) does not enter one GPU's step.
FILE_SECTIONS = ("model", "diffusion", "optim", "deepspeed")
FILE_TRAIN_KEYS = ("compile", "compile_unit", "head_keeps_logits", "attention_kernels")


def model_arg(name: str) -> str:
    """--models' type: a shape of SHAPES, or a config file (a .json path) whose settings a row runs."""
    if name in SHAPES or (name.endswith(".json") and os.path.isfile(name)):
        return name
    raise argparse.ArgumentTypeError(f"{name!r} is neither a shape ({', '.join(SHAPES)}) nor an existing "
                                     ".json config file")


def label(name: str) -> str:
    """A row's name: the shape, or the config file's name without .json."""
    return name if name in SHAPES else os.path.splitext(os.path.basename(name))[0]


@functools.cache
def _file_config(path: str) -> dict:
    """A config file, read and validated once (load_config's errors name the file), as dicts."""
    return to_dict(load_config(path))


def config(name: str, zero: int | None, batch: int, compile_: str | None = None, sets: list[str] = ()) -> Config:
    """The run's config. `name`: one of SHAPES, with the trainer's defaults; or a config file, with
    its model, diffusion, optimizer, DeepSpeed and FILE_TRAIN_KEYS settings. `zero` and `compile_`
    override it (None: the file's; a shape's compile is "off"); `sets` are `--set`-style overrides
    (e.g. deepspeed.persistence_threshold=0). Batch and sequence length are the benchmark's."""
    if name in SHAPES:
        m, d = SHAPES[name]
        base = {"model": vars(m) | {"mlp_type": m.mlp_type}, "diffusion": vars(d),
                "optim": {"lr": 1e-4, "warmup_steps": 10}, "deepspeed": {"precision": "bf16"},
                "train": {"compile": "off"}}
        if zero is None:
            raise ValueError(f"{name}: a shape needs a ZeRO stage")
    else:
        whole = _file_config(name)
        base = {k: whole[k] for k in FILE_SECTIONS}
        base["train"] = {k: whole["train"][k] for k in FILE_TRAIN_KEYS}
    return config_from_dict(base | {
        "deepspeed": base["deepspeed"] | ({} if zero is None else {"zero_stage": zero}),
        "train": base["train"] | ({} if compile_ is None else {"compile": compile_}) |
        {"global_batch": batch, "micro_batch": batch, "steps": 10**6, "ema": 0.0},
        "data": {"manifest": "unused", "seq_len": SEQ_LEN},
        "cluster": {"num_workers": 1, "use_gpu": True},
    }, list(sets))


def batches(cfg: Config, device):
    """Random tokens with their stream positions, as the reader hands them out."""
    g = torch.Generator().manual_seed(0)
    position = 0
    while True:
        B = cfg.train.micro_batch
        yield {"tokens": torch.randint(0, cfg.model.vocab_size, (B, SEQ_LEN), generator=g).pin_memory(),
               "positions": torch.arange(position, position + B)}
        position += B


def require_gpu(what: str) -> bool:
    if torch.cuda.is_available():
        return True
    print(f"{what} and needs a CUDA device; none is visible here: run it on a machine with an "
          "NVIDIA GPU", file=sys.stderr)
    return False


def trainer_engine(cfg: Config, state_dict: dict | None = None):
    """The trainer's DeepSpeed engine on this GPU (`engine.build_engine`, with these weights
    when given)."""
    import deepspeed

    from md4_dist.trainer.engine import build_engine

    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    return build_engine(cfg, 1, state_dict=state_dict)[0]


def unsynced_one_gpu_fetch() -> None:
    """--unsynced-fetch, an experiment, not a training setting: on one GPU ZeRO-3 gathers nothing
    (a parameter's partition is all of it), and DeepSpeed's handle for that fetch
    (partition_parameters.NoGatherHandle and its coalesced twin) points the parameter at
    `ds_tensor.to(device, non_blocking=True)`, which on the GPU returns the tensor itself, then
    waits for the host to drain the current stream. This wait() marks the parameters available
    without draining, to measure what those waits cost the one-GPU ZeRO-3 rows: several GPUs wait
    on all-gather handles instead (the stream waits on the collective, the host does not)."""
    from deepspeed.runtime.zero import partition_parameters as pp

    def single(handle, **kwargs):
        handle._NoGatherHandle__param.ds_status = pp.ZeroParamStatus.AVAILABLE
        handle._NoGatherHandle__complete = True

    def coalesced(handle, **kwargs):
        for param in handle._NoGatherCoalescedHandle__params:
            param.ds_status = pp.ZeroParamStatus.AVAILABLE
        handle._NoGatherCoalescedHandle__complete = True

    pp.NoGatherHandle.wait, pp.NoGatherCoalescedHandle.wait = single, coalesced


def unchecked_zero3_norm() -> None:
    """--unsynced-norm, an experiment, not a training setting: DeepSpeed's ZeRO-3 optimizer step
    reads on the host whether the global gradient norm is finite (stage3.is_invalid_grad_norm, a
    `bool()` of a device tensor: the host waits for the backward, the reductions and the norm),
    to skip a non-finite step; the ZeRO-1/2 optimizer has a setting for it
    (bf16.check_grad_overflow, off in md4_dist's config), ZeRO-3 has none. This takes every norm as
    finite, to measure what that wait costs (md4_dist's finite.py stops a run whose loss or
    weights go non-finite, as at ZeRO-1/2)."""
    from deepspeed.runtime.zero import stage3

    stage3.is_invalid_grad_norm = lambda norm: False


def run_trainer(cfg: Config, args) -> list[float]:
    from md4_dist.trainer.loop import micro_step

    if args.unsynced_fetch:
        unsynced_one_gpu_fetch()
    if args.unsynced_norm:
        unchecked_zero3_norm()
    engine = trainer_engine(cfg)
    device = engine.device
    noise = NoiseByPosition(0, TRAIN, cfg.train.global_batch, SEQ_LEN,
                            masks_per_sequence(cfg.diffusion), True, device)
    data = batches(cfg, device)
    return timed(lambda: micro_step(engine, next(data), noise, device, cfg.train.micro_batch), args)


def run_bare(cfg: Config, args) -> list[float]:
    from md4_dist.trainer.engine import build_model
    from md4_dist.trainer.inputs import model_inputs

    device = torch.device("cuda", 0)
    model = build_model(cfg).to(device)  # ZeRO-0 config: no DeepSpeed in it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    noise = NoiseByPosition(0, TRAIN, cfg.train.global_batch, SEQ_LEN,
                            masks_per_sequence(cfg.diffusion), True, device)
    data = batches(cfg, device)

    def step():
        inputs, _ = model_inputs(next(data), noise, device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(*inputs)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, args)


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profiled(step, steps: int = 3, stacks: bool = False) -> None:
    """Where the time goes, over a few steps: the top kernels, the GPU's busy share of the wall
    time, and the calls by which the host waited for the GPU (with --sync-stacks, where from)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - began
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60), file=sys.stderr)
    device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in device) / 1e6
    waits = {e.key: e.count for e in table if e.key in SYNCS}
    print(f"profile: {steps} steps in {wall * 1e3:.1f} ms wall, kernels {gpu * 1e3:.1f} ms "
          f"({gpu / wall:.0%} busy); host waits for the GPU over {steps} steps (the profiler's "
          f"own closing synchronize included): {waits}", file=sys.stderr)
    if device:
        # The trace, not prof.events(): it links each kernel to the host call that launched it.
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
            with open(os.path.join(tmp, "trace.json")) as f:
                trace = json.load(f)["traceEvents"]
        idle, longest = gpu_gaps([(e["ts"], e["ts"] + e["dur"], e) for e in trace if e.get("cat") in DEVICE])
        print(f"profile: the GPU idle between its first and last kernel {idle / 1e3 / steps:.2f} ms a step; "
              "the longest gaps: " + "; ".join(f"{gap / 1e3:.2f} ms after {before['name'][:50]} before "
                                               f"{after['name'][:50]}" for gap, before, after in longest),
              file=sys.stderr)
        for gap, before, after in longest[:3]:
            print(f"profile: the {gap / 1e3:.2f} ms gap before {after['name'][:50]}: "
                  + host_in_gap(trace, before, after), file=sys.stderr)
    if stacks:  # one more step, with PyTorch reporting each synchronizing call and its caller
        import collections
        import traceback
        import warnings

        seen = collections.Counter()

        def record(*_args, **_kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            seen["\n    ".join(f"{f.filename}:{f.lineno} {f.name}" for f in frames[-6:])] += 1

        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            step()
        torch.cuda.set_sync_debug_mode("default")
        for where, n in seen.most_common():
            print(f"{n} synchronizing call(s) in one step from:\n    {where}", file=sys.stderr)


def gpu_gaps(spans: list[tuple[float, float, object]], top: int = 5) -> tuple[float, list[tuple[float, object, object]]]:
    """The GPU's idle time between its first and last kernel, from (start, end, kernel) spans in
    any order (overlapping ones, as on several streams, count once), and the `top` longest gaps as
    (gap, the kernel that ended last before it, the kernel after it): where the host fell behind."""
    spans = sorted(spans, key=lambda span: span[:2])
    idle, gaps = 0.0, []
    end, last = spans[0][1], spans[0][2]
    for start, stop, kernel in spans[1:]:
        if start > end:
            idle += start - end
            gaps.append((start - end, last, kernel))
        if stop > end:
            end, last = stop, kernel
    return idle, sorted(gaps, key=lambda gap: -gap[0])[:top]


DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")  # a Chrome trace's categories of GPU work
LAUNCH = ("cuda_runtime", "cuda_driver")  # ... and of the host calls that queue it


def host_in_gap(trace: list[dict], before: dict, after: dict, top: int = 6) -> str:
    """What kept the host from queueing `after` sooner: from a profiler's Chrome trace events, the
    host ops that ran on the thread that launched it, from the end of `before` (when the GPU ran
    dry) to that launch, each with its time inside that window, longest first (an op's time
    includes the ops it called, so a culprit shows with its callers)."""
    corr = after.get("args", {}).get("correlation")
    launch = next((e for e in trace if e.get("cat") in LAUNCH and e.get("args", {}).get("correlation") == corr), None)
    if launch is None:
        return "its launch is not in the trace"
    lo, hi = before["ts"] + before["dur"], launch["ts"]
    if hi <= lo:
        return f"queued {(lo - hi) / 1e3:.2f} ms before the GPU ran dry: it waited on something else"
    ops = sorted(((min(e["ts"] + e["dur"], hi) - max(e["ts"], lo), e["name"]) for e in trace
                  if e.get("ph") == "X" and e.get("cat") not in DEVICE and e is not launch
                  and (e.get("pid"), e.get("tid")) == (launch.get("pid"), launch.get("tid"))
                  and e["ts"] < hi and e["ts"] + e["dur"] > lo), reverse=True)[:top]
    return (f"launched {(hi - lo) / 1e3:.2f} ms after the GPU ran dry; meanwhile its thread ran "
            + ("; ".join(f"{name[:60]} {t / 1e3:.2f} ms" for t, name in ops) or "no profiled op"))


def timed(step, args) -> list[float]:
    """Step times from CUDA events recorded between steps: the host never waits inside the
    window, so it may queue ahead as in training. Value checks off, as in the trainer's loop."""
    with value_checks(False):
        return _timed(step, args)


def _timed(step, args) -> list[float]:
    for _ in range(args.warmup):
        step()
    if args.profile:
        profiled(step, stacks=args.sync_stacks)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
    marks[0].record()
    for i in range(args.steps):
        step()
        marks[i + 1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]


def set_up_distributed() -> None:
    """The environment of a one-process torch.distributed group, for DeepSpeed."""
    # Not LOCAL_SIZE: build_engine sets it once DeepSpeed's communication has started (set
    # before, DeepSpeed's CPU all-reduce maps a /dev/shm buffer that is never unlinked)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def matmul_tflops(n: int = 8192, repeats: int = 50) -> float:
    """The GPU's bf16 dense matrix-product rate (TFLOP/s), n x n by n x n, median of `repeats`."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
    marks[0].record()
    for i in range(repeats):
        a @ b
        marks[i + 1].record()
    torch.cuda.synchronize()
    seconds = statistics.median(x.elapsed_time(y) for x, y in zip(marks, marks[1:])) / 1e3
    del a, b
    torch.cuda.empty_cache()  # the rows run in processes of their own
    return 2 * n**3 / seconds / 1e12


def official_name(name: str, sets: list[str] = ()) -> str | None:
    """The official step's MODELS name for a row whose model and objective (after `sets`) are one
    of OFFICIAL's shapes (a config file's too), else None."""
    cfg = config(name, 0, 1, None, sets)
    return next((o for shape, o in OFFICIAL.items() if (cfg.model, cfg.diffusion) == SHAPES[shape]), None)


def official(models: list[str], batch: int, sets: list[str] = ()) -> dict[str, float]:
    """Tokens/s of the official md4 step per model of ours, measured now in its own process."""
    wanted = {m: official_name(m, sets) for m in models}
    names = sorted({o for o in wanted.values() if o})
    if not names:
        return {}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "official_step.py")],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "BATCH": str(batch), "MODELS": ",".join(names)})
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or len(rows) != len(names):
        sys.exit(f"the official step failed (exit {r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    got = {}
    for row in rows:
        print(f"official {row['model']}: {row['tokens_per_s']:,} tok/s (batch {row['batch']}, mean of "
              f"20 steps)", flush=True)
        got |= {ours: row["tokens_per_s"] for ours, o in wanted.items() if o and row["model"].startswith(o + "-")}
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["md4-s", "genmd4-s"], type=model_arg,
                    help=f"shapes ({', '.join(SHAPES)}) or config files (.json): a file's row runs its "
                    "model, objective, optimizer, DeepSpeed and train.compile* settings at --batch")
    ap.add_argument("--paths", nargs="+", default=["trainer", "bare"], choices=["trainer", "bare"])
    ap.add_argument("--zero", nargs="+", type=int, default=None,
                    help="the trainer's ZeRO stages (default: 0 1 3 for a shape, a config file's own)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", default=None, choices=["off", "default", "reduce-overhead"],
                    help="train.compile: torch.compile the blocks and the output layer's reductions "
                    "(default: off for a shape, a config file's own)")
    ap.add_argument("--profile", action="store_true", help="profile 3 steps: top kernels, GPU busy "
                    "share, host waits")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run, as train's --set")
    ap.add_argument("--sync-stacks", action="store_true", help="with --profile: where each wait is")
    ap.add_argument("--unsynced-fetch", action="store_true", help="an experiment: ZeRO-3's one-GPU "
                    "fetch without its host wait (see unsynced_one_gpu_fetch)")
    ap.add_argument("--unsynced-norm", action="store_true", help="an experiment: ZeRO-3's optimizer "
                    "step without reading the norm's finiteness on the host (see unchecked_zero3_norm)")
    ap.add_argument("--official", action="store_true", help="run the official md4 step first "
                    "(benchmarks/official_step.py, md4's source in .peer/) and record it in each row")
    ap.add_argument("--repeats", type=int, default=1, help="measure every row this many times, each in "
                    "a process of its own, round after round; then each row's median and range, and its "
                    "share of the same model's ZeRO-1 row by the medians and round by round")
    ap.add_argument("--tag", default="", help="a label for this configuration, in the JSON and the table")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the MFU's peak; default: trainer/perf.py's measured figure for the GPU")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "PATH", "ZERO"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if not require_gpu("benchmarks/throughput.py measures GPU training throughput"):
        return 2
    set_up_distributed()
    if args.one:  # one measurement in this process, its JSON on the last line
        name, path, zero = args.one
        cfg = config(name, int(zero), args.batch, args.compile, args.set)
        times = (run_trainer if path == "trainer" else run_bare)(cfg, args)
        print(json.dumps({"times": times, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}))
        return 0

    os.makedirs(args.out, exist_ok=True)
    anchor = official(args.models, args.batch, args.set) if args.official else {}
    device_name = torch.cuda.get_device_name(0)
    matmul = matmul_tflops()
    peak = args.peak_tflops or perf.measured_peak(device_name) or matmul
    print(f"{device_name}: bf16 dense product {matmul:.0f} TFLOP/s now; MFU against {peak:.0f}", flush=True)
    command = " ".join(["python", "benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)])

    def stages(name):
        if args.zero:
            return args.zero
        return [0, 1, 3] if name in SHAPES else [config(name, None, args.batch).deepspeed.zero_stage]

    rows = [(name, path, zero) for name in args.models for path in args.paths
            for zero in (stages(name) if path == "trainer" else [0])]
    # --repeats: every row again, in the same order each round (A B A B), so that a drift of the
    # host or the GPU falls on every row alike; ZeRO-3's host-bound step moves by 10% between
    # processes (benchmarks/RESULTS.md, 2026-12-07)
    measured = {}
    for rep in range(args.repeats):
        for name, path, zero in rows:
            # A process each: a clean GPU for the peak memory, an out-of-memory one stays one row.
            one = [sys.executable, __file__, "--one", name, path, str(zero), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)] + \
                (["--compile", args.compile] if args.compile else []) + [f"--set={s}" for s in args.set] + \
                (["--profile"] if args.profile else []) + \
                (["--sync-stacks"] if args.sync_stacks else []) + \
                (["--unsynced-fetch"] if args.unsynced_fetch else []) + \
                (["--unsynced-norm"] if args.unsynced_norm else [])
            r = subprocess.run(one, capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
                print(f"{label(name):12s} {path:8s} zero={zero} {args.tag} failed: {' | '.join(tail)}", flush=True)
                continue
            if args.profile:
                print(r.stderr[r.stderr.find("----"):], flush=True)
            got = json.loads(r.stdout.strip().splitlines()[-1])
            times, cfg = got["times"], config(name, zero, args.batch, args.compile, args.set)
            med = statistics.median(times)
            tokens = args.batch * SEQ_LEN / med
            result = {
                "model": label(name), "config": None if name in SHAPES else name, "path": path,
                "zero_stage": zero if path == "trainer" else None,
                "tag": args.tag, "device": device_name, "batch": args.batch, "seq_len": SEQ_LEN,
                "compile": cfg.train.compile, "overrides": args.set, "tokens_per_s": tokens, "step_s_median": med,
                "step_s_min": min(times), "step_s_max": max(times), "steps": len(times),
                "peak_mem_gb": got["peak_mem_gb"],
                "mfu": tokens * perf.flops_per_token(cfg.model, cfg.diffusion, SEQ_LEN) / (peak * 1e12),
                "peak_tflops": peak, "matmul_tflops_now": matmul,
                "official_tokens_per_s": anchor.get(name),
                "x_official": tokens / anchor[name] if name in anchor else None,
                "date": datetime.date.today().isoformat(), "command": command, "repeat": rep,
            }
            stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
            tag = f"zero{zero}" if path == "trainer" else "torch"
            suffix = f"-{args.tag}" if args.tag else ""
            measured.setdefault((label(name), tag), {})[rep] = tokens
            with open(os.path.join(args.out, f"{label(name)}-{path}-{tag}{suffix}-{stamp}.json"), "w") as f:
                json.dump(result, f, indent=1)
            ratio = f"  {result['x_official']:.2f}x official" if name in anchor else ""
            print(f"{label(name):12s} {path:8s} {tag:6s} {args.tag:10s} {tokens:>10,.0f} tok/s  "
                  f"step {med * 1e3:.1f} ms "
                  f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, n={len(times)})  "
                  f"peak {result['peak_mem_gb']:.1f} GB  MFU {result['mfu']:.1%}{ratio}", flush=True)
    if args.repeats > 1:
        for line in summary(measured):
            print(f"{line} {args.tag}".rstrip(), flush=True)
    return 0


def summary(measured: dict[tuple[str, str], dict[int, float]]) -> list[str]:
    """--repeats' lines: each row's median tokens/s over its processes, with their range; and
    where the same model has a ZeRO-1 row, the row's share of it, by the medians and round by
    round (the rows of one round ran next to each other, so a drift of the host falls on both)."""
    lines = []
    for (name, tag), got in measured.items():
        runs = list(got.values())
        line = (f"{name:12s} {tag:6s} over {len(runs)} processes: median {statistics.median(runs):,.0f} tok/s "
                f"(min {min(runs):,.0f}, max {max(runs):,.0f})")
        base = measured.get((name, "zero1"))
        if base and tag.startswith("zero") and tag != "zero1":
            rounds = [got[r] / base[r] for r in got if r in base]
            line += f"; of ZeRO-1 {statistics.median(runs) / statistics.median(base.values()):.1%} by the medians"
            if rounds:
                line += ", round by round " + ", ".join(f"{x:.1%}" for x in rounds)
        lines.append(line)
    return lines


if __name__ == "__main__":
    sys.exit(main())
