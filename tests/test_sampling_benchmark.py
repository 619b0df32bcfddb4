"""benchmarks/sampling.py's core on a tiny random-weight model: the rows it plans, times and scores
against a Markov chain, the model calls growing with the steps, and its speed-only command as the
GPU machine runs it (here at the small shape, on the CPU)."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from md4_dist.data.synthetic import MarkovChain
from md4_dist.diffusion.schedules import build
from md4_dist.model import Denoiser, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, L = 8, 16


def bench():
    spec = importlib.util.spec_from_file_location("sampling_bench", os.path.join(ROOT, "benchmarks", "sampling.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: on a loaded machine more threads only wait
    yield
    torch.set_num_threads(before)


def test_rows_are_timed_scored_and_calls_grow_with_steps():
    b = bench()
    torch.manual_seed(0)
    den = Denoiser(ModelConfig(vocab_size=V, dim=32, n_layers=1, n_heads=4, time_dim=16))
    with torch.no_grad():
        for p in den.parameters():  # the output layer starts at zero: make every path count
            p.normal_(0, 0.3)
    plan = b.plans(L, ["ancestral", "confidence"], [32, 4, 8], [0.9])
    # the ordered sampler stops at L steps: past it a step would unmask nothing
    assert [(r["sampler"], r["steps"]) for r in plan] == [
        ("ancestral", 4), ("ancestral", 8), ("ancestral", 32), ("confidence", 4), ("confidence", 8)]
    assert b.plans(L, ["threshold"], [4], [0.99, 0.5]) == [
        {"sampler": "threshold", "steps": L, "threshold": 0.5},
        {"sampler": "threshold", "steps": L, "threshold": 0.99}]

    chain = MarkovChain(V, 0, successors=2, floor=0.05)
    rows = b.measure(den.eval(), build("linear", vocab_size=V), L, plan[:2] + plan[3:], num_samples=6,
                     batch=4, seed=1, chain=chain, progress=lambda s: None)
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        ("ancestral", 4), ("ancestral", 8), ("confidence", 4), ("confidence", 8)]
    for r in rows:
        assert r["num_samples"] == r["samples"] == 6 and r["batch"] == 4 and r["seq_len"] == L
        assert r["wall_s"] > 0 and r["samples_per_s"] == pytest.approx(6 / r["wall_s"])
        assert r["cpu_s"] > 0 and r["samples_per_cpu_s"] == pytest.approx(6 / r["cpu_s"])
        assert r["impossible"] == 0 and np.isfinite(r["nll_bits_per_token"]) and r["stderr_bits_per_token"] > 0
        assert r["gap_bits_per_token"] == pytest.approx(r["nll_bits_per_token"] - chain.entropy_bits_per_token(L))
        assert r["bigram_kl_bits"] > 0 and r["bigram_kl_exact_sampler_bits"] > 0
        # ancestral: steps + 1 calls (the last fills what is left); ordered: one per step; 2 batches
        per_sample = r["steps"] + (r["sampler"] == "ancestral")
        assert r["calls_per_sample"] == per_sample and r["model_calls"] == 2 * per_sample
    for sampler in ("ancestral", "confidence"):
        calls = [r["model_calls"] for r in rows if r["sampler"] == sampler]
        assert calls == sorted(calls) and calls[0] < calls[-1], "more steps, never fewer model calls"

    within = b.steps_to_within(rows, tolerance=1.0)  # everything lies within 100%: the fewest calls
    assert within["ancestral"]["steps"] == 4 and within["ancestral"]["reference_steps"] == 8
    within = b.steps_to_within(rows, tolerance=0.0)  # nothing but the reference itself
    assert {s: w["steps"] for s, w in within.items()} == {"ancestral": 8, "confidence": 8}


def test_speed_only_command_writes_its_rows(tmp_path):
    b = bench()
    assert b.main(["--shape", "tiny", "--num-samples", "3", "--batch", "2", "--samplers", "ancestral",
                   "margin", "--steps", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("sampling-cpu-*.json")
    got = json.loads(path.read_text())
    assert got["shape"] == "tiny" and got["weights"] == "random" and got["steps_to_1pct"] == {}
    assert got["machine"]["torch_threads"] == 1 and got["dtype"] == "fp32"
    assert [(r["sampler"], r["steps"], r["model_calls"]) for r in got["rows"]] == [
        ("ancestral", 2, 6), ("margin", 2, 4)]  # 2 batches: of 2 samples, of 1
    assert all(r["seq_len"] == 128 and "nll_bits_per_token" not in r for r in got["rows"])
