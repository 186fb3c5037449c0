"""The parents of a merge at their stored size: resident on the device, or mapped from their files and streamed.

A merge works on one tensor at a time, in chunks of whole rows (`chunk_size` elements: 2^18 on CPU, where eager
temporaries of 2^20 cost about 1 byte/param of a 100M model at the peak; 2^22 on CUDA, where launches cost more than
memory), so what it allocates besides the candidate is a few chunks × (N + 1), whatever the model's size.  Where the parents live is the only
difference between the two modes:

* ``resident`` — each tensor copied once to the device in the dtype its file holds (bf16 stays bf16);
* ``streaming`` — the safetensors files memory-mapped (file pages: every worker on a node shares the page cache, and
  none of it is the process's anonymous memory), each chunk moved to the device when the merge needs it (through
  pinned buffers on CUDA, copy overlapped with compute; on CPU the mapped pages are read in place).

Magnitude selections (TIES, breadcrumbs) need the value of the k-th largest |parent − base| of a tensor for a density
only known per candidate.  `MagnitudeIndex` keeps a sorted sample of |delta| per tensor and parent (≤ 1/64 of its
entries in fp32: 0.0625 byte/param) that brackets the k-th value within a few standard errors of a quantile (about
1% of the entries for a 1M-entry tensor); one pass over the chunks then finds it exactly,
with mergekit's top-k count and its tie order (equal magnitudes kept from the highest position down, as a stable
ascending argsort ranks them).
"""
from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..io import ModelFilesError, ModelInfo, load_bin, weight_files
from ..vocab import VocabPlan, align_rows

CPU_CHUNK, CUDA_CHUNK = 1 << 18, 1 << 22


def chunk_size(device: torch.device) -> int:
    return CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK
SAMPLE_FRACTION = 64
_ST_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


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

    def __init__(self, base: str | None, parents: list[str], device: torch.device, mode: str = "resident"):
        self.device, self.mode = device, mode
        self.chunk = chunk_size(device)
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


def _count_brackets(parents: list[Tensor], base: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For one chunk: per parent and bracket [lo, hi] ([N, T]) the entries whose |delta| is above it and inside it,
    and the mask [N, L] of entries inside any of a parent's brackets; one fused pass when compiled."""
    a = (torch.stack([p.float() for p in parents]) - base.float()).abs()[:, None, :]
    above = (a > hi[:, :, None]).sum(-1)
    within = (a >= lo[:, :, None]) & (a <= hi[:, :, None])
    return above, within.sum(-1), within.any(1)


class MagnitudeIndex:
    """Per tensor and parent, a sorted sample of |parent − base| that brackets any rank's value (see module doc)."""

    def __init__(self, store: ParentStore, shapes: dict[str, tuple[int, ...]], compile: bool = False):
        self.store = store
        self._count = torch.compile(_count_brackets, dynamic=True) if compile else _count_brackets
        self.samples: dict[str, Tensor] = {}
        for name, shape in shapes.items():
            m = math.prod(shape)
            s = max(1, m // SAMPLE_FRACTION)
            idx = torch.arange(s) * (m - 1) // max(s - 1, 1)  # evenly spaced, integer arithmetic (exact)
            views = [mm[name] for mm in store.models]
            b = views[0][idx.to(views[0].device)].float()
            self.samples[name] = torch.stack([(p[idx.to(p.device)].float() - b).abs() for p in views[1:]]).sort(
                dim=1).values

    def keys(self, name: str, shape: tuple[int, ...], ranks: Tensor) -> tuple[Tensor, Tensor]:
        """For ascending ranks [N, T] (0 = smallest |delta|), the keys (value, position) [N, T] of those ranks.

        Entry j of parent i has rank ≥ ranks[i, t] exactly when (|d_j|, j) ≥ (value, position) lexicographically —
        the order of a stable ascending argsort.  Ranks ≤ 0 give (−1, 0) (every entry), ranks ≥ M give (inf, 0) (none).
        """
        m = math.prod(shape)
        n, t = ranks.shape
        values = torch.full((n, t), -1.0)
        positions = torch.zeros((n, t), dtype=torch.int64)
        values[ranks >= m] = math.inf
        todo = [(i, j, int(ranks[i, j])) for i in range(n) for j in range(t) if 0 < ranks[i, j] < m]
        sample = self.samples[name].cpu()
        size = sample.shape[1]
        attempt = 0
        while todo:  # a sample that misses its bracket (a rare draw) is searched again with a wider one
            brackets = {}
            for i, j, r in todo:
                q = r * size // m
                widen = 8 ** max(attempt - 1, 0)
                half = widen * (math.ceil(4 * math.sqrt(q * (size - q) / size)) + 2)  # 4 sigma of a quantile's rank
                lo = float(sample[i, q - half]) if q >= half else -1.0
                hi = float(sample[i, q + half]) if q + half < size else math.inf
                if attempt == 0 and 0 < q < size - 1 and sample[i, q - 1] == sample[i, q + 1]:
                    lo = hi = float(sample[i, q])  # a tie group spans the quantile (bf16 deltas): count, don't gather
                brackets[(i, j)] = (lo, hi)
            found = self._select(name, shape, todo, brackets)
            for (i, j), (v, p) in found.items():
                values[i, j], positions[i, j] = v, p
            todo = [(i, j, r) for i, j, r in todo if (i, j) not in found]
            attempt += 1
        return values.to(self.store.device), positions.to(self.store.device)

    def _select(self, name: str, shape: tuple[int, ...], todo: list[tuple[int, int, int]],
                brackets: dict[tuple[int, int], tuple[float, float]]) -> dict[tuple[int, int], tuple[float, int]]:
        """One pass over the tensor: entries above each bracket counted, entries inside it kept (values only)."""
        m = math.prod(shape)
        ranges = row_chunks(shape, self.store.chunk)
        n, t = len(self.store.models) - 1, 1 + max(j for _, j, _ in todo)
        lo, hi = torch.full((n, t), math.inf), torch.full((n, t), -math.inf)  # empty where nothing is searched
        for (i, j), (low, high) in brackets.items():
            lo[i, j], hi[i, j] = low, high
        lo, hi = lo.to(self.store.device), hi.to(self.store.device)
        above = torch.zeros((n, t), dtype=torch.int64, device=self.store.device)
        # per bracket and chunk: the values inside it, or only their count for a one-value bracket (all equal to it)
        inside: dict[tuple[int, int], list[Tensor | int]] = {key: [] for key in brackets}
        gather = sorted({i for (i, _), (low, high) in brackets.items() if low < high})
        with torch.no_grad():
            for s, e, b, ps in self.store.chunks(name, ranges):
                counts, within, mask = self._count(ps, b, lo, hi)
                above += counts
                within = within.cpu()
                for (i, j), (low, high) in brackets.items():
                    if low == high:
                        inside[(i, j)].append(int(within[i, j]))
                for i in gather:
                    at = mask[i].nonzero().squeeze(1)
                    a = (ps[i][at].float() - b[at].float()).abs_()
                    for (pi, j), (low, high) in brackets.items():
                        if pi == i and low < high:
                            inside[(i, j)].append(a[(a >= low) & (a <= high)])
        above = {key: int(above[key]) for key in brackets}
        found = {}
        for i, j, r in todo:
            vals = inside[(i, j)]
            point = brackets[(i, j)][0] == brackets[(i, j)][1]
            n_in = sum(vals) if point else sum(len(v) for v in vals)
            first = m - above[(i, j)] - n_in  # rank of the bracket's smallest entry
            if not first <= r < first + n_in:
                continue
            if point:
                v, greater, equal = brackets[(i, j)][0], above[(i, j)], vals
            else:
                v = float(torch.cat(vals).sort().values[r - first])
                greater = above[(i, j)] + sum(int((x > v).sum()) for x in vals)
                equal = [int((x == v).sum()) for x in vals]
            keep_equal = (m - r) - greater  # the entries equal to v that rank ≥ r: the last ones by position
            skip = sum(equal) - keep_equal
            if skip == 0 or v == 0.0:  # a zero delta contributes nothing kept or not
                found[(i, j)] = (v, 0)
                continue
            for c, count in enumerate(equal):
                if skip < count:
                    s, e = ranges[c]
                    (_, _, b, ps), = self.store.chunks(name, [(s, e)])
                    a = (ps[i].float() - b.float()).abs_()
                    found[(i, j)] = (v, s + int(torch.nonzero(a == v)[skip, 0]))
                    break
                skip -= count
        return found
