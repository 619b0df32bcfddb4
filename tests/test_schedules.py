import pytest
import torch

from md4_dist.diffusion.schedules import LearnablePolySchedule, MD4Schedule, build

EPS = 1e-4
V = 5


def all_schedules():
    learn = build("learnable_poly", vocab_size=V).double()
    with torch.no_grad():
        learn.phi.copy_(torch.tensor([-1.5, -0.3, 0.0, 0.8, 2.0], dtype=torch.float64))
    return {"linear": build("linear"), "cosine": build("cosine"), "poly3": build("poly3"),
            "poly0.5": build("poly0.5"), "learnable_poly": learn}


@pytest.mark.parametrize("name", list(all_schedules()))
def test_alpha_endpoints_and_monotone(name):
    sched = all_schedules()[name]
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    a = sched.alpha(t)  # [T] or [T, V]
    assert torch.all(a[0] >= 1 - 1.01 * EPS) and torch.all(a[0] <= 1)
    assert torch.all(a[-1] <= 1.01 * EPS) and torch.all(a[-1] >= 0)
    assert torch.all(a[1:] < a[:-1]), "alpha must decrease strictly in t"


@pytest.mark.parametrize("name", list(all_schedules()))
def test_weight_is_dalpha_over_one_minus_alpha(name):
    sched = all_schedules()[name]
    t = torch.linspace(0.02, 0.98, 97, dtype=torch.float64)
    h = 1e-6
    dalpha = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)  # central difference
    want = dalpha / (1 - sched.alpha(t))
    got = sched.weight(t)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    assert torch.all(got < 0)


def test_learnable_shapes_and_parameter():
    sched = build("learnable_poly", vocab_size=V, power_init=2.0)
    assert isinstance(sched, LearnablePolySchedule)
    assert [n for n, _ in sched.named_parameters()] == ["phi"] and sched.phi.shape == (V,)
    torch.testing.assert_close(sched.exponents(), torch.full((V,), 2.0))
    t = torch.rand(3, 4) * 0.9 + 0.05
    assert sched.alpha(t).shape == (3, 4, V) and sched.weight(t).shape == (3, 4, V)


@pytest.mark.parametrize("k", [1.0, 2.0, 3.0])
def test_learnable_with_equal_exponents_equals_poly(k):
    """alpha = 1 - (1 - eps) t^k (GenMD4) vs (1 - 2 eps)(1 - t^k) + eps (MD4): equal up to eps."""
    gen = build("learnable_poly", vocab_size=V, power_init=k).double()
    md4 = build(f"poly{int(k)}")
    t = torch.linspace(0.01, 1, 100, dtype=torch.float64)
    a_gen, a_md4 = gen.alpha(t), md4.alpha(t)[:, None].expand(-1, V)
    assert (a_gen - a_md4).abs().max() <= EPS
    # weights: GenMD4 -k/t; MD4 -(k/t) / (1 + eps / ((1 - 2 eps) t^k))
    ratio = md4.weight(t)[:, None] / gen.weight(t)
    expected = 1 / (1 + EPS / ((1 - 2 * EPS) * t ** k))
    # rtol 1e-7: phi is a float32 parameter, so softplus(phi) is k to float32 precision
    torch.testing.assert_close(ratio, expected[:, None].expand(-1, V), rtol=1e-7, atol=0)


def test_keep_prob_matches_alpha_of_the_token():
    sched = all_schedules()["learnable_poly"]
    x = torch.randint(0, V, (4, 6))
    t = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=torch.float64)
    want = sched.alpha(t)[torch.arange(4)[:, None], x]  # [B, V] gathered at x
    torch.testing.assert_close(sched.keep_prob(t, x), want)
    md4 = build("cosine")
    torch.testing.assert_close(md4.keep_prob(t, x), md4.alpha(t)[:, None].expand(4, 6))


def test_build_names():
    assert isinstance(build("poly3"), MD4Schedule) and build("poly3").power == 3.0
    assert build("poly0.5").power == 0.5
    assert build("linear", vocab_size=10).vocab_size == 10
    for bad in ["quadratic", "poly", "polyx", "Linear", ""]:
        with pytest.raises(ValueError, match=f"unknown schedule '{bad}'"):
            build(bad)
    with pytest.raises(ValueError, match="vocab_size"):
        build("learnable_poly")
    with pytest.raises(ValueError, match="power_init"):
        build("learnable_poly", vocab_size=3, power_init=0.0)
