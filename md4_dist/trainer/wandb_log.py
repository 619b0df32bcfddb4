"""Rank 0's mirror of the run's records in Weights & Biases (`logging.wandb`, config.py): the same
scalars under the same grouped tags as TensorBoard (metrics.TAGS), the schedule's histogram, and
the samples as a table. W&B writes its files under the run directory (`<run_dir>/wandb`; staged
and uploaded with the metrics when the run directory is on object storage), which is where an
offline run waits for `wandb sync`.

The W&B run's id is kept in `<run_dir>/wandb.json`, written when the run first starts: every later
attempt (a restart, a resume by the same command) continues that W&B run (resume="allow").
Offline, each attempt writes a run directory of its own, all under the one id.

    mirror = WandbMirror(cfg, files)          # files: the MetricsWriter's StagedFiles
    mirror.write(step, scalars, histograms, texts)
    mirror.close()
"""

from __future__ import annotations

import json

from md4_dist.config import Config, ConfigError
from md4_dist.data.storage import join, read_bytes, write_bytes
from md4_dist.strict_config import to_dict
from md4_dist.trainer.metrics import StagedFiles

ID_FILE = "wandb.json"


def require(cfg: Config) -> None:
    """A clear error, before any worker starts, when the config asks for W&B without it installed."""
    if not cfg.logging.wandb.enabled:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("config key 'logging.wandb.enabled' is true, but the wandb package is not "
                          "installed: pip install 'md4_dist[wandb]' (or set it to false)") from None


class WandbMirror:
    def __init__(self, cfg: Config, files: StagedFiles):
        require(cfg)
        import wandb

        w, saved = cfg.logging.wandb, join(cfg.train.run_dir, ID_FILE)
        held = read_bytes(saved, cfg.storage, missing_ok=True)
        self.wandb = wandb
        self.run = wandb.init(
            project=w.project, entity=w.entity or None, name=w.name or cfg.train.name, mode=w.mode,
            id=json.loads(held)["id"] if held is not None else None,  # None: W&B makes one
            resume="allow", dir=files.root, config=to_dict(cfg),
            # the workers' output is Ray's to collect; W&B would capture it a second time
            settings=wandb.Settings(console="off"))
        if held is None:
            write_bytes(saved, (json.dumps({"id": self.run.id}) + "\n").encode(), cfg.storage)

    def write(self, step: int, scalars: dict, histograms: dict, texts: dict) -> None:
        if step < self.run.step:
            # a resumed online run: W&B holds these steps from the earlier attempt, which the resume
            # repeats exactly, and refuses steps below its last one
            return
        data = dict(scalars)
        data.update({k: self.wandb.Histogram(v.float().cpu().numpy()) for k, v in histograms.items()})
        data.update({k: self.wandb.Table(columns=["text"], data=[[text]]) for k, text in texts.items()})
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()
        # finish() can return before W&B's service has written the run's file out: seen offline,
        # 2 of 48 files still held only their 7-byte header, and the run directory's last upload
        # (right after this) would have kept that. teardown() waits for the service to exit.
        self.wandb.teardown()
