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
    score: Score | None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class Worker:
    """Parents resident, tasks built once; `evaluate` scores one recipe on one split."""

    def __init__(self, cfg: StudyConfig):
        self.device = pick_device(cfg.device)
        self.materializer = Materializer(cfg.models.base, cfg.models.parents, self.device, cfg.merge.dtype)
        tokenizer = AutoTokenizer.from_pretrained(cfg.models.base or cfg.models.parents[0], trust_remote_code=False)
        self.materializer.model.get_output_embeddings().register_forward_hook(_refuse_non_finite_logits)
        self.fitness = Fitness(cfg.fitness, self.materializer.model, tokenizer, str(self.device))

    def evaluate(self, recipe: Recipe, split: str = "search") -> TrialResult:
        """Never raises for a bad candidate: the error comes back in the result so only its trial fails."""
        t0 = time.perf_counter()
        try:
            self.materializer.materialize(recipe)
            t1 = time.perf_counter()
            score = self.fitness.score(split)
            t2 = time.perf_counter()
            return TrialResult(score, {"materialize_s": t1 - t0, "fitness_s": t2 - t1})
        except Exception as e:  # out of memory (CPU or CUDA), NaN logits, a task or metric that raises
            error = f"{type(e).__name__}: {e}"
        # after the handler, so the traceback's frames (and the tensors they hold) are gone before memory is returned
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return TrialResult(None, {"total_s": time.perf_counter() - t0}, error)


def _refuse_non_finite_logits(module: torch.nn.Module, args: tuple, logits: torch.Tensor) -> None:
    """Greedy decoding turns NaN logits into some token and a plausible-looking score; fail the candidate instead."""
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the candidate's logits are not finite (NaN or inf)")


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

    def evaluate(self, recipe: Recipe, split: str = "search") -> TrialResult:
        return self.worker.evaluate(recipe, split)
