"""Run by tests/test_ema.py under torchrun: 2 CPU ranks, real DeepSpeed ZeRO-3 over gloo.

Checks PartitionedEMA against an average of the whole parameters, gathered every step, that
`swapped()` puts the average in the model (as ZeRO-3's forward sees it) and restores it exactly,
and that the ranks' saved shares join into the whole average (`checkpoint_format.whole_average`).
"""

import sys
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from md4_dist.checkpoint_format import whole_average
from md4_dist.trainer.ema import PartitionedEMA


def gathered(module):
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return [p.detach().clone() for p in module.parameters()]


def main():
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    torch.manual_seed(0)
    # 2107- and 903-element weights are partitioned; the 301- and 3-element biases are below the
    # persistence threshold, so ZeRO-3 keeps them whole on every rank: both kinds are covered.
    # Odd sizes: each parameter's last slice is padded.
    model = nn.Sequential(nn.Linear(7, 301), nn.Tanh(), nn.Linear(301, 3))
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 500},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    persist = [getattr(p, "ds_persist", False) for p in engine.module.parameters()]
    assert persist == [False, True, False, True], persist
    decay = 0.6
    ema = PartitionedEMA(engine.module, decay)
    reference = gathered(engine.module)
    g = torch.Generator().manual_seed(rank)
    for _ in range(5):
        x, y = torch.randn(2, 7, generator=g), torch.randn(2, 3, generator=g)
        engine.backward(((engine(x) - y) ** 2).mean())
        engine.step()
        ema.update()
        reference = [decay * r + (1 - decay) * p for r, p in zip(reference, gathered(engine.module))]
    trained = gathered(engine.module)
    assert max((a - b).abs().max().item() for a, b in zip(trained, reference)) > 1e-3, "the check has power"

    probe = torch.randn(3, 7, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), ema.swapped():
        swapped = gathered(engine.module)
        out = engine.module(probe)
    for s, r in zip(swapped, reference):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-6)
    w1, b1, w2, b2 = reference
    torch.testing.assert_close(out, torch.tanh(probe @ w1.T + b1) @ w2.T + b2, rtol=1e-5, atol=1e-6)
    for a, b in zip(gathered(engine.module), trained):
        assert torch.equal(a, b), "the trained weights come back bit for bit"
    # every rank's share, saved and joined again as md4_dist.inference.consolidate does it
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, ema.state_dict()["shadow"])
    joined = whole_average(shares, [r.shape for r in reference], zero3=True)
    for j, r in zip(joined, reference):
        torch.testing.assert_close(j, r, rtol=1e-5, atol=1e-6)
    local = sum(s.numel() for s in ema.shadow)
    full = sum(p.numel() for p in reference)
    print(f"rank {rank}: ok, EMA holds {local} of {full} values", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
