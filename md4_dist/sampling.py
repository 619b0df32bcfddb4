"""Samplers for MD4 and GenMD4: ancestral, top-p, confidence-ordered and threshold-parallel, with
conditioning on given tokens (prefix, infilling), per-row seeds and stopping at EOS.

    tokens = sample(denoiser, schedule, num_samples=8, seq_len=1024, steps=256,
                    generator=torch.Generator().manual_seed(0))
    # prefix / infilling: positions where `fixed` is True keep the tokens of `given`
    given, fixed = prefix_condition(prompt_ids, num_samples=8, seq_len=1024)
    tokens = sample(denoiser, schedule, 8, 1024, 256, given=given, fixed=fixed)
    # Fast-dLLM-style parallel decoding; a row drawn alone equals the same row in any batch
    out = generate(denoiser, schedule, 8, 1024, steps=1024, sampler="threshold", threshold=0.9,
                   seeds=row_seeds(0, first_row=0, n=8), batch_invariant=True, eos_id=eos)
    out.tokens, out.denoiser_calls, out.calls_per_row
    # on a GPU: bf16 autocast by default; the trunk compiled
    tokens = sample(denoiser, schedule, 64, 1024, 256, device="cuda", precision="bf16", compile=True)

Samplers (docs/math.md, "Sampling"):
- "ancestral" (MD4): from t to s < t each masked position n becomes token j with probability
  p_theta(j | z_t) (alpha_s(j) - alpha_t(j)) / (1 - alpha_t(j)) and stays masked otherwise. For
  the scalar MD4 schedules the fraction does not depend on j; for GenMD4's learnable schedule it
  does (the state-dependent rule). After the last step any mask left is filled with the
  denoiser's most likely token. "topp": the same from p_theta's nucleus (`top_p`).
- "confidence", "margin", "entropy" (LLaDA's low-confidence remasking, Dream's orders): at each
  grid step every masked position gets a candidate (a draw from p_theta at `temperature`, its
  argmax at 0) and a score: the candidate's probability, the top-1 minus top-2 probability, or
  minus the entropy. The k best-scored positions are unmasked, k being what the ancestral sampler
  unmasks in expectation (for GenMD4's state-dependent schedule, with alpha averaged over tokens).
- "threshold" (Fast-dLLM): every masked position whose candidate's probability reaches
  `threshold` is unmasked, and at least the most confident one per step, until none is masked;
  `steps` caps the denoiser calls (the last allowed call unmasks all that remain). The number of
  calls depends on the data (a host sync per step), so under ZeRO-3, where every forward gathers
  on all ranks, every rank must draw the same rows (the trainer's samples use "ancestral").
Unmasked positions never change, so given tokens are kept. With `block_length` the ordered and
threshold samplers decode semi-autoregressively (LLaDA): block after block from the left.

Cost. The denoiser's trunk runs over the whole sequence (attention needs it), but only the rows
a step can change are projected to V: the masked positions for the ordered and threshold
samplers; for ancestral and top-p only the masked positions whose uniform lies below the step's
largest unmasking fraction (alpha_s - alpha_t) / (1 - alpha_t), about L / steps per row per step,
since above it a position stays masked whatever the logits (the bound allows for float32's
rounding, so the draws are exactly those from every row's logits). The softmax, top-p,
cumulative sums and scores are float32, `CHUNK` rows at a time. This needs a model with `hidden`
and `out` (model.Denoiser): only the chosen rows' logits exist, in the model's dtype; any other
callable gives its [N, L, V] logits, of which the rows are taken, and so does `full_logits=True`. `precision="bf16"`
(the default on a GPU) runs the denoiser under bf16 autocast; `compile=True` compiles its trunk,
whose shape does not change from step to step.

Randomness: `generator` (one stream for the batch) or `seeds` (one stream per row, see
`row_seeds`). A row's draws then depend only on its own seed; with `batch_invariant=True` the
denoiser also runs row by row, since on the CPU small-batch GEMMs (the denoiser's time MLP) round
differently for different batch sizes. Together they make a row drawn alone equal to the same row
drawn in a batch of any size, exactly: tested on the CPU (tests/test_samplers.py). On a GPU it
holds by the same construction (the same kernels on the same [1, L] shapes, per-row Philox
streams; the rest of a step reduces within a row), on one machine and software stack; the GPU
test there checks float32 and bf16 when a GPU is present. Without `batch_invariant` the draws
are still per row but the logits may differ in the last bits (cuBLAS and the CPU GEMMs pick
kernels by batch size; in bf16 the differences are larger), which can flip a draw now and then.
Row by row costs throughput on a GPU: one forward of one row per row and step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from md4_dist.diffusion.checks import tokens as check_tokens
from md4_dist.diffusion.schedules import MaskingSchedule
from md4_dist.output_head import CountLater
# row_seeds, time_grid and top_p_filter are also this module's interface (the docstring's examples)
from md4_dist.sampling_draws import (Uniforms, alpha_at, draw, masked_fraction, row_seeds, scores, time_at_fraction,
                                     time_grid, top_p_filter)

# (z_t [B, L], t [B]) -> logits [B, L, V]: what the sampler draws from, e.g. a model.Denoiser
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

Sampler = Literal["ancestral", "topp", "confidence", "margin", "entropy", "threshold"]
SAMPLERS = ("ancestral", "topp", "confidence", "margin", "entropy", "threshold")
_ORDERED = ("confidence", "margin", "entropy")
Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS = ("auto", "bf16", "fp32")
CHUNK = 4096  # rows of float32 sampling arithmetic at a time: 4096 x 50257 floats are 0.8 GB


@dataclass
class Generated:
    """What `generate` returns."""

    tokens: torch.Tensor  # [N, L] int64 in [0, V)
    denoiser_calls: int  # forwards of the batch (row by row counts once)
    calls_per_row: torch.Tensor  # [N] int64: the calls a row needed, as if drawn alone


def prefix_condition(prefix: Sequence[int], num_samples: int, seq_len: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(given, fixed) [num_samples, seq_len] that start every row with the prefix's tokens."""
    if not 0 < len(prefix) < seq_len:
        raise ValueError(f"the prefix is {len(prefix)} tokens; it must be 1 to {seq_len - 1} "
                         f"for seq_len {seq_len} (at least one token is generated)")
    given = torch.zeros((num_samples, seq_len), dtype=torch.int64)
    given[:, :len(prefix)] = torch.as_tensor(list(prefix), dtype=torch.int64)
    fixed = torch.zeros((num_samples, seq_len), dtype=torch.bool)
    fixed[:, :len(prefix)] = True
    return given, fixed


def _check(schedule, num_samples, seq_len, steps, sampler, top_p, threshold, temperature, given,
           fixed, generator, seeds, eos_id, pad_id, precision, block_length):
    V = schedule.vocab_size
    if V is None:
        raise ValueError("the schedule has no vocab_size: build it with vocab_size=V")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be >= 1, got {num_samples}, {seq_len}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature != 1.0 and sampler in ("ancestral", "topp"):
        raise ValueError(f"temperature ({temperature}) applies to the confidence, margin, entropy "
                         f"and threshold samplers; sampler {sampler!r} draws from p_theta itself")
    if (given is None) != (fixed is None):
        raise ValueError("given and fixed come together: tokens and the mask of positions to keep")
    if generator is not None and seeds is not None:
        raise ValueError("pass generator (one stream for the batch) or seeds (one per row), not both")
    if seeds is not None and len(seeds) != num_samples:
        raise ValueError(f"seeds must hold one seed per sample: {len(seeds)} seeds for "
                         f"num_samples {num_samples}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not 0 <= value < V:
            raise ValueError(f"{name} must be a token id in [0, {V - 1}], got {value}")
    if pad_id is not None and eos_id is None:
        raise ValueError(f"pad_id ({pad_id}) pads after the first EOS: pass eos_id too")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if block_length is not None:
        if sampler in ("ancestral", "topp"):
            raise ValueError(f"block_length ({block_length}) applies to the confidence, margin, "
                             f"entropy and threshold samplers; sampler {sampler!r} unmasks by time")
        if not 1 <= block_length <= seq_len:
            raise ValueError(f"block_length must lie in [1, seq_len={seq_len}], got {block_length}")
        if steps < -(-seq_len // block_length):
            raise ValueError(f"steps ({steps}) must be at least the number of blocks, "
                             f"{-(-seq_len // block_length)} of block_length {block_length} in {seq_len}")


class _RowLogits:
    """The denoiser's logits at the positions `select` [N, L] (bool) of z_t: (rows [n], logits
    [n, V]), rows the flat indices into [N, L] in ascending order, the logits in the denoiser's
    dtype (bf16 under the bf16 precision's autocast).

    A model.Denoiser (anything with hidden(z, t) -> [N, L, D] and out(h [n, D]) -> [n, V]) runs
    its trunk over the whole sequence, which attention needs, and projects only the selected rows
    to V, in one call of `out` per trunk call: under ZeRO-3 that call gathers the output weight,
    so every rank makes the same calls whatever its data. Any other callable, and `full`, computes
    all [N, L, V] logits (the denoiser's forward) and takes the rows. `compile`: the trunk through
    torch.compile, at the fixed shape [N, L] (or [1, L] row by row), so the number of rows
    projected, which changes every step, never recompiles it.
    """

    def __init__(self, denoiser: LogitsFn, batch_invariant: bool, bf16: bool, full: bool,
                 compile: bool, device: torch.device):
        split = (not full and callable(getattr(denoiser, "hidden", None))
                 and callable(getattr(denoiser, "out", None)))
        self.trunk = denoiser.hidden if split else denoiser  # [N, L] -> [N, L, D] (split) or [N, L, V]
        if compile:
            self.trunk = torch.compile(self.trunk, dynamic=False)
        self.out = denoiser.out if split else None
        self.batch_invariant = batch_invariant
        self.cast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16
                     else nullcontext)

    def _rows(self, z, t, rows):  # rows(): the rows to project, asked for once the trunk is queued
        h = self.trunk(z, t).flatten(0, 1)  # [N L, D] or [N L, V]
        r = rows()
        return r, (h[r] if self.out is None else self.out(h[r]))

    def __call__(self, z: torch.Tensor, t: torch.Tensor, select: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.cast():
            if self.batch_invariant:  # one row at a time: the shapes of a row drawn alone
                parts = [self._rows(z[k:k + 1], t[k:k + 1], lambda k=k: select[k].nonzero()[:, 0])
                         for k in range(len(z))]
                return (torch.cat([r + k * z.shape[1] for k, (r, _) in enumerate(parts)]),
                        torch.cat([lg for _, lg in parts]))
            # the selected rows first, without a host sync; the count, read once the trunk is
            # queued, says where they end (as model.Denoiser.masked_stats)
            count = CountLater(select)
            rows = torch.nonzero_static(select.flatten(), size=select.numel(), fill_value=0)[:, 0]
            return self._rows(z, t, lambda: rows[:count()])


def _blocks(seq_len: int, block_length: int, steps: int) -> list[tuple[tuple[int, int], int]]:
    """The blocks decoded one after another, left to right, [(start, end), steps]: consecutive
    positions of `block_length` (the last may be shorter), the steps shared out evenly (the first
    blocks take the remainder)."""
    starts = range(0, seq_len, block_length)
    per, extra = divmod(steps, len(starts))
    return [((a, min(a + block_length, seq_len)), per + (k < extra)) for k, a in enumerate(starts)]


def _chunks(n: int) -> list[slice]:
    return [slice(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]


@torch.no_grad()
def generate(denoiser: LogitsFn, schedule: MaskingSchedule, num_samples: int, seq_len: int,
             steps: int, *, sampler: Sampler = "ancestral", top_p: float = 0.98,
             threshold: float = 0.9, temperature: float = 1.0,
             grid: Literal["uniform", "cosine"] = "cosine", given: torch.Tensor | None = None,
             fixed: torch.Tensor | None = None, generator: torch.Generator | None = None,
             seeds: Sequence[int] | None = None, batch_invariant: bool = False,
             eos_id: int | None = None, pad_id: int | None = None, device=None,
             precision: Precision = "auto", compile: bool = False,
             full_logits: bool = False, block_length: int | None = None) -> Generated:
    """Draw [num_samples, seq_len] int64 tokens in [0, V): no mask id remains.

    given [N, L] int64 and fixed [N, L] bool: positions where fixed is True start (and stay) as
    given's tokens; the rest are generated. `temperature` applies to the confidence-ordered and
    threshold samplers' candidates (0: the argmax). `eos_id`: after sampling, every generated
    position after a row's first generated EOS becomes `pad_id` (default: eos_id itself); the
    draws are untouched, so the tokens up to that EOS are those drawn without it. Deterministic
    for a seeded generator or given seeds.

    `precision`: "bf16" runs the denoiser under bf16 autocast, "fp32" as it is, "auto" bf16 on a
    CUDA device and fp32 elsewhere; the sampling arithmetic is float32 either way. `compile`:
    the denoiser's trunk through torch.compile. `full_logits`: project every position to V, as
    the denoiser's forward does, instead of only the rows a step can change (the reference the
    tests hold the default against; the draws are the same up to the rounding of the output
    layer's product for another number of rows).

    `block_length` (the confidence, margin, entropy and threshold samplers): semi-autoregressive
    decoding, as LLaDA's: the positions are cut into consecutive blocks of this many, decoded one
    after another from the left, each to the end with its share of `steps` (a block of given
    tokens only is skipped); the denoiser still sees the whole sequence, at the time whose masked
    fraction is the sequence's.
    """
    _check(schedule, num_samples, seq_len, steps, sampler, top_p, threshold, temperature, given,
           fixed, generator, seeds, eos_id, pad_id, precision, block_length)
    V = schedule.vocab_size
    shape = (num_samples, seq_len)
    z = torch.full(shape, V, dtype=torch.int64, device=device)
    if given is not None:
        check_tokens("given", given.to(z.device), shape, V - 1)
        if fixed.dtype != torch.bool or tuple(fixed.shape) != shape:
            raise ValueError(f"fixed must be a bool tensor of shape {shape}, got {fixed.dtype} "
                             f"{tuple(fixed.shape)}")
        z = torch.where(fixed.to(z.device), given.to(z.device), z)
    free = z == V  # [N, L]: the positions to generate
    uniforms = Uniforms(num_samples, seq_len, z.device, generator, seeds)
    dtype = torch.float32
    bf16 = precision == "bf16" or (precision == "auto" and z.device.type == "cuda")
    logits_at = _RowLogits(denoiser, batch_invariant, bf16, full_logits, compile, z.device)

    calls_per_row = torch.zeros(num_samples, dtype=torch.int64, device=z.device)
    calls = 0
    if sampler in ("ancestral", "topp"):
        times = time_grid(steps, grid)
        flat = z.view(-1)  # z changes in place through it
        # A masked position is unmasked from t to s with total probability sum_j p_j ratio_j <=
        # max_j ratio_j: where its uniform lies above that bound the draw leaves it masked
        # whatever the logits, so only the rows below are projected. The slack covers float32's
        # rounding in the softmax, top-p's renormalisation and the cumulative sum over V terms
        # (each under V * eps/2 relative), so the draws are exactly those of all masked rows.
        slack = 1.0 + 8 * V * torch.finfo(dtype).eps
        for i in range(steps):
            t, s = float(times[i]), float(times[i + 1])
            a_t = alpha_at(schedule, t, num_samples, z.device, dtype)
            a_s = alpha_at(schedule, s, num_samples, z.device, dtype)
            ratio = ((a_s - a_t) / (1.0 - a_t))[:, 0]  # [N, 1] or [N, V]: unmask as token j
            u = uniforms()  # [N, L]
            select = z == V
            if not full_logits:
                select &= u < ratio.amax(-1, keepdim=True) * slack
            rows, logits = logits_at(z, torch.full((num_samples,), t, device=z.device), select)
            choice, row_of = torch.empty_like(rows), rows // seq_len  # [n] each
            for c in _chunks(len(rows)):  # [c, V] float32 at a time
                probs = torch.softmax(logits[c], -1, dtype=dtype)
                if sampler == "topp":
                    probs = top_p_filter(probs, top_p)
                choice[c] = draw(probs * ratio[row_of[c]], u.view(-1)[rows[c]])  # V: stays masked
            flat[rows] = choice.clamp_(max=V)
        # Always, not only when a mask is left: a data-dependent branch would cost a host sync,
        # and under ZeRO-3 every rank must run the same forwards.
        rows, logits = logits_at(z, torch.zeros(num_samples, device=z.device), z == V)
        flat[rows] = logits.argmax(-1)
        calls = steps + 1
        calls_per_row += calls
    else:
        blocks = _blocks(seq_len, block_length or seq_len, steps)
        n_free = free.sum(-1).to(torch.float64)  # [N]
        for (a, b), block_steps in blocks:
            in_block = torch.zeros(seq_len, dtype=torch.bool, device=z.device)
            in_block[a:b] = True
            todo = free & in_block  # [N, L]: this block's positions to generate
            if len(blocks) > 1 and not todo.any():  # a block all given (a prefix): no call
                continue
            if a > 0:
                uniforms.restart(a)
            times = time_grid(block_steps, grid, device=z.device)
            # masks of the block left after each grid step, what the ancestral sampler leaves in
            # expectation; none after the last ([N, block_steps + 1])
            left = torch.round(todo.sum(-1, dtype=torch.float64)[:, None]
                               * masked_fraction(schedule, times)[None]).long()
            left[:, -1] = 0
            for i in range(block_steps):
                masked = z == V  # [N, L]
                active = masked & in_block  # the positions this step may unmask
                if sampler == "threshold" and not active.any():  # a host sync: calls depend on data
                    break
                if sampler == "threshold" or len(blocks) > 1:  # the time of the masks left
                    fraction = masked.sum(-1) / n_free.clamp(min=1)
                    t = time_at_fraction(schedule, fraction.to(torch.float64)).to(dtype)
                else:
                    t = torch.full((num_samples,), float(times[i]), device=z.device)
                u = uniforms()  # drawn at temperature 0 too: a row's stream is the same either way
                rows, logits = logits_at(z, t, active)
                # each active position's candidate and score; -inf elsewhere: never chosen
                candidate = torch.zeros(z.numel(), dtype=torch.int64, device=z.device)
                score = torch.full((z.numel(),), -math.inf, dtype=dtype, device=z.device)
                for c in _chunks(len(rows)):  # [c, V] float32 at a time
                    lg = logits[c] if temperature in (0, 1) else logits[c].to(dtype) / temperature
                    probs = torch.softmax(lg, -1, dtype=dtype)
                    cand = (draw(probs, u.view(-1)[rows[c]]).clamp_(max=V - 1) if temperature > 0
                            else probs.argmax(-1))
                    candidate[rows[c]] = cand
                    score[rows[c]] = scores(probs, cand,
                                             "confidence" if sampler == "threshold" else sampler)
                candidate, score = candidate.view(shape), score.view(shape)
                if sampler == "threshold":
                    best = torch.zeros_like(active).scatter_(-1, score.argmax(-1, keepdim=True), True)
                    chosen = active & ((score >= threshold) | best | (i == block_steps - 1))
                else:
                    k = active.sum(-1) - left[:, i + 1]  # [N]: how many to unmask now
                    order = score.sort(dim=-1, descending=True, stable=True).indices  # ties: leftmost
                    rank = torch.empty_like(order).scatter_(
                        -1, order, torch.arange(seq_len, device=z.device).expand(num_samples, -1))
                    chosen = active & (rank < k[:, None])
                calls_per_row += active.any(-1)
                calls += 1
                z = torch.where(chosen, candidate, z)
    if eos_id is not None:
        eos = (z == eos_id) & free
        after = (eos.cumsum(-1) - eos.long()) > 0  # strictly after the first generated EOS
        z = torch.where(after & free, eos_id if pad_id is None else pad_id, z)
    return Generated(z, calls, calls_per_row)


def sample(denoiser: LogitsFn, schedule: MaskingSchedule, num_samples: int, seq_len: int,
           steps: int, **options) -> torch.Tensor:
    """`generate(...).tokens`: [num_samples, seq_len] int64; the same arguments."""
    return generate(denoiser, schedule, num_samples, seq_len, steps, **options).tokens
