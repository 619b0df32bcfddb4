"""Correctness of the GPU training step (a check run on the GPU machine, not a CPU test).

    python benchmarks/gpu_check.py [--models md4-s genmd4-s configs/owt_small.json] [--zero 0 3] [--batch 4]
        [--compile off|default|reduce-overhead] [--set KEY=VALUE ... --tag NAME]

For the same weights, tokens and noise (so the same masks):
1. bf16 against fp32: the loss of the trainer's step (a DeepSpeed engine from our config: bf16
   weights and compute, each ZeRO stage given, --compile as train.compile) against the float32
   loss on the CPU.
   Pass: relative difference <= 1e-2.
2. masked rows against full logits, on the GPU in float32 (TF32 off): the loss and every gradient
   of `Denoiser.masked_stats` (the output layer at the masked rows only, chunked) against the
   plain path through logits [B, L, V] (`tests/full_logits.py`, the tests' own). Pass: loss
   within 1e-5 relative, each gradient within 1e-3 of its largest entry. Twice: the output
   layer's backward recomputing the logits (the default) and reading the forward's
   (train.head_keeps_logits).
3. compiled against eager training (with --compile other than off): 10 optimizer steps of the
   trainer's step (lr 1e-3, so the weights move) from the same weights, batches and noise, at each
   ZeRO stage given, compiled and not. Pass: every step's loss within 1e-2 relative. The eager
   losses move by far more over the 10 steps (reported), so a compiled step that replayed stale
   weights would not follow them.
The zero-initialised weights (adaLN, the output layer) get small random values first, or the
logits would all be 0 and the comparison empty; then every weight is rounded to bf16, so that
both sides hold the same weights and (GenMD4's masks depend on its exponents) the same masks,
and the comparison measures bf16 compute alone. `--set` applies config overrides (e.g.
train.compile_unit=trunk) to every trainer step checked. Writes
benchmarks/results/check-<model>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import (SEQ_LEN, SHAPES, batches, config, label, model_arg, require_gpu,  # noqa: E402
                        set_up_distributed, trainer_engine)

from md4_dist.diffusion.checks import value_checks  # noqa: E402
from md4_dist.diffusion.objectives import masks_per_sequence, objective  # noqa: E402
from md4_dist.diffusion_model import DiffusionModel  # noqa: E402
from md4_dist.output_head import HeadKernels  # noqa: E402
from md4_dist.trainer.noise import TRAIN, NoiseByPosition  # noqa: E402
from tests.full_logits import FullLogits  # noqa: E402


def weights(cfg) -> DiffusionModel:
    """Float32 weights that bf16 holds exactly: the same weights on both sides."""
    torch.manual_seed(0)
    model = DiffusionModel(cfg.model, cfg.diffusion)
    with torch.no_grad():
        for p in model.parameters():
            zero = p == 0  # the zero-initialised weights (adaLN, the output layer)
            p[zero] = 0.05 * torch.randn(int(zero.sum()))
            p.copy_(p.to(torch.bfloat16))
    return model


def bf16_against_fp32(cfg, model, x, noise, want: float) -> dict:
    engine = trainer_engine(cfg, model.state_dict())  # compiled as --compile says
    dev = engine.device
    got = engine(x.to(dev), noise.t.to(dev), noise.u.to(dev))["loss"].item()
    rel = abs(got - want) / abs(want)
    # loss_bf16_gpu: the GPU's loss in the config's precision (bf16 unless a config file says fp32)
    return {"zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision, "loss_fp32_cpu": want,
            "loss_bf16_gpu": got, "relative": rel, "pass": rel <= 1e-2}


def train_losses(cfg, model, steps: int) -> list[float]:
    from md4_dist.trainer.loop import micro_step

    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-3, warmup_steps=1))
    engine = trainer_engine(cfg, model.state_dict())
    noise = NoiseByPosition(0, TRAIN, cfg.train.global_batch, SEQ_LEN, masks_per_sequence(cfg.diffusion),
                            True, engine.device)
    data = batches(cfg, engine.device)
    with value_checks(False):
        return [micro_step(engine, next(data), noise, engine.device, cfg.train.micro_batch)[0]["loss"].item()
                for _ in range(steps)]


def compiled_against_eager(name, zero, batch, mode, model, sets=()) -> dict:
    eager = train_losses(config(name, zero, batch, "off", sets), model, 10)
    compiled = train_losses(config(name, zero, batch, mode, sets), model, 10)
    worst = max(abs(c - e) / abs(e) for c, e in zip(compiled, eager))
    moved = max(abs(e - eager[0]) / abs(eager[0]) for e in eager)
    return {"zero_stage": zero, "eager": eager, "compiled": compiled, "worst_relative": worst,
            "eager_moved_relative": moved, "pass": worst <= 1e-2}


def masked_against_full(cfg, model, x, noise, keep_logits: bool = False) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 proper
    m = copy.deepcopy(model).cuda()
    m.denoiser.out.kernels = HeadKernels(keep_logits=keep_logits)  # as train.head_keeps_logits
    params = list(m.parameters())
    noise = type(noise)(noise.t.cuda(), noise.u.cuda())
    fused = objective(cfg.diffusion, m.denoiser, m.schedule, x.cuda(), noise=noise)
    plain = objective(cfg.diffusion, FullLogits(m.denoiser), m.schedule, x.cuda(), noise=noise)
    loss_rel = ((fused.loss - plain.loss).abs() / plain.loss.abs()).item()
    worst = 0.0
    for a, b in zip(torch.autograd.grad(fused.loss, params, allow_unused=True),
                    torch.autograd.grad(plain.loss, params, allow_unused=True)):
        if a is None and b is None:
            continue
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return {"head_keeps_logits": keep_logits, "loss_masked": fused.loss.item(), "loss_full": plain.loss.item(),
            "loss_relative": loss_rel, "grad_worst_relative": worst,
            "pass": loss_rel <= 1e-5 and worst <= 1e-3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["md4-s", "genmd4-s"], type=model_arg,
                    help=f"shapes ({', '.join(SHAPES)}) or config files (.json), as throughput.py's")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--zero", nargs="+", type=int, default=None,
                    help="ZeRO stages (default: 0 3 for a shape, a config file's own)")
    ap.add_argument("--compile", default=None, choices=["off", "default", "reduce-overhead"],
                    help="default: off for a shape, a config file's own")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every trainer step checked (repeatable)")
    ap.add_argument("--tag", default="", help="a label for the overrides, in the JSON's file name")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    if not require_gpu("benchmarks/gpu_check.py checks the GPU training step"):
        return 2
    set_up_distributed()
    os.makedirs(args.out, exist_ok=True)
    ok = True
    for name in args.models:
        cfg = config(name, 0 if name in SHAPES else None, args.batch, args.compile, args.set)
        mode, zeros = cfg.train.compile, args.zero or ([0, 3] if name in SHAPES else [cfg.deepspeed.zero_stage])
        model = weights(cfg)
        x = torch.randint(0, cfg.model.vocab_size, (args.batch, SEQ_LEN), generator=torch.Generator().manual_seed(1))
        noise = NoiseByPosition(0, TRAIN, args.batch, SEQ_LEN, masks_per_sequence(cfg.diffusion), True,
                                torch.device("cpu"))(torch.arange(args.batch))
        result = {"model": label(name), "config": None if name in SHAPES else name, "batch": args.batch,
                  "seq_len": SEQ_LEN, "compile": mode, "set": args.set,
                  "device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
                  "command": " ".join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
                  "masked_vs_full": [masked_against_full(cfg, model, x, noise, keep)
                                     for keep in (False, True)]}
        with torch.no_grad():
            want = model(x, noise.t, noise.u)["loss"].item()  # float32, CPU
        result["bf16_vs_fp32"] = [
            bf16_against_fp32(config(name, z, args.batch, mode, args.set), model, x, noise, want)
            for z in zeros]
        for m in result["masked_vs_full"]:
            backward = "kept logits" if m["head_keeps_logits"] else "recomputed logits"
            print(f"{label(name)}: masked rows ({backward}) vs full logits (fp32 GPU): loss "
                  f"{m['loss_relative']:.1e}, worst gradient {m['grad_worst_relative']:.1e} "
                  f"{'pass' if m['pass'] else 'FAIL'}", flush=True)
            ok &= m["pass"]
        for b in result["bf16_vs_fp32"]:
            print(f"{label(name)}: ZeRO-{b['zero_stage']} {b['precision']} GPU loss {b['loss_bf16_gpu']:.5f} "
                  f"vs fp32 CPU {b['loss_fp32_cpu']:.5f}: relative {b['relative']:.2e} "
                  f"{'pass' if b['pass'] else 'FAIL'}", flush=True)
            ok &= b["pass"]
        if mode != "off":
            result["compiled_vs_eager"] = [
                compiled_against_eager(name, z, args.batch, mode, model, args.set) for z in zeros]
            for c in result["compiled_vs_eager"]:
                print(f"{label(name)}: ZeRO-{c['zero_stage']} 10 training steps, compile {mode} vs off: "
                      f"worst relative difference {c['worst_relative']:.1e} (the eager loss moved by up "
                      f"to {c['eager_moved_relative']:.1%}) {'pass' if c['pass'] else 'FAIL'}", flush=True)
                ok &= c["pass"]
        with open(os.path.join(args.out, f"check-{label(name)}{'-' + args.tag if args.tag else ''}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
