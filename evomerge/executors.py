"""Executors run trials.  `local` evaluates in this process; each worker keeps the parents and the lm-eval tasks
resident, so a candidate costs one in-place materialization plus forward passes."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer

from .config import StudyConfig
from .fitness import Fitness, Score
from .io import pick_device
from .merge import Materializer
from .recipe import Recipe


@dataclass
class TrialResult:
    """One evaluation's outcome; `score.examples`, `score.stages` and `score.full` say how much racing spent."""

    score: Score | None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class Worker:
    """Parents resident, tasks built once; `evaluate` scores one recipe on one split."""

    def __init__(self, cfg: StudyConfig):
        self.device = pick_device(cfg.device)
        self.materializer = Materializer(cfg.models.base, cfg.models.parents, self.device, cfg.merge.dtype)
        tokenizer = AutoTokenizer.from_pretrained(cfg.models.base or cfg.models.parents[0], trust_remote_code=False)
        self.fitness = Fitness(cfg.fitness, self.materializer.model, tokenizer, str(self.device), seed=cfg.seed)

    def evaluate(self, recipe: Recipe, split: str = "search", incumbent: list[dict] | None = None) -> TrialResult:
        """Never raises for a bad candidate: the error comes back in the result so only its trial fails.

        `incumbent` (the best trial's racing stages) lets racing stop a candidate that cannot beat it.
        """
        t0 = time.perf_counter()
        try:
            self.materializer.materialize(recipe)
            t1 = time.perf_counter()
            score = self.fitness.score(split, incumbent)
            t2 = time.perf_counter()
            return TrialResult(score, {"materialize_s": t1 - t0, "fitness_s": t2 - t1, "forward_s": score.forward_s})
        except (RuntimeError, ValueError, FloatingPointError, torch.cuda.OutOfMemoryError) as e:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return TrialResult(None, {"total_s": time.perf_counter() - t0}, f"{type(e).__name__}: {e}")


class LocalExecutor:
    """In-process, one candidate at a time: the default, and the reference the Ray executor must match."""

    name = "local"

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self._worker: Worker | None = None

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            self._worker = Worker(self.cfg)
        return self._worker

    def evaluate(self, recipe: Recipe, split: str = "search", incumbent: list[dict] | None = None) -> TrialResult:
        return self.worker.evaluate(recipe, split, incumbent)
