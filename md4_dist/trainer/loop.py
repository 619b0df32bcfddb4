"""The per-worker train loop, run by Ray Train on every worker. DeepSpeed enters here, once.

Each step: `accumulation` micro-batches of `train.micro_batch` sequences per worker, so every
optimizer step sees `train.global_batch` sequences whatever the world size. A sequence's diffusion
time and masks are keyed by its stream position (trainer/noise.py), not by the rank that reads
it, so a run follows the same trajectory on 1 worker or on many, up to float rounding.

Everything a step depends on is either in the checkpoint (weights, optimizer, LR schedule, EMA,
reader position, the metric sums since the last record) or a function of the step and the seed
(the noise), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from md4_dist.config import Config, config_from_dict
from md4_dist.data import TokenStream, load_manifest, make_loader
from md4_dist.data.storage import join
from md4_dist.diffusion.checks import value_checks
from md4_dist.diffusion.objectives import masks_per_sequence
from md4_dist.trainer import checkpoint, perf
from md4_dist.trainer.ema import PartitionedEMA
from md4_dist.trainer.evaluate import Evaluator
from md4_dist.trainer.metrics import MetricsWriter, SampleLedger
from md4_dist.trainer.engine import build_engine
from md4_dist.trainer.inputs import model_inputs
from md4_dist.trainer.noise import TRAIN, NoiseByPosition
from md4_dist.trainer import samples
from md4_dist.trainer.stop import StopWatch


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _due(step: int, every: int, cfg: Config) -> bool:
    return every > 0 and (step % every == 0 or step == cfg.train.steps)


def micro_step(engine, batch: dict, noise: NoiseByPosition, device: torch.device,
               micro_batch: int) -> tuple[dict, int]:
    """Forward, backward and (at the accumulation boundary) the optimizer step for one
    micro-batch; returns the model's outputs and the rows the micro-batch held."""
    inputs, rows = model_inputs(batch, noise, device)
    out = engine(*inputs)
    # a short micro-batch (rows of a skipped corrupt shard) weighs what it holds
    engine.backward(out["loss"] * (rows / micro_batch))
    engine.step()
    return out, rows


def train_loop(loop_config: dict) -> None:
    import deepspeed  # after Ray has set DS_ACCELERATOR in this worker's environment
    import ray.train

    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cfg.cluster.use_gpu else "cpu")
    if cfg.cluster.use_gpu:
        torch.cuda.set_device(device)

    newest = checkpoint.registered()
    if rank == 0:
        for name in checkpoint.discard_after(cfg.train.run_dir, cfg.storage, checkpoint.step_of(newest)):
            print(f"removed {name}: an earlier attempt died writing it", flush=True)
    began = time.perf_counter()
    found = checkpoint.choose(newest, rank, world, device)  # before DeepSpeed: it may change its config
    checked_s = time.perf_counter() - began
    resized = found is not None and checkpoint.converts(found[1], world, cfg.deepspeed.zero_stage)
    engine, lr_schedule = build_engine(cfg, world, load_universal=resized)
    model = engine.module
    accumulation = engine.gradient_accumulation_steps()
    learnable = list(model.schedule.parameters())  # GenMD4's exponents, phi
    peak = perf.peak_tflops(cfg, torch.cuda.get_device_name(device) if cfg.cluster.use_gpu else None)
    flops_per_token = perf.flops_per_token(cfg.model, cfg.diffusion, cfg.data.seq_len)
    ema = PartitionedEMA(engine.module, cfg.train.ema) if cfg.train.ema else None
    # surrogate loss x rows, bits per token x rows, rows: every row counts once at any world size
    sums = torch.zeros(3, dtype=torch.float64, device=device)

    done, reader_state = 0, None  # steps done, and where the data stream stands after them
    if found is not None:
        saved, state = found
        began = time.perf_counter()
        ranks = checkpoint.load(engine, saved, state, rank, world)
        done, reader_state = state["step"], state["reader"]
        if state["world_size"] == world:  # this rank's own share
            sums.copy_(ranks[0]["sums"])
            if ema is not None:
                ema.load_state_dict(ranks[0]["ema"])
            torch.set_rng_state(ranks[0]["rng"])
        else:  # resized: the EMA re-split, the partial metric sums pooled on rank 0
            if rank == 0:
                sums.copy_(sum(r["sums"] for r in ranks))
            if ema is not None:
                ema.load_resharded([r["ema"] for r in ranks], rank, world)
        if rank == 0:
            print(f"resuming after step {done} from the latest checkpoint ({state['world_size']} "
                  f"workers then, {world} now): checked in {checked_s:.1f} s, loaded in "
                  f"{time.perf_counter() - began:.1f} s", flush=True)

    manifest = load_manifest(cfg.data.manifest, cfg.storage)
    manifest.check_compatible(cfg.model.vocab_size, cfg.data.seq_len)
    stream = TokenStream(manifest, "train", cfg.train.micro_batch, rank=rank, world_size=world,
                         seed=cfg.train.seed, state=reader_state, on_corrupt=cfg.data.on_corrupt,
                         storage=cfg.storage)
    batches = iter(make_loader(stream, cfg.data.loader_workers))
    noise = NoiseByPosition(cfg.train.seed, TRAIN, cfg.train.global_batch, cfg.data.seq_len,
                            masks_per_sequence(cfg.diffusion), cfg.diffusion.antithetic, device)
    evaluate = Evaluator(cfg, manifest, rank, world, device) if cfg.eval.every else None
    tokenizer = None
    if cfg.logging.sample_every and rank == 0 and manifest.tokenizer is not None:
        from md4_dist.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(manifest.tokenizer, storage=cfg.storage)

    attempt = torch.tensor([time.time_ns()], device=device)  # rank 0's clock names this attempt
    dist.broadcast(attempt, 0)
    attempt = int(attempt.item())
    writer = MetricsWriter(cfg.train.run_dir, cfg.storage, start_step=done + 1) if rank == 0 else None
    ledger = SampleLedger(cfg.train.run_dir, cfg.storage, rank, world, attempt) \
        if cfg.data.record_sample_ids else None
    watch = StopWatch(loop_config["stop"], rank, cfg.cluster.collective_timeout_s)

    def save(step: int, why: str) -> None:
        if ledger is not None:  # before the checkpoint: a resume from it never rewrites these steps
            ledger.upload()
        cost = checkpoint.save(
            engine, step,
            state={"samples_seen": step * cfg.train.global_batch, "reader": reader_state,
                   "world_size": world, "config": loop_config["config"],
                   # what evaluate, sample and export need of the data: its tokenizer
                   "tokenizer": manifest.tokenizer, "eos_id": manifest.eos_id},
            rank_state={"sums": sums.cpu(), "ema": ema.state_dict() if ema else None,
                        "rng": torch.get_rng_state()},
            metrics={"step": step}, rank=rank, attempt=attempt)
        if rank == 0:
            print(f"checkpoint after step {step}{f' ({why})' if why else ''}: "
                  f"{cost['bytes'] / 2**30:.3f} GiB, written in {cost['write_s']:.1f} s, "
                  f"committed in {cost['commit_s']:.1f} s", flush=True)

    start = last = time.perf_counter()
    step = done
    with value_checks(False):  # the reader's tokens are in range; no host syncs in the step
        for step in range(done + 1, cfg.train.steps + 1):
            ids = []
            for _ in range(accumulation):
                batch = next(batches)
                reader_state = batch["state"]
                if ledger is not None:
                    ids += batch["ids"].tolist()
                out, rows = micro_step(engine, batch, noise, device, cfg.train.micro_batch)
                sums += torch.stack([out["loss"].detach().double(), out["bits_per_token"].double(),
                                     torch.ones((), dtype=torch.float64, device=device)]) * rows
            if ema is not None:
                ema.update()
            if ledger is not None:
                ledger.write(step, ids)

            record = {"step": step}
            if _due(step, cfg.logging.every, cfg):
                dist.all_reduce(sums)  # every rank, at the same steps
                now = time.perf_counter()
                record.update({
                    "loss": (sums[0] / sums[2]).item(),
                    "nelbo_bits_per_token": (sums[1] / sums[2]).item(),
                    "lr": lr_schedule.get_last_lr()[0],
                    "tokens_per_s": sums[2].item() * cfg.data.seq_len / (now - last),
                    "samples_seen": step * cfg.train.global_batch,
                })
                if peak is not None:  # the model's FLOPs against every worker's peak
                    record["mfu"] = record["tokens_per_s"] * flops_per_token / (peak * 1e12 * world)
                if cfg.cluster.use_gpu:  # the largest of any worker, since the run (re)started
                    memory = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
                    dist.all_reduce(memory, dist.ReduceOp.MAX)
                    record["peak_memory_gib"] = memory.item()
                grad_norm = engine.get_global_grad_norm()  # None where DeepSpeed keeps none (stage 0, fp32)
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                sums.zero_()
                last = now
            histograms = {}
            if learnable and len(record) > 1:
                with deepspeed.zero.GatheredParameters(learnable):  # a no-op below ZeRO-3
                    w = model.schedule.exponents().detach().float().cpu()
                record.update(exponent_min=w.min().item(), exponent_mean=w.mean().item(),
                              exponent_max=w.max().item())
                histograms["exponents"] = w
            if evaluate is not None and _due(step, cfg.eval.every, cfg):
                began = time.perf_counter()
                with ema.swapped() if ema is not None else nullcontext():
                    record.update(evaluate(engine))
                last += time.perf_counter() - began  # tokens/s counts training time only
            texts = {}
            if _due(step, cfg.logging.sample_every, cfg):
                began = time.perf_counter()
                with ema.swapped() if ema is not None else nullcontext():
                    drawn = samples.draw(engine.module, cfg, step, device)
                texts["samples"] = samples.as_markdown(drawn, tokenizer, manifest.eos_id)
                last += time.perf_counter() - began
            if writer is not None and (len(record) > 1 or texts):
                writer.write(record, histograms, texts)
            if writer is not None and len(record) > 1:
                print(_progress(record, cfg, time.perf_counter() - start, done), flush=True)
            why, stop = watch.check()  # a SIGTERM or a preemption notice: save now
            if why or step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                save(step, why)
            if stop:
                if rank == 0:
                    print(f"stopped after step {step} of {cfg.train.steps}; the same command "
                          "resumes the run", flush=True)
                break
    if writer is not None:
        writer.close()
        if step == cfg.train.steps:
            print(f"done: {cfg.train.steps} steps; metrics {join(cfg.train.run_dir, 'metrics.jsonl')}, "
                  f"TensorBoard logs {join(cfg.train.run_dir, 'tensorboard')}", flush=True)


def _progress(record: dict, cfg: Config, elapsed: float, done: int) -> str:
    step = record["step"]
    line = f"step {step}/{cfg.train.steps}"
    if "loss" in record:
        line += (f"  loss {record['loss']:.4f}  bits/token {record['nelbo_bits_per_token']:.4f}  "
                 f"tokens/s {record['tokens_per_s']:,.0f}")
    if "val_nelbo_bits_per_token" in record:
        line += f"  val bits/token {record['val_nelbo_bits_per_token']:.4f} ± {record['val_nelbo_se']:.4f}"
    return line + f"  eta {_eta(elapsed / (step - done) * (cfg.train.steps - step))}"
