"""Merge methods: one short pure function per method over flattened tensors, registered by ``@merge_method``, which
reads its signature against the method's contract in `methodspec` (per-parent parameters with their bounds, options
with their defaults: plain data a study file is checked against without torch).

Every function sees one tensor of the model at a time, flattened: ``base`` [M] and ``deltas`` (task vectors, parent
minus base) or ``params`` (the parents themselves), one [M] tensor per parent — a list, or the rows of an [N, M]
tensor — and per-parent parameter vectors [N] (``weight``, ``density``, ``gamma``, ``epsilon``, ``t``), or the
per-parent constants a method derives from them (``constants``: computed once per merge group, outside the kernel's
loop, e.g. DARE's keep threshold).  Parents are walked one by one rather than stacked: ``torch.compile`` on CPU copies
a stack into a buffer, a list fuses into one pass.  Everything is tensor arithmetic — no ``.item()``, no Python
branching on values — so one function serves the eager path, the ``torch.compile``'d path and CUDA, and a candidate
never syncs.

Names, meanings and defaults follow mergekit's documentation, so a mergekit config means the same here:
``normalize`` divides by the sum of the weights that contribute to each entry; ``lambda`` scales the merged task
vector; ``rescale`` compensates the entries a random drop removed.  Where mergekit and the papers differ, ``rescale_mode``
names the choice: ``density`` (default; the DARE/DELLA papers: divide survivors by their keep probability, which keeps
the expectation of every entry) or ``l1`` (current mergekit: scale survivors so each task vector keeps its L1 norm).

A magnitude selection (TIES, breadcrumbs) declares the window of magnitude ranks it keeps per parent (``select``:
``topk_window``, ``outlier_window``); the merge engine turns that window into a ``keep`` mask with mergekit's exact
top-k count and tie order, without a per-element table (see ``parents.MagnitudeIndex``).  ``magnitude_keep`` is the
same mask from a full sort, the reference the engine is tested against.  Random drops (``bits``) are computed where
they are used, chunk by chunk: a counter-based hash of (seed, tensor name, parent, element index), so the search's
candidate and the exported model are the same weights, in any order, on any device.  DELLA's row ranks depend on the
parents only: a worker sorts them once into a table (``parents.RowRanks``), the export sorts each chunk's rows.
"""
from __future__ import annotations

import dataclasses
import inspect
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..methodspec import SPECS, MethodSpec, check_recipe, get_spec
from ..methodspec import InvalidRecipe as InvalidRecipe  # re-exported: the engine and tests import it from here

Parents = list[Tensor] | Tensor  # one flattened [M] tensor per parent


def _add(parts: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Sum over the parents as a chain of adds: fuses into one pass where a reduction over dim 0 would not."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _weighted(xs: Parents, weight: Tensor) -> list[Tensor]:
    w = weight.to(xs[0].dtype)
    return [x * w[i] for i, x in enumerate(xs)]


# --- auxiliary inputs: computed once per worker (resident) or per tensor (export) ----------------------------------

def magnitude_ranks(deltas: Tensor) -> Tensor:
    """Rank of each entry's magnitude within its task vector (0 = smallest), ties broken by position: int32 [N, M].

    The order of mergekit's magnitude selections; here the reference for ``magnitude_keep``.
    """
    order = torch.argsort(deltas.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order, dtype=torch.int32)
    ranks.scatter_(1, order, torch.arange(deltas.shape[1], dtype=torch.int32, device=deltas.device).expand_as(order))
    return ranks


def sort_row_ranks(deltas: Parents, cols: int) -> list[tuple[Tensor, Tensor]]:
    """DELLA's MagPrune order: each entry's magnitude rank within its row of `cols` entries (0 = smallest, ties by
    position: a stable sort's order), as two planes, rank = 256 * high + low.  uint8 planes (the high one int32 for
    rows over 2**16 entries): 2 bytes/param per parent, which a worker keeps as a table since the ranks depend on the
    parents only — and the compiled CPU kernel vectorizes uint8 loads where it runs int16 ones one at a time."""
    high = torch.uint8 if cols <= 2**16 else torch.int32
    out = []
    for d in deltas:
        ranks = magnitude_ranks(d.reshape(-1, cols)).reshape(-1)  # each row's own ranks
        out.append(((ranks >> 8).to(high), (ranks & 255).to(torch.uint8)))
    return out


def rank_fractions(ranks: list[tuple[Tensor, Tensor]], top: Tensor) -> list[Tensor]:
    """Row ranks (`sort_row_ranks`' planes) scaled to [0, 1] (`top`: a row's largest rank, fp32).  Divided by a
    tensor, not a number: the compiler turns a division by a constant into a multiplication by its rounded
    reciprocal, which eager does not."""
    return [(high.float() * 256 + low.float()) / top for high, low in ranks]


def tensor_seeds(seed: int, name: str, n: int, device: torch.device | str = "cpu") -> Tensor:
    """Per-parent 31-bit seeds for one tensor, from the recipe seed and the tensor's name (not its position)."""
    s = zlib.crc32(f"{seed}:{name}".encode())
    return torch.tensor([(s * 0x9E3779B1 + i * 0x7F4A7C15) % 0x7FFFFFFF for i in range(n)], dtype=torch.int32,
                        device=device)


def random_bits(seeds: Tensor, m: int, start: int | Tensor = 0) -> Tensor:
    """31 uniform random bits per entry of entries [start, start + m), int32 [N, m]: a hash of (seed, index).

    Counter-based, so any chunk of a tensor is computed alone, inside the merge kernel, and is the same bits whatever
    the chunking.  A 32-bit hash (lowbias32) in int32 lanes, twice as many per vector as int64 and with a native
    multiply: sums and products wrap modulo 2**32 (two's complement, as on every backend torch has), and the
    unsigned right shifts are arithmetic shifts masked to the bits an unsigned shift keeps.  `start` may be a 0-d
    tensor (the compiled kernel's: one graph for every chunk, where an int 0 would get a graph of its own).  Index
    and seed are added in the int32 lanes, not as 64-bit numbers first: the compiled kernel would redo that scalar
    arithmetic for every vector of entries.
    """
    index = torch.arange(m, dtype=torch.int32, device=seeds.device) + start
    h = index[None, :] + seeds.to(torch.int32)[:, None]
    h ^= (h >> 16) & 0xFFFF  # in place: the eager (export) path keeps one [N, M] buffer alive, not six
    h *= 0x7FEB352D
    h ^= (h >> 15) & 0x1FFFF
    h *= 0x2C1B3C6D
    h ^= (h >> 16) & 0xFFFF
    return (h >> 1) & 0x7FFFFFFF


def keep_threshold(probability: Tensor) -> Tensor:
    """A Bernoulli(p) keep per parent, from 31-bit bits: keep where bits <= this threshold, floor(p * 2**31) - 1
    (int32 [N], computed in double: exact, and it fits at p = 1)."""
    return ((probability.double().clamp(0, 1) * 2.0**31).floor() - 1).to(torch.int32)


def _keep_random(bits: Tensor, probability: Tensor) -> Tensor:
    """Bernoulli(probability) keep mask from 31-bit `bits`, one probability per entry: bits < floor(p * 2**31),
    computed in fp32 and int32 lanes, exactly — p * 2**31 is exact, and below 2**31 its floor is at most
    2**31 - 128, fp32's spacing there, an int32 (double lanes would halve the vector width of the whole kernel)."""
    scaled = probability.float().clamp(0, 1) * 2.0**31
    return (bits < scaled.floor().clamp(max=2.0**31 - 128).to(bits.dtype)) | (scaled >= 2.0**31)


# --- sparsification: which entries of each task vector survive --------------------------------------------------

def topk_window(m: int, density: Tensor, gamma: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """TIES trim: the ascending magnitude ranks [lo, hi) kept per parent — the top ``floor(density * M)``."""
    k = (density.double() * m).floor().long()
    return m - k, torch.full_like(k, m)


def outlier_window(m: int, density: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """Model Breadcrumbs: drop the top ``gamma`` fraction (outliers) and the smallest, keeping ``density`` in all."""
    keep = (density.double() * m).floor().long()
    top = (gamma.double() * m).floor().long()
    bottom = m - keep - top
    top = torch.where(bottom < 0, top + bottom, top)
    return bottom.clamp_min(0), m - top


def magnitude_keep(deltas: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Entries whose magnitude rank in their task vector lies in [lo, hi), from a full sort (the reference)."""
    ranks = magnitude_ranks(deltas)
    return (ranks >= lo[:, None]) & (ranks < hi[:, None])


def keep_from_keys(magnitudes: Parents, values: Tensor, above: Tensor, positions: Tensor, index: Tensor
                   ) -> list[Tensor]:
    """``magnitude_keep`` from the keys (value, position) [N, T] of ranks lo and, when T = 2, hi (T = 1: up to the
    top), for the entries at `index`: rank >= r exactly when (|d|, index) >= key(r) lexicographically, the order of a
    stable ascending sort — that is, |d| >= value at or past the key's position and |d| > value (>= `above`, the next
    float up) before it.  A select and one compare per entry, where the lexicographic test takes four."""
    def at_least(a: Tensor, i: int, t: int) -> Tensor:
        return a >= torch.where(index >= positions[i, t], values[i, t], above[i, t])
    if values.shape[1] == 1:
        return [at_least(a, i, 0) for i, a in enumerate(magnitudes)]
    return [at_least(a, i, 0) & ~at_least(a, i, 1) for i, a in enumerate(magnitudes)]


def _rescaled(deltas: Parents, kept: list[Tensor], scale: Callable[[int], Tensor], rescale: bool,
              mode: str) -> list[Tensor]:
    """`kept` rescaled: in ``density`` mode by ``scale(i)``, parent i's 1 / keep probability (one number, or one per
    entry); in ``l1`` mode so that each task vector keeps its L1 norm."""
    if not rescale:
        return kept
    if mode == "l1":
        out = []
        for d, k in zip(deltas, kept):
            before, after = d.abs().sum(), k.abs().sum()
            ok = (before > 1e-7) & (after > 1e-7)
            out.append(k * torch.where(ok, before / torch.where(ok, after, 1.0), 1.0))
        return out
    return [k * scale(i) for i, k in enumerate(kept)]


def random_drop(density: Tensor) -> dict[str, Tensor]:
    """DARE's per-parent constants, computed once per merge group: the keep threshold (see ``keep_threshold``) and
    the rescale 1 / density.  Inside the compiled kernel this scalar arithmetic would run again for every vector of
    entries (C++ compilers do not hoist it out of the loop): it made DARE-TIES 1.5x slower."""
    return {"threshold": keep_threshold(density), "scale": 1.0 / density.clamp_min(1e-12)}


def drop_random(deltas: Parents, threshold: Tensor, scale: Tensor, bits: Parents, rescale: bool,
                mode: str) -> list[Tensor]:
    """DARE: keep each entry with probability ``density`` (`threshold`), then rescale the survivors (see
    ``rescale_mode``)."""
    kept = [x * (b <= threshold[i]) for i, (x, b) in enumerate(zip(deltas, bits))]
    return _rescaled(deltas, kept, lambda i: scale[i], rescale, mode)


def magprune(density: Tensor, epsilon: Tensor) -> dict[str, Tensor]:
    """DELLA's per-parent constants, computed once per merge group (see ``random_drop``): the keep probability of a
    row rank fraction r is low + span * r, from density - epsilon to density + epsilon; density 1 keeps all."""
    full = density >= 1
    return {"low": torch.where(full, 1.0, density - epsilon), "span": torch.where(full, 0.0, 2 * epsilon)}


def drop_magprune(deltas: Parents, low: Tensor, span: Tensor, row_ranks: Parents, bits: Parents, rescale: bool,
                  mode: str) -> list[Tensor]:
    """DELLA MagPrune: keep probability rises with magnitude rank in the row (see ``magprune``)."""
    p = [low[i] + span[i] * r for i, r in enumerate(row_ranks)]
    kept = [x * _keep_random(b, q) for x, b, q in zip(deltas, bits, p)]
    return _rescaled(deltas, kept, lambda i: 1.0 / p[i].clamp_min(1e-12), rescale, mode)


# --- combination: the shared tail of the task-vector methods ------------------------------------------------------

def sign_consensus(weighted: list[Tensor]) -> list[Tensor]:
    """TIES sign election: per entry, the sign of the summed weighted deltas; per parent, True where it agrees."""
    majority = 1 - 2 * (_add(weighted) < 0).to(weighted[0].dtype)  # +1 or -1; ties go to +, as in mergekit
    return [x * majority > 0 for x in weighted]


def combine(base: Tensor, deltas: Parents, weight: Tensor, *, consensus: bool, normalize: bool,
            lambda_: float) -> Tensor:
    """base + lambda * (weighted sum of task vectors, optionally sign-elected, optionally normalized).

    Parents are handled as a list, not a reduction over dim 0, so the compiled form is one fused pass with no
    [N, M] intermediates; masks multiply rather than select (``x * mask``), which vectorizes better on CPU.
    """
    w = weight.to(deltas[0].dtype)
    weighted = _weighted(deltas, weight)
    if consensus:
        agree = sign_consensus(weighted)
        merged = _add([x * a for a, x in zip(agree, weighted)])
        divisor = _add([a * w[i] for i, a in enumerate(agree)])
        divisor = divisor + (divisor == 0)
    else:
        merged = _add(weighted)
        divisor = w.sum()
        divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    if normalize:
        merged = merged / divisor
    return base + lambda_ * merged


# --- the registry: each kernel registered against its contract in methodspec.SPECS ----------------------------------

Select = Callable[[int, Tensor, Tensor | None], tuple[Tensor, Tensor]]
SELECTED = ("density", "gamma")  # what a magnitude window consumes: the kernel gets the `keep` mask instead
_ARG = {"lambda": "lambda_"}  # an option whose name is a Python keyword


@dataclass(frozen=True, kw_only=True)
class MergeMethod(MethodSpec):
    """A registered method: its `MethodSpec` and the function that merges one tensor.  ``select``: the magnitude
    window behind ``keep``; it consumes ``density`` and ``gamma``.  ``constants``: per-parent values the kernel
    takes (``constant_names``) in place of the parameters they are computed from (``constant_args``), once per merge
    group (``kernel_constants``).  ``kernel_params``: the per-parent parameters the kernel takes itself."""

    fn: Callable[..., Tensor]
    select: Select | None = None
    constants: Callable[..., dict[str, Tensor]] | None = None
    constant_args: tuple[str, ...] = ()
    constant_names: tuple[str, ...] = ()
    kernel_params: tuple[str, ...] = ()

    def kernel_constants(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The per-parent constants of one merge group, from its parameters (none for most methods)."""
        if self.constants is None:
            return {}
        return self.constants(**{p: params[p] for p in self.constant_args})


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, select: Select | None = None, constants: Callable[..., dict[str, Tensor]] | None = None
                 ) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a kernel as method `name`, reading its signature against the method's torch-free contract: the
    tensors (``base, deltas`` or ``params``), the per-parent parameters in order (less those `select` or `constants`
    consume), then keyword-only the aux inputs, the constants and the options (``lambda`` spelled ``lambda_``).  A
    kernel that takes anything else is refused at import; the options get the contract's defaults, so each default
    is written once, where a study file is checked."""
    spec = SPECS[name]

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        params = inspect.signature(fn).parameters.values()
        positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        keywords = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
        options = {_ARG.get(k, k): v for k, v in spec.options.items()}
        args = tuple(inspect.signature(constants).parameters) if constants else ()  # read once, not per merge group
        consumed = {*(SELECTED if select else ()), *args}
        method = MergeMethod(**spec.spec_fields(), fn=fn, select=select, constants=constants, constant_args=args,
                             kernel_params=tuple(p for p in spec.tensor_params if p not in consumed))
        made = tuple(method.kernel_constants({p: torch.ones(1) for p in spec.tensor_params}))
        want = ["base", "deltas"] if spec.uses_base else ["params"]
        want += method.kernel_params
        if positional != want or keywords != {*spec.aux, *made, *options}:
            raise TypeError(f"merge method {name}: {fn.__name__}{inspect.signature(fn)} does not take what its "
                            f"contract declares: {', '.join(want)}, *, {', '.join([*spec.aux, *made, *options])}")
        fn.__kwdefaults__ = dict(options)
        METHODS[name] = dataclasses.replace(method, constant_names=made)
        return fn

    return register


# --- the methods ---------------------------------------------------------------------------------------------------

@merge_method("linear")
def linear(params: Parents, weight: Tensor, *, normalize: bool) -> Tensor:
    """Weighted average of the parents themselves (model soups)."""
    merged = _add(_weighted(params, weight))
    total = weight.sum()
    return merged / torch.where(total.abs() < 1e-8, 1.0, total) if normalize else merged


@merge_method("passthrough")
def passthrough(params: Parents, weight: Tensor) -> Tensor:
    """Take one parent's tensor (the one with a non-zero weight), times that weight (mergekit's ``scale``)."""
    return _add(_weighted(params, weight))


@merge_method("task_arithmetic")
def task_arithmetic(base: Tensor, deltas: Parents, weight: Tensor, *, normalize: bool, lambda_: float) -> Tensor:
    """base + sum_i weight_i * task_vector_i (Ilharco et al.)."""
    return combine(base, deltas, weight, consensus=False, normalize=normalize, lambda_=lambda_)


@merge_method("ties", select=topk_window)
def ties(base: Tensor, deltas: Parents, weight: Tensor, *, keep: Parents, normalize: bool, lambda_: float) -> Tensor:
    """TIES-Merging (Yadav et al.): trim by magnitude (`keep`, from ``topk_window``), elect signs, merge the agreeing
    entries."""
    return combine(base, [d * k for d, k in zip(deltas, keep)], weight, consensus=True, normalize=normalize, lambda_=lambda_)


@merge_method("dare_ties", constants=random_drop)
def dare_ties(base: Tensor, deltas: Parents, weight: Tensor, *, threshold: Tensor, scale: Tensor, bits: Parents,
              normalize: bool, rescale: bool, rescale_mode: str, lambda_: float) -> Tensor:
    """DARE (Yu et al.) random drop and rescale, then TIES sign election."""
    dropped = drop_random(deltas, threshold, scale, bits, rescale, rescale_mode)
    return combine(base, dropped, weight, consensus=True, normalize=normalize, lambda_=lambda_)


@merge_method("dare_linear", constants=random_drop)
def dare_linear(base: Tensor, deltas: Parents, weight: Tensor, *, threshold: Tensor, scale: Tensor, bits: Parents,
                normalize: bool, rescale: bool, rescale_mode: str, lambda_: float) -> Tensor:
    """DARE random drop and rescale, then plain task arithmetic."""
    dropped = drop_random(deltas, threshold, scale, bits, rescale, rescale_mode)
    return combine(base, dropped, weight, consensus=False, normalize=normalize, lambda_=lambda_)


@merge_method("breadcrumbs", select=outlier_window)
def breadcrumbs(base: Tensor, deltas: Parents, weight: Tensor, *, keep: Parents, normalize: bool,
                lambda_: float) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky): drop outliers and small entries (`keep`, from ``outlier_window``),
    then task arithmetic."""
    return combine(base, [d * k for d, k in zip(deltas, keep)], weight, consensus=False, normalize=normalize, lambda_=lambda_)


@merge_method("breadcrumbs_ties", select=outlier_window)
def breadcrumbs_ties(base: Tensor, deltas: Parents, weight: Tensor, *, keep: Parents, normalize: bool,
                     lambda_: float) -> Tensor:
    """Model Breadcrumbs trim, then TIES sign election."""
    return combine(base, [d * k for d, k in zip(deltas, keep)], weight, consensus=True, normalize=normalize, lambda_=lambda_)


@merge_method("della", constants=magprune)
def della(base: Tensor, deltas: Parents, weight: Tensor, *, low: Tensor, span: Tensor, row_ranks: Parents,
          bits: Parents, normalize: bool, rescale: bool, rescale_mode: str, lambda_: float) -> Tensor:
    """DELLA-Merging (Deep et al.): magnitude-ranked random drop (MagPrune) and rescale, then TIES sign election."""
    dropped = drop_magprune(deltas, low, span, row_ranks, bits, rescale, rescale_mode)
    return combine(base, dropped, weight, consensus=True, normalize=normalize, lambda_=lambda_)


@merge_method("della_linear", constants=magprune)
def della_linear(base: Tensor, deltas: Parents, weight: Tensor, *, low: Tensor, span: Tensor, row_ranks: Parents,
                 bits: Parents, normalize: bool, rescale: bool, rescale_mode: str, lambda_: float) -> Tensor:
    """DELLA MagPrune and rescale, then plain task arithmetic."""
    dropped = drop_magprune(deltas, low, span, row_ranks, bits, rescale, rescale_mode)
    return combine(base, dropped, weight, consensus=False, normalize=normalize, lambda_=lambda_)


@merge_method("slerp")
def slerp(base: Tensor, deltas: Parents, t: Tensor) -> Tensor:
    """Spherical interpolation from the base (t=0) to the one parent (t=1); linear when the two are nearly parallel."""
    v0, v1 = base, base + deltas[0]
    tt = t[0].to(base.dtype)
    n0, n1 = v0.norm(), v1.norm()
    dot = (v0 / torch.where(n0 > 1e-8, n0, 1.0) * (v1 / torch.where(n1 > 1e-8, n1, 1.0))).sum().clamp(-1, 1)
    theta = torch.arccos(dot)
    sin_theta = torch.where(dot.abs() > 0.9995, 1.0, torch.sin(theta))
    s0 = torch.where(dot.abs() > 0.9995, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    s1 = torch.where(dot.abs() > 0.9995, tt, torch.sin(tt * theta) / sin_theta)
    return s0 * v0 + s1 * v1


@merge_method("model_stock")
def model_stock(base: Tensor, deltas: Parents) -> Tensor:
    """Model Stock (Jang et al.): move from the base toward the parents' average by the angle between task vectors."""
    n = len(deltas)
    norms = [d.norm() for d in deltas]
    cosines = [(deltas[i] * deltas[j]).sum() / (norms[i] * norms[j]).clamp_min(1e-6)
               for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack(cosines).mean().clamp(-1, 1)
    ratio = n * cos / (1 + (n - 1) * cos)
    return base + ratio * _add(list(deltas)) / n


def get_method(name: str) -> MergeMethod:
    return METHODS[get_spec(name).name]


def apply(method: MergeMethod, base: Tensor | None, xs: Parents, params: dict[str, Tensor],
          aux: dict[str, Parents], options: dict[str, Any]) -> Tensor:
    """Call a method's function on one flattened tensor: `xs` are the deltas (or the parents, without a base)."""
    kwargs = {_ARG.get(k, k): v for k, v in options.items()}
    kwargs.update({c: params[c] for c in method.constant_names})
    tensors = {p: params[p] for p in method.kernel_params}
    if method.uses_base:
        return method.fn(base, xs, **tensors, **{a: aux[a] for a in method.aux}, **kwargs)
    return method.fn(xs, **tensors, **kwargs)


def validate(method_name: str, base: str | None, parents: list[str], groups: dict[str, dict[str, list[float]]],
             options: dict[str, Any]) -> MergeMethod:
    """`methodspec.check_recipe`, returning the method with its function; raises `InvalidRecipe` naming the field."""
    return METHODS[check_recipe(method_name, base, parents, groups, options).name]
