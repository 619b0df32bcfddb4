"""Samplers driven by an exact denoiser for a known distribution over short sequences."""

import itertools
import math

import pytest
import torch

from md4_dist.diffusion.schedules import build
from md4_dist.model import Denoiser, ModelConfig
from md4_dist.sampling import sample, time_grid, top_p_filter

V, L = 3, 3
SEQS = torch.tensor(list(itertools.product(range(V), repeat=L)))  # [27, L]


def target():
    g = torch.Generator().manual_seed(3)
    w = torch.rand(len(SEQS), generator=g, dtype=torch.float64) + 0.2  # correlated, all > 0
    return w / w.sum()


def exact_denoiser(p, schedule):
    """p_theta(x_n = j | z_t) for the true distribution p over SEQS.

    Posterior over sequences consistent with z_t, weighted by the probability that the masked
    positions were masked: prod_{masked n} (1 - alpha_t(x_n)), which for a scalar schedule is a
    constant and for GenMD4's state-dependent one is not."""
    def den(zt, t):
        consistent = ((zt[:, None, :] == SEQS[None]) | (zt[:, None, :] == V)).all(-1)  # [N, 27]
        post = p[None] * consistent
        if schedule.state_dependent:
            one_minus_alpha = 1 - schedule.alpha(t.double())  # [N, V]
            per_pos = one_minus_alpha[:, None, :].expand(-1, len(SEQS), -1).gather(
                2, SEQS[None].expand(len(zt), -1, -1))  # [N, 27, L]
            post = post * torch.where(zt[:, None, :] == V, per_pos, 1.0).prod(-1)
        post = post / post.sum(-1, keepdim=True)
        onehot = torch.nn.functional.one_hot(SEQS, V).double()  # [27, L, V]
        marg = torch.einsum("ns,slv->nlv", post, onehot)
        return torch.log(marg.clamp_min(1e-300))
    return den


def chi_square(samples, p):
    idx = (samples * torch.tensor([V * V, V, 1])).sum(-1)
    counts = torch.bincount(idx, minlength=len(p)).double()
    expected = p * len(samples)
    return ((counts - expected) ** 2 / expected).sum().item()


# chi-square with 26 degrees of freedom: P(X > 60) < 1e-4
CRIT_26 = 60.0


@pytest.mark.parametrize("schedule_name,grid", [("linear", "uniform"), ("cosine", "cosine"),
                                                ("learnable_poly", "cosine")])
def test_frequencies_match_the_distribution(schedule_name, grid):
    p = target()
    sched = build(schedule_name, vocab_size=V)
    if schedule_name == "learnable_poly":
        with torch.no_grad():
            sched.phi.copy_(torch.tensor([-1.0, 0.5, 2.0]))  # exponents 0.31, 0.97, 2.13
    den = exact_denoiser(p, sched)
    g = torch.Generator().manual_seed(0)
    out = sample(den, sched, 20000, L, steps=200, grid=grid, generator=g)
    assert out.dtype == torch.int64 and (out < V).all() and (out >= 0).all()
    stat = chi_square(out, p)
    print(f"{schedule_name}/{grid}: chi2 = {stat:.1f} (26 dof)")
    assert stat < CRIT_26
    # With one step every token is drawn from its marginal independently: the test must see it.
    one_step = sample(den, sched, 20000, L, steps=1, grid=grid, generator=g)
    assert chi_square(one_step, p) > 5 * CRIT_26


def test_prefix_is_kept_and_conditional_matches():
    p = target()
    sched = build("linear", vocab_size=V)
    den = exact_denoiser(p, sched)
    n = 20000
    given = torch.zeros(n, L, dtype=torch.int64)
    given[:, 0] = 2
    fixed = torch.zeros(n, L, dtype=torch.bool)
    fixed[:, 0] = True
    out = sample(den, sched, n, L, steps=200, given=given, fixed=fixed,
                 generator=torch.Generator().manual_seed(1))
    assert (out[:, 0] == 2).all() and (out < V).all()
    cond = p * (SEQS[:, 0] == 2)
    cond = cond / cond.sum()
    idx = (out * torch.tensor([V * V, V, 1])).sum(-1)
    counts = torch.bincount(idx, minlength=len(p)).double()
    keep = cond > 0
    stat = (((counts - cond * n) ** 2)[keep] / (cond * n)[keep]).sum().item()
    assert stat < 30.0  # 8 dof: P(X > 30) < 3e-4
    assert counts[~keep].sum() == 0


def test_infilling_keeps_fixed_positions_with_a_real_denoiser():
    cfg = ModelConfig(vocab_size=17, dim=32, n_layers=2, n_heads=4, time_dim=16)
    torch.manual_seed(0)
    den = Denoiser(cfg)
    with torch.no_grad():
        den.out.weight.normal_(0, 0.5)
    sched = build("learnable_poly", vocab_size=17)
    given = torch.randint(0, 17, (4, 12))
    fixed = torch.rand(4, 12) < 0.4
    kw = dict(given=given, fixed=fixed, sampler="topp", top_p=0.9)
    a = sample(den, sched, 4, 12, 16, generator=torch.Generator().manual_seed(5), **kw)
    b = sample(den, sched, 4, 12, 16, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b), "seeded sampling is deterministic"
    assert torch.equal(a[fixed], given[fixed]) and (a < 17).all()


def test_remaining_masks_are_filled_by_the_most_likely_token():
    """alpha(0) = 1 - eps for MD4 schedules, so masks can survive the last step; they are filled
    with the denoiser's argmax at t = 0. The denoiser below prefers another token at t > 0, so the
    filled positions are visible."""
    eps = 0.05
    sched = build("linear", vocab_size=V, eps=eps)
    preferred = torch.tensor([2, 0, 1])

    def den(zt, t):
        tok = torch.where(t[:, None] == 0, preferred, (preferred + 1) % V)  # [N, L]
        return torch.nn.functional.one_hot(tok, V).double() * 50.0

    n = 5000
    out = sample(den, sched, n, L, steps=1, grid="uniform", generator=torch.Generator().manual_seed(0))
    assert (out < V).all()
    filled = (out == preferred).double().mean().item()
    survive = eps / (1 - eps)  # one step from alpha = eps to alpha = 1 - eps
    assert abs(filled - survive) < 4 * math.sqrt(survive / (n * L))


def test_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    torch.testing.assert_close(top_p_filter(probs, 0.8), torch.tensor(
        [[0.625, 0.375, 0, 0], [0, 0, 0.375, 0.625]]))
    torch.testing.assert_close(top_p_filter(probs, 1.0), probs)
    torch.testing.assert_close(top_p_filter(probs, 0.1)[0], torch.tensor([1.0, 0, 0, 0]))

    sched = build("linear", vocab_size=V)

    def den(zt, t):  # each position: p = [0.6, 0.3, 0.1]
        return torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(len(zt), zt.shape[1], -1)

    out = sample(den, sched, 4000, L, 50, sampler="topp", top_p=0.85,
                 generator=torch.Generator().manual_seed(0))
    frac0 = (out == 0).double().mean().item()
    assert (out != 2).all() and abs(frac0 - 2 / 3) < 0.02


def test_time_grid_and_bad_arguments():
    torch.testing.assert_close(time_grid(4, "uniform"), torch.tensor([1, 0.75, 0.5, 0.25, 0.0],
                                                                     dtype=torch.float64))
    c = time_grid(4, "cosine")
    assert c[0] == 1 and c[-1] == 0 and (c.diff() < 0).all()
    assert math.isclose(c[2].item(), math.cos(math.pi / 4))
    sched = build("linear", vocab_size=V)
    den = exact_denoiser(target(), sched)
    with pytest.raises(ValueError, match="steps"):
        sample(den, sched, 2, L, 0)
    with pytest.raises(ValueError, match="grid"):
        sample(den, sched, 2, L, 4, grid="log")
    with pytest.raises(ValueError, match="top_p"):
        sample(den, sched, 2, L, 4, sampler="topp", top_p=0.0)
    with pytest.raises(ValueError, match="^given "):
        sample(den, sched, 2, L, 4, given=torch.full((2, L), V), fixed=torch.ones(2, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="^fixed "):
        sample(den, sched, 2, L, 4, given=torch.zeros(2, L, dtype=torch.int64), fixed=torch.ones(2, L))
    with pytest.raises(ValueError, match="vocab_size"):
        sample(den, build("linear"), 2, L, 4)
