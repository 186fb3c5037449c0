"""Merge methods: one short pure function per method over stacked tensors, parameters declared beside the math.

Every function takes the parents' tensors stacked on dim 0 (``deltas`` are task vectors, parent minus base) and
per-parent ``weight`` / ``density`` vectors, computes in the dtype it is given (the materializer hands it fp32), and
returns the merged tensor.  Meanings and defaults follow mergekit's, so a mergekit config means the same here:
``normalize`` divides by the sum of the weights that contribute to each entry; ``rescale`` (DARE) divides kept
entries by the density so the expectation of the task vector is preserved.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


def _per_parent(v: Tensor, like: Tensor) -> Tensor:
    """Shape a per-parent vector [N] to broadcast against stacked tensors [N, ...]."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def trim_magnitude(deltas: Tensor, density: Tensor) -> Tensor:
    """TIES trim: keep each task vector's top `density` fraction of entries by magnitude, zero the rest."""
    out = deltas.clone()
    for i, d in enumerate(density.tolist()):
        if d >= 1.0:
            continue
        flat = out[i].reshape(-1)
        drop = int(round(flat.numel() * (1.0 - d)))
        if drop <= 0:
            continue
        if drop >= flat.numel():
            flat.zero_()
            continue
        threshold = flat.abs().kthvalue(drop).values
        flat.mul_(flat.abs() > threshold)
    return out


def drop_random(deltas: Tensor, density: Tensor, rescale: bool, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry with probability `density`; with `rescale`, divide survivors by it (unbiased)."""
    keep = torch.rand(deltas.shape, generator=generator, device=deltas.device, dtype=deltas.dtype)
    d = _per_parent(density, deltas)
    out = deltas * (keep < d)
    return out / d.clamp_min(1e-12) if rescale else out


def sign_consensus(weighted: Tensor) -> Tensor:
    """TIES sign election: per entry, the sign of the summed weighted deltas; mask the parents that agree."""
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == majority


def _combine(base: Tensor, deltas: Tensor, weight: Tensor, *, consensus: bool, normalize: bool) -> Tensor:
    """Shared tail of the task-vector methods: weight, optionally elect signs, sum, optionally normalize."""
    w = _per_parent(weight, deltas)
    weighted = deltas * w
    if consensus:
        mask = sign_consensus(weighted)
        merged = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return base + (merged / divisor if normalize else merged)


def linear(params: Tensor, weight: Tensor, *, normalize: bool = True) -> Tensor:
    """Weighted average of the parents themselves (no base): model soups."""
    w = _per_parent(weight, params)
    merged = (params * w).sum(dim=0)
    total = float(weight.sum())
    return merged / total if normalize and abs(total) > 1e-8 else merged


def task_arithmetic(base: Tensor, deltas: Tensor, weight: Tensor, *, normalize: bool = False) -> Tensor:
    """base + sum_i weight_i * task_vector_i (Ilharco et al.)."""
    return _combine(base, deltas, weight, consensus=False, normalize=normalize)


def ties(base: Tensor, deltas: Tensor, weight: Tensor, density: Tensor, *, normalize: bool = True) -> Tensor:
    """TIES-Merging (Yadav et al.): trim by magnitude, elect signs, merge the agreeing entries."""
    return _combine(base, trim_magnitude(deltas, density), weight, consensus=True, normalize=normalize)


def dare_ties(base: Tensor, deltas: Tensor, weight: Tensor, density: Tensor, *, normalize: bool = False,
              rescale: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """DARE (Yu et al.) random drop and rescale, then TIES sign election."""
    dropped = drop_random(deltas, density, rescale, generator)
    return _combine(base, dropped, weight, consensus=True, normalize=normalize)


def dare_linear(base: Tensor, deltas: Tensor, weight: Tensor, density: Tensor, *, normalize: bool = False,
                rescale: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """DARE random drop and rescale, then plain task arithmetic."""
    dropped = drop_random(deltas, density, rescale, generator)
    return _combine(base, dropped, weight, consensus=False, normalize=normalize)


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, the per-parent tensor parameters, and global options with defaults."""

    name: str
    fn: Callable[..., Tensor]
    tensor_params: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    uses_base: bool = True
    random: bool = False


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("linear", linear, ("weight",), {"normalize": True}, uses_base=False),
        MergeMethod("task_arithmetic", task_arithmetic, ("weight",), {"normalize": False}),
        MergeMethod("ties", ties, ("weight", "density"), {"normalize": True}),
        MergeMethod("dare_ties", dare_ties, ("weight", "density"), {"normalize": False, "rescale": True}, random=True),
        MergeMethod("dare_linear", dare_linear, ("weight", "density"), {"normalize": False, "rescale": True},
                    random=True),
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; allowed: {', '.join(METHODS)}") from None
