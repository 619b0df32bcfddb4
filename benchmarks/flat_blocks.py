"""An experiment, not a feature: each block's six parameter tensors held as one flat parameter.

ZeRO-3's host work in a step is mostly per parameter tensor, not per module: about 470 Python
calls per tensor a step at MD4-S's structure (benchmarks/host_calls.py: 29,060 calls with 6
blocks, 46,082 with 12, six tensors a block), 38k of the 46k. With one tensor a block, MD4-S has
20 tensors instead of 80. This measures what that would buy before the model's parameter names
(checkpoints, exports, the HF code, the EMA) are changed for it:

    python benchmarks/throughput.py ... --flat-blocks
    python benchmarks/host_calls.py ... --flat-blocks

`use()` makes the trainer's engine build its model with every block flattened. The block's math
is `model.Block.forward`'s, written here against explicit weights (views of the flat tensor,
split again inside each call, so ZeRO-3's gathered tensor is the one read).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from md4_dist.model import Block, apply_rope


def flatten(blk: Block) -> None:
    """Replace blk's parameters (qkv, attn_out, mlp_in, mlp_out, ada weight and bias, in that
    order) by one 1-D parameter `blk.flat` holding the same values."""
    named = list(blk.named_parameters())
    blk.shapes = [p.shape for _, p in named]
    blk.sizes = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    for name in ("qkv", "attn_out", "mlp_in", "mlp_out", "ada"):
        delattr(blk, name)
    blk.flat = nn.Parameter(flat)
    blk.forward = types.MethodType(_flat_forward, blk)


def _flat_forward(self, h, cond, cos, sin):
    qkv_w, out_w, in_w, mlp_out_w, ada_w, ada_b = (
        t.view(s) for t, s in zip(self.flat.split(self.sizes), self.shapes))
    B, L, D = h.shape
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = F.linear(
        self.act(cond), ada_w, ada_b)[:, None].chunk(6, -1)
    x = F.layer_norm(h, (D,), eps=self.eps) * (1 + scale_a) + shift_a
    q, k, v = F.linear(x, qkv_w).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn = F.scaled_dot_product_attention(q, k, v)
    h = h + gate_a * F.linear(attn.transpose(1, 2).reshape(B, L, D), out_w)
    x = F.layer_norm(h, (D,), eps=self.eps) * (1 + scale_m) + shift_m
    gate, value = F.linear(x, in_w).chunk(2, -1)
    return h + gate_m * F.linear(self.act(gate) * value, mlp_out_w)


def use() -> None:
    """From now on, the trainer's engine builds its model with flat blocks (before it compiles
    them and hands the model to DeepSpeed)."""
    from md4_dist.trainer import engine

    build = engine.DiffusionModel

    def flat_model(*args, **kwargs):
        model = build(*args, **kwargs)
        for blk in model.denoiser.blocks:
            flatten(blk)
        return model

    engine.DiffusionModel = flat_model
