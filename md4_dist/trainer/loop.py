"""The per-worker train loop, run by Ray Train on every worker (`train_loop`).

`Trainer.train` reads top to bottom: a step, its record, evaluation, samples, a checkpoint, a stop.
Each "when" is an `Every` (trainer/state.py); the DeepSpeed engine comes from trainer/engine.py,
the run's own resumable state is a `TrainState`.

Each step: `accumulation` micro-batches of `train.micro_batch` sequences per worker, so every
optimizer step sees `train.global_batch` sequences whatever the world size. A sequence's diffusion
time and masks are keyed by its stream position (trainer/noise.py), not by the rank that reads
it, so a run follows the same trajectory on 1 worker or on many, up to float rounding.

Everything a step depends on is either in the checkpoint (weights, optimizer, LR schedule, EMA,
reader position, the metric sums since the last record) or a function of the step and the seed
(the noise), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from md4_dist.config import Config
from md4_dist.data import ManifestError, TokenStream, load_manifest, make_loader
from md4_dist.data.reader import describe_exclusion, excluded_shards
from md4_dist.data.storage import join
from md4_dist.diffusion.checks import value_checks
from md4_dist.diffusion.objectives import masks_per_sequence
from md4_dist.trainer import checkpoint, config_secrets, fatal, finite, metrics, perf, samples
from md4_dist.trainer.ema import PartitionedEMA
from md4_dist.trainer.engine import NormAtRecords, build_engine, learned_exponents
from md4_dist.trainer.inputs import model_inputs
from md4_dist.trainer.ledger import SampleLedger
from md4_dist.trainer.noise import TRAIN, NoiseByPosition
from md4_dist.trainer.profiling import StepProfiler
from md4_dist.trainer.state import Every, TrainState
from md4_dist.trainer.stop import StopWatch
from md4_dist.trainer.validation import Validation


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def micro_step(engine, batch: dict, noise: NoiseByPosition, device: torch.device,
               micro_batch: int) -> tuple[dict, int]:
    """Forward, backward and (at the accumulation boundary) the optimizer step for one
    micro-batch; returns the model's outputs and the rows the micro-batch held."""
    inputs, rows = model_inputs(batch, noise, device)
    out = engine(*inputs)
    # the reader's training batches are full (damaged shards are left out of the order, not
    # holes in it); a shorter micro-batch a caller makes weighs what it holds
    engine.backward(out["loss"] * (rows / micro_batch))
    engine.step()
    return out, rows


def train_loop(loop_config: dict) -> None:
    """Ray Train's worker function: `loop_config` holds the resolved config without its secrets,
    the driver's holder of those, its stop request and its record of uncurable errors
    (trainer/ray_job.py, trainer/config_secrets.py, trainer/fatal.py)."""
    import ray.train

    record = loop_config["fatal"]
    if fatal.earlier_failure(record):
        return  # an earlier attempt met an error no restart cures: fit ends, the driver raises it
    ctx = ray.train.get_context()
    with fatal.recorded_as_fatal(record, ctx.get_world_rank()):
        Trainer(loop_config, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                ctx.get_local_world_size()).train()


class Trainer:
    """One worker's run: set up (or resumed) in the constructor, trained by `train`."""

    def __init__(self, loop_config: dict, rank: int, world: int, local_rank: int, local_world: int):
        cfg = self.cfg = config_secrets.received(loop_config["config"], loop_config["secrets"])
        self.loop_config, self.rank, self.world = loop_config, rank, world
        self.device = torch.device(f"cuda:{local_rank}" if cfg.cluster.use_gpu else "cpu")
        if cfg.cluster.use_gpu:
            torch.cuda.set_device(self.device)
        found, checked_s = self._find_checkpoint()  # before DeepSpeed: it may change its config
        resized = found is not None and checkpoint.converts(found[1], world, cfg.deepspeed.zero_stage)
        self.engine, self.lr_schedule = build_engine(cfg, world, load_universal=resized, local_size=local_world)
        self.norm_at = NormAtRecords(self.engine)
        self.ema = PartitionedEMA(self.engine.module, cfg.train.ema) if cfg.train.ema else None
        self.state = TrainState(self.device)
        if found is not None:
            self._resume(*found, checked_s)
        self.saved_step = self.state.step  # the latest checkpoint's (0: none yet)

        self.manifest = load_manifest(cfg.data.manifest, cfg.storage)
        self.manifest.check_compatible(cfg.model.vocab_size, cfg.data.seq_len)
        excluded = self._excluded_shards()
        self.stream = TokenStream(self.manifest, "train", cfg.train.micro_batch, rank=rank, world_size=world,
                                  seed=cfg.train.seed, state=self.state.reader, exclude=excluded.get("train", ()),
                                  storage=cfg.storage, run_length=cfg.data.run_length,
                                  lanes=cfg.train.global_batch)
        self.batches = iter(make_loader(self.stream, cfg.data.loader_workers))
        self.noise = NoiseByPosition(cfg.train.seed, TRAIN, cfg.train.global_batch, cfg.data.seq_len,
                                     masks_per_sequence(cfg.diffusion), cfg.diffusion.antithetic, self.device)
        self.validation = Validation(cfg, self.manifest, rank, world, self.device, excluded.get("val", ())) \
            if cfg.eval.every else None
        self.tokenizer = None
        if cfg.logging.sample_every and rank == 0 and self.manifest.tokenizer is not None:
            from md4_dist.tokenizer import load_tokenizer
            self.tokenizer = load_tokenizer(self.manifest.tokenizer, storage=cfg.storage)

        # metrics.jsonl, TensorBoard, Ray's metrics and W&B (trainer/metrics.py)
        self.writer = metrics.for_run(cfg, start_step=self.state.step + 1) if rank == 0 else None
        self.profiler = StepProfiler(cfg, rank)  # logging.profile_steps
        self.ledger = SampleLedger(cfg.train.run_dir, cfg.storage, rank, world, self.state.attempt) \
            if cfg.data.record_sample_ids else None
        self.watch = StopWatch(loop_config["stop"], rank, cfg.cluster.collective_timeout_s)
        last = cfg.train.steps
        self.record_due, self.eval_due = Every(cfg.logging.every, last), Every(cfg.eval.every, last)
        self.samples_due = Every(cfg.logging.sample_every, last)
        self.checkpoint_due = Every(cfg.checkpoint.every, last)
        self.peak = perf.peak_tflops(cfg, torch.cuda.get_device_name(self.device) if cfg.cluster.use_gpu else None)
        self.flops_per_token = perf.flops_per_token(cfg.model, cfg.diffusion, cfg.data.seq_len)

    def train(self) -> None:
        cfg, first = self.cfg, self.state.step + 1
        self.started = self.window = time.perf_counter()  # the run, and the record's training time
        self.data_wait = 0.0  # this rank's time blocked on its next batch, since the last record
        # value checks off: the reader's tokens are in range; no host syncs in the step
        with value_checks(False), self._writer_closed_at_the_end():
            for step in range(first, cfg.train.steps + 1):
                with self.profiler(step):
                    self._step(step)
                record, histograms = self._metrics(step)
                if not math.isfinite(record.get("loss", 0.0)):  # every rank pooled the same loss
                    if self.writer is not None:  # the record seen before the stop (no histogram:
                        self.writer.write(record)  # TensorBoard's refuses NaN)
                    raise finite.loss_error(record["loss"], step, self.saved_step)
                texts = {}
                if self.validation is not None and self.eval_due(step):
                    with self._aside(), self._ema_weights():
                        record.update(self.validation(self.engine))
                if self.samples_due(step):
                    with self._aside(), self._ema_weights():
                        drawn = samples.draw(self.engine.module, cfg, step, self.device)
                    texts["samples"] = samples.as_markdown(drawn, self.tokenizer, self.manifest.eos_id)
                if self.writer is not None and (len(record) > 1 or texts):
                    self.writer.write(record, histograms, texts)
                if self.writer is not None and len(record) > 1:
                    print(_progress(record, cfg, time.perf_counter() - self.started, first - 1), flush=True)
                why, stop = self.watch.check()  # a SIGTERM or a preemption notice: save now
                if why or self.checkpoint_due(step):
                    self._save(why)
                if stop:
                    if self.rank == 0:
                        print(f"stopped after step {step} of {cfg.train.steps}; the same command "
                              "resumes the run", flush=True)
                    break
        if self.writer is not None:
            if self.state.step == cfg.train.steps:
                print(f"done: {cfg.train.steps} steps; metrics {join(cfg.train.run_dir, 'metrics.jsonl')}, "
                      f"TensorBoard logs {join(cfg.train.run_dir, 'tensorboard')}", flush=True)

    @contextmanager
    def _writer_closed_at_the_end(self):
        """Rank 0's records closed and (on object storage) uploaded when the loop ends, also by an
        error: what the run recorded before it stopped is kept. A failure to close on the way out
        of an error is printed, and the error goes on."""
        try:
            yield
        except Exception:
            if self.writer is not None:
                try:
                    self.writer.close()
                except Exception as e:  # noqa: BLE001 - the loop's own error is the one to raise
                    print(f"warning: the run's last records may not all be kept: {e}", flush=True)
            raise
        if self.writer is not None:
            self.writer.close()

    def _step(self, step: int) -> None:
        """One optimizer step: its micro-batches, the EMA, the sample ledger."""
        ids = []
        self.norm_at(self.record_due(step))  # the gradient norm where the record shows it
        for _ in range(self.engine.gradient_accumulation_steps()):
            began = time.perf_counter()
            batch = next(self.batches)
            self.data_wait += time.perf_counter() - began
            self.state.reader = batch["state"]
            if self.ledger is not None:
                ids += batch["ids"].tolist()
            out, rows = micro_step(self.engine, batch, self.noise, self.device, self.cfg.train.micro_batch)
            self.state.sums.add(out, rows)
        if self.ema is not None:
            self.ema.update()
        if self.ledger is not None:
            self.ledger.write(step, ids)
        self.state.step = step

    def _metrics(self, step: int) -> tuple[dict, dict]:
        """The training record of this step ({"step"} alone when none is due), and histograms."""
        record = {"step": step}
        if not self.record_due(step):
            return record, {}
        cfg = self.cfg
        loss, bits, rows = self.state.sums.pooled()  # every rank, at the same steps
        now = time.perf_counter()
        position = self.stream.position(self.state.reader)
        record.update(loss=loss, nelbo_bits_per_token=bits, lr=self.lr_schedule.get_last_lr()[0],
                      tokens_per_s=rows * cfg.data.seq_len / (now - self.window),
                      # the mean of the steps since the last record: rows / global_batch of them
                      step_time_s=(now - self.window) * cfg.train.global_batch / rows,
                      samples_seen=step * cfg.train.global_batch,
                      epoch=position / self.stream.sequences,  # epochs of the train split read (fractional)
                      # sequences of shards left out as damaged that the stream has stepped over
                      skipped_sequences=self.stream.skipped_before(position))
        if self.peak is not None:  # the model's FLOPs against every worker's peak
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak * 1e12 * self.world)
        # the largest of any worker: the share of the training time a rank's host spent blocked
        # on its loader (the rank the others waited for: at hundreds of ranks, the reads that do
        # not keep up), and on GPUs the peak memory since the run (re)started
        memory = torch.cuda.max_memory_allocated(self.device) / 2**30 if cfg.cluster.use_gpu else 0.0
        most = torch.tensor([self.data_wait / (now - self.window), memory], device=self.device)
        dist.all_reduce(most, dist.ReduceOp.MAX)
        record["data_wait_share"] = most[0].item()
        if cfg.cluster.use_gpu:
            record["peak_memory_gib"] = most[1].item()
        self.window, self.data_wait = now, 0.0
        grad_norm = self.engine.get_global_grad_norm()  # None where DeepSpeed keeps none (stage 0, fp32)
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        w = learned_exponents(self.engine)  # GenMD4's schedule; None for MD4
        if w is None:
            return record, {}
        record.update(exponent_min=w.min().item(), exponent_mean=w.mean().item(), exponent_max=w.max().item())
        return record, {"exponents": w}

    def _excluded_shards(self) -> dict[str, dict[str, str]]:
        """The shards to leave out, {split: {name: why}}: rank 0 checks every shard's size against
        the manifest (data.on_corrupt = "raise": a ManifestError naming them), every rank gets its
        verdict, so all build the same order."""
        verdict: list = [None]
        if self.rank == 0:
            try:
                verdict[0] = excluded_shards(self.manifest, self.cfg.data.on_corrupt, self.cfg.storage)
            except ManifestError as e:
                verdict[0] = e
        dist.broadcast_object_list(verdict, src=0)
        if isinstance(verdict[0], ManifestError):
            raise verdict[0]
        if verdict[0] and self.rank == 0:
            print(describe_exclusion(self.manifest, verdict[0]), flush=True)
        return verdict[0]

    @contextmanager
    def _aside(self):
        """Work that is not training (evaluation, samples): left out of the record's tokens/s."""
        began = time.perf_counter()
        yield
        self.window += time.perf_counter() - began

    def _ema_weights(self):
        return self.ema.swapped() if self.ema is not None else nullcontext()

    def _find_checkpoint(self) -> tuple[tuple[object, dict] | None, float]:
        """The newest checkpoint that passes its check, (checkpoint, state), and the check's time;
        rank 0 first removes what an earlier attempt left half-written after it."""
        newest = checkpoint.registered()
        if self.rank == 0:
            for name in checkpoint.discard_after(self.cfg.train.run_dir, self.cfg.storage,
                                                 checkpoint.step_of(newest)):
                print(f"removed {name}: an earlier attempt died writing it", flush=True)
        began = time.perf_counter()
        found = checkpoint.choose(newest, self.rank, self.world, self.device)
        return found, time.perf_counter() - began

    def _resume(self, saved, state: dict, checked_s: float) -> None:
        began = time.perf_counter()
        ranks = checkpoint.load(self.engine, saved, state, self.rank, self.world)
        self.state.load(state, ranks, self.world, self.rank)
        if self.ema is not None:
            if state["world_size"] == self.world:  # this rank's own share
                self.ema.load_state_dict(ranks[0]["ema"])
            else:  # resized: the EMA re-split
                self.ema.load_resharded([r["ema"] for r in ranks], self.rank, self.world)
        if self.rank == 0:
            print(f"resuming after step {self.state.step} from the latest checkpoint ({state['world_size']} "
                  f"workers then, {self.world} now): checked in {checked_s:.1f} s, loaded in "
                  f"{time.perf_counter() - began:.1f} s", flush=True)

    def _save(self, why: str) -> None:
        cfg, step = self.cfg, self.state.step
        finite.check_before_checkpoint(self.engine.module, self.state.sums.values, step, self.saved_step)
        if self.ledger is not None:  # before the checkpoint: a resume from it never rewrites these steps
            self.ledger.upload()
        cost = checkpoint.save(
            self.engine, step,
            state={"samples_seen": step * cfg.train.global_batch, "reader": self.state.reader,
                   # the resolved config without its secrets (strict_config.to_dict)
                   "world_size": self.world, "config": self.loop_config["config"],
                   # what evaluate, sample and export need of the data: its tokenizer
                   "tokenizer": self.manifest.tokenizer, "eos_id": self.manifest.eos_id},
            rank_state=self.state.rank_state() | {"ema": self.ema.state_dict() if self.ema else None},
            metrics={"step": step}, rank=self.rank, attempt=self.state.attempt)
        self.saved_step = step
        if self.rank == 0:
            # ray.train.report has returned: every rank entered it, and this rank's files are in
            # the run directory. Ray's controller registers the checkpoint (the one a restart
            # resumes from) only once it has collected every rank's report, after this line.
            print(f"checkpoint after step {step}{f' ({why})' if why else ''}: "
                  f"{cost['bytes'] / 2**30:.3f} GiB, written in {cost['write_s']:.1f} s, "
                  f"uploaded in {cost['commit_s']:.1f} s; Ray registers it once every rank's "
                  "upload is in", flush=True)


def _progress(record: dict, cfg: Config, elapsed: float, done: int) -> str:
    step = record["step"]
    line = f"step {step}/{cfg.train.steps}"
    if "loss" in record:
        line += (f"  loss {record['loss']:.4f}  bits/token {record['nelbo_bits_per_token']:.4f}  "
                 f"tokens/s {record['tokens_per_s']:,.0f}")
    if "val_nelbo_bits_per_token" in record:
        line += f"  val bits/token {record['val_nelbo_bits_per_token']:.4f} ± {record['val_nelbo_se']:.4f}"
    return line + f"  eta {_eta(elapsed / (step - done) * (cfg.train.steps - step))}"
