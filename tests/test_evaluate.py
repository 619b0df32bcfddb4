"""Evaluation, sampling and export as a user runs them, on models trained here for real (Ray,
DeepSpeed ZeRO-3 over gloo, 2 CPU workers): one on a Markov corpus of known entropy, one on text
with its SentencePiece tokenizer."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

from data_tools import synthetic
from md4_dist import cli, evaluate, export, load_pretrained, sample
from md4_dist.hf import remote_code
from md4_dist.inference.consolidate import open_checkpoint
from md4_dist.data import TokenStream, load_manifest
from md4_dist.data.synthetic import MarkovChain
from md4_dist.diffusion.forward import draw_noise
from md4_dist.diffusion.objectives import masks_per_sequence
from md4_dist.trainer.noise import EVAL, NoiseByPosition
from crafted import write_crafted
from test_train import ROOT, train

# A small chain the tiny model learns well in a few hundred steps; the floor makes every
# transition possible, so any sample has a finite log-likelihood under the chain.
CHAIN = {"vocab_size": 16, "seed": 0, "successors": 2, "floor": 0.02}
MARKOV_STEPS = 800


def run_cli(module, *args):
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    return r


def in_process(main, capsys, *args):
    """(exit status, stdout, stderr) of a CLI's main called here: the same code, without paying
    for a fresh interpreter's imports."""
    capsys.readouterr()
    status = cli.run(main, list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def markov_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("markov")
    data = d / "data"
    assert synthetic.main(["--out", str(data), "--vocab-size", str(CHAIN["vocab_size"]), "--seq-len", "64",
                           "--num-sequences", "20000", "--val-fraction", "0.05", "--seed", str(CHAIN["seed"]),
                           "--successors", str(CHAIN["successors"]), "--floor", str(CHAIN["floor"])]) == 0
    run_dir = d / "run"
    r = train(f"train.run_dir={run_dir}", f"data.manifest={data}", f"model.vocab_size={CHAIN['vocab_size']}",
              "diffusion.kind=md4", "diffusion.schedule=linear", "optim.lr=1e-2",
              "train.global_batch=64", "train.micro_batch=32", f"train.steps={MARKOV_STEPS}",
              f"checkpoint.every={MARKOV_STEPS}", f"eval.every={MARKOV_STEPS}", "logging.every=100",
              f"logging.sample_every={MARKOV_STEPS // 2}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, data


def chain_log2_likelihood(tokens: np.ndarray) -> np.ndarray:
    """Bits per token of each row [N, L] under the chain that made the corpus."""
    chain = MarkovChain(CHAIN["vocab_size"], CHAIN["seed"], CHAIN["successors"], CHAIN["floor"])
    first = np.log2(chain.pi[tokens[:, 0]])
    rest = np.log2(chain.P[tokens[:, :-1], tokens[:, 1:]]).sum(1)
    return (first + rest) / tokens.shape[1]


def test_evaluate_bounds_the_entropy_and_repeats_within_its_errors(markov_run, capsys):
    run_dir, data = markov_run
    r = run_cli("md4_dist.evaluate", "--checkpoint", str(run_dir), "--t-samples", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads(r.stdout)
    status, out, err = in_process(evaluate.main, capsys, "--checkpoint", str(run_dir), "--t-samples", "4",
                                  "--seed", "1", "--data", str(data))
    assert status == 0, err
    second = json.loads(out)
    print("evaluate:", first, second, sep="\n")

    entropy = json.loads((data / "manifest.json").read_text())["entropy_bits_per_token"]
    for res in first, second:
        assert res["sequences"] == 1000 and res["tokens"] == 1000 * 64  # the whole val split
        assert res["step"] == MARKOV_STEPS and res["weights"] == "ema"
        assert res["entropy_bits_per_token"] == entropy
        assert res["gap_bits_per_token"] == pytest.approx(res["nelbo_bits_per_token"] - entropy)
        assert res["ppl_bound"] == pytest.approx(2 ** res["nelbo_bits_per_token"])
        assert 0 < res["stderr_bits_per_token"] < 0.05
        assert res["nelbo_bits_per_token"] >= entropy - 3 * res["stderr_bits_per_token"]
        assert "bits_per_byte" not in res  # token ids: no text bytes
    assert res["nelbo_bits_per_token"] < entropy + 0.5, "a trained model, near the entropy"
    assert first["nelbo_bits_per_token"] != second["nelbo_bits_per_token"], "another seed, other noise"

    # Disjoint halves of the split are independent estimates of the same bound: their difference
    # tests the standard error, data spread included (two runs over the same sequences share it).
    halves = []
    for skip in 0, 500:
        status, out, err = in_process(evaluate.main, capsys, "--checkpoint", str(run_dir), "--t-samples", "4",
                                      "--max-sequences", "500", "--skip-sequences", str(skip))
        assert status == 0, err
        halves.append(json.loads(out))
    print("halves:", *halves, sep="\n")
    assert [h["sequences"] for h in halves] == [500, 500] and halves[1]["skipped_sequences"] == 500
    a, b = (h["nelbo_bits_per_token"] for h in halves)
    assert a != b and abs(a - b) < 4 * math.hypot(*(h["stderr_bits_per_token"] for h in halves))
    assert abs((a + b) / 2 - first["nelbo_bits_per_token"]) < 4 * first["stderr_bits_per_token"]
    status, _, err = in_process(evaluate.main, capsys, "--checkpoint", str(run_dir), "--skip-sequences", "1000")
    assert status != 0 and "--skip-sequences 1000 leaves none of the 1000 sequences of " in err


@pytest.mark.parametrize("run", ["markov_run", "text_run"])  # MD4, and GenMD4's learnable schedule
def test_consolidated_ema_weights_give_the_runs_own_validation_nelbo(run, request):
    """One process, the checkpoint's ZeRO-3 shards of 2 ranks consolidated: the EMA weights, on the
    sequences and noise of the run's own last evaluation, give the figure the run logged."""
    run_dir, data = request.getfixturevalue(run)
    data = data if run == "markov_run" else data / "data"
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    with open_checkpoint(str(run_dir)) as ckpt:
        cfg = ckpt.config
        model = ckpt.model(ema=True)
        trained = ckpt.model(ema=False)
    noise = NoiseByPosition(cfg.train.seed, EVAL, cfg.train.global_batch, 64, masks_per_sequence(cfg.diffusion),
                            antithetic=False, device=torch.device("cpu"))
    bits = []
    with torch.no_grad():
        for batch in TokenStream(load_manifest(str(data)), "val", 50, seed=cfg.train.seed, loop=False):
            n = noise(batch["positions"])
            bits.append(model(batch["tokens"], n.t, n.u)["nelbo"].double() / (64 * math.log(2)))
            last = (batch["tokens"], n)
    bits = torch.cat(bits)
    assert logged["step"] == cfg.train.steps and len(bits) == logged["val_sequences"]
    assert bits.mean().item() == pytest.approx(logged["val_nelbo_bits_per_token"], rel=1e-5)
    with torch.no_grad():  # the trained weights are another model
        x, n = last
        assert not torch.equal(trained(x, n.t, n.u)["nelbo"], model(x, n.t, n.u)["nelbo"])


def test_samples_follow_the_chain(markov_run, tmp_path, capsys):
    run_dir, data = markov_run
    out = tmp_path / "samples.jsonl"
    r = run_cli("md4_dist.sample", "--checkpoint", str(run_dir), "--num-samples", "64", "--steps", "128",
                "--batch-size", "32", "--seed", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [rec["sample"] for rec in records] == list(range(64))
    tokens = np.array([rec["tokens"] for rec in records])
    assert tokens.shape == (64, 64) and tokens.min() >= 0 and tokens.max() < CHAIN["vocab_size"]
    assert records[0]["text"] == " ".join(map(str, records[0]["tokens"]))  # ids: no tokenizer

    real = np.concatenate([b["tokens"].numpy() for b in TokenStream(load_manifest(str(data)), "val", 100,
                                                                      loop=False)])
    chain = MarkovChain(CHAIN["vocab_size"], CHAIN["seed"], CHAIN["successors"], CHAIN["floor"])
    unigram = np.random.default_rng(0).choice(CHAIN["vocab_size"], size=(64, 64), p=chain.pi)
    got, want, iid = (chain_log2_likelihood(t).mean() for t in (tokens, real, unigram))
    print(f"log2-likelihood per token under the chain: samples {got:.3f}, real sequences {want:.3f}, "
          f"tokens drawn independently from the chain's marginal {iid:.3f}")
    assert abs(got - want) < 0.2 * abs(iid - want), "the samples are near the corpus, far from i.i.d."

    # the same samples scored exactly by `evaluate --samples --oracle`
    status, stdout, err = in_process(evaluate.main, capsys, "--samples", str(out), "--oracle", str(data))
    assert status == 0, err
    scored = json.loads(stdout)
    assert scored["samples"] == 64 and scored["impossible"] == 0 and scored["seq_len"] == 64
    assert scored["nll_bits_per_token"] == pytest.approx(-got, rel=1e-12)
    entropy = load_manifest(str(data)).entropy_bits_per_token
    assert scored["gap_bits_per_token"] == pytest.approx(-got - entropy, rel=1e-9)
    from md4_dist.inference.oracle import score
    independent = score(chain, unigram)
    print(f"oracle: gap {scored['gap_bits_per_token']:.4f} +- {scored['stderr_bits_per_token']:.4f} bits/token, "
          f"bigram KL {scored['bigram_kl_bits']:.4f} (exact sampler {scored['bigram_kl_exact_sampler_bits']:.4f}, "
          f"i.i.d. tokens {independent['bigram_kl_bits']:.4f})")
    assert scored["bigram_kl_bits"] < 0.2 * independent["bigram_kl_bits"]
    with pytest.raises(SystemExit) as exited:
        evaluate.main(["--samples", str(out), "--oracle", str(data), "--checkpoint", str(run_dir)])
    assert exited.value.code == 2
    assert "--samples and --oracle go together, without --checkpoint" in capsys.readouterr().err

    again = run_cli("md4_dist.sample", "--checkpoint", str(run_dir), "--num-samples", "64", "--steps", "128",
                    "--batch-size", "32", "--seed", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[1::2] == [rec["text"] for rec in records], "the same seed, the same samples"


def test_export_reproduces_the_checkpoint_loss_exactly(markov_run, tmp_path, capsys):
    run_dir, _ = markov_run
    out = tmp_path / "exported"
    status, _, err = in_process(export.main, capsys, "--checkpoint", str(run_dir), "--out", str(out))
    assert status == 0, err
    # no tokenizer (token ids); the code transformers' AutoModel runs (tests/test_export_hf.py)
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *remote_code.MODULES.values()])
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["step"] == MARKOV_STEPS and config["source"]["weights"] == "ema"

    pretrained = load_pretrained(str(out))
    with open_checkpoint(str(run_dir)) as ckpt:
        reference = ckpt.model(ema=True)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, CHAIN["vocab_size"], (8, 64)))
    noise = draw_noise(8, 64, masks_per_sequence(pretrained.diffusion_config), torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = pretrained.model(x, noise.t, noise.u), reference(x, noise.t, noise.u)
    assert torch.equal(got["loss"], want["loss"]) and torch.equal(got["nelbo"], want["nelbo"])
    assert pretrained.tokenizer is None and pretrained.seq_len == 64
    logits = pretrained.denoiser(x, noise.t)
    assert logits.shape == (8, 64, CHAIN["vocab_size"])

    before = (out / "model.safetensors").read_bytes()
    status, _, err = in_process(export.main, capsys, "--checkpoint", str(run_dir), "--out", str(out), "--no-ema")
    assert status == 2 and f"--out {out} is not empty" in err
    assert (out / "model.safetensors").read_bytes() == before, "nothing overwritten"
    status, _, err = in_process(export.main, capsys, "--checkpoint", str(run_dir), "--out", str(out),
                                "--no-ema", "--overwrite")
    assert status == 0, err
    assert json.loads((out / "config.json").read_text())["source"]["weights"] == "trained"
    assert (out / "model.safetensors").read_bytes() != before


def test_training_writes_samples_to_tensorboard(markov_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = markov_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("samples/text_summary")
    assert [e.step for e in events] == [MARKOV_STEPS // 2, MARKOV_STEPS]
    text = events[-1].tensor_proto.string_val[0].decode()
    blocks = text.split("**sample ")[1:]
    assert len(blocks) == 4  # logging.samples
    for block in blocks:
        ids = [int(tok) for tok in block.split("\n\n", 1)[1].split()]
        assert len(ids) == 64 and all(0 <= i < CHAIN["vocab_size"] for i in ids)


WORDS = ("the of and to in is was for on that with as by at from his her an which or be are this "
         "had not but it have they one were all their there been has when who will more no if").split()


def documents(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 60))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """Text -> tokenizer -> shards -> a short training run, each step as the README runs it."""
    d = tmp_path_factory.mktemp("text")
    with open(d / "corpus.jsonl", "w") as f:
        for doc in documents(600, 0):
            f.write(json.dumps({"text": doc}) + "\n")
    tokenizer = d / "tok"
    for args in (("data_tools.train_tokenizer", "--input", str(d / "corpus.jsonl"), "--vocab-size", "320",
                  "--out", str(tokenizer)),
                 ("data_tools.shard", "--input", str(d / "corpus.jsonl"), "--tokenizer", f"{tokenizer}.model",
                  "--seq-len", "64", "--out", str(d / "data"), "--val-fraction", "0.1", "--workers", "1")):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr[-3000:]
    run_dir = d / "run"
    r = train(f"train.run_dir={run_dir}", f"data.manifest={d / 'data'}", "model.vocab_size=320",
              "train.steps=30", "checkpoint.every=30", "eval.every=30", "logging.every=10",
              "logging.sample_every=30", "logging.samples=6", "logging.sample_steps=16")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, d


def test_text_evaluation_gives_bits_per_byte(text_run, capsys):
    run_dir, d = text_run
    held_out = documents(40, 1)
    for i, doc in enumerate(held_out):
        (d / f"held-out-{i:02d}.txt").write_text(doc)
    status, out, err = in_process(evaluate.main, capsys, "--checkpoint", str(run_dir),
                                  "--text", str(d / "held-out-*.txt"))
    assert status == 0, err
    res = json.loads(out)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    tokens = sum(len(sp.encode(doc)) + 1 for doc in held_out)  # an EOS after each document
    rows = -(-tokens // 64)
    assert res["sequences"] == rows and res["tokens"] == rows * 64
    text_bytes = sum(len(doc.encode()) for doc in held_out)
    assert res["bits_per_byte"] == pytest.approx(res["nelbo_bits_per_token"] * rows * 64 / text_bytes)
    assert "entropy_bits_per_token" not in res and res["nelbo_bits_per_token"] < math.log2(320)

    status, out, err = in_process(evaluate.main, capsys, "--checkpoint", str(run_dir), "--max-sequences", "5")
    assert status == 0, err
    res = json.loads(out)
    split = load_manifest(str(d / "data")).split("val")
    assert res["sequences"] == 5 and res["split"] == "val"
    assert res["bits_per_byte"] == pytest.approx(res["nelbo_bits_per_token"] * split.tokens / split.source_bytes)


def test_every_sampler_of_the_command_keeps_the_prefix_and_batch_size_changes_nothing(text_run, tmp_path, capsys):
    """`sample --sampler X`: the prefix kept, --stop-at-eos pads after the first generated EOS,
    and with --batch-invariant a sample is the same drawn 3 at a time or one by one."""
    run_dir, d = text_run
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    prefix = sp.encode("the history of")

    def draw(name, *extra):
        out = tmp_path / f"{name}.jsonl"
        status, _, err = in_process(sample.main, capsys, "--checkpoint", str(run_dir), "--num-samples", "3",
                                    "--steps", "8", "--prefix", "the history of", "--seed", "5",
                                    "--out", str(out), *extra)
        assert status == 0, err
        return [json.loads(line)["tokens"] for line in out.read_text().splitlines()], err

    for sampler in ("confidence", "margin", "entropy", "threshold"):
        rows, err = draw(sampler, "--sampler", sampler, "--stop-at-eos")
        assert len(rows) == 3 and f"({sampler})" in err
        for row in rows:
            assert row[:len(prefix)] == prefix and len(row) == 64
            if sp.eos_id() in row[len(prefix):]:
                first = row.index(sp.eos_id(), len(prefix))
                assert set(row[first:]) == {sp.eos_id()}, "padded with EOS after the first one"
    together, _ = draw("together", "--sampler", "margin", "--batch-size", "3", "--batch-invariant")
    alone, _ = draw("alone", "--sampler", "margin", "--batch-size", "1", "--batch-invariant")
    assert together == alone
    # semi-autoregressive blocks: the prefix kept, and still the same whatever the batching
    blocks = [draw(f"blocks-{b}", "--sampler", "threshold", "--block-length", "16", "--batch-size", b,
                   "--batch-invariant")[0] for b in ("3", "1")]
    assert blocks[0] == blocks[1] and all(row[:len(prefix)] == prefix for row in blocks[0])
    for bad, message in ((["--sampler", "threshold", "--threshold", "1.5"], r"--threshold must lie in \(0, 1\], got 1\.5"),
                         (["--block-length", "16"], "--block-length applies to .*--sampler ancestral"),
                         (["--sampler", "margin", "--block-length", "65"], r"--block-length 65: it must be at most the length \(64\)")):
        with pytest.raises(SystemExit) as exit_:  # argparse's usage error
            in_process(sample.main, capsys, "--checkpoint", str(run_dir), *bad)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and re.search(message, err), err


def test_samples_are_decoded_and_keep_the_prefix(text_run, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, d = text_run
    out = tmp_path / "samples.jsonl"
    status, _, err = in_process(sample.main, capsys, "--checkpoint", str(run_dir), "--num-samples", "3",
                                "--steps", "16", "--prefix", "the history of", "--out", str(out))
    assert status == 0, err
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    prefix = sp.encode("the history of")
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        assert rec["tokens"][:len(prefix)] == prefix and len(rec["tokens"]) == 64
        assert rec["text"].startswith("the history of")

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    # A 30-step model: about 5 in 6 of its samples hold a whole common word (measured over 80);
    # six samples make missing them all a 1-in-40000 event rather than the sampler's seed's luck.
    assert text.count("**sample ") == 6 and any(w in text.split() for w in WORDS), "decoded words"

    exported = tmp_path / "exported"
    status, _, err = in_process(export.main, capsys, "--checkpoint", str(run_dir), "--out", str(exported))
    assert status == 0, err
    m = load_pretrained(str(exported))
    assert (exported / "tokenizer.model").read_bytes() == (d / "tok.model").read_bytes()
    assert m.tokenizer.decode(prefix) == "the history of" and m.eos_id == sp.eos_id()


def test_bad_input_names_the_culprit(text_run, markov_run, tmp_path, capsys):
    run_dir, d = text_run
    missing = tmp_path / "no-such-run"
    status, _, err = in_process(evaluate.main, capsys, "--checkpoint", str(missing))
    assert status == 2 and f"no checkpoint at {missing}" in err

    other = tmp_path / "other.model"
    other.write_bytes(b"not the tokenizer this model was trained with")
    text = tmp_path / "a.txt"
    text.write_text("the history of it")
    status, _, err = in_process(evaluate.main, capsys, "--checkpoint", str(run_dir), "--tokenizer", str(other),
                                "--text", str(text))
    assert status == 2 and f"tokenizer {other}" in err and "does not match" in err

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème".encode("latin-1"))
    status, _, err = in_process(evaluate.main, capsys, "--checkpoint", str(run_dir), "--text", str(latin1))
    assert status == 2 and f"{latin1} is not UTF-8 text" in err

    status, _, err = in_process(evaluate.main, capsys, "--checkpoint", "s3://md4-no-such-bucket/run")
    assert status == 2 and "no S3 credentials for s3://md4-no-such-bucket/run" in err  # not "no checkpoint"
    status, _, err = in_process(sample.main, capsys, "--checkpoint", str(run_dir), "--device", "gpu")
    assert status == 2 and "--device 'gpu' is no device" in err

    # export: a directory that holds something else is never written into; a failed export
    # leaves the one before it whole
    other_dir = tmp_path / "mine"
    other_dir.mkdir()
    (other_dir / "notes.txt").write_text("mine")
    status, _, err = in_process(export.main, capsys, "--checkpoint", str(run_dir), "--out", str(other_dir),
                                "--overwrite")
    assert status == 2 and "holds files but no exported model" in err
    assert os.listdir(other_dir) == ["notes.txt"]
    exported = tmp_path / "exported"
    assert in_process(export.main, capsys, "--checkpoint", str(run_dir), "--out", str(exported))[0] == 0
    before = {f: (exported / f).read_bytes() for f in os.listdir(exported)}
    status, _, err = in_process(export.main, capsys, "--checkpoint", str(run_dir), "--out", str(exported),
                                "--overwrite", "--no-ema", "--tokenizer", str(other))
    assert status == 2 and "does not match" in err
    assert {f: (exported / f).read_bytes() for f in os.listdir(exported)} == before
    samples_out = tmp_path / "samples.txt"
    samples_out.write_text("earlier samples")
    status, _, err = in_process(sample.main, capsys, "--checkpoint", str(run_dir), "--out", str(samples_out))
    assert status == 2 and f"--out {samples_out} exists" in err and samples_out.read_text() == "earlier samples"

    markov_dir, markov_data = markov_run
    status, _, err = in_process(evaluate.main, capsys, "--checkpoint", str(run_dir), "--data", str(markov_data))
    assert status == 2 and "vocab_size 16 disagrees with the model's model.vocab_size = 320" in err
    status, _, err = in_process(sample.main, capsys, "--checkpoint", str(markov_dir), "--prefix", "the")
    assert status == 2 and "has no tokenizer" in err


def test_skip_and_max_sequences_cut_disjoint_parts_of_the_seeded_order(tiny_data):
    from md4_dist.data import load_manifest
    from md4_dist.evaluate import _manifest_rows

    manifest = load_manifest(tiny_data)  # its val split: 100 sequences

    def rows(skip, limit):  # batches of 7: the cuts fall inside batches
        return torch.cat(list(_manifest_rows(manifest, "val", 7, 0, skip, limit, None)))

    whole = rows(0, 100)
    assert len(whole) == 100 and torch.equal(torch.cat([rows(0, 37), rows(37, 63)]), whole)
    assert torch.equal(rows(95, 5), whole[95:])


def test_a_checkpoint_file_crafted_to_run_code_is_refused_and_named(text_run, tmp_path, capsys):
    """Checkpoint files are pickles: each command reads them weights only (tensors, plain data and
    DeepSpeed's few classes), also where DeepSpeed's own code reads them (the trained weights'
    ZeRO shards), so a file that would run code is refused, named, and runs nothing."""
    run_dir, _ = text_run
    [original] = (run_dir / "checkpoints").glob("checkpoint-*")
    marker = tmp_path / "ran"
    for name, weights in (("rank-00000.pt", []), ("step/zero_pp_rank_1_mp_rank_00_optim_states.pt", ["--no-ema"])):
        crafted = tmp_path / f"crafted-{len(weights)}"
        shutil.copytree(original, crafted)
        write_crafted(crafted / name, marker)
        r = run_cli("md4_dist.evaluate", "--checkpoint", str(crafted), "--max-sequences", "4", *weights)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"{name} is refused: it holds an object no md4_dist checkpoint holds" in r.stderr
        assert "GLOBAL posix.system" in r.stderr
        status, _, err = in_process(export.main, capsys, "--checkpoint", str(crafted), "--out",
                                    str(tmp_path / "exported"), *weights)
        assert status == 2 and f"{name} is refused" in err
        assert not marker.exists(), "the crafted file ran its command"
        assert not (tmp_path / "exported").exists()


def test_a_checkpoint_set_aside_as_damaged_is_refused_with_why(tmp_path, capsys):
    """A resume that cannot load a checkpoint sets it aside with a note saying why
    (trainer/checkpoint.py; tests/test_checkpoint.py makes one): the commands refuse it by name."""
    aside = tmp_path / "checkpoint-00000100-1"
    aside.mkdir()
    (aside / "state.json").write_text("{}")
    (aside / "damaged.txt").write_text("checkpoint-00000100-1 cannot be loaded: rank-00001.pt is damaged "
                                       "(EOFError)\nThe run resumed from checkpoint-00000080-1 instead.\n")
    status, _, err = in_process(evaluate.main, capsys, "--checkpoint", str(aside))
    assert status == 2 and f"checkpoint {aside} was set aside as damaged" in err
    assert "rank-00001.pt is damaged (EOFError)" in err
