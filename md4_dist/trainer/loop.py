"""The per-worker train loop, run by Ray Train on every worker. DeepSpeed enters here, once.

Each step: `accumulation` micro-batches of `train.micro_batch` sequences per worker, so every
optimizer step sees `train.global_batch` sequences whatever the world size. Time and masks come
from a generator seeded by (seed, rank): each rank draws its own.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from md4_dist.config import config_from_dict
from md4_dist.data import TokenStream, load_manifest, make_loader
from md4_dist.diffusion.checks import value_checks
from md4_dist.trainer.ds_config import deepspeed_config
from md4_dist.trainer.metrics import MetricsWriter
from md4_dist.trainer.module import DiffusionModel


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def train_loop(loop_config: dict) -> None:
    import deepspeed  # after Ray has set DS_ACCELERATOR in this worker's environment
    import ray.train

    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cfg.cluster.use_gpu else "cpu")
    if cfg.cluster.use_gpu:
        torch.cuda.set_device(device)

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = DiffusionModel(cfg.model, cfg.diffusion)
    engine, _, _, lr_schedule = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg, world))
    accumulation = engine.gradient_accumulation_steps()
    learnable = list(model.schedule.parameters())  # GenMD4's exponents, phi
    if cfg.deepspeed.zero_stage == 3 and learnable:
        # The loss reads phi outside the schedule's own forward: ZeRO-3 must gather it for the
        # whole forward and backward of the top-level module.
        for p in learnable:
            deepspeed.zero.register_external_parameter(engine.module, p)

    manifest = load_manifest(cfg.data.manifest, cfg.storage)
    manifest.check_compatible(cfg.model.vocab_size, cfg.data.seq_len)
    stream = TokenStream(manifest, "train", cfg.train.micro_batch, rank=rank, world_size=world,
                         seed=cfg.train.seed, on_corrupt=cfg.data.on_corrupt, storage=cfg.storage)
    batches = iter(make_loader(stream, cfg.data.loader_workers))
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + rank)

    writer = MetricsWriter(cfg.train.run_dir) if rank == 0 else None
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # surrogate loss, bits per token
    start = last = time.perf_counter()
    last_step = 0
    with value_checks(False):  # the reader's tokens are in range; no host syncs in the step
        for step in range(1, cfg.train.steps + 1):
            for _ in range(accumulation):
                batch = next(batches)
                out = engine(batch["tokens"].to(device, non_blocking=True), generator)
                engine.backward(out["loss"])
                engine.step()
                sums += torch.stack([out["loss"].detach().double(), out["bits_per_token"].double()])
            if step % cfg.logging.every and step != cfg.train.steps:
                continue
            dist.all_reduce(sums)  # every rank, at the same steps
            n = (step - last_step) * accumulation * world
            now = time.perf_counter()
            record = {
                "step": step,
                "loss": sums[0].item() / n,
                "nelbo_bits_per_token": sums[1].item() / n,
                "lr": lr_schedule.get_last_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "tokens_per_s": (step - last_step) * tokens_per_step / (now - last),
                "samples_seen": step * cfg.train.global_batch,
            }
            histograms = {}
            if learnable:
                with deepspeed.zero.GatheredParameters(learnable):  # a no-op below ZeRO-3
                    w = model.schedule.exponents().detach().float().cpu()
                record.update(exponent_min=w.min().item(), exponent_mean=w.mean().item(),
                              exponent_max=w.max().item())
                histograms["exponents"] = w
            if writer is not None:
                writer.write(record, histograms)
                eta = (now - start) / step * (cfg.train.steps - step)
                print(f"step {step}/{cfg.train.steps}  loss {record['loss']:.4f}  "
                      f"bits/token {record['nelbo_bits_per_token']:.4f}  "
                      f"tokens/s {record['tokens_per_s']:,.0f}  eta {_eta(eta)}", flush=True)
            sums.zero_()
            last, last_step = now, step
    if writer is not None:
        writer.close()
        print(f"done: {cfg.train.steps} steps; metrics {os.path.join(cfg.train.run_dir, 'metrics.jsonl')}, "
              f"TensorBoard logs {os.path.join(cfg.train.run_dir, 'tensorboard')}", flush=True)
