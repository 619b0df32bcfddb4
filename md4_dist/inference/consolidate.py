"""A training checkpoint's weights, whole, in one process: what evaluate, sample and export start
from, on any device and with no DeepSpeed engine or Ray.

    with open_checkpoint("runs/owt") as ckpt:            # a run directory: its latest checkpoint
        model = ckpt.model(ema=True)                     # DiffusionModel, fp32, on the CPU
        ckpt.config, ckpt.step, ckpt.tokenizer           # its config, step and tokenizer record

`URL` may be a run directory (the latest checkpoint Ray registered for it), or one checkpoint
directory, `<run_dir>/checkpoints/checkpoint-<step>-<attempt>`, local or on object storage.
The trained weights are DeepSpeed's fp32 master weights, wherever its optimizer keeps them
(`TrainedCheckpoint._trained`); the EMA's come from the ranks' shares in rank-*.pt
(md4_dist/checkpoint_format.py, which also names the rest): under ZeRO-3 each rank averaged its
flat slice of every parameter, so the slices are joined and the padding cut.
From object storage only the files the chosen weights need are copied: the EMA shares are about
a quarter of a checkpoint that also holds the optimizer's fp32 weights and moments.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field

import torch

from md4_dist.checkpoint_format import (CHECKPOINTS, DAMAGED, SNAPSHOT, STATE, TAG, CheckpointError,
                                        deepspeed_reading, ema_shares, load_file, to_universal, version_problem,
                                        whole_average)
from md4_dist.config import Config, config_from_dict
from md4_dist.data.storage import StorageConfig, explain, filesystem, join, protocol, read_bytes
from md4_dist.diffusion_model import DiffusionModel


def remove(url: str, storage: StorageConfig | None = None) -> None:
    """Delete the file or directory at `url` (a local path or an object-storage URL), if there is
    one; an error names the URL."""
    try:
        fs, path = filesystem(url, storage)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the URL named
        raise explain(url, e) from e


@dataclass
class TrainedCheckpoint:
    """One checkpoint of a training run, opened for use (`open_checkpoint`)."""

    url: str  # the checkpoint directory
    state: dict  # its state.json
    local: str  # the directory itself, or (remote) a temporary one its files are copied into
    storage: StorageConfig | None = None
    copied: set[str] = field(default_factory=set)  # names already copied from a remote checkpoint

    def files(self, *names: str) -> str:
        """The local directory that holds `names` (files or directories of the checkpoint),
        copying those not copied yet when the checkpoint is remote. Each lands under a temporary
        name first, so a copy that fails half-way is never taken for a whole one."""
        if protocol(self.url) != "file":
            for name in names:
                if any(name == c or name.startswith(f"{c}/") for c in self.copied):
                    continue
                target = os.path.join(self.local, name)
                partial = f"{target}.partial"
                try:
                    fs, path = filesystem(join(self.url, name), self.storage)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    fs.get(path, partial, recursive=fs.isdir(path))
                except Exception as e:  # noqa: BLE001 - re-raised with the URL named
                    remove(partial)
                    raise explain(join(self.url, name), e) from e
                remove(target)  # a directory of which single files were copied before
                os.replace(partial, target)
                self.copied.add(name)
        return self.local

    @property
    def config(self) -> Config:
        return config_from_dict(self.state["config"])

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def tokenizer(self) -> dict | None:
        """The training data's tokenizer record, {"url", "sha256"}, or None (token-id corpora)."""
        return self.state["tokenizer"]

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """DiffusionModel's state dict in fp32: the EMA of the parameters, or the trained ones."""
        cfg = self.config
        if ema and not cfg.train.ema:
            raise CheckpointError(f"checkpoint {self.url} has no EMA weights (its run had "
                                  "train.ema = 0): use the trained weights (--no-ema)")
        return self._ema(cfg) if ema else self._trained(cfg)

    def model(self, ema: bool = True) -> DiffusionModel:
        cfg = self.config
        model = DiffusionModel(cfg.model, cfg.diffusion)
        model.load_state_dict(self.weights(ema))
        return model.eval()

    def _load(self, name: str):
        """The checkpoint's file `name`, weights only; one refused or damaged is named."""
        return load_file(os.path.join(self.files(name), name), shown=join(self.url, name),
                         deepspeed=name.startswith(f"{TAG}/"))  # DeepSpeed's files, under TAG

    def _trained(self, cfg: Config) -> dict[str, torch.Tensor]:
        """The optimizer's fp32 master weights. Where DeepSpeed keeps them depends on its
        optimizer: stage 0 in the model-states file (in bf16 runs, beside bf16 working weights),
        ZeRO-1 with bf16 (its BF16_Optimizer) in shards of its own format, other ZeRO runs in
        the shards that `zero_to_fp32` reads."""
        if cfg.deepspeed.zero_stage == 0:
            states = self._load(f"{TAG}/mp_rank_00_model_states.pt")
            if cfg.deepspeed.precision == "fp32":  # the module's weights are the master weights
                return {k: v.float() for k, v in states["module"].items()}
            opt = states["optimizer"]  # DeepSpeed's fp16/bf16 optimizer; the trainer's one group
            if "fp32_groups" in opt:  # its unfused variant (torch's Adam): a tensor per parameter
                return self._by_parameter_order(cfg, opt["fp32_groups"][0])
            return self._by_parameter_order(cfg, opt["fp32_groups_flat"][0])  # fused: one flat tensor
        shards = os.path.join(self.files(TAG), TAG)
        if any(n.startswith("bf16_zero_") for n in os.listdir(shards)):
            return self._via_universal(cfg, shards)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # its progress lines to stderr: stdout is the CLIs' output
        with redirect_stdout(sys.stderr), deepspeed_reading(self.url, os.path.dirname(shards)):
            weights = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(shards), TAG)
        return {k: v.detach().float() for k, v in weights.items()}

    def _by_parameter_order(self, cfg: Config, tensors) -> dict[str, torch.Tensor]:
        """A list of tensors, or one flat tensor, in the order of the model's parameters (the
        trainer gives DeepSpeed one parameter group), by name."""
        named = _parameters(cfg)
        if isinstance(tensors, torch.Tensor) and tensors.numel() == sum(p.numel() for _, p in named):
            tensors = [t.view(p.shape) for t, (_, p) in zip(tensors.split([p.numel() for _, p in named]), named)]
        if [tuple(t.shape) for t in tensors] != [tuple(p.shape) for _, p in named]:
            raise CheckpointError(f"checkpoint {self.url}: the optimizer's fp32 weights do not match "
                                  "the model's parameters")
        return {name: t.float() for (name, _), t in zip(named, tensors)}

    def _via_universal(self, cfg: Config, shards: str) -> dict[str, torch.Tensor]:
        """DeepSpeed's universal conversion: zero/<parameter>/fp32.pt, a file per parameter."""
        with tempfile.TemporaryDirectory(prefix="md4-universal-") as u:
            try:
                with redirect_stdout(sys.stderr), deepspeed_reading(self.url, os.path.dirname(shards)):
                    to_universal(shards, os.path.join(u, TAG))
            except AssertionError as e:  # DeepSpeed's word for a checkpoint it cannot convert
                raise CheckpointError(f"checkpoint {self.url}: DeepSpeed cannot convert its shards "
                                      f"({e})") from None
            zero = os.path.join(u, TAG, "zero")
            return {name: load_file(os.path.join(zero, name, "fp32.pt"), shown=f"{self.url} (converted: "
                                    f"zero/{name}/fp32.pt)")["param"].float() for name, _ in _parameters(cfg)}

    def _ema(self, cfg: Config) -> dict[str, torch.Tensor]:
        shares = ema_shares(self._load, self.state["world_size"])
        named = _parameters(cfg)  # the EMA's order
        whole = whole_average(shares, [p.shape for _, p in named], cfg.deepspeed.zero_stage == 3)
        return {name: w for (name, _), w in zip(named, whole)}


def _parameters(cfg: Config) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's parameters by name, in order, on the meta device (names and shapes only)."""
    with torch.device("meta"):
        return list(DiffusionModel(cfg.model, cfg.diffusion).named_parameters())


@contextmanager
def open_checkpoint(url: str, storage: StorageConfig | None = None):
    """The checkpoint at `url` (see the module docstring), copied locally if it is remote."""
    url, raw = _checkpoint_dir(url.rstrip("/"), storage)
    note = read_bytes(join(url, DAMAGED), storage, missing_ok=True)  # trainer/checkpoint.py's
    if note is not None:
        raise CheckpointError(f"checkpoint {url} was set aside as damaged when its run resumed: "
                              f"{note.decode(errors='replace').strip()}")
    try:
        state = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{join(url, STATE)} is not valid JSON ({e})") from None
    problem = version_problem(state)
    if problem is not None:
        raise CheckpointError(f"checkpoint {url} has {problem}")
    if "tokenizer" not in state:
        raise CheckpointError(f"checkpoint {url} was written by an md4_dist that did not record the "
                              "data's tokenizer: resume the run for one checkpoint with this version")
    if protocol(url) == "file":
        yield TrainedCheckpoint(url, state, url, storage)
        return
    with tempfile.TemporaryDirectory(prefix="md4-checkpoint-") as local:
        yield TrainedCheckpoint(url, state, local, storage)


def _checkpoint_dir(url: str, storage: StorageConfig | None) -> tuple[str, bytes]:
    """The checkpoint directory and its state.json: `url` itself when it holds one, else the
    latest checkpoint its run registered."""
    raw = read_bytes(join(url, STATE), storage, missing_ok=True)
    if raw is not None:
        return url, raw
    for record in (join(join(url, CHECKPOINTS), SNAPSHOT), join(url, SNAPSHOT)):
        snapshot = read_bytes(record, storage, missing_ok=True)
        if snapshot is None:
            continue
        try:
            latest = json.loads(snapshot).get("latest_checkpoint_result")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{record} is not valid JSON ({e})") from None
        if not latest:
            raise CheckpointError(f"the run at {url} has no checkpoint yet ({record} lists none)")
        found = join(record.rsplit("/", 1)[0], latest["checkpoint_dir_name"])
        return found, read_bytes(join(found, STATE), storage)
    raise CheckpointError(f"no checkpoint at {url}: it is neither a checkpoint directory (with "
                          f"{STATE}) nor a run directory (with {CHECKPOINTS}/{SNAPSHOT})")
