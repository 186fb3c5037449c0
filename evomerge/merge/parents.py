"""The parents of a merge at their stored size: resident on the device, or mapped from their files and streamed.

A merge works on one tensor at a time, in chunks of whole rows (`chunk_size` elements: 2^18 on CPU, where eager
temporaries of 2^20 cost about 1 byte/param of a 100M model at the peak; 2^22 where the kernel is compiled and has
none, since each call costs a Python dispatch and wakes the OpenMP threads, and on CUDA, where launches cost more than
memory), so what it allocates besides the candidate is a few chunks × (N + 1), whatever the model's size.  Where the
parents live is the only difference between the two modes:

* ``resident`` — each tensor copied once to the device in the dtype its file holds (bf16 stays bf16);
* ``streaming`` — the safetensors files memory-mapped (file pages: every worker on a node shares the page cache, and
  none of it is the process's anonymous memory), each chunk moved to the device when the merge needs it (through
  pinned buffers on CUDA, copy overlapped with compute; on CPU the mapped pages are read in place).

Magnitude selections (TIES, breadcrumbs) need the value of the k-th largest |parent − base| of a tensor for a density
only known per candidate.  `MagnitudeIndex`, built once per worker, keeps per tensor and parent a sorted sample of
|delta| (1/512 of its entries) with the exact count of entries below and at each sample value, and, for each group of
equal magnitudes (bf16 task vectors are full of them), the position of every 256th member: 0.055 byte/param.  A rank's
value then lies in a known bracket of about 512 entries.  A rank inside a group gets its exact key before the merge
from a scan between two anchors; for any other rank the candidate's one merge pass marks the bracket's entries and
finds the key among them (`Selection`) — with mergekit's top-k count and its tie order (equal magnitudes kept from
the highest position down, as a stable ascending argsort ranks them).

DELLA's MagPrune needs more: every entry's own rank in its row sets its keep probability and its rescale, so no
summary will do.  The ranks depend on the parents only, so `RowRanks` sorts every row once per worker and keeps the
ranks, two uint8 planes: 2 bytes/param per parent, the one per-element table, which the memory plan counts and drops
(sorting each candidate's rows instead) where the device has no room for it.
"""
from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..io import ModelFilesError, ModelInfo, load_bin, weight_files
from ..vocab import VocabPlan, align_rows
from .methods import sort_row_ranks

CPU_CHUNK, COMPILED_CPU_CHUNK, CUDA_CHUNK = 1 << 18, 1 << 22, 1 << 22
SAMPLE_FRACTION = 512  # the magnitude index: one entry per 512 entries of a parent,
INDEX_ENTRY_BYTES = 28  # an fp32 bound, two int32 counts, where its anchors start, at most three anchors (0.055 b/p)
ANCHOR_STRIDE = 256  # members of a group of equal magnitudes between two of the index's anchors into it
BUILD_CHUNK = 1 << 18  # entries per step while an index is built (a rank table too, on CPU): temporaries of a few MB
SCAN_CHUNK = 1 << 17  # entries per step of a scan between two anchors, which stops at the member it looks for
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


def row_length(shape: tuple[int, ...]) -> int:
    """Entries per row: the last dimension (a 1-D tensor is one row)."""
    return shape[-1] if shape else 1


def row_chunks(shape: tuple[int, ...], chunk: int, whole: bool = False) -> list[tuple[int, int]]:
    """Flat [start, end) ranges of whole rows, about `chunk` elements each (the whole tensor when `whole`)."""
    m = math.prod(shape)
    if whole or m <= chunk or len(shape) < 2:
        return [(0, m)]
    cols = row_length(shape)
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
    """The magnitude keys of one tensor for one candidate: entry j of parent i is kept from rank t up exactly when
    (|d_j|, j) >= (values[i, t], positions[i, t]) lexicographically (see ``methods.keep_from_keys``).

    Every key is exact before the merge pass but those ``marked`` (rank among and count of the entries strictly
    inside their bracket): the kernel keeps, provisionally, everything above the bracket's lower bound and marks the
    entries inside it (`lo`, `hi`: open bounds, empty where none); ``MagnitudeIndex.resolve`` finds the key among
    them, and they are merged again."""

    values: Tensor
    positions: Tensor
    lo: Tensor
    hi: Tensor
    marked: dict[tuple[int, int], tuple[int, int]]
    keys: tuple[Tensor, Tensor, Tensor] = field(init=False, repr=False)  # as the kernel takes them (`kernel_keys`)

    def __post_init__(self) -> None:
        self.keys = kernel_keys(self.values, self.positions)


def kernel_keys(values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keys as ``methods.keep_from_keys`` takes them: values, the next float above each (the keep test before a key's
    position), positions."""
    return values, torch.nextafter(values, values.new_tensor(math.inf)), positions


def equal_magnitude(parent: Tensor, base: Tensor, value: Tensor | float) -> Tensor:
    """The entries whose |parent − base| equals `value`: a group of ties (the base promoted inside the subtraction,
    the magnitude taken in place on the new difference: two passes over a scan's entries fewer; never in place on
    `parent.float()`, which is the parent itself when it is stored in fp32)."""
    return (parent.float() - base).abs_() == value


class MagnitudeIndex:
    """Per tensor and parent, |parent − base| at evenly spaced quantiles, the exact count of entries below and at or
    below each, and anchors into each group of equal magnitudes: any rank's value lies in a known bracket, and a rank
    inside a group has its exact position after a short scan (see `Selection`)."""

    def __init__(self, store: ParentStore, shapes: dict[str, tuple[int, ...]]):
        self.store = store
        self.bounds: dict[str, Tensor] = {}  # [N, S + 2]: 0, the sorted sample, inf
        self.below: dict[str, Tensor] = {}   # [N, S + 2]: entries with |delta| < each bound
        self.upto: dict[str, Tensor] = {}    # [N, S + 2]: entries with |delta| <= each bound
        self.anchor_start: dict[str, Tensor] = {}  # [N, S + 3]: where each bound's anchors start in anchors[i]
        self.anchors: dict[str, list[Tensor]] = {}  # per parent: positions of members 0, A, 2A, … of each group
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
        members = torch.zeros((n, s + 3), dtype=torch.int64, device=device)  # group members seen so far
        # the anchors, (group, position) each: ceil(members / stride) per group is at most m // stride + one per
        # group; preallocated, since small tensors kept from chunk to chunk fragment the heap the chunks cycle through
        room = m // ANCHOR_STRIDE + s + 3
        groups = torch.empty((n, room), dtype=torch.int64, device=device)
        places = torch.empty((n, room), dtype=torch.int64, device=device)
        found = [0] * n
        for start, _, base, parents in self.store.chunks(name, row_chunks(shape, min(self.store.chunk, BUILD_CHUNK))):
            for i, p in enumerate(parents):
                a = (p.float() - base.float()).abs_()
                # entry j counts below bound k (resp. at or below) for every k past its slot: the bounds <= a (>= 1,
                # bounds start at 0) and the bounds < a, the second from the first without another binary search
                right = torch.searchsorted(bounds[i], a, right=True, out_int32=True)
                below[i] += torch.bincount(right, minlength=s + 3)
                right -= 1  # the last bound <= a; where it equals a, the bounds < a end where its value starts
                equal, slot = bounds[i][right] == a, first[i][right]
                upto[i] += torch.bincount(torch.where(equal, slot, right + 1), minlength=s + 3)
                group, position = self._anchors(members[i], slot, equal & (a > 0), start)
                groups[i, found[i]:found[i] + group.numel()] = group
                places[i, found[i]:found[i] + group.numel()] = position
                found[i] += group.numel()
        count = torch.int32 if m < 2**31 else torch.int64
        self.bounds[name] = bounds
        self.below[name] = below.cumsum(1)[:, :-1].to(count)
        self.upto[name] = upto.cumsum(1)[:, :-1].to(count)
        starts, self.anchors[name] = [], []
        for i in range(n):
            group, position = groups[i, :found[i]], places[i, :found[i]]
            order = torch.argsort(group, stable=True)  # by group, then (chunks in order) by position
            self.anchors[name].append(position[order].to(count))
            starts.append(torch.bincount(group, minlength=s + 2).cumsum(0))
        self.anchor_start[name] = torch.cat([torch.zeros((n, 1), dtype=torch.int64, device=device),
                                             torch.stack(starts)], 1).to(count)

    @staticmethod
    def _anchors(members: Tensor, group: Tensor, equal: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """The anchors in one chunk: the group and position of each entry whose ordinal in its group of equal
        non-zero magnitudes (`equal`: entries equal to a bound; `group`: that bound's first slot) is a multiple of
        ANCHOR_STRIDE.  `members` (per group, the members before the chunk) is advanced past the chunk."""
        where = torch.nonzero(equal).squeeze(1)
        g = group[where]  # int32: its stable sort is three times an int64 one's speed on CPU
        order = torch.argsort(g, stable=True)  # by group, positions ascending within each
        count = torch.bincount(g, minlength=members.numel())
        skip = -members % ANCHOR_STRIDE  # each group's members here before its first anchor
        per_group = ((count - skip + ANCHOR_STRIDE - 1) // ANCHOR_STRIDE).clamp_min(0)
        anchored = torch.repeat_interleave(torch.arange(members.numel(), device=g.device), per_group)
        nth = torch.arange(anchored.numel(), device=g.device) - (per_group.cumsum(0) - per_group)[anchored]
        members += count
        return anchored, where[order[(count.cumsum(0) - count + skip)[anchored] + nth * ANCHOR_STRIDE]] + start

    def select(self, name: str, m: int, ranks: Tensor) -> Selection:
        """The keys of ascending ranks [N, T] (0 = smallest |delta|): entry j of parent i has rank ≥ ranks[i, t]
        exactly when (|d_j|, j) ≥ (value, position) lexicographically, the order of a stable ascending argsort.
        Ranks ≤ 0 give (−1, 0) (every entry), ranks ≥ M give (inf, 0) (none)."""
        bounds, below, upto = self.bounds[name], self.below[name], self.upto[name]
        ranks = ranks.to(bounds.device, below.dtype)  # the counts' own dtype: converting them costs more than the rest
        k = (torch.searchsorted(below, ranks, right=True) - 1).clamp(0, below.shape[1] - 2)
        lo, hi = bounds.gather(1, k), bounds.gather(1, k + 1)
        first, group, last = below.gather(1, k), upto.gather(1, k), below.gather(1, k + 1)
        inside = (ranks > 0) & (ranks < m)
        zero = inside & (ranks < group) & (lo == 0)  # among the zero deltas: key (0, 0) keeps every non-zero one
        tie = inside & (ranks < group) & (lo > 0)
        mark = inside & (ranks >= group)
        values = torch.where(ranks >= m, math.inf, torch.where(inside, lo, -1.0))
        positions = torch.where(inside & ~zero, m, 0)  # marked: everything above lo kept until the key is resolved
        slot = torch.searchsorted(bounds, lo)  # the first bound of the group's value: where its anchors are
        host = torch.stack([ranks - first, ranks - group, last - group, tie, mark, slot, group - first]).cpu()
        ordinals, in_bracket, brackets, _, _, slots, sizes = host.tolist()  # Python ints: no tensor indexing per key
        for i, t in host[3].nonzero().tolist():
            positions[i, t] = self._member(name, i, slots[i][t], ordinals[i][t], sizes[i][t], values[i, t], m)
        marked = {(i, t): (in_bracket[i][t], brackets[i][t]) for i, t in host[4].nonzero().tolist()}
        return Selection(values, positions.to(below.dtype), torch.where(mark, lo, math.inf),
                         torch.where(mark, hi, -math.inf), marked)

    def _member(self, name: str, i: int, slot: int, ordinal: int, size: int, value: Tensor, m: int) -> int:
        """The position of member `ordinal` (in position order) of parent i's group of `size` entries equal to
        `value`: a scan of the entries between the anchors around it, from the one nearer in members (on average a
        quarter of the way), in steps of SCAN_CHUNK entries at most: a step stops the scan once it holds the member,
        and small steps' temporaries reuse the heap (a whole compiled chunk per step made a TIES candidate 25%
        slower)."""
        anchors = self.anchors[name][i]
        first = int(self.anchor_start[name][i, slot])
        count = int(self.anchor_start[name][i, slot + 1]) - first
        k, skip = divmod(ordinal, ANCHOR_STRIDE)
        start = int(anchors[first + k])
        end = int(anchors[first + k + 1]) if k + 1 < count else m
        members = min(ANCHOR_STRIDE, size - k * ANCHOR_STRIDE)  # in [start, end): anchor k's and those up to the next
        forward = 2 * skip < members
        need = skip if forward else members - 1 - skip  # members to pass over from where the scan starts
        base, parent = self.store.models[0][name], self.store.models[i + 1][name]
        step, value = min(self.store.chunk, SCAN_CHUNK), value.to(parent.device)
        while start < end:
            q, r = (start, min(start + step, end)) if forward else (max(end - step, start), end)
            hits = torch.nonzero(equal_magnitude(parent[q:r], base[q:r], value)).squeeze(1)
            if need < hits.numel():
                return q + int(hits[need if forward else hits.numel() - 1 - need])
            need -= hits.numel()
            start, end = (r, end) if forward else (start, q)
        raise RuntimeError(f"magnitude index out of date: member {ordinal} of a group of {name} not found")

    def resolve(self, selection: Selection, positions: Tensor, magnitudes: list[Tensor]
                ) -> tuple[Tensor, Tensor, Tensor]:
        """The exact keys (`kernel_keys`), from the entries merged again: their `positions` (ascending) and |delta|
        per parent."""
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
        return kernel_keys(values, where)


class RowRanks:
    """Per tensor, each parent's task-vector entries' magnitude ranks within their rows (``methods.sort_row_ranks``:
    high and low planes), on the store's device; sorted once, chunk by chunk, so building it holds no more than a
    chunk in fp32."""

    def __init__(self, store: ParentStore, shapes: dict[str, tuple[int, ...]]):
        self.table: dict[str, list[tuple[Tensor, Tensor]]] = {}
        step = store.chunk if store.device.type == "cuda" else min(store.chunk, BUILD_CHUNK)
        for name, shape in shapes.items():
            m = math.prod(shape)
            planes: list[tuple[Tensor, Tensor]] = []
            for s, e, base, parents in store.chunks(name, row_chunks(shape, step)):
                chunk = sort_row_ranks([p.float() - base.float() for p in parents], row_length(shape))
                if not planes:
                    planes = [tuple(torch.empty(m, dtype=x.dtype, device=store.device) for x in c) for c in chunk]
                for table, ranks in zip(planes, chunk):
                    for plane, x in zip(table, ranks):
                        plane[s:e] = x
            self.table[name] = planes

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for planes in self.table.values() for p in planes for x in p)
