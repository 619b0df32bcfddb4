"""A training checkpoint's weights, whole, in one process: what evaluate, sample and export start
from, on any device and with no DeepSpeed engine or Ray.

    with open_checkpoint("runs/owt") as ckpt:            # a run directory: its latest checkpoint
        model = ckpt.model(ema=True)                     # DiffusionModel, fp32, on the CPU
        ckpt.config, ckpt.step, ckpt.tokenizer           # its config, step and tokenizer record

`URL` may be a run directory (the latest checkpoint Ray registered for it), or one checkpoint
directory, `<run_dir>/checkpoints/checkpoint-<step>-<attempt>`, local or on object storage.
The trained weights come from DeepSpeed's fp32 copy of the ZeRO shards (its own consolidation,
`zero_to_fp32`); the EMA's from the ranks' shares in rank-*.pt (trainer/ema.py): under ZeRO-3 each
rank averaged its flat slice of every parameter, so the slices are joined and the padding cut.
From object storage only the files the chosen weights need are copied: the EMA shares are about
a quarter of a checkpoint that also holds the optimizer's fp32 weights and moments.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass

import torch

from md4_dist.config import Config, config_from_dict
from md4_dist.data.storage import StorageConfig, explain, filesystem, join, protocol, read_bytes
from md4_dist.trainer.checkpoint import FORMAT_VERSION, TAG, CheckpointError
from md4_dist.trainer.module import DiffusionModel

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


@dataclass
class Checkpoint:
    url: str  # the checkpoint directory
    state: dict  # its state.json
    local: str  # the directory itself, or (remote) a temporary one its files are copied into
    storage: StorageConfig | None = None

    def files(self, *names: str) -> str:
        """The local directory that holds `names` (files or directories of the checkpoint),
        copying those not copied yet when the checkpoint is remote."""
        if protocol(self.url) != "file":
            for name in names:
                if not os.path.exists(os.path.join(self.local, name)):
                    try:
                        fs, path = filesystem(join(self.url, name), self.storage)
                        target = os.path.join(self.local, name)
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        fs.get(path, target, recursive=fs.isdir(path))
                    except Exception as e:  # noqa: BLE001 - re-raised with the URL named
                        raise explain(join(self.url, name), e) from e
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

    def _trained(self, cfg: Config) -> dict[str, torch.Tensor]:
        if cfg.deepspeed.zero_stage == 0:  # no shards: the module's own state dict
            states = torch.load(os.path.join(self.files(f"{TAG}/mp_rank_00_model_states.pt"), TAG,
                                             "mp_rank_00_model_states.pt"),
                                map_location="cpu", weights_only=False)
            return {k: v.float() for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with redirect_stdout(sys.stderr):  # its progress lines: stdout is the CLIs' output
            weights = get_fp32_state_dict_from_zero_checkpoint(self.files(TAG), TAG)
        return {k: v.detach().float() for k, v in weights.items()}

    def _ema(self, cfg: Config) -> dict[str, torch.Tensor]:
        names = [f"rank-{r:05d}.pt" for r in range(self.state["world_size"])]
        local = self.files(*names)
        shares = [torch.load(os.path.join(local, name), map_location="cpu",
                             weights_only=False)["ema"]["shadow"] for name in names]
        with torch.device("meta"):  # names and shapes only
            skeleton = DiffusionModel(cfg.model, cfg.diffusion)
        weights = {}
        for i, (name, p) in enumerate(skeleton.named_parameters()):  # the EMA's order
            if cfg.deepspeed.zero_stage == 3:  # flat slices, the last padded
                whole = torch.cat([share[i].flatten() for share in shares])[:p.numel()]
            else:  # every rank averaged the whole parameter
                whole = shares[0][i]
            weights[name] = whole.view(p.shape).float()
        return weights


@contextmanager
def open_checkpoint(url: str, storage: StorageConfig | None = None):
    """The checkpoint at `url` (see the module docstring), copied locally if it is remote."""
    url = url.rstrip("/")
    url = _checkpoint_dir(url, storage)
    try:
        state = json.loads(read_bytes(join(url, "state.json"), storage))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{join(url, 'state.json')} is not valid JSON ({e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {url} has format version {state.get('format_version')}; "
                              f"this code reads {FORMAT_VERSION}")
    if "tokenizer" not in state:
        raise CheckpointError(f"checkpoint {url} was written by an md4_dist that did not record the "
                              "data's tokenizer: resume the run for one checkpoint with this version")
    if protocol(url) == "file":
        yield Checkpoint(url, state, url, storage)
        return
    with tempfile.TemporaryDirectory(prefix="md4-checkpoint-") as local:
        yield Checkpoint(url, state, local, storage)


def _checkpoint_dir(url: str, storage: StorageConfig | None) -> str:
    """`url` itself when it holds state.json, else the latest checkpoint its run registered."""
    from md4_dist.data.storage import StorageError

    def readable(u):
        try:
            return read_bytes(u, storage)
        except StorageError:
            return None

    if readable(join(url, "state.json")) is not None:
        return url
    for record in (join(join(url, "checkpoints"), SNAPSHOT), join(url, SNAPSHOT)):
        raw = readable(record)
        if raw is None:
            continue
        latest = json.loads(raw).get("latest_checkpoint_result")
        if not latest:
            raise CheckpointError(f"the run at {url} has no checkpoint yet ({record} lists none)")
        return join(record.rsplit("/", 1)[0], latest["checkpoint_dir_name"])
    raise CheckpointError(f"no checkpoint at {url}: it is neither a checkpoint directory (with "
                          f"state.json) nor a run directory (with checkpoints/{SNAPSHOT})")
