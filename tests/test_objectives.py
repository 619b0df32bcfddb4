"""Objectives: Monte Carlo checks of the NELBO and of the RLOO gradient, forward process, times."""

import itertools
import math

import pytest
import torch

from md4_dist.diffusion import losses
from md4_dist.diffusion.forward import discretize_time, forward_sample, sample_times
from md4_dist.diffusion.objectives import (DiffusionConfig, build_schedule, genmd4_objective,
                                           md4_objective, objective)
from md4_dist.diffusion.schedules import build
from md4_dist.model import Denoiser, ModelConfig

import full_logits

TINY = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, time_dim=16)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_uniform_logits_nelbo_is_L_log_V(name):
    """The zero-initialised denoiser predicts uniformly: E[NELBO] = L log V (1 - eps)."""
    torch.manual_seed(0)
    V, L, B = TINY.vocab_size, 16, 4096
    den = Denoiser(TINY)
    sched = build(name, vocab_size=V)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, L), generator=g)
    with torch.no_grad():
        # i.i.d. times (not antithetic), so the sample standard error is valid
        nelbo = torch.cat([md4_objective(den, sched, x, generator=g, antithetic=False).nelbo
                           for _ in range(4)]).double()
    mean, se = nelbo.mean().item(), nelbo.std().item() / math.sqrt(len(nelbo))
    want = L * math.log(V) * (1 - 1e-4)
    print(f"{name}: NELBO {mean:.3f} +- {se:.3f}, L log V = {want:.3f}")
    assert abs(mean - want) < 4 * se
    assert se < 0.02 * want  # the check has power


def test_md4_discrete_objective_uses_grid_times():
    V = TINY.vocab_size
    den = Denoiser(TINY)
    out = md4_objective(den, build("linear", vocab_size=V), torch.randint(0, V, (8, 12)),
                        generator=torch.Generator().manual_seed(0), timesteps=20)
    assert out.loss.shape == () and out.nelbo.shape == (8,) and torch.isfinite(out.nelbo).all()
    assert out.bits_per_token == pytest.approx(out.nelbo.mean() / (12 * math.log(2)))


def test_genmd4_objective_runs_both_masks_as_one_batch():
    V, B, L = TINY.vocab_size, 4, 10
    den = Denoiser(TINY)
    sched = build("learnable_poly", vocab_size=V)
    seen = []

    def spy(zt, t):
        seen.append(tuple(zt.shape))
        return den(zt, t)

    out = genmd4_objective(full_logits.FullLogits(spy), sched, torch.randint(0, V, (B, L)),
                           generator=torch.Generator().manual_seed(0))
    assert seen == [(2 * B, L)]
    out.loss.backward()
    assert sched.phi.grad is not None and torch.isfinite(sched.phi.grad).all()
    assert out.stats["exponent_min"] == pytest.approx(1.0) == out.stats["exponent_max"]


def test_genmd4_with_equal_exponents_matches_md4_poly_objective():
    """Same seed, same times and masks (t in [t1, 1] on both sides): the NELBOs agree to eps."""
    V, B, L = TINY.vocab_size, 64, 10
    torch.manual_seed(0)
    den = Denoiser(TINY)
    with torch.no_grad():
        for p in den.parameters():
            p.normal_(0, 0.3)  # a non-trivial denoiser
    x = torch.randint(0, V, (B, L))
    gen = build("learnable_poly", vocab_size=V, power_init=1.0).double()
    md4 = build("poly1", vocab_size=V)
    t = torch.linspace(0.3, 1.0, B, dtype=torch.float64)
    zt = forward_sample(x, t, md4, torch.Generator().manual_seed(2))
    logits = den(zt, t.float()).double()
    a = full_logits.genmd4_diffusion_loss(logits, x, zt, t, gen)
    b = full_logits.md4_diffusion_loss(logits, x, zt, t, md4)
    torch.testing.assert_close(a, b, rtol=5e-4, atol=0)


def test_forward_sample_keeps_with_alpha():
    V = 7
    sched = build("learnable_poly", vocab_size=V).double()
    with torch.no_grad():
        sched.phi.copy_(torch.linspace(-2, 2, V, dtype=torch.float64))
    x = torch.arange(V).repeat(20000, 1)  # each token in each column
    t = torch.full((20000,), 0.5, dtype=torch.float64)
    zt = forward_sample(x, t, sched, torch.Generator().manual_seed(0))
    assert ((zt == x) | (zt == V)).all()
    kept = (zt == x).double().mean(0)
    want = sched.alpha(torch.tensor(0.5, dtype=torch.float64))
    assert (kept - want).abs().max() < 4 * math.sqrt(0.25 / 20000)


def test_sample_times():
    t = sample_times(8, torch.Generator().manual_seed(0))
    assert t.shape == (8,) and (t > 0).all() and (t <= 1).all()
    gaps = torch.sort(t).values.diff()
    torch.testing.assert_close(gaps, torch.full((7,), 1 / 8), rtol=0, atol=1e-6)  # antithetic
    td = discretize_time(torch.tensor([1e-9, 0.1, 0.1001, 0.5, 1.0], dtype=torch.float64), 10)
    torch.testing.assert_close(td, torch.tensor([0.1, 0.1, 0.2, 0.5, 1.0], dtype=torch.float64))


def test_rloo_gradient_matches_exact_gradient():
    """On V = 3, L = 2 every mask can be enumerated: d/dphi sum_z q_phi(z | x) loss_phi(z) is
    exact, and the mean gradient of the RLOO surrogate must match it within Monte Carlo error.
    Without the RLOO term (pathwise part only) it must not."""
    V, L = 3, 2
    x0 = torch.tensor([[0, 2]])
    t0 = 0.45
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(L, V + 1, L, V, generator=gen, dtype=torch.float64)  # fixed "denoiser"

    def logits_of(zt):  # [B, L] -> [B, L, V]: depends on every position's token
        return sum(table[n][zt[:, n]] for n in range(L))

    sched = build("learnable_poly", vocab_size=V).double()
    with torch.no_grad():
        sched.phi.copy_(torch.tensor([-0.4, 0.3, 1.1], dtype=torch.float64))

    # exact: enumerate the 2^L masks
    exact_obj = 0.0
    for m in itertools.product([False, True], repeat=L):
        mask = torch.tensor([m])
        zt = torch.where(mask, torch.full_like(x0, V), x0)
        t = torch.tensor([t0], dtype=torch.float64)
        log_q = losses.genmd4_log_q(x0, zt, t, sched)
        loss = full_logits.genmd4_diffusion_loss(logits_of(zt), x0, zt, t, sched)
        exact_obj = exact_obj + log_q.exp() * loss
    (exact,) = torch.autograd.grad(exact_obj.sum(), sched.phi)

    def chunk_grads(with_rloo: bool, chunks=24, n=8192):
        grads = []
        g = torch.Generator().manual_seed(7)
        for _ in range(chunks):
            x = x0.expand(n, L)
            t = torch.full((n,), t0, dtype=torch.float64)
            z1, z2 = forward_sample(x, t, sched, g), forward_sample(x, t, sched, g)
            l1 = full_logits.genmd4_diffusion_loss(logits_of(z1), x, z1, t, sched)
            l2 = full_logits.genmd4_diffusion_loss(logits_of(z2), x, z2, t, sched)
            surrogate = 0.5 * (l1 + l2)
            if with_rloo:
                surrogate = surrogate + losses.genmd4_rloo_term(x, z1, z2, t, sched, l1, l2)
            grads.append(torch.autograd.grad(surrogate.mean(), sched.phi)[0])
        grads = torch.stack(grads)
        return grads.mean(0), grads.std(0) / math.sqrt(chunks)

    mc, se = chunk_grads(True)
    print("exact", exact.tolist(), "rloo", mc.tolist(), "se", se.tolist())
    assert ((mc - exact).abs() < 4 * se + 1e-9).all()
    pathwise, se_p = chunk_grads(False)
    assert ((pathwise - exact).abs() > 4 * se_p).any(), "the score-function part must matter"


def test_objective_dispatch_and_config_validation():
    V = TINY.vocab_size
    den = Denoiser(TINY)
    x = torch.randint(0, V, (4, 8))
    for cfg in [DiffusionConfig(kind="md4", schedule="cosine"),
                DiffusionConfig(kind="genmd4", schedule="learnable_poly", power_init=2.0)]:
        sched = build_schedule(cfg, V)
        out = objective(cfg, den, sched, x, torch.Generator().manual_seed(0))
        assert torch.isfinite(out.loss)
        assert ("exponent_mean" in out.stats) == (cfg.kind == "genmd4")
    with pytest.raises(ValueError, match="learnable_poly"):
        DiffusionConfig(kind="genmd4", schedule="linear")
    with pytest.raises(ValueError, match="'quadratic'"):
        DiffusionConfig(kind="md4", schedule="quadratic")
    with pytest.raises(ValueError, match="timesteps"):
        DiffusionConfig(kind="genmd4", schedule="learnable_poly", timesteps=10)


def test_objective_rejects_out_of_range_tokens():
    V = TINY.vocab_size
    den = Denoiser(TINY)
    with pytest.raises(ValueError, match="^x "):
        md4_objective(den, build("linear", vocab_size=V), torch.full((2, 4), V))
    with pytest.raises(ValueError, match="vocab_size"):
        md4_objective(den, build("linear"), torch.zeros(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("kind,schedule", [("md4", "cosine"), ("genmd4", "learnable_poly")])
def test_noise_by_rows_makes_the_split_irrelevant(kind, schedule):
    """One Noise for the whole batch, handed out by row (as ranks and micro-batches get it): each
    sequence's NELBO and the mean gradient are those of the unsplit batch."""
    torch.manual_seed(0)
    cfg = DiffusionConfig(kind=kind, schedule=schedule)
    den = Denoiser(TINY)
    with torch.no_grad():
        for p in den.parameters():
            p.add_(0.1 * torch.randn_like(p))  # the zero-initialised output layer would hide rows
    sched = build_schedule(cfg, TINY.vocab_size)
    g = torch.Generator().manual_seed(1)
    B, L = 8, 12
    x = torch.randint(0, TINY.vocab_size, (B, L), generator=g)
    from md4_dist.diffusion.forward import draw_noise
    from md4_dist.diffusion.objectives import masks_per_sequence

    noise = draw_noise(B, L, masks_per_sequence(cfg), g)
    params = list(den.parameters()) + list(sched.parameters())
    whole = objective(cfg, den, sched, x, noise=noise)
    grads_whole = torch.autograd.grad(whole.loss, params)
    nelbo = torch.empty(B)
    grads_split = [torch.zeros_like(p) for p in params]
    for rank in range(2):  # rank r's rows: r, r + 2, ...; each a micro-batch of B / 2
        rows = torch.arange(rank, B, 2)
        part = objective(cfg, den, sched, x[rows], noise=noise.rows(rows))
        nelbo[rows] = part.nelbo
        for acc, gr in zip(grads_split, torch.autograd.grad(part.loss / 2, params)):
            acc += gr
    torch.testing.assert_close(nelbo, whole.nelbo, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_split, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(gr.abs().sum() > 0 for gr in grads_whole)
    with pytest.raises(ValueError, match="noise has t"):
        objective(cfg, den, sched, x[:4], noise=noise)


@pytest.mark.parametrize("kind,schedule", [("md4", "cosine"), ("genmd4", "learnable_poly")])
def test_masked_rows_path_equals_full_logits_path(kind, schedule, monkeypatch):
    """Our denoiser's loss path (the output layer at the masked rows only, a few rows at a time,
    `Denoiser.masked_stats`) gives the loss, the NELBO and every gradient of the plain path
    through logits [B, L, V], in float64, across chunk boundaries."""
    from md4_dist import output_head
    from md4_dist.diffusion.forward import draw_noise

    monkeypatch.setattr(output_head, "CHUNK", 7)  # many chunks, a short last one
    torch.manual_seed(0)
    cfg = DiffusionConfig(kind=kind, schedule=schedule)
    den = Denoiser(TINY).double()
    sched = build_schedule(cfg, TINY.vocab_size).double()
    with torch.no_grad():
        for p in [*den.parameters(), *sched.parameters()]:
            p.normal_(0, 0.3)  # the zero-initialised layers too
    B, L = 4, 10
    x = torch.randint(0, TINY.vocab_size, (B, L))
    noise = draw_noise(B, L, 2 if kind == "genmd4" else 1, torch.Generator().manual_seed(1), "cpu", True)
    params = [*den.parameters(), *sched.parameters()]

    fused = objective(cfg, den, sched, x, noise=noise)
    plain = objective(cfg, full_logits.FullLogits(den), sched, x, noise=noise)  # logits [B, L, V]
    torch.testing.assert_close(fused.nelbo, plain.nelbo, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused.loss, params), torch.autograd.grad(plain.loss, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compiled_head_kernels_equal_eager():
    """The output layer's reductions fused by torch.compile (what train.compile runs) give the
    eager ones' values and logit gradients, at two row counts (the graph is dynamic in rows)."""
    from md4_dist.output_head import HeadKernels, padded_vocab

    eager, fused = HeadKernels(), HeadKernels(compiled=True)
    V = 50
    g = torch.Generator().manual_seed(0)
    w = torch.rand(V, generator=g) + 0.5
    for n in (37, 91):
        logits = torch.randn(n, padded_vocab(V), generator=g) * 3
        x = torch.randint(0, V, (n,), generator=g)
        ups = [torch.randn(n, generator=g) for _ in range(3)]
        for ww in (None, w):
            want, got = eager.reduce(logits, x, ww, V), fused.reduce(logits, x, ww, V)
            for a, b in zip(want, got):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            ew = want[2] if ww is not None else torch.zeros(n)
            want = eager.grad(logits, x, ww, want[0], ew, *ups, V)
            got = fused.grad(logits, x, ww, got[0], ew, *ups, V)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
            assert got[0][:, V:].abs().max() == 0  # the padding columns
            if ww is not None:
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
