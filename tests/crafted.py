"""A checkpoint file made to run code, for the tests that md4_dist refuses it: unpickled by a
loader that trusts the file (torch.load with weights_only=False), it runs a shell command."""

import os

import torch


class RunsCode:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_crafted(path, marker) -> None:
    """A torch.save file at `path` whose unpickling, if it ran code, would create `marker`."""
    torch.save({"ema": RunsCode(f"touch {marker}")}, path)
