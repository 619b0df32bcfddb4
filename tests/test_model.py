import pytest
import torch

from md4_dist.model import Denoiser, ModelConfig, apply_rope, rope_tables

TINY = ModelConfig(vocab_size=11, dim=32, n_layers=2, n_heads=4, time_dim=16)


def randomised(cfg=TINY, seed=0):
    """A denoiser whose zero-initialised weights (adaLN, the output layer; parts of a block's
    flat tensor) are filled in, so outputs depend on inputs."""
    torch.manual_seed(seed)
    den = Denoiser(cfg)
    with torch.no_grad():
        for p in den.parameters():
            zero = p == 0
            p[zero] = 0.2 * torch.randn(int(zero.sum()))
    return den


def test_md4_s_parameter_count_matches_official():
    """The official MD4-S (V = 50257) has 165.9M parameters; built on the meta device (no memory)."""
    with torch.device("meta"):
        den = Denoiser(ModelConfig())
    n = sum(p.numel() for p in den.parameters())
    print(f"MD4-S parameters: {n:,}")
    assert abs(n - 165.9e6) / 165.9e6 < 0.01
    assert den.blocks[0].shapes["mlp_out"] == (768, 2048)  # the official hidden-size rule


def test_shapes_and_zero_init_output():
    den = Denoiser(TINY)
    zt = torch.randint(0, TINY.vocab_size + 1, (3, 9))  # includes the mask id V
    logits = den(zt, torch.rand(3))
    assert logits.shape == (3, 9, TINY.vocab_size)
    assert (logits == 0).all(), "untied zero-initialised output: uniform predictions at init"


def test_attention_is_bidirectional_and_time_conditions():
    den = randomised()
    zt = torch.randint(0, TINY.vocab_size, (1, 8))
    t = torch.tensor([0.5])
    base = den(zt, t)
    later = zt.clone()
    later[0, -1] = (later[0, -1] + 1) % TINY.vocab_size
    assert not torch.allclose(den(later, t)[0, 0], base[0, 0]), "position 0 must see the last token"
    assert not torch.allclose(den(zt, torch.tensor([0.9])), base), "t must condition the output"
    masked = zt.clone()
    masked[0, 3] = TINY.vocab_size
    assert not torch.allclose(den(masked, t), base), "the mask id has its own embedding"


def test_rope_is_relative():
    """<R(p) q, R(p') k> depends only on p - p'."""
    cos, sin = rope_tables(16, 8, 10000.0, "cpu")
    q, k = torch.randn(8), torch.randn(8)
    Q = apply_rope(q.expand(1, 1, 16, 8), cos, sin)[0, 0]
    K = apply_rope(k.expand(1, 1, 16, 8), cos, sin)[0, 0]
    torch.testing.assert_close(Q[5] @ K[2], Q[13] @ K[10], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mlp_type", ["glu", "swiglu", "geglu"])
def test_mlp_types_and_float64(mlp_type):
    cfg = ModelConfig(vocab_size=11, dim=32, n_layers=1, n_heads=2, time_dim=8, mlp_type=mlp_type)
    den = randomised(cfg).double()
    out = den(torch.randint(0, 12, (2, 5)), torch.rand(2, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(vocab_size=0)
    den = Denoiser(TINY)
    with pytest.raises(ValueError, match="^zt "):
        den(torch.rand(2, 5), torch.rand(2))
    with pytest.raises(ValueError, match="^t "):
        den(torch.zeros(2, 5, dtype=torch.int64), torch.rand(3))


@pytest.mark.parametrize("part", ["block", "time"])
def test_flat_weights_are_views_of_one_parameter(part):
    """A block, and the time conditioning (the time MLP and the output adaLN), each hold one
    parameter (ZeRO-3's host work is per tensor); their named weights are views that tile it in
    order, and the loss reaches every one of them. The denoiser holds no other small tensors."""
    den = randomised()
    mod = den.blocks[0] if part == "block" else den.time
    assert [n for n, _ in mod.named_parameters()] == ["params"]
    w = mod.weights()
    assert {n: tuple(t.shape) for n, t in w.items()} == mod.shapes
    offsets = [t.data_ptr() - mod.params.data_ptr() for t in w.values()]
    sizes = [t.numel() * t.element_size() for t in w.values()]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    assert sum(sizes) == mod.params.numel() * mod.params.element_size()
    den(torch.randint(0, TINY.vocab_size + 1, (2, 8)), torch.rand(2)).square().sum().backward()
    grads = dict(zip(w, mod.params.grad.split([t.numel() for t in w.values()])))
    assert all(g.abs().sum() > 0 for g in grads.values()), {n: float(g.abs().sum()) for n, g in grads.items()}
    assert [n for n, _ in den.named_parameters()] == \
        ["embed.weight", "time.params"] + [f"blocks.{i}.params" for i in range(TINY.n_layers)] + ["out.weight"]
