"""The memory plan of a worker, made from the safetensors headers before any weight is read.

Bytes a worker needs, by the measured model of the merge engine (``bench/merge_throughput.py``):

* resident — the device holds base + parents at their stored size, the candidate, the magnitude index (at most 0.055
  byte per parameter and parent, selecting methods only), the merge's chunk workspace and a forward pass;
* streaming — the device holds the candidate, the workspace and a forward pass; the parents stay in their files,
  mapped (the host's page cache; shared by every worker on the node).

DELLA methods add, in either mode, the table of row ranks (2 bytes per parameter and parent) when it fits; without
it each candidate sorts every row again (about 20 ns per entry on a CPU core: exact, the same weights, much slower).

`plan_memory` picks resident when it fits the device budget, else streaming, or obeys the study's
``worker.parents``; when even streaming does not fit it raises `MemoryPlanError` naming what does not fit and the
options.  On CPU the device is host memory.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import EvomergeError
from ..io import inspect_model, stored_size
from ..recipe import DTYPE_BYTES
from .parents import INDEX_ENTRY_BYTES, RANK_ENTRY_BYTES, SAMPLE_FRACTION, chunk_size

if TYPE_CHECKING:
    from ..config import StudyConfig

WORKSPACE_TEMPS = 8  # fp32 [N+1, chunk] temporaries alive at once in the eager kernel, measured upper bound
FORWARD_TOKENS = 1024  # sequence length assumed for the forward-pass estimate


class MemoryPlanError(EvomergeError, ValueError):
    """The study's models cannot fit the device even with the parents streamed from host memory."""


@dataclass(frozen=True)
class MemoryPlan:
    mode: str
    device: str
    params: int
    parents_bytes: int
    candidate_bytes: int
    aux_bytes: int
    workspace_bytes: int
    forward_bytes: int
    budget_bytes: int
    row_ranks: str | None = None  # DELLA: "table" (kept, rank_bytes) or "sorted" (per candidate); None otherwise
    rank_bytes: int = 0

    @property
    def device_bytes(self) -> int:
        resident = self.parents_bytes + self.aux_bytes if self.mode == "resident" else 0
        return resident + self.rank_bytes + self.candidate_bytes + self.workspace_bytes + self.forward_bytes

    @property
    def host_bytes(self) -> int:
        """Page cache the mapped parents occupy (streaming), shared by the workers of a node."""
        return self.parents_bytes if self.mode == "streaming" else 0

    def describe(self) -> str:
        gb = _size
        parts = (f"parents {gb(self.parents_bytes)} {'on the device' if self.mode == 'resident' else 'mapped on the host'}"
                 f", candidate {gb(self.candidate_bytes)}, aux {gb(self.aux_bytes)}, workspace "
                 f"{gb(self.workspace_bytes)}, forward pass ~{gb(self.forward_bytes)}"
                 + (f", DELLA row ranks: a table of {gb(self.rank_bytes)}" if self.row_ranks == "table" else
                    ", DELLA row ranks: sorted per candidate (no room for their table: slow)" if self.row_ranks else ""))
        return (f"memory plan: {self.mode} on {self.device} ({self.params / 1e6:.0f}M params): device "
                f"{gb(self.device_bytes)} of {gb(self.budget_bytes)} ({parts})")


def device_budget(device: torch.device) -> int:
    """Free memory of the device: CUDA's free bytes, or the host's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def plan_memory(base: str | None, parents: list[str], device: torch.device, *, method_selects: bool,
                method_ranks: bool = False, candidate_dtype: str | None = None, prefer: str = "auto",
                budget_bytes: int | None = None, batch_size: int = 1) -> MemoryPlan:
    """The worker's memory plan for these (local) models; raises `MemoryPlanError` when nothing fits.
    `method_ranks`: a DELLA method, whose table of row ranks the plan keeps in the first mode it fits."""
    models = ([base] if base else []) + list(parents)
    sizes = [stored_size(m) for m in models]
    params, _, stored_dtype = sizes[0]
    info = inspect_model(models[0])
    largest = max(math.prod(s) for s in info.shapes.values())
    n = len(models)
    candidate = params * DTYPE_BYTES[candidate_dtype or stored_dtype]
    aux = INDEX_ENTRY_BYTES * params * len(parents) // SAMPLE_FRACTION if method_selects else 0
    workspace = WORKSPACE_TEMPS * 4 * n * min(largest, chunk_size(device))
    cfg = info.config
    hidden = int(cfg.get("hidden_size") or 0)
    vocab = int(cfg.get("vocab_size") or 0)
    tokens = batch_size * min(int(cfg.get("max_position_embeddings") or FORWARD_TOKENS), FORWARD_TOKENS)
    forward = tokens * (4 * vocab + 16 * hidden * DTYPE_BYTES[candidate_dtype or stored_dtype])
    budget = device_budget(device) if budget_bytes is None else budget_bytes
    common = dict(device=str(device), params=params, parents_bytes=sum(s[1] for s in sizes), candidate_bytes=candidate,
                  aux_bytes=aux, workspace_bytes=workspace, forward_bytes=forward, budget_bytes=budget)
    table = RANK_ENTRY_BYTES * params * len(parents)
    ranks = [dict(row_ranks="table", rank_bytes=table), dict(row_ranks="sorted")] if method_ranks else [{}]
    plans = {mode: [MemoryPlan(mode=mode, **common, **r) for r in ranks] for mode in ("resident", "streaming")}
    for mode in {"resident": ["resident"], "streaming": ["streaming"]}.get(prefer, ["resident", "streaming"]):
        for plan in plans[mode]:
            if plan.device_bytes <= budget:
                return plan
    forced = "worker.parents: resident" if prefer == "resident" else None
    raise MemoryPlanError(_refusal(plans["resident"][-1], plans["streaming"][-1], forced))


def _size(b: int) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"


def _refusal(resident: MemoryPlan, streaming: MemoryPlan, forced: str | None) -> str:
    gb = _size
    what = (f"{forced} needs {gb(resident.device_bytes)} on {resident.device}" if forced else
            f"even with the parents streamed from host memory the candidate ({gb(streaming.candidate_bytes)}) plus "
            f"workspace and forward pass need {gb(streaming.device_bytes)} on {streaming.device}")
    return (f"the models do not fit: {what}, and {gb(resident.budget_bytes)} is available "
            f"(base + parents at their stored size: {gb(resident.parents_bytes)}). Options: "
            + ("set worker.parents: host (or auto) to stream the parents; " if forced else "")
            + "a smaller merge.dtype (bfloat16), a device with more memory (or a larger --device-memory), "
              "a smaller fitness batch_size, or fewer parents")


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes (file pages of mapped parents are not counted)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """The peak of `rss_anon` while the block runs, sampled every millisecond on a thread."""

    def __init__(self) -> None:
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.001)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def study_plan(cfg: StudyConfig, device: torch.device) -> MemoryPlan | None:
    """The memory plan of one worker of a parameter-space study on `device` (``worker`` section of the study).

    None for data-flow studies (their engine keeps the sources resident, unchanged) and for models given as Hub ids
    that are not downloaded (``run --check`` reads no network)."""
    from .methods import METHODS

    models = [m for m in [cfg.models.base, *cfg.models.parents] if m]
    if not cfg.search_space.traits.merges or not all(Path(m).is_dir() for m in models):
        return None
    w = cfg.worker
    return plan_memory(cfg.models.base, cfg.models.parents, device,
                       method_selects=METHODS[cfg.merge.method].select is not None,
                       method_ranks=METHODS[cfg.merge.method].row_ranked, candidate_dtype=cfg.merge.dtype,
                       prefer={"host": "streaming"}.get(w.parents, w.parents),
                       budget_bytes=None if w.device_memory is None else int(w.device_memory * 1e9),
                       batch_size=cfg.fitness.batch_size)
