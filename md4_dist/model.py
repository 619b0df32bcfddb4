"""The MD4 / GenMD4 denoiser: noised tokens z_t and time t in, logits over the V real tokens out.

A pure `nn.Module` (no loss, no sampling, no distribution). Architecture of the paper's MD4-S
(docs/math.md, "The OpenWebText setting"; official `md4/networks/transformer.py`): token embedding
over V + 1 ids (the mask id V is an input embedding only), bidirectional attention with RoPE
through SDPA, LayerNorm without scale or bias modulated by adaLN-Zero from a time embedding, a
gated MLP, and a zero-initialised untied output layer over the V real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from md4_dist.output_head import EAGER, CountLater, head_stats, padded_vocab

MlpType = Literal["glu", "swiglu", "geglu"]
# The gate activation of each MLP type; the official code uses the same activation in front of
# every adaLN projection.
_ACTIVATIONS = {"glu": torch.sigmoid, "swiglu": F.silu, "geglu": F.gelu}


@dataclass
class ModelConfig:
    """Denoiser shape. The defaults are MD4-S with the GPT-2 vocabulary."""

    vocab_size: int = 50257
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_type: MlpType = "glu"
    mlp_hidden: int = 0  # 0: the official rule, 2/3 * 4 * dim rounded up to a multiple of 32
    time_dim: int = 64  # width of the time embedding that conditions every block
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    depth_scaled_init: bool = True  # MLP init variance 2 / n_layers, as the official MD4-S

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "time_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim ({self.dim}) must split into n_heads ({self.n_heads}) heads of "
                             "even size (RoPE rotates pairs)")
        if self.time_dim % 2 or self.time_dim < 4:
            raise ValueError(f"time_dim must be even and >= 4, got {self.time_dim}")
        if self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden must be >= 0, got {self.mlp_hidden}")

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        h = int(2 * 4 * self.dim / 3)
        return 32 * ((h + 31) // 32)


def _trunc_normal_(w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Flax's variance_scaling(scale, 'fan_in', 'truncated_normal') for a torch Linear weight."""
    std = math.sqrt(scale / w.shape[1]) / 0.87962566103423978  # undo the truncation's shrink
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of 1000 t: [B] -> [B, dim] (sin half, then cos half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, device=t.device))
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [L, head_dim / 2] for rotary embeddings over adjacent pairs."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, H, L, hd] by the position's angles."""
    xr = x.float().unflatten(-1, (-1, 2))  # [B, H, L, hd/2, 2]
    a, b = xr[..., 0], xr[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class FlatLinears(nn.Module):
    """Linear maps held in one flat parameter, `params`, viewed as the named weights [out, in] and
    biases (`NAME_bias`) of `weights()`. ZeRO-3 gathers, reduces and re-partitions each parameter
    tensor with host work of its own (about 470 Python calls a tensor a step,
    benchmarks/host_calls.py), and its step is bound by that host work: one tensor a block
    instead of six ran MD4-S's ZeRO-3 step 27-45% faster on an H100 (benchmarks/RESULTS.md,
    2026-12-07)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes.values()]
        self.params = nn.Parameter(torch.empty(sum(self.sizes)))

    def weights(self) -> dict[str, torch.Tensor]:
        """Views of `params`, split again at each call so that ZeRO-3's gathered tensor is read."""
        return {name: t.view(shape) for (name, shape), t in zip(self.shapes.items(), self.params.split(self.sizes))}

    @torch.no_grad()
    def linear_draws(self, *names: str) -> None:
        """nn.Linear's own initialisation of these weights and their biases. The layout of
        separate tensors (format version 1) drew it in each nn.Linear's constructor, and
        Denoiser.reset_parameters overwrites every value drawn; but the draws advance the random
        generator (uniform draws: a fixed count an entry, whatever their order), so drawing them
        gives a seed the weights, and every run the trajectory, it had then."""
        w = self.weights()
        for name in names:
            nn.init.kaiming_uniform_(w[name], a=math.sqrt(5))
            if name + "_bias" in w:
                bound = 1 / math.sqrt(w[name].shape[1])
                w[name + "_bias"].uniform_(-bound, bound)


class TimeConditioning(FlatLinears):
    """The time embedding [B, time_dim] -> (cond [B, time_dim], which every block's adaLN reads;
    the output norm's shift and scale [B, 1, D]): the time MLP and the output adaLN, both
    functions of t alone, in one tensor."""

    def __init__(self, cfg: ModelConfig):
        T, D = cfg.time_dim, cfg.dim
        super().__init__({"mlp_in": (4 * T, T), "mlp_in_bias": (4 * T,),
                          "mlp_out": (T, 4 * T), "mlp_out_bias": (T,),
                          "out_ada": (2 * D, T), "out_ada_bias": (2 * D,)})  # zero-initialised
        self.act = _ACTIVATIONS[cfg.mlp_type]
        self.linear_draws("mlp_in", "mlp_out", "out_ada")

    def forward(self, emb):
        w = self.weights()
        cond = F.linear(F.silu(F.linear(emb, w["mlp_in"], w["mlp_in_bias"])), w["mlp_out"], w["mlp_out_bias"])
        shift, scale = F.linear(self.act(cond), w["out_ada"], w["out_ada_bias"])[:, None].chunk(2, -1)
        return cond, shift, scale


class Block(FlatLinears):
    """Pre-norm transformer block with adaLN-Zero: shift, scale and gate from the time embedding;
    its six weights in one tensor (FlatLinears)."""

    def __init__(self, cfg: ModelConfig):
        D, H, T = cfg.dim, cfg.hidden, cfg.time_dim
        super().__init__({
            "qkv": (3 * D, D), "attn_out": (D, D),
            "mlp_in": (2 * H, D),  # [activation input | value]
            "mlp_out": (D, H),
            "ada": (6 * D, T), "ada_bias": (6 * D,),  # zero-initialised: blocks start as identity
        })
        self.n_heads = cfg.n_heads
        self.act = _ACTIVATIONS[cfg.mlp_type]
        self.eps = cfg.norm_eps
        self.linear_draws("qkv", "attn_out", "mlp_in", "mlp_out", "ada")

    def forward(self, h, cond, cos, sin):
        # h: [B, L, D], cond: [B, time_dim]
        B, L, D = h.shape
        w = self.weights()
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = F.linear(
            self.act(cond), w["ada"], w["ada_bias"])[:, None].chunk(6, -1)
        x = F.layer_norm(h, (D,), eps=self.eps) * (1 + scale_a) + shift_a
        q, k, v = F.linear(x, w["qkv"]).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, hd], bidirectional
        h = h + gate_a * F.linear(attn.transpose(1, 2).reshape(B, L, D), w["attn_out"])
        x = F.layer_norm(h, (D,), eps=self.eps) * (1 + scale_m) + shift_m
        gate, value = F.linear(x, w["mlp_in"]).chunk(2, -1)
        return h + gate_m * F.linear(self.act(gate) * value, w["mlp_out"])


class Blocks(nn.ModuleList):
    """The trunk's blocks, applied in order: one module whose forward runs them all, so that the
    whole trunk can be compiled as one graph and gathered by ZeRO-3 as one unit
    (`train.compile_unit: "trunk"`, trainer/engine.py). Its parameters keep the names of a plain
    list of blocks (`blocks.N.*`)."""

    def forward(self, h, cond, cos, sin):
        for blk in self:
            h = blk(h, cond, cos, sin)
        return h


class OutputLayer(nn.Module):
    """The untied output projection, weight [V_pad, D] with V_pad >= V rows (output_head says why;
    the padding rows are never read as logits). Called with targets, it returns the loss's
    reductions of the logits at the given rows instead of the logits (`output_head.head_stats`).
    Either way the weight is read inside this module's own call, where ZeRO-3 gathers it."""

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.weight = nn.Parameter(torch.empty(padded_vocab(vocab), dim))
        self.kernels = EAGER

    def forward(self, h, x=None, w=None):
        if x is None:
            return F.linear(h, self.weight)[..., :self.vocab]
        return head_stats(h, self.weight, x, self.vocab, w, self.kernels)


class Denoiser(nn.Module):
    """p_theta(x | z_t, t): tokens [B, L] in [0, V] (V is the mask) and t [B] -> logits [B, L, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size + 1, cfg.dim)
        self.time = TimeConditioning(cfg)
        self.blocks = Blocks(Block(cfg) for _ in range(cfg.n_layers))
        self.out = OutputLayer(cfg.dim, cfg.vocab_size)
        # masked_stats projects every row, with no host-read count, when the whole module is
        # traced as one graph (DeepSpeed's DeepCompile; trainer.engine sets it)
        self.static_rows = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.cfg
        nn.init.normal_(self.embed.weight, std=cfg.dim ** -0.5)
        w = self.time.weights()
        for name in ("mlp_in", "mlp_out"):
            _trunc_normal_(w[name])
            nn.init.zeros_(w[name + "_bias"])
        nn.init.zeros_(w["out_ada"])
        nn.init.zeros_(w["out_ada_bias"])
        mlp_scale = 2.0 / cfg.n_layers if cfg.depth_scaled_init else 1.0
        for blk in self.blocks:
            w = blk.weights()
            _trunc_normal_(w["qkv"])
            _trunc_normal_(w["attn_out"])
            _trunc_normal_(w["mlp_in"], mlp_scale)
            _trunc_normal_(w["mlp_out"], mlp_scale)
            nn.init.zeros_(w["ada"])
            nn.init.zeros_(w["ada_bias"])
        nn.init.zeros_(self.out.weight)

    def hidden(self, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The modulated final hidden state [B, L, D]; `forward` projects it to logits.

        Split out so a loss can project only the positions it needs.
        """
        cfg = self.cfg
        if zt.dim() != 2 or zt.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"zt must be an integer tensor [B, L], got {zt.dtype} {tuple(zt.shape)}")
        if t.shape != zt.shape[:1]:
            raise ValueError(f"t must have shape [B] = {tuple(zt.shape[:1])}, got {tuple(t.shape)}")
        L = zt.shape[1]
        cond, shift, scale = self.time(timestep_embedding(t, cfg.time_dim).to(self.embed.weight.dtype))
        cos, sin = rope_tables(L, cfg.dim // cfg.n_heads, cfg.rope_theta, zt.device)
        h = self.blocks(self.embed(zt), cond, cos, sin)
        return F.layer_norm(h, (cfg.dim,), eps=cfg.norm_eps) * (1 + scale) + shift

    def forward(self, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(zt, t))  # [B, L, V]

    def masked_stats(self, zt: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                     w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the losses read, at the masked positions of zt only (0 elsewhere): log p(x_n | z_t)
        and, given GenMD4's exponents w [V], sum_j w_j p_j(. | z_t); [B, L] each. The output layer
        projects only the masked rows (about half), a chunk at a time: [B, L, V] never exists.
        With `static_rows` it projects every row and zeroes the unmasked ones: twice the output
        layer's work for MD4, but shapes that do not depend on the data and no wait on the host."""
        B, L = zt.shape
        masked = (zt == self.cfg.vocab_size).flatten()
        if self.static_rows:
            lse, target, expected = self.out(self.hidden(zt, t).flatten(0, 1), x.flatten(), w)
            zero = lse.new_zeros(())
            return (torch.where(masked, target - lse, zero).view(B, L),
                    None if expected is None else torch.where(masked, expected, zero).view(B, L))
        count = CountLater(masked)  # before the trunk is queued: reading it costs the GPU nothing
        # the masked rows first, without a host sync; the count says where they end
        rows = torch.nonzero_static(masked, size=B * L, fill_value=0).squeeze(1)
        h = self.hidden(zt, t).flatten(0, 1)
        rows = rows[:count()]
        lse, target, expected = self.out(h[rows], x.flatten()[rows], w)

        def spread(v):  # the masked rows' values back in place, [B, L]
            return v.new_zeros(B * L).index_copy(0, rows, v).view(B, L)

        return spread(target - lse), (None if expected is None else spread(expected))
