"""The confidence-ordered and threshold samplers, batch invariance, stopping at EOS and bad input
(md4_dist.sampling), driven by crafted exact denoisers and a tiny real model.Denoiser."""

import math

import pytest
import torch

from md4_dist.diffusion.schedules import build
from md4_dist.model import Denoiser, ModelConfig
from md4_dist.sampling import SAMPLERS, generate, prefix_condition, row_seeds, sample

V, L = 17, 12
ORDERED = ("confidence", "margin", "entropy", "threshold")


def tiny_denoiser():
    torch.manual_seed(0)
    den = Denoiser(ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, time_dim=16))
    with torch.no_grad():
        for p in den.parameters():  # ada and out start at zero: make every path count
            p.normal_(0, 0.3)
    return den.eval()


def fixed_logits(probs):
    """A denoiser that predicts the distributions probs [L, V] whatever z_t and t; it records the
    masks it saw, one [B, L] bool per call."""
    seen = []

    def den(zt, t):
        seen.append(zt == probs.shape[-1])
        return torch.log(probs.double().clamp_min(1e-30)).expand(len(zt), -1, -1)
    den.seen = seen
    return den


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: on a loaded machine, intra-op threads only wait on each other
    (a forward of the tiny model takes 10 ms on one thread, 250 ms on two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def denoiser(one_thread):
    return tiny_denoiser()


@pytest.mark.parametrize("sampler", ORDERED)
def test_fills_every_mask_and_keeps_prefix_and_infilling(denoiser, sampler):
    sched = build("learnable_poly", vocab_size=V)
    given = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(1))
    fixed = torch.rand(3, L, generator=torch.Generator().manual_seed(2)) < 0.4
    p_given, p_fixed = prefix_condition([5, 6, 7], 3, L)
    for g, f in ((given, fixed), (p_given, p_fixed)):
        kw = dict(sampler=sampler, threshold=0.3, given=g, fixed=f, seeds=[1, 2, 3])
        a = generate(denoiser, sched, 3, L, 6, **kw)
        b = generate(denoiser, sched, 3, L, 6, **kw)
        assert torch.equal(a.tokens, b.tokens), "seeded sampling is deterministic"
        assert a.tokens.dtype == torch.int64 and ((a.tokens >= 0) & (a.tokens < V)).all()
        assert torch.equal(a.tokens[f], g[f])
        assert a.denoiser_calls == int(a.calls_per_row.max())
        if sampler == "threshold":  # at least one position a call, and no more calls than steps
            assert (a.calls_per_row <= (~f).sum(1).clamp(max=6)).all() and (a.calls_per_row >= 1).all()
        else:  # an ordered sampler calls the model once a step, every row
            assert a.calls_per_row.tolist() == [6, 6, 6]
    c = generate(denoiser, sched, 3, L, 6, sampler=sampler, threshold=0.3, seeds=[4, 5, 6])
    assert not torch.equal(c.tokens, generate(denoiser, sched, 3, L, 6, sampler=sampler,
                                              threshold=0.3, seeds=[1, 2, 3]).tokens)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_row_alone_equals_the_row_in_any_batch(denoiser, sampler):
    """Per-row seeds and the denoiser run row by row: row k of a batch of 5 equals row k drawn in
    a batch of 2 and drawn alone, bit for bit, EOS padding and call counts included, and so do
    the logits it was drawn from at every step (on the CPU the model's small-batch GEMMs round
    differently for another batch size: without batch_invariant these differ in the last bits)."""
    sched = build("learnable_poly", vocab_size=V)
    seeds = row_seeds(11, 0, 5)
    given = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(3))
    fixed = torch.rand(5, L, generator=torch.Generator().manual_seed(4)) < 0.3
    kw = dict(sampler=sampler, top_p=0.9, threshold=0.4, batch_invariant=True, eos_id=3)

    def draw(rows):
        seen = []  # each row's logits at each call, step-major: seen[step * len(rows) + j]

        def recording(zt, t):
            out = denoiser(zt, t)
            seen.extend(out.unbind(0))
            return out
        got = generate(recording, sched, len(rows), L, 5, given=given[rows], fixed=fixed[rows],
                       seeds=[seeds[r] for r in rows], **kw)
        return got, [seen[j::len(rows)] for j in range(len(rows))]
    five, five_logits = draw([0, 1, 2, 3, 4])
    assert (five.tokens == 3).any() or sampler == "threshold"  # the padding is exercised
    for rows in ([1, 4], [2], [4], [0]):
        part, part_logits = draw(rows)
        assert torch.equal(part.tokens, five.tokens[rows]), rows
        assert torch.equal(part.calls_per_row, five.calls_per_row[rows])
        for j, r in enumerate(rows):
            n = int(part.calls_per_row[j])
            assert all(torch.equal(a, b) for a, b in zip(part_logits[j][:n], five_logits[r][:n]))
    # the rows differ from each other: the streams are really per row
    assert len({tuple(r) for r in five.tokens.tolist()}) == 5


def test_row_seeds_do_not_depend_on_the_batching():
    assert row_seeds(7, 0, 5)[2:4] == row_seeds(7, 2, 2)
    assert len(set(row_seeds(7, 0, 100) + row_seeds(8, 0, 100))) == 200
    assert all(0 <= s < 2 ** 63 for s in row_seeds(7, 0, 10))


def test_threshold_finishes_in_one_step_when_certain_and_one_per_step_when_not():
    sched = build("linear", vocab_size=V)
    seq = torch.arange(L) % V
    certain = fixed_logits(torch.nn.functional.one_hot(seq, V).double() * 0.999 + 0.001 / V)
    out = generate(certain, sched, 2, L, 64, sampler="threshold", threshold=0.9, seeds=[0, 1])
    assert out.denoiser_calls == 1 and torch.equal(out.calls_per_row, torch.tensor([1, 1]))
    assert torch.equal(out.tokens, seq.expand(2, -1))

    unsure = fixed_logits(torch.full((L, V), 1.0 / V))
    out = generate(unsure, sched, 1, L, 64, sampler="threshold", threshold=0.5, seeds=[0])
    masked = [int(m.sum()) for m in unsure.seen]
    assert out.denoiser_calls == L and masked == list(range(L, 0, -1)), "one per step"

    # confident on the first half only: those go in the first step, then one per step
    probs = torch.full((L, V), 1.0 / V)
    probs[: L // 2] = torch.nn.functional.one_hot(seq[: L // 2], V).double()
    half = fixed_logits(probs)
    out = generate(half, sched, 1, L, 64, sampler="threshold", threshold=0.9, seeds=[0])
    assert [int(m.sum()) for m in half.seen] == [L] + list(range(L // 2, 0, -1))
    assert torch.equal(out.tokens[0, : L // 2], seq[: L // 2])
    # steps caps the calls: the last allowed call unmasks the rest
    out = generate(unsure, sched, 1, L, 3, sampler="threshold", threshold=0.5, seeds=[0])
    assert out.denoiser_calls == 3 and (out.tokens < V).all()


def test_each_order_unmasks_its_own_most_sure_position_first():
    """Three positions where the three scores disagree: the candidate's probability picks
    position 1, the top-1 minus top-2 margin position 0, minus the entropy position 2."""
    probs = torch.tensor([[0.01, 0.50, 0.23, 0.26], [0.40, 0.04, 0.55, 0.01],
                          [0.01, 0.01, 0.51, 0.47]], dtype=torch.float64)
    top2 = probs.topk(2, -1).values
    entropy = -(probs * probs.log()).sum(-1)
    expect = {"confidence": int(probs.max(-1).values.argmax()),
              "margin": int((top2[:, 0] - top2[:, 1]).argmax()), "entropy": int(entropy.argmin())}
    assert sorted(expect.values()) == [0, 1, 2], "the orders must disagree for the test to see them"
    sched = build("linear", vocab_size=4)
    for order, first in expect.items():
        den = fixed_logits(probs)
        out = generate(den, sched, 1, 3, 3, sampler=order, temperature=0.0, grid="uniform")
        unmasked_first = (den.seen[0] & ~den.seen[1]).nonzero()[:, 1].tolist()
        assert unmasked_first == [first], order
        assert torch.equal(out.tokens[0], probs.argmax(-1)), "temperature 0: the argmax"


def test_ordered_samplers_unmask_as_the_schedule_says():
    """k per step is what the ancestral sampler unmasks in expectation: on a linear schedule and
    a uniform grid of 4 steps, 12 masks become 9, 6, 3, 0; on the learnable schedule, alpha
    averaged over tokens."""
    probs = torch.full((L, V), 1.0 / V)
    den = fixed_logits(probs)
    generate(den, build("linear", vocab_size=V), 2, L, 4, sampler="margin", grid="uniform",
             seeds=[0, 1])
    assert [m.sum(-1).tolist() for m in den.seen] == [[12, 12], [9, 9], [6, 6], [3, 3]]
    sched = build("learnable_poly", vocab_size=V)
    with torch.no_grad():
        sched.phi.copy_(torch.linspace(-1, 2, V))
    den = fixed_logits(probs)
    given, fixed = prefix_condition([1, 2], 1, L)  # 10 positions to generate
    generate(den, sched, 1, L, 4, sampler="entropy", grid="uniform", given=given, fixed=fixed,
             seeds=[0])
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    mean_alpha = sched.alpha(t).mean(-1)
    expected = torch.round(10 * (1 - mean_alpha) / (1 - sched.alpha(t[:1]).mean())).long()
    assert [int(m.sum()) for m in den.seen] == expected.tolist()


def test_stop_at_eos_pads_after_the_first_generated_eos():
    sched = build("linear", vocab_size=V)
    eos, pad = 3, 0
    seq = torch.tensor([5, 6, 3, 7, 3, 8, 9, 10, 11, 12, 13, 14])
    den = fixed_logits(torch.nn.functional.one_hot(seq, V).double())
    plain = sample(den, sched, 1, L, 4, sampler="confidence", seeds=[0])
    assert torch.equal(plain[0], seq)
    out = sample(den, sched, 1, L, 4, sampler="confidence", seeds=[0], eos_id=eos)
    assert out[0].tolist() == [5, 6, 3] + [3] * 9, "padded with the EOS itself by default"
    out = sample(den, sched, 1, L, 4, sampler="ancestral", seeds=[0], eos_id=eos, pad_id=pad)
    assert out[0].tolist() == [5, 6, 3] + [pad] * 9
    # a given EOS (in the prompt) does not stop the row; given tokens after it are kept
    given, fixed = prefix_condition([3, 3], 1, L)
    out = sample(den, sched, 1, L, 4, sampler="confidence", seeds=[0], eos_id=eos, pad_id=pad,
                 given=given, fixed=fixed)
    assert out[0].tolist() == [3, 3, 3] + [pad] * 9
    # with a real model and random draws: the tokens up to the first EOS are those drawn without it
    model = tiny_denoiser()
    kw = dict(sampler="topp", top_p=0.95, seeds=row_seeds(0, 0, 6))
    free = sample(model, sched, 6, L, 8, **kw)
    # the EOS: the token that most rows draw before their end (which one depends on the weights)
    rows_with = [sum(v in a[:-1] for a in free.tolist()) for v in range(V)]
    eos = max(range(V), key=rows_with.__getitem__)
    pad = (eos + 1) % V
    assert rows_with[eos] >= 2, "some rows have an EOS to stop at"
    stopped = sample(model, sched, 6, L, 8, eos_id=eos, pad_id=pad, **kw)
    for a, b in zip(free.tolist(), stopped.tolist()):
        cut = a.index(eos) + 1 if eos in a else L
        assert b[:cut] == a[:cut] and b[cut:] == [pad] * (L - cut)


def test_bad_input_raises_naming_the_value():
    sched = build("linear", vocab_size=V)
    den = fixed_logits(torch.full((L, V), 1.0 / V))
    bad = [(dict(sampler="greedy"), "sampler must be one of .*'greedy'"),
           (dict(sampler="threshold", threshold=0.0), r"threshold must lie in \(0, 1\], got 0.0"),
           (dict(sampler="threshold", threshold=1.5), r"threshold must lie in \(0, 1\], got 1.5"),
           (dict(temperature=-1.0), "temperature .* got -1.0"),
           (dict(temperature=math.nan), "temperature .* got nan"),
           (dict(sampler="topp", temperature=0.5), r"temperature \(0.5\) applies to .* 'topp'"),
           (dict(seeds=[1, 2, 3]), "3 seeds for num_samples 2"),
           (dict(seeds=[1, 2], generator=torch.Generator()), "generator .* or seeds"),
           (dict(eos_id=V), f"eos_id must be a token id in \\[0, {V - 1}\\], got {V}"),
           (dict(eos_id=1, pad_id=-1), "pad_id .* got -1"),
           (dict(pad_id=0), r"pad_id \(0\) .* eos_id"),
           (dict(given=torch.zeros(2, L + 3, dtype=torch.int64),
                 fixed=torch.ones(2, L + 3, dtype=torch.bool)), rf"^given must have shape \(2, {L}\)"),
           (dict(block_length=4), r"block_length \(4\) applies to .* 'ancestral'"),
           (dict(sampler="confidence", block_length=0), rf"block_length must lie in \[1, seq_len={L}\], got 0"),
           (dict(sampler="threshold", block_length=L + 1), f"got {L + 1}"),
           (dict(sampler="margin", block_length=2), rf"steps \(4\) must be at least the number of blocks, 6")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            sample(den, sched, 2, L, 4, **kwargs)
    with pytest.raises(ValueError, match=f"prefix is {L} tokens; it must be 1 to {L - 1}"):
        prefix_condition(list(range(L)), 2, L)
    with pytest.raises(ValueError, match="prefix is 0 tokens"):
        prefix_condition([], 2, L)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance_on_the_gpu(dtype):
    """What holds on a GPU: with batch_invariant (the denoiser row by row) and per-row seeds, a
    row alone equals the row in a batch exactly, in float32 and in bf16 alike."""
    den = tiny_denoiser().to("cuda", dtype)
    sched = build("learnable_poly", vocab_size=V).cuda()
    seeds = row_seeds(5, 0, 5)
    for sampler in SAMPLERS:
        kw = dict(sampler=sampler, threshold=0.4, batch_invariant=True, device="cuda")
        five = sample(den, sched, 5, L, 6, seeds=seeds, **kw)
        for k in (0, 3):
            alone = sample(den, sched, 1, L, 6, seeds=seeds[k:k + 1], **kw)
            assert torch.equal(alone, five[k:k + 1]), sampler


def rows_projected(den):
    """Record how many rows each call of den's output layer projects to V (a list, appended to)."""
    counts = []
    den.out.register_forward_hook(lambda m, args, out: counts.append(out.shape[:-1].numel()))
    return counts


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_projecting_only_the_rows_a_step_changes_draws_as_the_full_logits(sampler):
    """By default the real denoiser projects to V only the rows a step can change: the masked
    ones, and for ancestral and top-p only those whose uniform lies below the step's unmasking
    fraction; full_logits=True projects every position, as its forward does. In float32 on the
    CPU both draw the same tokens, for either kind of schedule, with a prefix or infilling, per-row
    seeds or one generator, row by row or batched, and the default projects far fewer rows."""
    den = tiny_denoiser()
    projected = rows_projected(den)
    given = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(5))
    fixed = torch.rand(4, L, generator=torch.Generator().manual_seed(6)) < 0.3
    p_given, p_fixed = prefix_condition([5, 6, 7], 4, L)
    temperature = 1.0 if sampler in ("ancestral", "topp") else 0.8
    fewer = []
    for name, (g, f), batch_invariant, seeded in (
            ("linear", (None, None), False, True), ("learnable_poly", (given, fixed), True, True),
            ("cosine", (p_given, p_fixed), False, False), ("linear", (given, fixed), True, False)):
        sched = build(name, vocab_size=V)
        if name == "learnable_poly":
            with torch.no_grad():
                sched.phi.copy_(torch.linspace(-1, 2, V))  # a rate per token: the state-dependent rule
        kw = dict(sampler=sampler, top_p=0.9, threshold=0.4, temperature=temperature, given=g,
                  fixed=f, batch_invariant=batch_invariant, eos_id=3)
        draws = {}
        for full in (False, True):
            projected.clear()
            rng = (dict(seeds=row_seeds(2, 0, 4)) if seeded
                   else dict(generator=torch.Generator().manual_seed(8)))
            draws[full] = (generate(den, sched, 4, L, 7, full_logits=full, **kw, **rng),
                           sum(projected))
        (rows, n_rows), (full, n_full) = draws[False], draws[True]
        assert torch.equal(rows.tokens, full.tokens), (name, batch_invariant)
        assert rows.denoiser_calls == full.denoiser_calls
        assert torch.equal(rows.calls_per_row, full.calls_per_row)
        assert n_full == full.denoiser_calls * 4 * L, "full_logits: every position at every call"
        fewer.append(n_rows / n_full)
    # ancestral, top-p: about one projection per generated position (7 steps + the fill: 1/8);
    # the others: every masked position at every call (the cosine grid keeps most masked early)
    assert max(fewer) < (0.3 if sampler in ("ancestral", "topp") else 0.8), fewer


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_row_alone_equals_the_row_in_any_batch_with_only_its_rows_projected(denoiser, sampler):
    """The same as above for the real denoiser itself, which projects only the rows a step can
    change: with batch_invariant a row's trunk and its rows' projection have the shapes of the
    row drawn alone."""
    sched = build("linear", vocab_size=V)
    seeds = row_seeds(12, 0, 5)
    given, fixed = prefix_condition([4, 5], 5, L)
    kw = dict(sampler=sampler, threshold=0.4, batch_invariant=True, given=given, fixed=fixed)
    five = generate(denoiser, sched, 5, L, 5, seeds=seeds, **kw)
    for rows in ([1, 4], [2]):
        part = generate(denoiser, sched, len(rows), L, 5, seeds=[seeds[r] for r in rows],
                        **dict(kw, given=given[rows], fixed=fixed[rows]))
        assert torch.equal(part.tokens, five.tokens[rows]), rows
        assert torch.equal(part.calls_per_row, five.calls_per_row[rows])
    assert len({tuple(r) for r in five.tokens.tolist()}) == 5


def test_bf16_runs_the_denoiser_under_autocast_on_the_cpu(denoiser):
    """precision='bf16' runs the denoiser under bf16 autocast (its logits are bf16) on the CPU too,
    and every sampler still draws valid tokens and keeps the prefix; 'auto' is float32 on the CPU."""
    sched = build("learnable_poly", vocab_size=V)
    given, fixed = prefix_condition([5, 6, 7], 3, L)
    dtypes = []
    hook = denoiser.out.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    try:
        for sampler in SAMPLERS:
            for precision, dtype in (("bf16", torch.bfloat16), ("auto", torch.float32),
                                     ("fp32", torch.float32)):
                dtypes.clear()
                out = generate(denoiser, sched, 3, L, 6, sampler=sampler, threshold=0.3,
                               seeds=[1, 2, 3], given=given, fixed=fixed, precision=precision)
                assert set(dtypes) == {dtype}, (sampler, precision)
                assert ((out.tokens >= 0) & (out.tokens < V)).all()
                assert torch.equal(out.tokens[fixed], given[fixed])
        with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32; got 'fp16'"):
            sample(denoiser, sched, 2, L, 4, precision="fp16")
    finally:
        hook.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_trunk_in_bf16_on_the_gpu():
    """compile=True (the trunk through torch.compile) in bf16 draws valid tokens, keeps the prefix,
    and draws the same again for the same seeds, for a batch and row by row."""
    den = tiny_denoiser().cuda()
    sched = build("linear", vocab_size=V).cuda()
    given, fixed = prefix_condition([5, 6], 4, L)
    for sampler in ("ancestral", "threshold"):
        for batch_invariant in (False, True):
            kw = dict(sampler=sampler, threshold=0.4, device="cuda", precision="bf16", compile=True,
                      given=given.cuda(), fixed=fixed.cuda(), batch_invariant=batch_invariant)
            a = sample(den, sched, 4, L, 6, seeds=row_seeds(1, 0, 4), **kw)
            b = sample(den, sched, 4, L, 6, seeds=row_seeds(1, 0, 4), **kw)
            assert torch.equal(a, b) and ((a >= 0) & (a < V)).all()
            assert torch.equal(a[fixed.cuda()], given.cuda()[fixed.cuda()])


@pytest.mark.parametrize("sampler", ORDERED)
def test_blocks_decode_from_the_left_one_after_another(denoiser, sampler):
    """block_length (LLaDA's semi-autoregressive decoding): every call sees the blocks before the
    current one fully unmasked and those after it fully masked, each block getting its share of
    the steps; block_length = L is the plain sampler exactly; a block of given tokens only costs
    no call."""
    sched = build("linear", vocab_size=V)
    probs = torch.softmax(2 * torch.randn(L, V, generator=torch.Generator().manual_seed(5)), -1)
    den = fixed_logits(probs)
    got = generate(den, sched, 2, L, 6, sampler=sampler, threshold=0.5, block_length=4, seeds=[1, 2])
    assert ((got.tokens >= 0) & (got.tokens < V)).all()
    current = []  # each call's block: the first with a masked position
    for m in den.seen:
        k = int(m.any(0).nonzero()[0]) // 4
        assert m[:, 4 * (k + 1):].all(), "a later block was touched before this one ended"
        current.append(k)
    if sampler == "threshold":  # as many calls as it needs, at most its two steps, per block
        assert current == sorted(current) and set(current) == {0, 1, 2}
        assert all(current.count(k) <= 2 for k in range(3))
    else:
        assert current == [0, 0, 1, 1, 2, 2]
    plain = generate(denoiser, sched, 3, L, 6, sampler=sampler, threshold=0.5, seeds=[1, 2, 3])
    whole = generate(denoiser, sched, 3, L, 6, sampler=sampler, threshold=0.5, seeds=[1, 2, 3],
                     block_length=L)
    assert torch.equal(plain.tokens, whole.tokens) and torch.equal(plain.calls_per_row, whole.calls_per_row)
    blocked = generate(denoiser, sched, 3, L, 6, sampler=sampler, threshold=0.5, seeds=[1, 2, 3],
                       block_length=4)
    assert not torch.equal(plain.tokens, blocked.tokens), "the blocks change the order of decoding"
    given, fixed = prefix_condition([5, 6, 7, 8], 2, L)  # block 0 is all given
    out = generate(den, sched, 2, L, 6, sampler=sampler, threshold=0.5, block_length=4,
                   given=given, fixed=fixed, seeds=[1, 2])
    assert out.tokens[:, :4].tolist() == [[5, 6, 7, 8]] * 2
    assert out.denoiser_calls == 4 if sampler != "threshold" else out.denoiser_calls <= 4


@pytest.mark.parametrize("sampler", ["confidence", "threshold"])
def test_a_row_alone_equals_the_row_in_any_batch_with_blocks(denoiser, sampler):
    """With blocks a row may sit out calls the batch makes (its block already done, or nothing of
    its own to decode there): its stream restarts at every block, so it still draws alone what it
    draws in any batch."""
    sched = build("learnable_poly", vocab_size=V)
    seeds = row_seeds(7, 0, 5)
    given = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(3))
    fixed = torch.rand(5, L, generator=torch.Generator().manual_seed(4)) < 0.3
    fixed[1, 4:8] = True  # row 1 has nothing to decode in block 1
    kw = dict(sampler=sampler, threshold=0.3, batch_invariant=True, block_length=4)

    def draw(rows):
        return generate(denoiser, sched, len(rows), L, 9, given=given[rows], fixed=fixed[rows],
                        seeds=[seeds[r] for r in rows], **kw)
    five = draw([0, 1, 2, 3, 4])
    for rows in ([1, 4], [1], [3], [0, 2]):
        part = draw(rows)
        assert torch.equal(part.tokens, five.tokens[rows]), rows
        assert torch.equal(part.calls_per_row, five.calls_per_row[rows]), rows
    if sampler == "threshold":  # rows needed different numbers of calls: some sat out
        assert len(set(five.calls_per_row.tolist())) > 1
