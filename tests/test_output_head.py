"""The output layer's backward with the forward's logits kept (train.head_keeps_logits): the same
values and gradients as the recompute path, bit for bit, one V-wide product fewer."""

import weakref

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from md4_dist import output_head
from md4_dist.config import config_from_dict
from md4_dist.output_head import HeadKernels, head_stats, padded_vocab

V, D = 50, 16


def _head_inputs(n: int, genmd4: bool):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, D, generator=g, requires_grad=True)
    weight = (torch.randn(padded_vocab(V), D, generator=g) * 0.5).requires_grad_()
    x = torch.randint(0, V, (n,), generator=g)
    w = (torch.rand(V, generator=g) + 0.5).requires_grad_() if genmd4 else None
    ups = [torch.randn(n, generator=g) for _ in range(3)]  # the loss's weights of lse, target, expected
    return h, weight, x, w, ups


def _values_grads_flops(kernels, n, genmd4, chunk):
    h, weight, x, w, ups = _head_inputs(n, genmd4)
    lse, target, expected = head_stats(h, weight, x, V, w, kernels, chunk)
    loss = (lse * ups[0]).sum() + (target * ups[1]).sum()
    if genmd4:
        loss = loss + (expected * ups[2]).sum()
    saved = len(lse.grad_fn.saved_tensors)
    inputs = [h, weight] + ([w] if genmd4 else [])
    with FlopCounterMode(display=False) as flops:
        grads = torch.autograd.grad(loss, inputs)
    values = [lse, target] + ([expected] if genmd4 else [])
    return [v.detach() for v in values], grads, flops.get_total_flops(), saved


@pytest.mark.parametrize("genmd4", [False, True], ids=["md4", "genmd4"])
@pytest.mark.parametrize("n,chunk", [(23, 7), (23, 64), (0, 7)], ids=["uneven-chunks", "one-chunk", "no-rows"])
def test_kept_logits_give_the_recompute_paths_values_and_gradients_exactly(genmd4, n, chunk):
    """float32 on the CPU: the values and grad_h, grad_W, grad_w equal (torch.equal) those of the
    recompute path, across uneven chunks (7 + 7 + 7 + 2 rows), one chunk and no rows; the kept
    path saves one logits tensor per chunk and its backward runs two of the recompute path's three
    V-wide products."""
    recompute = _values_grads_flops(HeadKernels(), n, genmd4, chunk)
    kept = _values_grads_flops(HeadKernels(keep_logits=True), n, genmd4, chunk)
    for a, b in zip(kept[0] + list(kept[1]), recompute[0] + list(recompute[1])):
        assert a.dtype == b.dtype and torch.equal(a, b)
    chunks = -(-n // chunk)
    assert kept[3] == recompute[3] + chunks
    if n:
        assert kept[1][0].abs().sum() > 0 and kept[1][1].abs().sum() > 0  # not vacuous
        product = 2 * n * padded_vocab(V) * D
        assert recompute[2] - kept[2] == product  # the recompute's h @ W^T, nothing else
        assert kept[2] == 2 * product


class _Watched(HeadKernels):
    """HeadKernels that note, at each chunk's reduction, how many earlier chunks' logits are
    still alive (held for the backward)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.chunks, self.alive = [], []
        reduce = self.reduce

        def watched(logits, *args):
            self.alive.append(sum(r() is not None for r in self.chunks))
            self.chunks.append(weakref.ref(logits))
            return reduce(logits, *args)

        self.reduce = watched


def test_no_logits_kept_where_no_gradient_is_taken():
    """Under no_grad (validation, samples) or without inputs that need a gradient, the forward
    holds one chunk's logits at a time, as the recompute path does; where a gradient will be
    taken it holds every earlier chunk's."""
    h, weight, x, w, _ = _head_inputs(23, True)
    for grad, args, holds in [(False, (h, weight, w), 0), (True, (h.detach(), weight.detach(), w.detach()), 0),
                              (True, (h, weight, w), None)]:
        kernels = _Watched(keep_logits=True)
        with torch.set_grad_enabled(grad):
            out = head_stats(args[0], args[1], x, V, args[2], kernels, 7)
        assert kernels.alive == ([0, 0, 0, 0] if holds == 0 else [0, 1, 2, 3])
        del out


TINY = {"model": {"vocab_size": 50, "dim": 32, "n_layers": 2, "n_heads": 4, "time_dim": 16},
        "data": {"manifest": "unused", "seq_len": 12},
        "train": {"global_batch": 4, "micro_batch": 4, "ema": 0.0},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"}}


def _trainer_step_grads(kind: str, sets: list[str]):
    """The gradients of one micro-batch through the trainer's module (`engine.build_model`, which
    DeepSpeed wraps) and the trainer's inputs: its forward is the objective."""
    from md4_dist.diffusion.objectives import masks_per_sequence
    from md4_dist.trainer.engine import build_model
    from md4_dist.trainer.inputs import model_inputs
    from md4_dist.trainer.noise import TRAIN, NoiseByPosition

    diffusion = {"kind": kind, "schedule": "learnable_poly" if kind == "genmd4" else "cosine"}
    cfg = config_from_dict(TINY | {"diffusion": diffusion}, sets)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            zero = p == 0  # the zero-initialised weights, or the logits would all be 0
            p[zero] = torch.randn(int(zero.sum()), generator=torch.Generator().manual_seed(p.numel())) * 0.3
    noise = NoiseByPosition(0, TRAIN, 4, 12, masks_per_sequence(cfg.diffusion), True, torch.device("cpu"))
    batch = {"tokens": torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1)),
             "positions": torch.arange(4)}
    inputs, _ = model_inputs(batch, noise, torch.device("cpu"))
    out = model(*inputs)
    out["loss"].backward()
    return model, out["loss"].detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["md4", "genmd4"])
def test_trainer_step_with_head_keeps_logits_has_the_same_gradients(kind, monkeypatch):
    """train.head_keeps_logits=true reaches the output layer through the trainer's model, and a
    micro-batch's loss and every parameter's gradient (the exponents' too, for GenMD4) equal the
    default's exactly, in float32 across uneven chunks."""
    monkeypatch.setattr(output_head, "CHUNK", 7)  # 4 x 12 tokens: several chunks, a short last one
    base_model, base_loss, base = _trainer_step_grads(kind, [])
    model, loss, grads = _trainer_step_grads(kind, ["train.head_keeps_logits=true"])
    assert model.denoiser.out.kernels.keep_logits and not base_model.denoiser.out.kernels.keep_logits
    assert torch.equal(loss, base_loss)
    assert grads.keys() == base.keys()
    for name, g in grads.items():
        assert g is not None and torch.equal(g, base[name]), name
    assert grads["denoiser.out.weight"].abs().sum() > 0
    if kind == "genmd4":
        assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("schedule."))


def test_compiled_head_kernels_with_kept_logits_equal_recompute():
    """With train.compile's fused reductions (HeadKernels(compiled=True), dynamic in rows) the
    kept path's gradients still equal the recompute path's exactly, at two row counts."""
    for n in (23, 41):
        recompute = _values_grads_flops(HeadKernels(compiled=True), n, True, 7)
        kept = _values_grads_flops(HeadKernels(compiled=True, keep_logits=True), n, True, 7)
        for a, b in zip(kept[0] + list(kept[1]), recompute[0] + list(recompute[1])):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["md4", "genmd4"])
def test_static_rows_for_deepcompile_give_the_masked_rows_loss_and_gradients(kind, monkeypatch):
    """deepspeed.deepcompile=true makes the trainer's module project every row (shapes that do not
    depend on the data, for one whole-module graph) and zero the unmasked ones: the micro-batch's
    loss and every gradient match the masked-rows path's in float32."""
    monkeypatch.setattr(output_head, "CHUNK", 7)
    base_model, base_loss, base = _trainer_step_grads(kind, [])
    model, loss, grads = _trainer_step_grads(kind, ["deepspeed.deepcompile=true"])
    assert model.denoiser.static_rows and not base_model.denoiser.static_rows
    torch.testing.assert_close(loss, base_loss, rtol=2e-6, atol=0)
    assert grads.keys() == base.keys()
    for name, g in grads.items():
        # float32 sums over other row counts: equal to a millionth of the gradient's scale
        torch.testing.assert_close(g, base[name], rtol=0, atol=1e-6 * float(base[name].abs().max()), msg=name)
    assert grads["denoiser.out.weight"].abs().sum() > 0


@pytest.mark.parametrize("unit", ["block", "trunk"])
def test_compile_unit_sets_what_zero3_gathers_and_what_is_compiled(unit):
    """train.compile_unit reaches engine.build_model: at ZeRO-3 the unit is DeepSpeed's leaf
    module (gathered as one) and none of its parts are; with train.compile its forward, and only
    its, is replaced by the compiled one (built lazily: nothing compiles here). The trunk keeps the
    parameter names of a list of blocks, so checkpoints and exports load either way."""
    from deepspeed.utils import z3_leaf_module

    from md4_dist.trainer.engine import build_model

    cfg = config_from_dict(TINY | {"diffusion": {"kind": "md4", "schedule": "cosine"}},
                           [f"train.compile_unit={unit}", "deepspeed.zero_stage=3", "train.compile=default"])
    model = build_model(cfg)
    blocks = model.denoiser.blocks
    trunk = unit == "trunk"
    assert z3_leaf_module(blocks) == trunk
    assert [z3_leaf_module(b) for b in blocks] == [not trunk] * len(blocks)
    assert ("forward" in vars(blocks)) == trunk
    assert ["forward" in vars(b) for b in blocks] == [not trunk] * len(blocks)
    assert [n for n, _ in model.named_parameters() if n.startswith("denoiser.blocks.")][0] == \
        "denoiser.blocks.0.params"


def test_trunk_compiled_as_one_graph_trains_as_eager():
    """train.compile_unit=trunk with train.compile: the whole trunk through torch.compile (inductor
    on the CPU) gives the eager micro-batch's loss and gradients, to float32 rounding."""
    base_model, base_loss, base = _trainer_step_grads("genmd4", [])
    model, loss, grads = _trainer_step_grads("genmd4", ["train.compile=default", "train.compile_unit=trunk"])
    assert "forward" in vars(model.denoiser.blocks) and "forward" not in vars(base_model.denoiser.blocks)
    torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, base[name], rtol=0, atol=1e-5 * float(base[name].abs().max()), msg=name)
    assert grads["denoiser.blocks.0.params"].abs().sum() > 0


def _attention_ops(model) -> set[str]:
    """The attention kernels (aten ops) that one eager forward of the trainer's module runs."""
    from md4_dist.trainer.inputs import model_inputs
    from md4_dist.trainer.noise import TRAIN, NoiseByPosition

    noise = NoiseByPosition(0, TRAIN, 2, 12, 1, True, torch.device("cpu"))
    inputs, _ = model_inputs({"tokens": torch.randint(0, 50, (2, 12)), "positions": torch.arange(2)},
                             noise, torch.device("cpu"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(*inputs)
    return {e.name for e in prof.events() if "_scaled_dot_product" in e.name}


def test_attention_kernels_limit_and_order_what_the_blocks_run():
    """train.attention_kernels reaches the blocks: with ["math"] they run the math kernel where
    the default runs the CPU's flash kernel; ["cudnn", "math"] (cuDNN cannot serve a CPU tensor)
    falls to the next named, not to an unnamed one; torch's own choice is back after each call;
    with train.compile the compiled trunk still gives the eager loss."""
    from md4_dist.trainer.engine import build_model

    def sets(*extra):
        return config_from_dict(TINY | {"diffusion": {"kind": "md4", "schedule": "cosine"}}, list(extra))
    default = _attention_ops(build_model(sets()))
    assert default == {"aten::_scaled_dot_product_flash_attention_for_cpu"}
    for names in ('["math"]', '["cudnn", "math"]'):
        ops = _attention_ops(build_model(sets(f"train.attention_kernels={names}")))
        assert ops == {"aten::_scaled_dot_product_attention_math"}, names
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    base_loss = _trainer_step_grads("md4", [])[1]
    loss = _trainer_step_grads("md4", ["train.compile=default", "train.compile_unit=trunk",
                                       'train.attention_kernels=["math"]'])[1]
    torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="attention_kernels names a kernel twice"):
        sets('train.attention_kernels=["flash", "flash"]')
    with pytest.raises(ValueError, match=r"train.attention_kernels=\['cudnn'\] does nothing under deepspeed.deepcompile"):
        sets('train.attention_kernels=["cudnn"]', "deepspeed.deepcompile=true", "deepspeed.zero_stage=3")


@pytest.mark.parametrize("ranges", [False, True])
def test_deepspeeds_nvtx_ranges_follow_the_config(ranges):
    """deepspeed.nvtx_ranges (default false) reaches DeepSpeed's switch for the NVTX ranges it
    wraps around ZeRO's functions, whatever the switch held before."""
    import deepspeed.utils.nvtx as nvtx

    from md4_dist.trainer.engine import build_model

    was = nvtx.enable_nvtx
    try:
        nvtx.enable_nvtx = not ranges
        build_model(config_from_dict(TINY, ["deepspeed.nvtx_ranges=true"] if ranges else []))
        assert nvtx.enable_nvtx is ranges
    finally:
        nvtx.enable_nvtx = was
