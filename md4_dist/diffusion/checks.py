"""Argument checks shared by the losses, the forward process and the samplers.

Shape and dtype checks read metadata only. Value checks (ids in range, t in (0, 1], finite) read
the tensor, which synchronises with an accelerator; the trainer's hot path turns them off with
`value_checks(False)` once its inputs are known good.
"""

from __future__ import annotations

import contextlib

import torch

_VALUE_CHECKS = True


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the data-dependent checks on or off inside the block."""
    global _VALUE_CHECKS
    previous, _VALUE_CHECKS = _VALUE_CHECKS, enabled
    try:
        yield
    finally:
        _VALUE_CHECKS = previous


def tokens(name: str, x: torch.Tensor, shape: tuple[int, ...] | None, high: int) -> None:
    """x: int64 with the given shape (None: any [B, L]) and values in [0, high]."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
        raise ValueError(f"{name} must be an int64 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2 or (shape is not None and tuple(x.shape) != tuple(shape)):
        want = f"{tuple(shape)}" if shape is not None else "[B, L]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if _VALUE_CHECKS and x.numel() and (x.min() < 0 or x.max() > high):
        raise ValueError(f"{name} holds ids outside [0, {high}]: min {int(x.min())}, max {int(x.max())}")


def masked_copy(name: str, zt: torch.Tensor, x: torch.Tensor, mask_id: int) -> None:
    """zt: same shape as x, each entry either x's token or the mask id."""
    tokens(name, zt, tuple(x.shape), mask_id)
    if _VALUE_CHECKS and not ((zt == x) | (zt == mask_id)).all():
        raise ValueError(f"{name} must equal x or the mask id {mask_id} at every position")


def times(name: str, t: torch.Tensor, batch: int, low: float = 0.0) -> None:
    """t: floating [B], finite, in (low, 1]."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    if _VALUE_CHECKS:
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} holds non-finite values")
        if (t <= low).any() or (t > 1).any():
            raise ValueError(f"{name} must lie in ({low}, 1], got min {t.min().item()}, max {t.max().item()}")


def per_sequence(name: str, v: torch.Tensor, batch: int) -> None:
    """v: floating [B]."""
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or tuple(v.shape) != (batch,):
        raise ValueError(f"{name} must be a floating-point tensor of shape ({batch},), got "
                         f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
