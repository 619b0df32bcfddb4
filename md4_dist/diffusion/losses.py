"""MD4 and GenMD4 loss terms as pure functions of tensors (nats per sequence).

The diffusion terms read what the denoiser gives at the masked positions of z_t
(`model.Denoiser.masked_stats`), never logits [B, L, V]: log p(x_n | z_t) [B, L] and, for GenMD4,
sum_j w_j p_j(. | z_t) [B, L]. x [B, L] int64 in [0, V), zt [B, L] int64 with mask id V, t [B].
Results are computed in the promoted dtype of the inputs and float32 (float64 in, float64 out;
bf16 in gives float32). The formulas are those of docs/math.md, checked against the official
md4.py / genmd4.py.
"""

from __future__ import annotations

import math

import torch

from md4_dist.diffusion import checks
from md4_dist.diffusion.schedules import LearnablePolySchedule, MD4Schedule


def _dtype(*tensors: torch.Tensor) -> torch.dtype:
    out = torch.float32
    for x in tensors:
        out = torch.promote_types(out, x.dtype)
    return out


def md4_diffusion_loss_at(log_p_x, masked, t, schedule: MD4Schedule, timesteps: int | None = None):
    """MD4 diffusion term from log p(x_n | z_t) [B, L], read where `masked` [B, L] is True: [B].

    Continuous time (timesteps None): weight(t) * sum_{n masked} log p(x_n | z_t).
    Discrete time with T steps: t must lie on the grid k / T (k = 1..T, see
    `forward.discretize_time`); with s = t - 1/T and gamma = log(alpha / (1 - alpha)) the weight is
    T * expm1(gamma_t - gamma_s) * alpha_s.
    """
    if not isinstance(schedule, MD4Schedule):
        raise ValueError(f"md4_diffusion_loss_at needs an MD4 schedule, got {type(schedule).__name__}")
    dtype = _dtype(log_p_x, t)
    t = t.to(dtype)
    masked_log_p = (log_p_x.to(dtype) * masked).sum(-1)  # [B], <= 0
    if timesteps is None:
        return schedule.weight(t) * masked_log_p
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive int or None, got {timesteps!r}")
    k = t * timesteps
    if checks._VALUE_CHECKS and not torch.allclose(k, torch.round(k), atol=1e-4):
        raise ValueError(f"t must lie on the grid k / {timesteps} for discrete time; "
                         "use forward.discretize_time")
    s = t - 1.0 / timesteps
    weight = timesteps * torch.expm1(schedule.log_snr(t) - schedule.log_snr(s)) * schedule.alpha(s)
    return weight * masked_log_p


def md4_recon_loss(schedule: MD4Schedule, seq_len: int, vocab_size: int) -> torch.Tensor:
    """Reconstruction term L (1 - alpha(0)) log V: a float64 scalar."""
    if not isinstance(schedule, MD4Schedule):
        raise ValueError(f"md4_recon_loss needs an MD4 schedule, got {type(schedule).__name__}")
    if seq_len < 1 or vocab_size < 2:
        raise ValueError(f"need seq_len >= 1 and vocab_size >= 2, got {seq_len}, {vocab_size}")
    alpha0 = schedule.alpha(torch.zeros((), dtype=torch.float64))
    return seq_len * (1.0 - alpha0) * math.log(vocab_size)


def genmd4_diffusion_loss_at(log_p_x, expected_w, x, masked, t, schedule: LearnablePolySchedule):
    """GenMD4 diffusion term from log p(x_n | z_t) and sum_j w_j p_j(. | z_t), each [B, L] and read
    where `masked` [B, L] is True: [B].

    At each masked position n: (w_{x_n} / t) (-log p(x_n) - 1) + sum_j (w_j / t) p_j, summed.
    """
    if not isinstance(schedule, LearnablePolySchedule):
        raise ValueError(f"genmd4_diffusion_loss_at needs a learnable_poly schedule, got "
                         f"{type(schedule).__name__}")
    dtype = _dtype(log_p_x, expected_w, t)
    w = schedule.exponents(dtype)  # [V]
    integrand = w[x] * (-log_p_x.to(dtype) - 1.0) + expected_w.to(dtype)  # [B, L]
    return (integrand * masked).sum(-1) / t.to(dtype)


def genmd4_recon_loss(x, schedule: LearnablePolySchedule, t1: float):
    """GenMD4 reconstruction term at t1 (official genmd4.py `recon_loss`): [B].

    -(1 - eps) sum_n t1^{w_{x_n}} (w_{x_n} log t1 - logsumexp_j(w_j log t1)).
    """
    if not isinstance(schedule, LearnablePolySchedule):
        raise ValueError(f"genmd4_recon_loss needs a learnable_poly schedule, got {type(schedule).__name__}")
    checks.tokens("x", x, None, schedule.vocab_size - 1)
    if not 0 < t1 < 1:
        raise ValueError(f"t1 must lie in (0, 1), got {t1}")
    w = schedule.exponents()  # [V]
    w_log_t = w * math.log(t1)
    w_log_t_x = w_log_t[x]  # [B, L]
    per_pos = -(1.0 - schedule.eps) * torch.exp(w_log_t_x) * (w_log_t_x - torch.logsumexp(w_log_t, 0))
    return per_pos.sum(-1)


def genmd4_log_q(x, zt, t, schedule: LearnablePolySchedule):
    """log q(z_t | x) = sum_n [masked: log(1 - eps) + w_{x_n} log t; kept: log alpha_t(x_n)]: [B]."""
    dtype = _dtype(t)
    w_log_t = schedule.exponents(dtype)[x] * torch.log(t.to(dtype))[:, None]  # [B, L]
    log_masked = math.log1p(-schedule.eps) + w_log_t
    log_kept = torch.log1p(-(1.0 - schedule.eps) * torch.exp(w_log_t))
    return torch.where(zt == schedule.vocab_size, log_masked, log_kept).sum(-1)


def genmd4_rloo_term(x, zt1, zt2, t, schedule: LearnablePolySchedule, loss1, loss2):
    """REINFORCE with a leave-one-out baseline for the exponents: [B].

    0.5 * stopgrad(L1 - L2) * (log q(z1 | x) - log q(z2 | x)); its value is zero-mean noise, its
    gradient the score-function part of d E[loss] / d phi.
    """
    if not isinstance(schedule, LearnablePolySchedule):
        raise ValueError(f"genmd4_rloo_term needs a learnable_poly schedule, got {type(schedule).__name__}")
    V = schedule.vocab_size
    checks.tokens("x", x, None, V - 1)
    B = x.shape[0]
    checks.masked_copy("zt1", zt1, x, V)
    checks.masked_copy("zt2", zt2, x, V)
    checks.times("t", t, B)
    checks.per_sequence("loss1", loss1, B)
    checks.per_sequence("loss2", loss2, B)
    log_q1 = genmd4_log_q(x, zt1, t, schedule)
    log_q2 = genmd4_log_q(x, zt2, t, schedule)
    return 0.5 * (loss1 - loss2).detach() * (log_q1 - log_q2)
