"""The output layer and the loss's reductions of it, a chunk of rows at a time.

The losses read three numbers of the logits l = W h_n (V of them) at each masked position n:
logsumexp(l), l[x_n] and, for GenMD4, sum_j w_j softmax(l)_j. Materialising the logits costs
B x L x V floats (3.3 GB in float32 for B = 16, L = 1024, V = 50257), and autograd would keep
the softmax too. `head_stats` keeps one chunk of rows' logits at a time, in the forward and again
in the backward (recomputed there), so memory is O(chunk x V) and only the rows it is given (the
masked positions) are ever projected.

`HeadKernels(keep_logits=True)` (train.head_keeps_logits) trades that memory for time: the
forward keeps every chunk's logits (N x V_pad in the compute dtype: 2 bytes each in bf16, about
0.8 GB for 8192 masked rows of the GPT-2 vocabulary, twice that for GenMD4's two masks) and the
backward reads them instead of recomputing them, so it runs two V-wide products instead of three.
The saved logits are the very tensor the recompute would make, so the gradients are the same.

The weight has V_pad >= V rows, V_pad a multiple of 128: cuBLAS's fast tensor-core kernels need
aligned leading dimensions, and V = 50257 is odd (unaligned, the projection ran about 4x slower
on an H100). Logits past V are never read; the padding rows get zero gradient.

The logits are produced in the weight's dtype (bf16 in training) and reduced in float32 (float64
for float64 input). The reductions are plain tensor functions; `HeadKernels(compiled=True)`
(train.compile) fuses each into a few kernels with torch.compile instead of one pass over the
logits per elementwise op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 8192  # rows per chunk: 8192 x 50304 bf16 logits are 0.8 GB
PAD = 128  # the weight's rows are a multiple of this


def padded_vocab(vocab: int) -> int:
    return -(-vocab // PAD) * PAD


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def reduce_logits(logits, x, w, vocab: int):
    """logits [n, V_pad] -> logsumexp, the target's logit and sum_j w_j p_j (w [V] or None), [n]
    each, over the first `vocab` columns."""
    lg = logits[:, :vocab].to(_acc(logits.dtype))
    top = lg.amax(-1, keepdim=True)
    e = torch.exp(lg - top)
    total = e.sum(-1)
    lse = top.squeeze(-1) + torch.log(total)
    target = lg.gather(-1, x[:, None]).squeeze(-1)
    expected = (e * w).sum(-1) / total if w is not None else None
    return lse, target, expected


def grad_logits(logits, x, w, lse, expected, g_lse, g_target, g_expected, vocab: int):
    """The gradient of the three reductions with respect to the logits [n, V_pad], in the logits'
    dtype with zero padding columns, and (GenMD4) its part for w [V]:
        d lse = p,  d target = onehot(x),  d expected = p (w - expected)."""
    lg = logits[:, :vocab].to(_acc(logits.dtype))
    p = torch.exp(lg - lse[:, None])
    g = p * g_lse[:, None]
    grad_w = None
    if w is not None:
        pg = p * g_expected[:, None]
        g = g + pg * (w - expected[:, None])
        grad_w = pg.sum(0)
    cols = torch.arange(vocab, device=logits.device)
    g = g + (cols == x[:, None]) * g_target[:, None]
    return F.pad(g.to(logits.dtype), (0, logits.shape[1] - vocab)), grad_w


class HeadKernels:
    """How the head runs: the two reductions eager or compiled (symbolic in the row count, which
    varies per step), and whether the backward reads the forward's logits (`keep_logits`) or
    recomputes them."""

    def __init__(self, compiled: bool = False, keep_logits: bool = False):
        # Not dynamic=True: that makes the vocabulary and the row stride symbolic too, and the
        # V-wide kernels lose their constant strides. Dynamo's default compiles the first row
        # count as it is and, at the second, recompiles with only what changed (the rows)
        # symbolic. benchmarks/head_kernels.py times both.
        wrap = torch.compile if compiled else (lambda f: f)
        self.reduce, self.grad = wrap(reduce_logits), wrap(grad_logits)
        self.keep_logits = keep_logits


EAGER = HeadKernels()


class _HeadStats(torch.autograd.Function):
    # Under autocast the backward's products run in the forward's precision too.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, x, w, vocab, chunk, kernels, keep):
        # h [N, D], weight [V_pad, D], x [N] targets, w [V] (or None: MD4); keep: save each
        # chunk's logits for the backward
        N, acc = h.shape[0], _acc(h.dtype)
        lse, target, expected = (torch.zeros(N, dtype=acc, device=h.device) for _ in range(3))
        kept = []
        for a in range(0, N, chunk):
            s = slice(a, a + chunk)
            logits = h[s] @ weight.t()  # [n, V_pad]
            out = kernels.reduce(logits, x[s], w, vocab)
            lse[s], target[s] = out[0], out[1]
            if w is not None:
                expected[s] = out[2]
            if keep:
                kept.append(logits)
        ctx.save_for_backward(h, weight, x, w, lse, expected, *kept)
        ctx.vocab, ctx.chunk, ctx.kernels = vocab, chunk, kernels
        return lse, target, expected

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_lse, g_target, g_expected):
        h, weight, x, w, lse, expected, *kept = ctx.saved_tensors
        N, acc = h.shape[0], lse.dtype
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_weight = None
        grad_w = torch.zeros_like(w) if w is not None and ctx.needs_input_grad[3] else None
        for i, a in enumerate(range(0, N, ctx.chunk)):
            s = slice(a, a + ctx.chunk)
            logits = kept[i] if kept else h[s] @ weight.t()  # [n, V_pad], as the forward's
            g, gw = ctx.kernels.grad(logits, x[s], w, lse[s], expected[s], g_lse[s], g_target[s],
                                     g_expected[s], ctx.vocab)
            del logits  # a recomputed chunk's memory is free for the products
            if grad_h is not None:
                grad_h[s] = g @ weight
            if ctx.needs_input_grad[1]:
                part = g.t() @ h[s]  # [V_pad, D]
                if N <= ctx.chunk:  # one chunk: the product as it is
                    grad_weight = part
                else:  # several: summed in float32
                    grad_weight = part.to(acc) if grad_weight is None else grad_weight.add_(part)
            if grad_w is not None:
                grad_w += gw
        if grad_weight is None and ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)  # no rows
        return grad_h, None if grad_weight is None else grad_weight.to(weight.dtype), None, grad_w, \
            None, None, None, None


def head_stats(h: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, vocab: int,
               w: torch.Tensor | None = None, kernels: HeadKernels = EAGER, chunk: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For rows h [N, D] of the final hidden state, the output weight [V_pad, D] (rows past
    `vocab` are padding), targets x [N] and (GenMD4) exponents w [V]: logsumexp of the logits,
    the target's logit, and sum_j w_j p_j, each [N] in float32 (float64 for float64 h),
    differentiable in h, weight and w; the logits never exist whole, unless
    `kernels.keep_logits` keeps them (all N rows, chunk by chunk) for the backward where a
    gradient will be taken."""
    if w is not None:
        w = w.to(_acc(h.dtype))
    # Function.forward runs without grad mode and reports needs_input_grad even under no_grad:
    # whether the logits are worth keeping is decided here (validation keeps none)
    keep = kernels.keep_logits and torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (h, weight, w))
    lse, target, expected = _HeadStats.apply(h, weight, x, w, vocab, chunk or CHUNK, kernels, keep)
    return lse, target, (expected if w is not None else None)


class CountLater:
    """mask.sum() for the host, read later without draining the GPU's queue.

    Reading a device value on the host waits for the GPU to reach it. Here the copy is queued
    when the mask is made, before the trunk; by the time the host reads it (at the output layer)
    the GPU has passed that point while still holding the trunk's work, so the wait never leaves
    the GPU idle, as `.item()` or `nonzero()` at the output layer would.
    """

    def __init__(self, mask: torch.Tensor):
        count = mask.sum()
        if mask.is_cuda:
            self._host = torch.empty((), dtype=count.dtype, pin_memory=True)
            self._host.copy_(count, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = count, None

    def __call__(self) -> int:
        if self._ready is not None:
            self._ready.synchronize()
        return int(self._host)
