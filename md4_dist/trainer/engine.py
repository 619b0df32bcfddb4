"""Where DeepSpeed enters: the module built, compiled and wrapped in a DeepSpeed engine.

    engine, lr_schedule = build_engine(cfg, world_size)            # in every worker
    engine, lr_schedule = build_engine(cfg, 1, load_universal=True)  # resuming at another size

Everything DeepSpeed needs to know about the model is decided here: ZeRO-3's leaf modules and
external parameters, and how the step is compiled (`train.compile` per block or for the whole
trunk, `train.compile_unit`; or DeepSpeed's DeepCompile of the whole module with
`deepspeed.deepcompile`). Beyond the engine, DeepSpeed is read in two places: its partitions by
the EMA (trainer/ema.py), its checkpoint files by trainer/checkpoint.py and the checkpoint format
(md4_dist/checkpoint_format.py).
"""

from __future__ import annotations

import os

import torch

from md4_dist.config import Config
from md4_dist.diffusion_model import DiffusionModel
from md4_dist.model import Block, Blocks
from md4_dist.output_head import HeadKernels
from md4_dist.trainer.ds_config import deepspeed_config


def build_model(cfg: Config) -> DiffusionModel:
    """The module DeepSpeed wraps, with the same initial weights on every rank."""
    import deepspeed.utils.nvtx
    from deepspeed.utils import set_z3_leaf_modules

    # DeepSpeed wraps ZeRO's per-module and per-parameter functions in NVTX ranges that it pushes
    # and pops on every call (469 a ZeRO-3 step with the trunk, benchmarks/host_calls.py), and
    # only Nsight Systems reads them. A module-wide switch: DeepSpeed flips it itself for compile.
    deepspeed.utils.nvtx.enable_nvtx = cfg.deepspeed.nvtx_ranges

    torch.manual_seed(cfg.train.seed)
    model = DiffusionModel(cfg.model, cfg.diffusion)
    # The output layer's reductions, fused by torch.compile with train.compile (DeepCompile takes
    # them with the whole module), and its backward reading the forward's logits with
    # train.head_keeps_logits
    model.denoiser.out.kernels = HeadKernels(
        compiled=cfg.train.compile != "off" and not cfg.deepspeed.deepcompile,
        keep_logits=cfg.train.head_keeps_logits)
    if cfg.deepspeed.deepcompile:
        # DeepCompile takes the whole module as one graph: no per-block hooks, and an output
        # layer whose shapes do not depend on the data (the masked-row count read on the host,
        # a CUDA event inside the graph, stalled DeepCompile's profiler on the H200)
        model.denoiser.static_rows = True
        return model
    trunk = cfg.train.compile_unit == "trunk"
    if cfg.deepspeed.zero_stage == 3:
        # ZeRO-3 gathers a unit's parameters together, in one pair of hooks per unit (a block, or
        # the whole trunk) rather than one per linear layer (whose host cost made ZeRO-3 far
        # slower than ZeRO-0 on a GPU), and the unit's forward, free of hooks, compiles into one
        # graph.
        set_z3_leaf_modules(model, [Blocks if trunk else Block])
    if cfg.train.compile == "off" and not cfg.train.attention_kernels:
        return model
    for unit in [model.denoiser.blocks] if trunk else model.denoiser.blocks:
        forward = unit.forward
        if cfg.train.compile != "off":
            # the forward only: ZeRO-3's hooks around it stay eager
            forward = _when_training(torch.compile(forward, mode=cfg.train.compile), forward)
        if cfg.train.attention_kernels:
            forward = _attention_kernels(forward, cfg.train.attention_kernels)
        unit.forward = forward
    return model


def _attention_kernels(forward, names):
    """`forward` with scaled_dot_product_attention limited to these kernels, in this order of
    preference (train.attention_kernels). Entered around the compiled callable, so that the
    kernel is chosen when the graph is traced as well as in eager calls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = [{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[n] for n in names]

    def run(*args):
        with sdpa_kernel(kernels, set_priority=True):
            return forward(*args)
    return run


def _when_training(compiled, eager):
    """The compiled forward where gradients are taken, the eager one elsewhere (validation and
    samples, a small share of a run). Under no_grad, reduce-overhead's CUDA graphs let one block's
    replay overwrite the output the next block is reading (seen on the H200: "accessing tensor
    output of CUDAGraphs that has been overwritten by a subsequent run" at the first validation)."""
    return lambda *args: compiled(*args) if torch.is_grad_enabled() else eager(*args)


def build_engine(cfg: Config, world_size: int, load_universal: bool = False,
                 state_dict: dict | None = None, local_size: int = 1):
    """(engine, lr_schedule): `build_model` (with these weights when given) in a DeepSpeed engine
    from our config. `load_universal`: the checkpoint to load was written at another world size.
    `local_size`: how many ranks share this node."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    if load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True  # beside deepspeed.extra's
    model = build_model(cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    engine, _, _, lr_schedule = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config)
    # What DeepSpeed's own launcher tells each process. Without it DeepSpeed's CPU accelerator
    # counts its devices by running `numactl` in a subprocess, at every ZeRO-3 step, and that
    # subprocess's warning filters re-arm torch's deprecation warnings, printed again at every
    # step (the CUDA accelerator asks torch). Set only now, after DeepSpeed's communication has
    # started: there its CPU shared-memory all-reduce (for inference, unused here) reads it and,
    # where every rank is local, maps a 69 MB /dev/shm buffer per rank that it never unlinks:
    # about 5 GB left in /dev/shm by one run of the test suite, and workers killed where
    # /dev/shm holds 64 MB, as in many containers.
    os.environ["LOCAL_SIZE"] = str(local_size)
    if cfg.deepspeed.zero_stage == 3:
        # The loss reads GenMD4's exponents (phi) outside the schedule's own forward: ZeRO-3 must
        # gather them for the whole forward and backward of the top-level module.
        for p in model.schedule.parameters():
            deepspeed.zero.register_external_parameter(engine.module, p)
    if cfg.deepspeed.deepcompile:
        mode = {} if cfg.train.compile == "off" else {"mode": cfg.train.compile}
        engine.compile(compile_kwargs=mode)
    return engine, lr_schedule


class NormAtRecords:
    """DeepSpeed's global gradient norm on the steps that are recorded, where the config leaves
    it out of the others (ds_config.norm_only_for_records; a `deepspeed.extra` that sets
    zero_optimization.compute_grad_norm decides instead). Call with whether the coming step is
    recorded, before its micro-batches."""

    def __init__(self, engine):
        self.optimizer = engine.optimizer
        # DeepSpeed's ZeRO-1/2 optimizer reads this flag at every step; an optimizer without it
        # (ZeRO-3, the BF16 optimizer, stage 0) takes the norm every step
        self.active = getattr(self.optimizer, "compute_grad_norm", True) is False

    def __call__(self, recorded: bool) -> None:
        if self.active:
            self.optimizer.compute_grad_norm = recorded


def schedule_parameters(module):
    """A context in which the learnable schedule's parameters (GenMD4's phi) are whole on every
    rank: they are read outside any module's forward, where ZeRO-3 would not gather them (a no-op
    below ZeRO-3)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.schedule.parameters()))


def learned_exponents(engine) -> torch.Tensor | None:
    """GenMD4's learned exponents w [V] (float32, on the CPU); None for a fixed schedule."""
    module = engine.module
    if not list(module.schedule.parameters()):
        return None
    with schedule_parameters(module):
        return module.schedule.exponents().detach().float().cpu()
