"""Our config -> a DeepSpeed config dict. The global batch is the same for every world size:
gradient accumulation = global_batch / (micro_batch x world_size)."""

from __future__ import annotations

import os
from types import SimpleNamespace

from md4_dist.config import Config


def accumulation_steps(cfg: Config, world_size: int) -> int:
    per_pass = cfg.train.micro_batch * world_size
    if cfg.train.global_batch % per_pass:
        raise ValueError(f"train.global_batch ({cfg.train.global_batch}) is not divisible by "
                         f"train.micro_batch x workers ({cfg.train.micro_batch} x {world_size})")
    return cfg.train.global_batch // per_pass


def check_gradient_precision(cfg: Config, world_size: int) -> None:
    """bf16 trains with fp32 master weights, and sums micro-batch gradients in fp32 (ZeRO 1-3,
    `data_types` below). DeepSpeed's stage-0 bf16 path can only sum them in bf16: refuse it when
    there is more than one micro-batch per step to sum."""
    steps = accumulation_steps(cfg, world_size)
    if cfg.deepspeed.precision == "bf16" and cfg.deepspeed.zero_stage == 0 and steps > 1:
        raise ValueError(
            f"deepspeed.zero_stage 0 with bf16 would sum the gradients of {steps} micro-batches "
            f"per step in bf16 at {world_size} worker(s) (DeepSpeed's stage-0 bf16 path); use "
            "zero_stage 1 (on one GPU the same memory and speed), precision fp32, or a "
            "global_batch of micro_batch x workers")


def check_with_deepspeed(cfg: Config, world_size: int) -> None:
    """DeepSpeed's own parse of the config this run would hand it, on the driver: its sections
    refuse unknown keys and wrong types, so a misspelt `deepspeed.extra` key fails here once,
    naming it, rather than in every worker at engine start, where Ray retries it; a top-level
    key that DeepSpeed would ignore fails too. Raises ValueError with DeepSpeed's words."""
    # DeepSpeed picks its accelerator once per process, at import, and on a machine without a
    # GPU warns that it found none. The driver only parses here: it imports DeepSpeed as a CPU
    # process, and the environment that workers started later inherit stays as it was.
    unset = "DS_ACCELERATOR" not in os.environ
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.runtime.config import DeepSpeedConfig as Parsed
    finally:
        if unset:
            del os.environ["DS_ACCELERATOR"]

    generated = deepspeed_config(cfg, world_size)
    # Outside torch.distributed DeepSpeed takes the world size to be 1 and checks the global
    # batch against it; ours is checked against every world size in train.prepare.
    generated.pop("train_batch_size")
    ds = _KeysRead(generated)
    try:
        parsed = Parsed(ds)
    except Exception as e:  # pydantic's ValidationError, DeepSpeed's asserts and ValueErrors
        words = " ".join(str(e).split()).split(" For further information visit")[0]  # pydantic's link
        raise ValueError(f"DeepSpeed refuses the config md4_dist builds from it: "
                         f"{type(e).__name__}: {words}") from None
    # DeepSpeed's sections refuse unknown keys, but its top level ignores them: a misspelt
    # section would be dropped without a word. A top-level key its parse never looked up (nor
    # deepspeed.initialize, which reads the mesh's sizes itself) is refused. A parse that walked
    # the whole dict looked at every key, and then nothing can be told apart.
    unread = [k for k in cfg.deepspeed.extra if k not in ds.notes.read and k not in _READ_BY_INITIALIZE]
    if unread and not ds.notes.walked:
        import difflib

        import deepspeed

        near = difflib.get_close_matches(unread[0], ds.notes.read, n=1)
        raise ValueError(f"DeepSpeed {deepspeed.__version__} reads no top-level setting "
                         f"{unread[0]!r}, so it would be ignored"
                         + (f"; did you mean {near[0]!r}?" if near else ""))
    # DeepSpeed's optimizer checks this one when it is built, in the workers
    if not parsed.zero_config.compute_grad_norm and cfg.optim.grad_clip > 0:
        raise ValueError(f"zero_optimization.compute_grad_norm false leaves DeepSpeed no norm to "
                         f"clip with, and optim.grad_clip is {cfg.optim.grad_clip}")


# top-level keys deepspeed.initialize reads from the dict itself, outside DeepSpeedConfig
_READ_BY_INITIALIZE = ("data_parallel_size", "sequence_parallel_size")


class _KeysRead(dict):
    """A config dict that notes the top-level keys looked up in it, for check_with_deepspeed.
    DeepSpeed asks `key in d`, `key in d.keys()`, `d[key]` and `d.get(key)`, of this dict and of
    its shallow copy, which shares the notes. `notes.walked`: something went over every key (a
    deep copy, an iteration), after which the notes tell nothing."""

    def __init__(self, items, notes: SimpleNamespace | None = None):
        super().__init__(items)
        self.notes = notes or SimpleNamespace(read=set(), walked=False)

    def _note(self, key):
        self.notes.read.add(key)
        return key

    def __getitem__(self, key):
        return super().__getitem__(self._note(key))

    def get(self, key, default=None):
        return super().get(self._note(key), default)

    def __contains__(self, key):
        return super().__contains__(self._note(key))

    def pop(self, key, *default):
        return super().pop(self._note(key), *default)

    def setdefault(self, key, default=None):
        return super().setdefault(self._note(key), default)

    def keys(self):
        return _Keys(self)

    def __iter__(self):
        self.notes.walked = True
        return super().__iter__()

    def items(self):
        self.notes.walked = True
        return super().items()

    def values(self):
        self.notes.walked = True
        return super().values()

    def __copy__(self):
        return _KeysRead(dict.items(self), self.notes)


class _Keys:
    """`d.keys()` of a _KeysRead: membership notes the key, iteration walks."""

    def __init__(self, d: _KeysRead):
        self.d = d

    def __contains__(self, key):
        return key in self.d

    def __iter__(self):
        return iter(self.d)

    def __len__(self):
        return len(self.d)


def why_steps_are_fixed(cfg: Config) -> str:
    """Why a run's train.steps cannot change once it has begun: the schedule below spans it. (A
    schedule whose steps taken do not depend on train.steps, warmup then constant or warmup-
    stable-decay with the decay counted from the end, would let a run be extended; none is
    offered yet.)"""
    return (f"its learning rate follows DeepSpeed's WarmupCosineLR, whose cosine decay (after "
            f"optim.warmup_steps = {cfg.optim.warmup_steps}) spans train.steps, so another "
            "train.steps would have given the steps already taken another learning rate")


def norm_only_for_records(cfg: Config) -> bool:
    """Whether DeepSpeed skips the global gradient norm on steps that no record shows. Only
    clipping needs it every step, and taking it makes the host wait for the GPU (DeepSpeed reads
    the norm's finiteness, and builds a device scalar from a Python float, each a stream drain)
    at every optimizer step; the loop asks for it on the steps it records (engine.NormAtRecords).
    DeepSpeed offers this at ZeRO-1 and 2 without optimizer offload, but not in its BF16
    optimizer (ZeRO-1 in bf16 with fp32 gradient sums), which always takes the norm."""
    z, bf16 = cfg.deepspeed.zero_stage, cfg.deepspeed.precision == "bf16"
    return cfg.optim.grad_clip == 0 and not cfg.deepspeed.offload_optimizer and (
        z == 2 or (z == 1 and not bf16))


def _merge(into: dict, extra: dict) -> None:
    """Merge `extra` into `into`, nested objects key by key (DeepSpeedConfig checked its keys)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config of this run: ours, with `deepspeed.extra` merged in."""
    check_gradient_precision(cfg, world_size)
    o = cfg.optim
    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.deepspeed.persistence_threshold
        # DeepSpeed's own autograd linear re-gathers the weight for the backward; ZeRO-3's hooks
        # already do, and torch.compile breaks its graphs at that function.
        zero["memory_efficient_linear"] = False
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    if norm_only_for_records(cfg):
        zero["compute_grad_norm"] = False
    generated = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accumulation_steps(cfg, world_size),
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: DeepSpeed's ZeRO-1/2 optimizer would read every step's gradients
        # for inf and NaN on the host (a stream drain each step) and skip such a step without a
        # word. bf16 has no loss scale for that check to tune; a non-finite gradient is a run
        # gone wrong, and trainer/finite.py stops it at the next record or checkpoint instead.
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16", "check_grad_overflow": False},
        **({"data_types": {"grad_accum_dtype": "fp32"}}
           if cfg.deepspeed.precision == "bf16" and cfg.deepspeed.zero_stage > 0 else {}),
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            # FusedAdam needs CUDA; on CPU workers DeepSpeed builds torch.optim.AdamW
            "torch_adam": not cfg.cluster.use_gpu}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.train.steps, "warmup_num_steps": min(o.warmup_steps, cfg.train.steps),
            "warmup_min_ratio": 0.0, "cos_min_ratio": o.min_lr_ratio, "warmup_type": "linear"}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device twice per micro-step (the GPU
        # drains while the host catches up); the loop measures throughput itself.
        "timers": {"throughput": {"enabled": False}},
        **({"compile": {"deepcompile": True}} if cfg.deepspeed.deepcompile else {}),
    }
    _merge(generated, cfg.deepspeed.extra)
    return generated
