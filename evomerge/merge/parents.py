"""The parents of a merge at their stored size: resident on the device, or mapped from their files and streamed.

A merge works on one tensor at a time, in chunks of whole rows (`chunk_size` elements: 2^18 on CPU, where eager
temporaries of 2^20 cost about 1 byte/param of a 100M model at the peak, 2^20 where the kernel is compiled and has
none; 2^22 on CUDA, where launches cost more than memory), so what it allocates besides the candidate is a few chunks
× (N + 1), whatever the model's size.  Where the parents live is the only difference between the two modes:

* ``resident`` — each tensor copied once to the device in the dtype its file holds (bf16 stays bf16);
* ``streaming`` — the safetensors files memory-mapped (file pages: every worker on a node shares the page cache, and
  none of it is the process's anonymous memory), each chunk moved to the device when the merge needs it (through
  pinned buffers on CUDA, copy overlapped with compute; on CPU the mapped pages are read in place).

Magnitude selections (TIES, breadcrumbs) need the value of the k-th largest |parent − base| of a tensor for a density
only known per candidate.  `MagnitudeIndex`, built once per worker, keeps per tensor and parent a sorted sample of
|delta| (1/512 of its entries) with the exact count of entries below and at each sample value: 0.023 byte/param.  A
rank's value then lies in a known bracket of about 512 entries, so the candidate's one merge pass finds its exact key
(`Selection`) — with mergekit's top-k count and its tie order (equal magnitudes kept from the highest position down,
as a stable ascending argsort ranks them).

DELLA's MagPrune needs more: every entry's own rank in its row sets its keep probability and its rescale, so no
summary will do.  The ranks depend on the parents only, so `RowRanks` sorts every row once per worker and keeps the
ranks, two uint8 planes: 2 bytes/param per parent, the one per-element table, which the memory plan counts and drops (sorting
each candidate's rows instead) where the device has no room for it.
"""
from __future__ import annotations

import json
import math
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..io import ModelFilesError, ModelInfo, load_bin, weight_files
from ..vocab import VocabPlan, align_rows
from .methods import sort_row_ranks

CPU_CHUNK, COMPILED_CPU_CHUNK, CUDA_CHUNK = 1 << 18, 1 << 20, 1 << 22
SAMPLE_FRACTION = 512  # the magnitude index: one entry per 512 entries of a parent,
INDEX_ENTRY_BYTES = 12  # an fp32 bound and two int32 counts (0.023 byte/param)
INDEX_CHUNK = 1 << 18  # entries per step while the index counts: its slots and gathers stay a few MB
RANK_ENTRY_BYTES = 2  # DELLA's row ranks: two uint8 planes (rows up to 2**16 entries; wider rows are not planned for)
_ST_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def chunk_size(device: torch.device, compiled: bool = False) -> int:
    return CUDA_CHUNK if device.type == "cuda" else COMPILED_CPU_CHUNK if compiled else CPU_CHUNK


class MappedModel:
    """One model directory's tensors as zero-copy views of its memory-mapped safetensors files, flattened.

    Mapped copy-on-write (never written), so the pages stay the page cache's: resident in RAM once per node, counted
    in a process's file RSS, not its anonymous memory.  Legacy ``.bin`` weights cannot be mapped and are loaded.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._maps: list[mmap.mmap] = []
        self.views: dict[str, Tensor] = {}
        files = weight_files(self.path)
        if files[0].suffix != ".safetensors":
            self.views = {k: v.reshape(-1) for f in files for k, v in load_bin(f).items()}
            return
        for f in files:
            self.views.update(self._map(f))

    def _map(self, f: Path) -> dict[str, Tensor]:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise ModelFilesError(f"{f}: not a readable safetensors file ({e})") from e
        self._maps.append(mm)
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_TORCH.get(entry["dtype"])
            if dtype is None:
                raise ModelFilesError(f"{f}: tensor {name} has dtype {entry['dtype']}; float weights are expected")
            start, end = entry["data_offsets"]
            count = math.prod(entry["shape"])
            size = torch.empty((), dtype=dtype).element_size()
            if end - start != count * size:
                raise ModelFilesError(f"{f}: tensor {name}: data_offsets do not match its shape and dtype")
            out[name] = (torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + start) if count
                         else torch.empty(0, dtype=dtype))
        return out


def row_chunks(shape: tuple[int, ...], chunk: int, whole: bool = False) -> list[tuple[int, int]]:
    """Flat [start, end) ranges of whole rows, about `chunk` elements each (the whole tensor when `whole`)."""
    m = math.prod(shape)
    if whole or m <= chunk or len(shape) < 2:
        return [(0, m)]
    cols = shape[-1]
    step = max(1, chunk // cols) * cols
    return [(s, min(s + step, m)) for s in range(0, m, step)]


class ParentStore:
    """Base and parents of one merge, by tensor name, in chunks on `device`; `mode` is ``resident`` or ``streaming``."""

    def __init__(self, base: str | None, parents: list[str], device: torch.device, mode: str = "resident",
                 chunk: int | None = None):
        self.device, self.mode = device, mode
        self.chunk = chunk or chunk_size(device)
        self.has_base = base is not None
        self.paths = paths = ([base] if base else []) + list(parents)
        maps = [MappedModel(p) for p in paths]
        if mode == "streaming":
            self.models = [m.views for m in maps]
            self._maps = maps
            self._stager = _Stager(device, len(paths), self.chunk) if device.type == "cuda" else None
            return
        # one tensor of one model at a time: a parent is never held twice, and the maps are dropped once copied
        self.models = [{k: torch.empty_like(v, device=device).copy_(v) for k, v in m.views.items()} for m in maps]
        self._maps, self._stager = [], None
        del maps

    def align_vocab(self, plan: VocabPlan, info: ModelInfo) -> dict[str, tuple[int, ...]]:
        """Embedding and head rows of every model in `plan`'s vocabulary (parents with added tokens); new shapes."""
        return align_rows(plan, info, dict(zip(self.paths, self.models)))

    def chunks(self, name: str, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int, Tensor | None, list[Tensor]]]:
        """(start, end, base chunk or None, parent chunks), flattened, on the device, in the stored dtype."""
        views = [m[name] for m in self.models]
        if self._stager is not None:
            yield from self._stager.stream(views, ranges, self.has_base)
            return
        for s, e in ranges:
            parts = [v[s:e] for v in views]
            yield (s, e, parts[0], parts[1:]) if self.has_base else (s, e, None, parts)

    def gather(self, name: str, positions: Tensor) -> tuple[Tensor | None, list[Tensor]]:
        """The entries at `positions` of the base and each parent, on the device, in the stored dtype."""
        parts = [m[name][positions.to(m[name].device)].to(self.device) for m in self.models]
        return (parts[0], parts[1:]) if self.has_base else (None, parts)


class _Stager:
    """Host-to-CUDA streaming: chunks copied into pinned buffers, then to the device on a side stream, one chunk ahead
    of the merge, so the copy of chunk i+1 overlaps the kernel of chunk i."""

    def __init__(self, device: torch.device, n_models: int, chunk: int):
        self.device, self.n, self.chunk = device, n_models, chunk
        self.stream = torch.cuda.Stream(device)
        self.pinned: dict[torch.dtype, list[Tensor]] = {}

    def _buffers(self, dtype: torch.dtype) -> list[Tensor]:
        if dtype not in self.pinned:  # two slots (current, next) × models
            self.pinned[dtype] = [torch.empty(self.chunk * 2, dtype=dtype, pin_memory=True) for _ in range(2 * self.n)]
        return self.pinned[dtype]

    def stream(self, views: list[Tensor], ranges: list[tuple[int, int]], has_base: bool):
        bufs = self._buffers(views[0].dtype)
        compute = torch.cuda.current_stream(self.device)
        events: list[torch.cuda.Event] = []
        previous = None  # the chunk in flight, handed to the merge once the next one's copy is queued
        for slot, (s, e) in enumerate(ranges):
            if slot >= 2:
                events[slot - 2].synchronize()  # this pinned slot's previous copy has reached the device
            with torch.cuda.stream(self.stream):
                parts = []
                for i, v in enumerate(views):
                    host = (bufs[2 * i + slot % 2][: e - s] if e - s <= self.chunk * 2 else torch.empty(
                        e - s, dtype=v.dtype, pin_memory=True))
                    host.copy_(v[s:e])
                    parts.append(host.to(self.device, non_blocking=True))
                events.append(torch.cuda.Event())
                events[-1].record(self.stream)
            if previous is not None:
                yield self._ready(compute, *previous, has_base)
            previous = ((s, e, parts), events[-1])
        if previous is not None:
            yield self._ready(compute, *previous, has_base)

    def _ready(self, compute, item, event, has_base):
        s, e, parts = item
        compute.wait_event(event)
        for p in parts:
            p.record_stream(compute)
        return (s, e, parts[0], parts[1:]) if has_base else (s, e, None, parts)


@dataclass
class Selection:
    """The magnitude keys of one tensor for one candidate, made exact during its one merge pass.

    A rank whose bracket starts with a group of equal magnitudes holding it (``ties``: rank among the group) gets the
    key (value, position of that entry): the kernel counts the group's entries (`groups`: its value, NaN where none)
    chunk by chunk and, until the count reaches the rank, no entry of the group is kept; `advance` then finds the
    position, and the chunk where that happened is merged again from there on.  A rank above the group (``marked``:
    rank among and count of the entries strictly inside the bracket) keeps, provisionally, everything above the group;
    the kernel marks the entries inside (`lo`, `hi`: open bounds, empty where none), ``MagnitudeIndex.resolve`` finds
    the key among them, and they are merged again."""

    values: Tensor
    positions: Tensor
    lo: Tensor
    hi: Tensor
    groups: Tensor
    marked: dict[tuple[int, int], tuple[int, int]]
    ties: dict[tuple[int, int], int]
    seen: dict[tuple[int, int], int] = field(default_factory=dict)
    above: Tensor = field(init=False, repr=False)  # the next float above each value: the thresholds before a position

    def __post_init__(self) -> None:
        self.above = torch.nextafter(self.values, self.values.new_tensor(math.inf))

    def thresholds(self, start: int) -> Tensor:
        """The keys as thresholds for a stretch starting at `start` that no key's position falls inside: an entry at or
        past a key's position is kept from its value up (|d| >= value), one before it only above (|d| > value)."""
        return torch.where(self.positions <= start, self.values, self.above)

    def advance(self, start: int, counts: Tensor, base: Tensor, parents: list[Tensor], cols: int,
                count_rows: Callable[[Tensor, Tensor, Tensor, int], Tensor]) -> list[int]:
        """After the chunk at `start` (whole rows of `cols`) was merged with `counts` [N, T] of each pending group's
        entries in it: where a group reached its rank here, its key takes that entry's position.  Returns those
        positions, ascending: from each on, the chunk must be merged again.  `count_rows`: per row, the entries
        equal to a value."""
        found = set()
        for key, rank in list(self.ties.items()):
            i, t = key
            before = self.seen.get(key, 0)
            self.seen[key] = before + int(counts[i, t])
            if self.seen[key] <= rank:
                continue
            total = count_rows(parents[i], base, self.values[i, t], cols).cumsum(0)
            r = int(torch.searchsorted(total, rank - before, right=True))  # the row holding the entry
            skip = rank - before - (int(total[r - 1]) if r else 0)
            row = slice(r * cols, (r + 1) * cols)
            group = torch.nonzero(equal_magnitude(parents[i][row], base[row], self.values[i, t])).squeeze(1)
            position = start + r * cols + int(group[skip])
            self.positions[i, t] = position
            self.groups[i, t] = math.nan
            del self.ties[key]
            found.add(position)
        return sorted(found)


def equal_magnitude(parent: Tensor, base: Tensor, value: Tensor) -> Tensor:
    """The entries whose |parent − base| equals `value`: a group of ties."""
    return (parent.float() - base.float()).abs() == value


def count_equal_rows(parent: Tensor, base: Tensor, value: Tensor, cols: int) -> Tensor:
    """Per row of `cols` entries, how many have |parent − base| equal to `value` (one fused pass when compiled, with
    an output of one count per row rather than a mask)."""
    return equal_magnitude(parent, base, value).reshape(-1, cols).sum(1, dtype=torch.int32)


class MagnitudeIndex:
    """Per tensor and parent, |parent − base| at evenly spaced quantiles, and the exact count of entries below and
    at or below each: any rank's value lies in a known bracket (see `Selection`)."""

    def __init__(self, store: ParentStore, shapes: dict[str, tuple[int, ...]]):
        self.store = store
        self.bounds: dict[str, Tensor] = {}  # [N, S + 2]: 0, the sorted sample, inf
        self.below: dict[str, Tensor] = {}   # [N, S + 2]: entries with |delta| < each bound
        self.upto: dict[str, Tensor] = {}    # [N, S + 2]: entries with |delta| <= each bound
        for name, shape in shapes.items():
            self._build(name, shape)

    def _build(self, name: str, shape: tuple[int, ...]) -> None:
        m = math.prod(shape)
        s = max(1, m // SAMPLE_FRACTION)
        idx = torch.arange(s) * (m - 1) // max(s - 1, 1)  # evenly spaced, integer arithmetic (exact)
        views = [mm[name] for mm in self.store.models]
        device = self.store.device
        b = views[0][idx.to(views[0].device)].float()
        sample = torch.stack([(p[idx.to(p.device)].float() - b).abs() for p in views[1:]]).sort(dim=1).values
        sample = sample.to(device)
        n = sample.shape[0]
        bounds = torch.cat([torch.zeros((n, 1), device=device), sample,
                            torch.full((n, 1), math.inf, device=device)], 1)
        below = torch.zeros((n, s + 3), dtype=torch.int64, device=device)
        upto = torch.zeros((n, s + 3), dtype=torch.int64, device=device)
        first = torch.searchsorted(bounds, bounds, out_int32=True)  # where each bound's value first occurs
        for _, _, base, parents in self.store.chunks(name, row_chunks(shape, min(self.store.chunk, INDEX_CHUNK))):
            for i, p in enumerate(parents):
                a = (p.float() - base.float()).abs_()
                # entry j counts below bound k (resp. at or below) for every k past its slot: the bounds <= a (>= 1,
                # bounds start at 0) and the bounds < a, the second from the first without another binary search
                right = torch.searchsorted(bounds[i], a, right=True, out_int32=True)
                below[i] += torch.bincount(right, minlength=s + 3)
                right -= 1  # the last bound <= a; where it equals a, the bounds < a end where its value starts
                upto[i] += torch.bincount(torch.where(bounds[i][right] == a, first[i][right], right + 1),
                                          minlength=s + 3)
        count = torch.int32 if m < 2**31 else torch.int64
        self.bounds[name] = bounds
        self.below[name] = below.cumsum(1)[:, :-1].to(count)
        self.upto[name] = upto.cumsum(1)[:, :-1].to(count)

    def select(self, name: str, m: int, ranks: Tensor) -> Selection:
        """The keys of ascending ranks [N, T] (0 = smallest |delta|): entry j of parent i has rank ≥ ranks[i, t]
        exactly when (|d_j|, j) ≥ (value, position) lexicographically, the order of a stable ascending argsort.
        Ranks ≤ 0 give (−1, 0) (every entry), ranks ≥ M give (inf, 0) (none)."""
        bounds, below, upto = self.bounds[name], self.below[name].long(), self.upto[name].long()
        ranks = ranks.to(bounds.device)
        k = (torch.searchsorted(below, ranks, right=True) - 1).clamp(0, below.shape[1] - 2)
        lo, hi = bounds.gather(1, k), bounds.gather(1, k + 1)
        first, group, last = below.gather(1, k), upto.gather(1, k), below.gather(1, k + 1)
        inside = (ranks > 0) & (ranks < m)
        zero = inside & (ranks < group) & (lo == 0)  # among the zero deltas: key (0, 0) keeps every non-zero one
        tie = inside & (ranks < group) & (lo > 0)
        mark = inside & (ranks >= group)
        values = torch.where(ranks >= m, math.inf, torch.where(inside, lo, -1.0))
        positions = torch.where(inside & ~zero, m, 0)  # a group at lo is not kept until its rank's position is found
        host = torch.stack([ranks - first, ranks - group, last - group, tie.long(), mark.long()]).cpu()
        ties = {(i, t): int(host[0, i, t]) for i, t in host[3].nonzero().tolist()}
        marked = {(i, t): (int(host[1, i, t]), int(host[2, i, t])) for i, t in host[4].nonzero().tolist()}
        return Selection(values, positions, torch.where(mark, lo, math.inf), torch.where(mark, hi, -math.inf),
                         torch.where(tie, lo, math.nan), marked, ties)

    def resolve(self, selection: Selection, positions: Tensor, magnitudes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The exact keys, from the entries merged again: their `positions` (ascending) and |delta| per parent."""
        values, where = selection.values.clone(), selection.positions.clone()
        for (i, t), (rank, count) in selection.marked.items():
            a = magnitudes[i]
            inside = (a > selection.lo[i, t]) & (a < selection.hi[i, t])
            vals, pos = a[inside], positions[inside]
            if vals.numel() != count:
                raise RuntimeError(f"magnitude index out of date: {count} entries expected in a bracket, "
                                   f"{vals.numel()} found")
            j = torch.sort(vals, stable=True).indices[rank]  # positions ascend: equal values keep position order
            values[i, t], where[i, t] = vals[j], pos[j]
        return values, where


class RowRanks:
    """Per tensor, each parent's task-vector entries' magnitude ranks within their rows (``methods.sort_row_ranks``:
    high and low planes), on the store's device; sorted once, chunk by chunk, so building it holds no more than a
    chunk in fp32."""

    def __init__(self, store: ParentStore, shapes: dict[str, tuple[int, ...]]):
        self.table: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for name, shape in shapes.items():
            m = math.prod(shape)
            cols = shape[-1] if len(shape) > 1 else m
            planes: list[tuple[Tensor, Tensor]] = []
            for s, e, base, parents in store.chunks(name, row_chunks(shape, store.chunk)):
                chunk = sort_row_ranks([p.float() - base.float() for p in parents], cols)
                if not planes:
                    planes = [tuple(torch.empty(m, dtype=x.dtype, device=store.device) for x in c) for c in chunk]
                for table, ranks in zip(planes, chunk):
                    for plane, x in zip(table, ranks):
                        plane[s:e] = x
            self.table[name] = planes

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for planes in self.table.values() for p in planes for x in p)
