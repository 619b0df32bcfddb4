"""Several GPUs through the real command: weak scaling and elastic resizing (a benchmark, not a test).

    python benchmarks/multi_gpu.py scaling [--models genmd4-s genmd4-1.3b] [--workers 1 2 4 8]
        [--steps 60] [--log-every 10] [--skip 2] [--compile reduce-overhead] [--set KEY=VALUE ...]
    python benchmarks/multi_gpu.py elastic [--model genmd4-s] [--workers 4] [--repeats 1]
    ... --device cpu    the same on CPU workers over gloo, at the tiny config's shape

Both run `python -m md4_dist.train` as a user would: Ray Train starts one worker per GPU, each a
DeepSpeed ZeRO-3 rank (bf16, FusedAdam) over NCCL, on uniform random tokens at the model's shape
(the token values do not change the work), written once as shards in the writer's layout.

scaling: the embedded Ray instance, N workers. Weak scaling: every worker keeps the preset's
micro-batch (GenMD4-S 16, the ~1.3B preset 4), one micro-batch per step, so the global batch is
N x micro_batch. The figures are the run's own metrics.jsonl records, one every --log-every steps:
tokens/s = clean tokens of all workers / wall time between records (data loading included), the
first --skip records dropped (compilation, warm-up). Per GPU = tokens/s / N; MFU by the FLOP count
of benchmarks/throughput.py; efficiency = median per-GPU tokens/s at N / at 1 (when 1 ran).

elastic: a `ray.cluster_utils.Cluster` of N one-GPU nodes on this host (each node's processes see
only its GPU), `cluster.num_workers: [N-1, N]`, sample ids recorded. After the first committed
checkpoint one node's training worker is SIGKILLed and the node removed; the run continues on
N - 1 workers (a universal checkpoint), and once that group has committed a checkpoint the node
comes back and the run grows to N again. Then the driver gets SIGTERM (it checkpoints and exits
143). Time lost per resize: from the last step the old group logged until the new group logs that
step again (restart, conversion, load, the steps replayed since the checkpoint). The ledger is
checked: every step up to the last trained exactly the stream's own sequences, once.

Writes one JSON per run to --results (benchmarks/results/) and prints a table. Keep
NCCL_NVLS_ENABLE=0 (and TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1) set where a
host needs NVLink multicast off: the trainer forwards them to every worker.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from checkpoint_io import Events, environment, local_cluster, spread  # noqa: E402

MODELS = {  # base config, per-worker micro-batch
    "genmd4-s": ("owt_small.json", 16),
    "genmd4-1.3b": ("owt_large.json", 4),
    "tiny": ("tiny.json", 16),
}


def write_corpus(out: str, vocab_size: int, seq_len: int, sequences: int) -> str:
    """Uniform random tokens as a train split in the shard writer's layout; returns its URL."""
    from md4_dist.data.shard_writer import SplitWriter
    from md4_dist.data.manifest import Manifest, save, token_dtype

    dtype = token_dtype(vocab_size)
    rng = np.random.default_rng(0)
    with SplitWriter(out, "train", seq_len, dtype, per_shard=max(1, sequences // 16)) as w:
        for row in rng.integers(0, vocab_size, (sequences, seq_len)):
            w.write(row)
    save(Manifest(vocab_size=vocab_size, seq_len=seq_len, dtype=dtype, splits={"train": w.split},
                  created_by={"tool": "benchmarks/multi_gpu.py", "tokens": "uniform"}), out)
    return out


def common_sets(model: str, args) -> list[str]:
    """The overrides of every run of `model`; --set last, so that it wins."""
    on_gpu = args.device == "cuda"
    return [f"train.micro_batch={MODELS[model][1]}", "deepspeed.zero_stage=3",
            f"cluster.use_gpu={'true' if on_gpu else 'false'}",
            f"deepspeed.precision={'bf16' if on_gpu else 'fp32'}",
            f"train.compile={args.compile if on_gpu else 'off'}",
            "eval.every=0", "logging.sample_every=0", *args.set]


def run_config(model: str, args):
    """The config the runs of `model` get, short of the data, run directory and cluster size."""
    from md4_dist.config import load_config

    return load_config(os.path.join(ROOT, "configs", MODELS[model][0]), common_sets(model, args))


def train_command(model: str, args, data: str, run_dir: str, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "md4_dist.train", os.path.join(ROOT, "configs", MODELS[model][0])]
    for s in (f"data.manifest={data}", f"train.run_dir={run_dir}", *sets, *common_sets(model, args)):
        cmd += ["--set", s]
    return cmd


def failed(what: str, log_path: str) -> SystemExit:
    return SystemExit(f"{what}: see {log_path}")


def device_name(args) -> str:
    if args.device == "cpu":
        return f"CPU, {os.cpu_count()} cores"  # one worker per core: tiny.json's cpus_per_worker
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/multi_gpu.py needs CUDA devices and none is visible here: run it on a "
                 "machine with NVIDIA GPUs, or pass --device cpu to check the script itself")
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def worker_counts(args) -> list[int]:
    """--workers, or the default, within this machine's GPUs (CPU workers: its cores)."""
    import torch

    count = os.cpu_count() if args.device == "cpu" else torch.cuda.device_count()
    if args.workers is None:
        if args.what == "elastic":
            return [4 if args.device == "cuda" else 2]
        return [w for w in (1, 2, 4, 8) if w <= max(count, 1)]
    if args.what == "elastic":
        if args.workers[0] < 2:
            sys.exit("elastic needs --workers N with N >= 2")
        if args.device == "cuda" and args.workers[0] > count:
            sys.exit(f"--workers {args.workers[0]} needs {args.workers[0]} GPUs; this machine has {count}")
        return args.workers[:1]
    if args.device == "cuda" and max(args.workers) > count:
        print(f"this machine has {count} GPUs: skipping --workers "
              f"{' '.join(str(w) for w in args.workers if w > count)}", flush=True)
    return [w for w in args.workers if args.device == "cpu" or w <= count]


def write_result(args, name: str, result: dict) -> None:
    os.makedirs(args.results, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    with open(os.path.join(args.results, f"{name}-{stamp}.json"), "w") as f:
        json.dump(result, f, indent=1)


def scaling(args, work: str, device: str, command: str) -> bool:
    """One run per model and worker count; False if any failed."""
    from md4_dist.trainer.perf import flops_per_token

    peak, ok = args.peak_tflops * 1e12, True
    for model in args.models:
        cfg = run_config(model, args)
        L, mb = cfg.data.seq_len, cfg.train.micro_batch
        # 16 steps of the largest run per epoch (the stream repeats it, in a new order each time)
        data = write_corpus(os.path.join(work, f"data-{model}"), cfg.model.vocab_size, L,
                            sequences=16 * mb * max(args.workers))
        per_worker_at_1 = None
        for n in sorted(args.workers):
            run_dir = os.path.join(work, f"run-{model}-{n}")
            cmd = train_command(model, args, data, run_dir, f"cluster.num_workers={n}",
                                f"train.global_batch={n * mb}", f"train.steps={args.steps}",
                                f"checkpoint.every={args.steps}", "checkpoint.keep=1",
                                f"logging.every={args.log_every}")
            began = time.perf_counter()
            log_path = f"{run_dir}.log"
            with open(log_path, "w") as log:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=environment(),
                                      cwd=ROOT).returncode
            if code != 0:
                print(f"{model:12s} {n} workers  failed (exit {code}): see {log_path}", flush=True)
                ok = False
                continue
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                rates = [json.loads(line)["tokens_per_s"] for line in f][args.skip:]
            shutil.rmtree(run_dir)  # its final checkpoint: tens of GB for the larger models
            if not rates:
                print(f"{model:12s} {n} workers  no records left after --skip {args.skip}: raise "
                      "--steps", flush=True)
                ok = False
                continue
            per_worker = spread([x / n for x in rates])
            if n == 1:
                per_worker_at_1 = per_worker["median"]
            result = {
                "model": model, "path": "trainer (python -m md4_dist.train, Ray Train)",
                "zero_stage": 3, "device": device, "workers": n, "micro_batch": mb,
                "global_batch": n * mb, "seq_len": L, "compile": args.compile if args.device == "cuda" else "off",
                "overrides": args.set, "tokens_per_s": statistics.median(rates),
                "tokens_per_s_per_worker": per_worker, "records": len(rates), "steps_per_record": args.log_every,
                "mfu": per_worker["median"] * flops_per_token(cfg.model, cfg.diffusion, L) / peak
                if args.device == "cuda" else None,
                "scaling_efficiency": per_worker["median"] / per_worker_at_1 if per_worker_at_1 else None,
                "wall_s": time.perf_counter() - began,
                "date": datetime.date.today().isoformat(), "command": command,
            }
            write_result(args, f"scaling-{model}-{n}w", result)
            eff = f"{result['scaling_efficiency']:.1%}" if per_worker_at_1 else "n/a"
            mfu = f"  MFU {result['mfu']:.1%}" if result["mfu"] is not None else ""
            print(f"{model:12s} {n} workers  {result['tokens_per_s']:>11,.0f} tok/s  per worker "
                  f"{per_worker['median']:,.0f} (min {per_worker['min']:,.0f}, max {per_worker['max']:,.0f}, "
                  f"n={per_worker['n']}){mfu}  efficiency {eff}  ({result['wall_s']:.0f} s wall)", flush=True)
    return ok


def elastic(args, work: str, device: str, command: str) -> bool:
    import psutil

    from md4_dist.data import load_manifest
    from md4_dist.trainer.ledger import ledger_problems, read_ledger

    n, model, every = args.workers[0], args.model, args.checkpoint_every
    cfg = run_config(model, args)
    mb = cfg.train.micro_batch
    global_batch = math.lcm(n - 1, n) * mb  # whole micro-batches at N - 1 and at N workers
    data = write_corpus(os.path.join(work, f"data-{model}"), cfg.model.vocab_size, cfg.data.seq_len,
                        sequences=4 * global_batch)
    cpus = cfg.cluster.cpus_per_worker if args.device == "cuda" else 1
    # The controller runs in the cluster, whose processes read this environment: after the node
    # loss Ray first tries N workers again (the dead node's resources linger); this bounds the try.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(args.start_timeout)

    def add_node(cluster, gpu: int):
        if args.device == "cpu":
            return cluster.add_node(num_cpus=cpus)
        # The node's raylet, and so its workers, see this GPU alone (the gpu-th of those visible).
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = saved.split(",")[gpu] if saved else str(gpu)
        try:
            return cluster.add_node(num_cpus=cpus, num_gpus=1)
        finally:
            if saved is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved

    def committed(run_dir: str, step: int) -> bool:
        snapshot = os.path.join(run_dir, "checkpoints", "checkpoint_manager_snapshot.json")
        return os.path.exists(snapshot) and f"checkpoint-{step:08d}" in open(snapshot).read()

    for i in range(args.repeats):
        cluster = local_cluster(num_gpus=0)
        try:
            nodes = [add_node(cluster, g) for g in range(n)]
            cluster.wait_for_nodes()
            run_dir, log_path = os.path.join(work, f"elastic-{i}"), os.path.join(work, f"elastic-{i}.log")
            cmd = train_command(model, args, data, run_dir, f"cluster.num_workers=[{n - 1}, {n}]",
                                f"train.global_batch={global_batch}", "train.steps=1000000",
                                f"checkpoint.every={every}", "logging.every=1",
                                "cluster.resize_check_s=5", "data.record_sample_ids=true")
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        env=environment() | {"RAY_ADDRESS": cluster.address}, cwd=ROOT)
                try:
                    events = Events(log_path, proc)
                    events.until(lambda: committed(run_dir, every) and events.max_step() >= every + every // 2)
                    raylet = psutil.Process(nodes[-1].all_processes["raylet"][0].process.pid)
                    # "ray::RayTrainWorker", or with ".<method>" during a call; not its DataLoader workers
                    workers = [p for p in raylet.children(recursive=True)
                               if p.name().startswith("ray::RayTrainWorker")]
                    if len(workers) != 1:
                        raise failed(f"expected one training worker on the node, found {len(workers)}", log_path)
                    workers[0].send_signal(signal.SIGKILL)
                    cluster.remove_node(nodes.pop(), allow_graceful=False)
                    events.until(lambda: events.regained(n - 1))
                    # Grow only once the smaller group has committed a checkpoint of its own.
                    shrunk = resumed_step(log_path, f"({n} workers then, {n - 1} now)")
                    events.until(lambda: committed(run_dir, (shrunk // every + 1) * every))
                    nodes.append(add_node(cluster, n - 1))
                    events.until(lambda: events.regained(n))
                finally:
                    proc.send_signal(signal.SIGTERM)  # it saves a checkpoint and exits 143
                    try:
                        code = proc.wait(timeout=900)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        code = proc.wait()
            out = open(log_path).read()
            if code != 128 + signal.SIGTERM or "stopped after step " not in out:
                raise failed(f"the run exited {code}, not 143 with a checkpoint after SIGTERM", log_path)
            stopped = int(out.split("stopped after step ")[1].split()[0])
            lines = read_ledger(run_dir)
            problems = ledger_problems(lines, load_manifest(data), global_batch, cfg.train.seed, stopped)
            lost = events.lost_per_restart()
            conversions = [float(x.split(" s")[0]) for x in out.split("converted to a universal checkpoint in ")[1:]]
            result = {
                "model": model, "path": "trainer (python -m md4_dist.train, Ray Train, elastic)",
                "zero_stage": 3, "device": device, "workers": [n - 1, n], "micro_batch": mb,
                "global_batch": global_batch, "checkpoint_every": every,
                "lost_s": {"shrink": lost[0], "grow": lost[1]} if len(lost) == 2 else lost,
                "universal_conversion_s": conversions, "steps": stopped,
                "world_sizes_in_ledger": sorted({e["world_size"] for e in lines}),
                "ledger_exactly_once": not problems, "ledger_problems": problems[:5],
                "date": datetime.date.today().isoformat(), "command": command,
            }
            write_result(args, f"elastic-{model}-{n}w", result)
            print(f"{model}: {n} -> {n - 1} -> {n} workers; lost per resize (s): {lost}; universal "
                  f"conversions (s, each rank its own): {conversions}; {stopped} steps, ledger exactly once: "
                  f"{not problems}{'' if not problems else ' ' + '; '.join(problems[:3])}", flush=True)
            if len(lost) != 2 or problems:
                raise failed(f"expected a shrink and a grow with the ledger exactly once, got "
                             f"{len(lost)} restarts and {len(problems)} ledger problems", log_path)
        finally:
            cluster.shutdown()
    return True


def resumed_step(log_path: str, marker: str) -> int:
    """The step that the group which logged `marker` ("(4 workers then, 3 now)") resumed after."""
    text = open(log_path).read()
    before = text.split(marker)[0]
    if marker not in text or "resuming after step " not in before:
        raise failed(f"no resume {marker} in the log", log_path)
    return int(before.rsplit("resuming after step ", 1)[1].split()[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["scaling", "elastic"])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--models", nargs="+", default=["genmd4-s", "genmd4-1.3b"], choices=MODELS,
                    help="scaling: the models")
    ap.add_argument("--model", default="genmd4-s", choices=MODELS, help="elastic: the model")
    ap.add_argument("--workers", nargs="+", type=int, help="scaling: worker counts (default 1 2 4 8, "
                    "up to this machine's GPUs); elastic: N (default 4)")
    ap.add_argument("--steps", type=int, default=60, help="scaling: steps per run")
    ap.add_argument("--log-every", type=int, default=10, help="scaling: steps per record")
    ap.add_argument("--skip", type=int, default=2, help="scaling: first records dropped")
    ap.add_argument("--checkpoint-every", type=int, default=20, help="elastic: steps between checkpoints")
    ap.add_argument("--repeats", type=int, default=1, help="elastic: runs")
    ap.add_argument("--start-timeout", type=int, default=20,
                    help="elastic: RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (20: the launcher's clusters)")
    ap.add_argument("--compile", default="reduce-overhead", choices=["off", "default", "reduce-overhead"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run, as train's --set")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="the MFU's peak (bf16 dense, H100/H200)")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    if args.device == "cpu" and args.what == "scaling" and args.models == ap.get_default("models"):
        args.models = ["tiny"]
    if args.device == "cpu" and args.what == "elastic" and args.model == ap.get_default("model"):
        args.model = "tiny"
    from md4_dist.config import ConfigError

    for model in (args.models if args.what == "scaling" else [args.model]):
        try:
            run_config(model, args)
        except ConfigError as e:
            sys.exit(f"error: {e}")
    device = device_name(args)
    args.workers = worker_counts(args)
    command = " ".join(["python", "benchmarks/multi_gpu.py", *(sys.argv[1:] if argv is None else argv)])
    # Data, logs and run directories: removed after a clean finish, kept to read after a failure.
    work = tempfile.mkdtemp(prefix="md4-multi-gpu-")
    ok = False
    try:
        ok = (scaling if args.what == "scaling" else elastic)(args, work, device, command)
    finally:
        if ok:
            shutil.rmtree(work)
        else:
            print(f"kept {work} (logs, run directories) to read", file=sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
