"""A worker: the parents resident, the fitness tasks built once, one recipe scored at a time.

Both executors run the same Worker, in this process (`local`) or inside a Ray actor (`ray`): loading the parents and
building the lm-eval tasks is paid once per worker, so a candidate costs one in-place materialization plus forward
passes, and a bad candidate fails its own trial, never the worker.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from .config import StudyConfig
from .fitness import Fitness, Score
from .io import pick_device
from .recipe import Recipe
from .spaces import SearchSpace


@dataclass
class TrialResult:
    """One evaluation's outcome; `score.examples`, `score.stages` and `score.full` say how much racing spent."""

    score: Score | None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    worker: str = "local"
    attempts: int = 1


class Worker:
    """Parents resident, tasks built once; `evaluate` scores one recipe on one split."""

    def __init__(self, cfg: StudyConfig):
        from transformers import AutoTokenizer

        self.device = pick_device(cfg.device)
        # the space's kind decides what stays resident (parents to merge, or sources for layer paths)
        self.resident = SearchSpace.of_kind(cfg.search_space.kind).load(cfg, self.device)
        tokenizer = self.resident.tokenizer or AutoTokenizer.from_pretrained(
            cfg.models.base or cfg.models.parents[0], trust_remote_code=False)
        # the model object every candidate runs through
        self.resident.model.register_forward_hook(_refuse_non_finite_logits)
        self.fitness = Fitness(cfg.fitness, self.resident.model, tokenizer, str(self.device), seed=cfg.seed)

    def evaluate(self, recipe: Recipe, split: str = "search",
                 incumbent: dict[str, list[float]] | None = None) -> TrialResult:
        """Never raises for a bad candidate: the error comes back in the result so only its trial fails.

        `incumbent` (the best trial's per-example search scores) lets racing stop a candidate that cannot beat it.
        """
        t0 = time.perf_counter()
        try:
            self.resident.apply(recipe)
            t1 = time.perf_counter()
            score = self.fitness.score(split, incumbent)
            t2 = time.perf_counter()
            return TrialResult(score, {"materialize_s": t1 - t0, "fitness_s": t2 - t1, "forward_s": score.forward_s})
        except Exception as e:  # out of memory (CPU or CUDA), NaN logits, a task or metric that raises
            error = f"{type(e).__name__}: {e}"
        # after the handler, so the traceback's frames (and the tensors they hold) are gone before memory is returned
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return TrialResult(None, {"total_s": time.perf_counter() - t0}, error)


def _refuse_non_finite_logits(module: torch.nn.Module, args: tuple, output) -> None:
    """Greedy decoding turns NaN logits into some token and a plausible-looking score; fail the candidate instead.

    Hooked on the whole CausalLM, not its head: a data-flow path swaps the head for its first model's.  Only the
    extremes are checked (NaN and inf propagate into them), so no logits-sized mask is allocated per forward pass."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    if not torch.isfinite(torch.stack(torch.aminmax(logits))).all():
        raise FloatingPointError("the candidate's logits are not finite (NaN or inf)")
