"""Our config -> a DeepSpeed config dict. The global batch is the same for every world size:
gradient accumulation = global_batch / (micro_batch x world_size)."""

from __future__ import annotations

from md4_dist.config import Config


def accumulation_steps(cfg: Config, world_size: int) -> int:
    per_pass = cfg.train.micro_batch * world_size
    if cfg.train.global_batch % per_pass:
        raise ValueError(f"train.global_batch ({cfg.train.global_batch}) is not divisible by "
                         f"train.micro_batch x workers ({cfg.train.micro_batch} x {world_size})")
    return cfg.train.global_batch // per_pass


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    o = cfg.optim
    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.deepspeed.persistence_threshold
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.cluster.use_gpu}
    return {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accumulation_steps(cfg, world_size),
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            # FusedAdam needs CUDA; on CPU workers DeepSpeed builds torch.optim.AdamW
            "torch_adam": not cfg.cluster.use_gpu}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.train.steps, "warmup_num_steps": min(o.warmup_steps, cfg.train.steps),
            "warmup_min_ratio": 0.0, "cos_min_ratio": o.min_lr_ratio, "warmup_type": "linear"}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
