"""The one config tree of a run, loaded strictly from JSON with dotted `--set` overrides.

    cfg = load_config("configs/tiny.json", overrides=["optim.lr=1e-4", "train.steps=100"])
    save_config(cfg, "run/config.json")   # load_config of that file gives cfg back, less its secrets

Each section that has a module lives next to it (ModelConfig in model.py, DiffusionConfig in
diffusion/objectives.py, DataConfig in data/reader.py, StorageConfig in data/storage.py); the
sections below are read by the trainer and the launcher. Fields made with `secret_field` (the
storage keys) are never written down nor compared: `to_dict` leaves them out (strict_config.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import fsspec

from md4_dist.data.reader import DataConfig
from md4_dist.data.storage import StorageConfig, write_bytes
from md4_dist.diffusion.objectives import DiffusionConfig
from md4_dist.model import ModelConfig
from md4_dist.strict_config import ConfigError, apply_overrides, from_dict, to_dict

__all__ = ["Config", "ConfigError", "load_config", "save_config", "config_from_dict"]


FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay (the paper's OpenWebText recipe)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 2000  # >= 1: the lr rises linearly from 0 at step 0
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # 0 disables clipping

    def __post_init__(self):
        if not 0 < self.lr <= FLOAT32_MAX:  # a scalar of float32 arithmetic: 1e300 failed every
            # worker's step ("cannot be converted to type float without overflow"), retried by Ray
            raise ValueError(f"lr must be > 0 and at most float32's largest value, 3.4e38, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0 and eps > 0")
        if self.warmup_steps < 1:  # DeepSpeed's WarmupCosineLR refuses 0, inside every worker
            raise ValueError(f"warmup_steps must be >= 1 (1: only step 0 runs at lr 0), got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    name: str = "md4"
    run_dir: str = "runs/md4"  # local path or object-storage URL
    seed: int = 42
    steps: int = 1_000_000
    global_batch: int = 512  # sequences per optimizer step, the same for every world size
    micro_batch: int = 16  # sequences per worker per forward pass
    ema: float = 0.9999  # 0 disables the EMA of the parameters
    # torch.compile each block's (or the trunk's, compile_unit) forward and fuse the output
    # layer's reductions (GPU runs); "reduce-overhead" also replays its kernels as a CUDA graph
    compile: Literal["off", "default", "reduce-overhead"] = "off"
    # what is compiled as one graph and, at ZeRO-3, gathered as one unit: each "block" (one
    # block's parameters whole at a time, the next one's gathered while one runs: least memory),
    # or the whole "trunk" (every block's parameters whole through the forward and again through
    # the backward, one compiled graph and one pair of ZeRO-3 hooks instead of one per block: less
    # host work per step, for the trunk's parameters in the compute dtype held whole on every rank)
    compile_unit: Literal["block", "trunk"] = "block"
    # the output layer's backward reads the forward's logits at the masked rows instead of
    # recomputing them (md4_dist/output_head.py): one V-wide product fewer per step, for
    # N_masked x V x 2 bytes (bf16) held per micro-batch, about 0.8 GB for 16 x 1024 tokens half
    # masked (GenMD4, with two masks: twice that)
    head_keeps_logits: bool = False
    # the kernels scaled_dot_product_attention may use in the trainer's blocks, the first that
    # serves the shape preferred ("cudnn", "flash", "efficient", "math"); empty: torch's own set
    # and order (flash first). cuDNN's ran within the spread of flash here on an H100
    # (benchmarks/RESULTS.md, 2026-12-07); it is reported faster on Hopper for other shapes
    attention_kernels: tuple[Literal["cudnn", "flash", "efficient", "math"], ...] = ()

    def __post_init__(self):
        if self.steps < 1 or self.global_batch < 1 or self.micro_batch < 1:
            raise ValueError("steps, global_batch and micro_batch must be >= 1")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch ({self.global_batch}) must be a multiple of "
                             f"micro_batch ({self.micro_batch})")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must lie in [0, 1), got {self.ema}")
        if len(set(self.attention_kernels)) != len(self.attention_kernels):
            raise ValueError(f"attention_kernels names a kernel twice: {list(self.attention_kernels)}")


@dataclass
class CheckpointConfig:
    """Checkpoints every `every` steps, at the end, on SIGTERM to the driver and on Ray's notice
    that a node is being preempted. A failed worker restarts the whole group from the latest one,
    up to `max_failures` times."""

    every: int = 5000  # steps between checkpoints
    keep: int = 3  # committed checkpoints kept
    max_failures: int = 3  # restarts after a failure; -1: without limit

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError("every and keep must be >= 1")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1, got {self.max_failures}")


@dataclass
class ClusterConfig:
    num_workers: int | tuple[int, int] = 1  # a fixed count, or [min, max] for an elastic run
    use_gpu: bool = False
    cpus_per_worker: int = 1
    collective_timeout_s: int = 600  # a collective that waits longer fails the job instead of hanging
    # elastic runs: how often Ray looks for room to grow (it restarts from the latest checkpoint)
    resize_check_s: float = 60.0
    # each worker checks, as it starts, that its node's packages are at their pins in
    # scripts/constraints.txt (trainer/pins.py); false: not checked (development only)
    check_pins: bool = True

    def __post_init__(self):
        lo, hi = self._bounds()
        if not 1 <= lo <= hi:
            raise ValueError(f"num_workers must be >= 1 (or [min, max] with 1 <= min <= max), "
                             f"got {self.num_workers}")
        if self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if self.collective_timeout_s < 1:
            raise ValueError(f"collective_timeout_s must be >= 1, got {self.collective_timeout_s}")
        if self.resize_check_s <= 0:
            raise ValueError(f"resize_check_s must be > 0, got {self.resize_check_s}")

    def _bounds(self) -> tuple[int, int]:
        n = self.num_workers
        return (n, n) if isinstance(n, int) else n

    @property
    def world_sizes(self) -> range:
        """Every world size the job may run at."""
        lo, hi = self._bounds()
        return range(lo, hi + 1)


# The DeepSpeed settings md4_dist derives from its own config (trainer/ds_config.py), each with
# the config key that sets it: `deepspeed.extra` may not set them. md4_dist also sets
# steps_per_print, wall_clock_breakdown, timers and zero_optimization.memory_efficient_linear, for
# speed and quiet only: extra may change those, as any other setting of DeepSpeed's (ZeRO's
# buckets, overlap_comm, offload_param, activation checkpointing, bf16's check_grad_overflow...).
DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch and train.micro_batch (accumulation = "
                                   "global_batch / (micro_batch x workers))",
    "gradient_clipping": "optim.grad_clip", "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.stage3_param_persistence_threshold": "deepspeed.persistence_threshold",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "bf16.enabled": "deepspeed.precision", "fp16": "deepspeed.precision",
    "optimizer": "optim (optim.lr, optim.betas, optim.eps, optim.weight_decay)",
    "scheduler": "optim.warmup_steps, optim.min_lr_ratio and train.steps",
    "compile.deepcompile": "deepspeed.deepcompile",
}
# Where md4_dist sums micro-batch gradients in fp32 (bf16 at ZeRO 1-3), extra may trade that for
# speed: {"data_types": {"grad_accum_dtype": "bf16"}} (the ZeRO-3 benchmarks measure it).
ACCUM_DTYPES = ("fp32", "bf16")


def _refuse_owned(extra: dict, prefix: str = "") -> None:
    for key, value in extra.items():
        path = prefix + key
        if path in DEEPSPEED_OWNED:
            raise ConfigError(f"config key 'deepspeed.extra.{path}' is set by md4_dist: use "
                              f"{DEEPSPEED_OWNED[path]}")
        if isinstance(value, dict):
            _refuse_owned(value, path + ".")
        elif any(k.startswith(path + ".") for k in DEEPSPEED_OWNED):
            raise ConfigError(f"config key 'deepspeed.extra.{path}' is a {type(value).__name__}, but "
                              "it is an object holding settings md4_dist sets itself: give its "
                              "other keys one by one")


def _check_accum_dtype(extra: dict, precision: str, zero_stage: int) -> None:
    types = extra.get("data_types")
    if types is None or types == {}:
        return
    key = "config key 'deepspeed.extra.data_types"
    if not isinstance(types, dict) or set(types) - {"grad_accum_dtype"}:
        raise ConfigError(f"{key}' may hold only grad_accum_dtype, got {json.dumps(types)}")
    dtype = types.get("grad_accum_dtype")
    if precision != "bf16" or zero_stage == 0:
        raise ConfigError(f"{key}.grad_accum_dtype' is set by md4_dist at precision {precision}, "
                          f"zero_stage {zero_stage} (the parameters' own dtype; DeepSpeed has no "
                          "other there): only bf16 at zero_stage 1-3 may choose it")
    if dtype not in ACCUM_DTYPES:
        raise ConfigError(f"{key}.grad_accum_dtype': {json.dumps(dtype)} is not allowed; allowed: "
                          f"{', '.join(json.dumps(d) for d in ACCUM_DTYPES)}")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["bf16", "fp32"] = "bf16"
    offload_optimizer: bool = False
    # ZeRO-3 keeps parameters with fewer elements than this whole on every rank (fewer, larger
    # gathers); 0 partitions every parameter. DeepSpeed's stage3_param_persistence_threshold.
    persistence_threshold: int = 100_000
    # DeepSpeed's DeepCompile: the whole module compiled as one graph, ZeRO's gathers, releases
    # and gradient reductions scheduled inside it (instead of per-block hooks and compile)
    deepcompile: bool = False
    # DeepSpeed's NVTX ranges around ZeRO's functions (for Nsight Systems): pushed and popped on
    # every call, hundreds a ZeRO-3 step, host work the step waits on; off unless asked for
    nvtx_ranges: bool = False
    # further DeepSpeed settings, merged into the config md4_dist generates (trainer/ds_config.py);
    # the keys md4_dist sets itself are refused, naming the config key that sets them
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.persistence_threshold < 0:
            raise ValueError(f"persistence_threshold must be >= 0, got {self.persistence_threshold}")
        _refuse_owned(self.extra)
        _check_accum_dtype(self.extra, self.precision, self.zero_stage)
        if self.deepcompile and self.zero_stage not in (1, 3):
            raise ValueError(f"deepcompile needs zero_stage 1 or 3 (DeepSpeed's passes), got {self.zero_stage}")


@dataclass
class WandbConfig:
    """Rank 0 mirrors the records (the same grouped names as TensorBoard), the schedule's
    histogram and the samples to Weights & Biases (trainer/wandb_log.py); a resumed run continues
    the same W&B run (its id kept in <run_dir>/wandb.json). Needs `pip install 'md4_dist[wandb]'`,
    and for mode "online" the workers need W&B's credentials (WANDB_API_KEY or their ~/.netrc)."""

    enabled: bool = False
    project: str = "md4_dist"
    entity: str = ""  # "": the credentials' default entity
    name: str = ""  # the run's name in W&B; "": train.name
    mode: Literal["online", "offline"] = "online"  # offline: files under <run_dir>/wandb, for `wandb sync`


@dataclass
class LoggingConfig:
    every: int = 100  # steps between metrics.jsonl / TensorBoard records
    # Samples in TensorBoard's text tab every `sample_every` steps (0: never) and at the end, drawn
    # with the EMA weights (when train.ema > 0) by the ancestral sampler, decoded with the data's
    # tokenizer (token ids for a corpus without one).
    sample_every: int = 0
    samples: int = 4
    sample_steps: int = 128  # denoising steps per sample
    # the device peak (TFLOP/s) that each record's `mfu` is quoted against; 0: the measured peak
    # of a known GPU (trainer/perf.py), and no `mfu` on any other device
    peak_tflops: float = 0.0
    # [first, last]: a torch.profiler trace of those steps (inclusive) into <run_dir>/profile/
    # (trainer/profiling.py), by rank 0 or, with profile_all_ranks, by every rank; []: none
    profile_steps: tuple[int, ...] = ()
    profile_all_ranks: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.profile_steps and not (len(self.profile_steps) == 2 and 1 <= self.profile_steps[0] <=
                                       self.profile_steps[1]):
            raise ValueError(f"profile_steps must be [first, last] with 1 <= first <= last, or [] for "
                             f"none; got {list(self.profile_steps)}")
        if self.sample_every < 0:
            raise ValueError(f"sample_every must be >= 0, got {self.sample_every}")
        if self.samples < 1 or self.sample_steps < 1:
            raise ValueError(f"samples and sample_steps must be >= 1, got {self.samples} and "
                             f"{self.sample_steps}")
        if self.peak_tflops < 0:
            raise ValueError(f"peak_tflops must be >= 0, got {self.peak_tflops}")


@dataclass
class EvalConfig:
    """Validation NELBO every `every` steps and at the end, on the same sequences with the same
    noise each time (with the EMA weights when train.ema > 0)."""

    every: int = 0  # steps between evaluations; 0 disables
    sequences: int = 0  # the first this many of the val split's (seeded) order; 0: all of it

    def __post_init__(self):
        if self.every < 0 or self.sequences < 0:
            raise ValueError(f"every and sequences must be >= 0, got {self.every} and {self.sequences}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.deepspeed.deepcompile and self.train.compile_unit != "block":
            raise ValueError(f"train.compile_unit={self.train.compile_unit!r} does nothing under "
                             "deepspeed.deepcompile, which takes the whole module as one graph: "
                             "leave it at 'block'")
        if self.deepspeed.deepcompile and self.train.attention_kernels:
            raise ValueError(f"train.attention_kernels={list(self.train.attention_kernels)} does nothing under "
                             "deepspeed.deepcompile, which compiles the whole module itself: leave it empty")


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    return from_dict(Config, apply_overrides(Config, data, list(overrides)))


def load_config(url: str, overrides: list[str] = ()) -> Config:
    """Read a JSON config (any fsspec URL), apply `key.path=value` overrides, validate."""
    try:
        with fsspec.open(url, "r") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {url} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {url} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {url} must hold a JSON object, got {type(data).__name__}")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{url}: {e}") from None


def save_config(cfg: Config, url: str) -> None:
    """Write cfg without its secrets as JSON to url (local or object storage, reached with
    cfg.storage, keys included)."""
    write_bytes(url, (json.dumps(to_dict(cfg), indent=2) + "\n").encode(), cfg.storage)
