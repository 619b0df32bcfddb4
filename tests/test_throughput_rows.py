"""benchmarks/throughput.py's rows on the CPU: which settings a row runs, and how --repeats
summarises them (the GPU measurement itself runs on the GPU machine)."""

import argparse
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("throughput", os.path.join(ROOT, "benchmarks", "throughput.py"))
throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(throughput)


def test_a_benchmark_row_of_a_config_file_runs_that_files_settings():
    """benchmarks/throughput.py and gpu_check.py take a config file where they take a shape: the
    row runs the file's model, objective, optimizer, DeepSpeed section and train.compile* keys
    (what a run of it does per GPU), with --zero and --compile overriding, and its official
    anchor only where the model and objective are the official shape."""
    small = os.path.join(ROOT, "configs", "owt_small.json")
    with open(small) as f:
        data = json.load(f)
    cfg = throughput.config(small, None, 8)
    assert (cfg.deepspeed.zero_stage, cfg.train.compile) == (data["deepspeed"]["zero_stage"], data["train"]["compile"])
    assert cfg.train.head_keeps_logits is data["train"]["head_keeps_logits"] is True
    assert cfg.model.dim == data["model"]["dim"] and cfg.optim.lr == data["optim"]["lr"]
    assert (cfg.train.micro_batch, cfg.train.global_batch, cfg.data.seq_len) == (8, 8, throughput.SEQ_LEN)
    assert cfg.cluster.num_workers == 1 and cfg.train.ema == 0.0
    cfg = throughput.config(small, 3, 8, "off", ["train.compile_unit=trunk"])
    assert (cfg.deepspeed.zero_stage, cfg.train.compile, cfg.train.compile_unit) == (3, "off", "trunk")
    assert cfg.train.head_keeps_logits, "an override leaves the file's other keys"
    assert throughput.label(small) == "owt_small"
    assert throughput.official_name(small) == "genmd4" == throughput.official_name("genmd4-s")
    assert throughput.official_name(os.path.join(ROOT, "configs", "owt_large.json")) is None
    assert throughput.official_name("md4-s") == "md4"
    assert throughput.official_name(small, ["diffusion.kind=md4", "diffusion.schedule=linear"]) == "md4"
    with pytest.raises(argparse.ArgumentTypeError, match="'nowhere.json' is neither a shape"):
        throughput.model_arg("nowhere.json")
    with pytest.raises(ValueError, match="md4-s: a shape needs a ZeRO stage"):
        throughput.config("md4-s", None, 8)


def test_repeats_give_each_rows_share_of_zero1_by_medians_and_round_by_round():
    """A round whose ZeRO-1 row failed gives no pair; the medians still use every process."""
    measured = {("md4-s", "zero1"): {0: 400.0, 1: 440.0, 2: 420.0},
                ("md4-s", "zero3"): {0: 360.0, 1: 352.0, 3: 380.0},
                ("genmd4-s", "zero3"): {0: 200.0}, ("md4-s", "torch"): {0: 300.0, 1: 310.0}}
    lines = throughput.summary(measured)
    assert len(lines) == 4
    assert lines[0].startswith("md4-s") and "over 3 processes: median 420 tok/s (min 400, max 440)" in lines[0]
    assert "of ZeRO-1" not in lines[0], "ZeRO-1 against itself says nothing"
    assert "median 360 tok/s" in lines[1] and "of ZeRO-1 85.7% by the medians" in lines[1]
    assert lines[1].endswith("round by round 90.0%, 80.0%"), "round 3 had no ZeRO-1 row"
    assert "of ZeRO-1" not in lines[2], "genmd4-s has no ZeRO-1 row"
    assert "of ZeRO-1" not in lines[3], "the plain-PyTorch row is not a ZeRO stage"


def test_gpu_gaps_count_idle_once_across_overlapping_streams_and_name_the_kernels_either_side():
    spans = [(30.0, 40.0, "c"), (0.0, 10.0, "a"), (5.0, 12.0, "b"),  # a and b overlap: busy 0-12
             (60.0, 61.0, "e"), (35.0, 50.0, "d")]  # d overlaps c and ends after it: busy 30-50
    idle, longest = throughput.gpu_gaps(spans)
    assert idle == (30 - 12) + (60 - 50)
    assert longest == [(18.0, "b", "c"), (10.0, "d", "e")], "the kernel that ended last before each gap"
    assert throughput.gpu_gaps(spans, top=1)[1] == [(18.0, "b", "c")]
    assert throughput.gpu_gaps([(0.0, 5.0, "only")]) == (0.0, [])


def test_a_gap_names_what_the_host_ran_before_launching_the_kernel_after_it():
    def event(cat, name, ts, dur, corr=None, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid,
                "args": {} if corr is None else {"correlation": corr}}

    before, after = event("kernel", "gemm", 100.0, 50.0, corr=1), event("kernel", "softmax", 2400.0, 10.0, corr=2)
    trace = [before, after, event("cuda_runtime", "cudaLaunchKernel", 90.0, 5.0, corr=1),
             event("cuda_runtime", "cudaLaunchKernel", 2300.0, 5.0, corr=2),
             event("cpu_op", "aten::mm", 1200.0, 1100.0), event("cuda_runtime", "cudaMalloc", 1250.0, 1000.0),
             event("cpu_op", "aten::add", 100.0, 300.0),  # partly before the GPU ran dry at 150
             event("cpu_op", "other thread", 200.0, 2000.0, tid=2)]
    gap, first, second = throughput.gpu_gaps([(e["ts"], e["ts"] + e["dur"], e) for e in trace
                                              if e["cat"] in throughput.DEVICE])[1][0]
    assert (gap, first["name"], second["name"]) == (2250.0, "gemm", "softmax")
    said = throughput.host_in_gap(trace, first, second)
    assert said == ("launched 2.15 ms after the GPU ran dry; meanwhile its thread ran aten::mm 1.10 ms; "
                    "cudaMalloc 1.00 ms; aten::add 0.25 ms"), said
    trace[3] = event("cuda_runtime", "cudaLaunchKernel", 120.0, 5.0, corr=2)  # launched before the gap
    assert throughput.host_in_gap(trace, first, second).startswith("queued 0.03 ms before the GPU ran dry")


def test_the_profilers_trace_has_the_fields_the_gap_reading_uses(tmp_path):
    """A real trace of a CPU step: its host ops carry the fields host_in_gap reads."""
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.randn(64, 64) @ torch.randn(64, 64)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    ops = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e.get("cat") == "cpu_op"]
    assert any(e["name"] == "aten::mm" for e in ops)
    assert all(e["ph"] == "X" and {"ts", "dur", "pid", "tid", "args"} <= set(e) for e in ops)
