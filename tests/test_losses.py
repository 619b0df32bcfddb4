"""The loss terms, fed from full logits (full_logits.py), against an independent float64
implementation written from docs/math.md.

The reference below loops over sequences and positions in numpy, so that it shares no code (and
no vectorisation trick) with md4_dist.diffusion.losses.
"""

import math

import numpy as np
import pytest
import torch

from md4_dist.diffusion import losses
from md4_dist.diffusion.forward import discretize_time, forward_sample
from md4_dist.diffusion.schedules import build

import full_logits

EPS = 1e-4


# ---- reference, from docs/math.md --------------------------------------------------------------
def ref_alpha(name, t):
    if name == "linear":
        a = 1 - t
    elif name == "cosine":
        a = 1 - math.cos(math.pi / 2 * (1 - t))
    else:
        a = 1 - t ** float(name[4:])
    return (1 - 2 * EPS) * a + EPS


def ref_dalpha(name, t):
    if name == "linear":
        d = -1.0
    elif name == "cosine":
        d = -math.pi / 2 * math.sin(math.pi / 2 * (1 - t))
    else:
        k = float(name[4:])
        d = -k * t ** (k - 1)
    return (1 - 2 * EPS) * d


def ref_log_softmax(row):
    m = max(row)
    return [v - m - math.log(sum(math.exp(u - m) for u in row)) for v in row]


def ref_md4(name, logits, x, zt, t, T=None):
    V = logits.shape[-1]
    out = []
    for b in range(x.shape[0]):
        s = sum(ref_log_softmax(logits[b, n])[x[b, n]] for n in range(x.shape[1]) if zt[b, n] == V)
        tb = t[b]
        if T is None:
            w = ref_dalpha(name, tb) / (1 - ref_alpha(name, tb))
        else:
            sb = tb - 1 / T
            g = lambda u: math.log(ref_alpha(name, u) / (1 - ref_alpha(name, u)))  # noqa: E731
            w = T * math.expm1(g(tb) - g(sb)) * ref_alpha(name, sb)
        out.append(w * s)
    return np.array(out)


def ref_exponents(phi):
    return [math.log1p(math.exp(p)) for p in phi]


def ref_genmd4(phi, logits, x, zt, t):
    V = logits.shape[-1]
    w = ref_exponents(phi)
    out = []
    for b in range(x.shape[0]):
        total = 0.0
        for n in range(x.shape[1]):
            if zt[b, n] != V:
                continue
            lp = ref_log_softmax(logits[b, n])
            p = [math.exp(v) for v in lp]
            xn = x[b, n]
            total += (w[xn] / t[b]) * (-lp[xn] - 1) + sum(w[j] / t[b] * p[j] for j in range(V))
        out.append(total)
    return np.array(out)


def ref_genmd4_recon(phi, x, t1):
    w = ref_exponents(phi)
    lse = math.log(sum(t1 ** wj for wj in w))
    return np.array([sum(-(1 - EPS) * t1 ** w[xn] * (w[xn] * math.log(t1) - lse) for xn in row)
                     for row in x])


def ref_log_q(phi, x, zt, t):
    w = ref_exponents(phi)
    V = len(phi)
    out = []
    for b in range(x.shape[0]):
        s = 0.0
        for n in range(x.shape[1]):
            wx = w[x[b, n]]
            if zt[b, n] == V:
                s += math.log(1 - EPS) + wx * math.log(t[b])
            else:
                s += math.log(1 - (1 - EPS) * t[b] ** wx)
        out.append(s)
    return np.array(out)


# ---- fixtures ----------------------------------------------------------------------------------
B, L, V = 6, 9, 7


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    x = torch.randint(0, V, (B, L), generator=g)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.98 + 0.01
    mask = torch.rand(B, L, generator=g) < 0.5
    zt = torch.where(mask, torch.full_like(x, V), x)
    return logits, x, zt, t


@pytest.mark.parametrize("name", ["linear", "cosine", "poly3", "poly0.5"])
def test_md4_continuous_matches_reference(batch, name):
    logits, x, zt, t = batch
    got = full_logits.md4_diffusion_loss(logits, x, zt, t, build(name))
    assert got.dtype == torch.float64 and got.shape == (B,)
    want = ref_md4(name, logits.numpy(), x.numpy(), zt.numpy(), t.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    assert (got >= 0).all()


@pytest.mark.parametrize("name", ["linear", "cosine", "poly2"])
def test_md4_discrete_matches_reference(batch, name):
    logits, x, zt, t = batch
    T = 10
    td = discretize_time(t, T)
    got = full_logits.md4_diffusion_loss(logits, x, zt, td, build(name), timesteps=T)
    want = ref_md4(name, logits.numpy(), x.numpy(), zt.numpy(), td.numpy(), T=T)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_md4_discrete_approaches_continuous(batch):
    logits, x, zt, t = batch
    sched = build("cosine")
    td = discretize_time(t, 100000)
    cont = full_logits.md4_diffusion_loss(logits, x, zt, td, sched)
    disc = full_logits.md4_diffusion_loss(logits, x, zt, td, sched, timesteps=100000)
    np.testing.assert_allclose(disc.numpy(), cont.numpy(), rtol=1e-3)


def test_md4_recon_matches_reference():
    for name in ["linear", "cosine", "poly3"]:
        got = losses.md4_recon_loss(build(name), 1024, 50257)
        want = 1024 * (1 - ref_alpha(name, 0.0)) * math.log(50257)
        assert got.dtype == torch.float64
        assert float(got) == pytest.approx(want, rel=1e-12)


def learnable(phi):
    sched = build("learnable_poly", vocab_size=len(phi)).double()
    with torch.no_grad():
        sched.phi.copy_(torch.tensor(phi, dtype=torch.float64))
    return sched


PHI = [-1.0, -0.2, 0.0, 0.3, 0.9, 1.7, 2.5]


def test_genmd4_diffusion_matches_reference(batch):
    logits, x, zt, t = batch
    got = full_logits.genmd4_diffusion_loss(logits, x, zt, t, learnable(PHI))
    assert got.dtype == torch.float64 and got.shape == (B,)
    want = ref_genmd4(PHI, logits.numpy(), x.numpy(), zt.numpy(), t.numpy())
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)


def test_genmd4_recon_matches_reference(batch):
    _, x, _, _ = batch
    got = losses.genmd4_recon_loss(x, learnable(PHI), 1e-3)
    assert got.dtype == torch.float64 and got.shape == (B,)
    np.testing.assert_allclose(got.detach().numpy(), ref_genmd4_recon(PHI, x.numpy(), 1e-3), rtol=1e-10)


def test_genmd4_rloo_matches_reference(batch):
    logits, x, zt1, t = batch
    sched = learnable(PHI)
    zt2 = forward_sample(x, t, sched, torch.Generator().manual_seed(1))
    l1 = full_logits.genmd4_diffusion_loss(logits, x, zt1, t, sched)
    l2 = full_logits.genmd4_diffusion_loss(logits, x, zt2, t, sched)
    got = losses.genmd4_rloo_term(x, zt1, zt2, t, sched, l1, l2)
    assert got.dtype == torch.float64 and got.shape == (B,)
    lq1 = ref_log_q(PHI, x.numpy(), zt1.numpy(), t.numpy())
    lq2 = ref_log_q(PHI, x.numpy(), zt2.numpy(), t.numpy())
    want = 0.5 * (l1 - l2).detach().numpy() * (lq1 - lq2)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-12)
    # The baseline term carries no gradient through the losses, only through log q.
    got.sum().backward()
    assert sched.phi.grad is not None and sched.phi.grad.abs().sum() > 0


def test_genmd4_with_equal_exponents_equals_md4_poly(batch):
    """With every exponent k, GenMD4's loss is MD4's polyK loss up to the two eps conventions:
    MD4 weight = -(k / t) / (1 + eps / ((1 - 2 eps) t^k)), GenMD4 weight = -k / t."""
    logits, x, zt, t = batch
    k = 2.0
    t = t * 0.5 + 0.5  # t >= 0.5, so the eps conventions differ by <= eps / t^k = 4e-4
    gen = build("learnable_poly", vocab_size=V, power_init=k).double()
    got = full_logits.genmd4_diffusion_loss(logits, x, zt, t, gen)
    md4 = full_logits.md4_diffusion_loss(logits, x, zt, t, build("poly2"))
    bound = EPS / ((1 - 2 * EPS) * t ** k)
    assert ((got / md4 - 1).abs() <= bound * 1.01 + 1e-12).all()


def test_bf16_logits_compute_in_float32(batch):
    logits, x, zt, t = batch
    got = full_logits.md4_diffusion_loss(logits.bfloat16(), x, zt, t.float(), build("linear"))
    assert got.dtype == torch.float32
    want = full_logits.md4_diffusion_loss(logits.bfloat16().double(), x, zt, t, build("linear"))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_input_names_the_argument(batch):
    logits, x, zt, t = batch
    sched = build("linear")
    f = full_logits.md4_diffusion_loss
    cases = [
        ((logits[:, :-1], x, zt, t), "logits"),  # wrong L
        ((logits.unsqueeze(0), x, zt, t), "logits"),
        ((logits.long(), x, zt, t), "logits"),
        ((logits, x.int(), zt, t), "x"),  # wrong dtype
        ((logits, x.float(), zt, t), "x"),
        ((logits, x + V, zt, t), "x"),  # ids out of range
        ((logits, x - 1, zt, t), "x"),
        ((logits, x, zt[:, :-1], t), "zt"),
        ((logits, x, (zt + 1).clamp(max=V + 1), t), "zt"),
        ((logits, x, zt, t[:-1]), "t"),  # would broadcast
        ((logits, x, zt, t[:, None]), "t"),
        ((logits, x, zt, t.long()), "t"),
        ((logits, x, zt, t * 0), "t"),  # t = 0
        ((logits, x, zt, t + 1), "t"),  # t > 1
        ((logits, x, zt, torch.where(torch.arange(B) == 2, float("nan"), t)), "t"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=rf"^{name} "):
            f(*args, sched)
    with pytest.raises(ValueError, match="grid"):
        f(logits, x, zt, t, sched, timesteps=10)
    with pytest.raises(ValueError, match="MD4 schedule"):
        f(logits, x, zt, t, build("learnable_poly", vocab_size=V))
    with pytest.raises(ValueError, match="learnable_poly"):
        full_logits.genmd4_diffusion_loss(logits, x, zt, t, sched)
    with pytest.raises(ValueError, match="vocab_size"):
        full_logits.genmd4_diffusion_loss(logits, x, zt, t, build("learnable_poly", vocab_size=V + 1))
    gen = learnable(PHI)
    l1 = full_logits.genmd4_diffusion_loss(logits, x, zt, t, gen)
    with pytest.raises(ValueError, match="^loss2 "):
        losses.genmd4_rloo_term(x, zt, zt, t, gen, l1, l1[:-1])
    with pytest.raises(ValueError, match="^t1 "):
        losses.genmd4_recon_loss(x, gen, 0.0)
