"""Fitness through lm-eval: tasks built once per worker, the resident model wrapped once, weighted scores.

`lm_eval.evaluator.evaluate` is called with prebuilt task objects (not `simple_evaluate`, which rebuilds everything
per call) and an `HFLM` around the in-memory model; lm-eval's response cache is never used, since answers would
leak between candidates that share one model object.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass

from .config import FitnessConfig


class FitnessError(ValueError):
    """The fitness setup cannot work (unknown task, missing split, unknown metric)."""


@dataclass
class Score:
    """Weighted fitness plus the per-task metric values it came from."""

    value: float
    per_task: dict[str, float]


def _quiet_lm_eval() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Fitness:
    """Scores whatever weights the wrapped model holds right now, on the search or the test split."""

    def __init__(self, config: FitnessConfig, model, tokenizer, device: str):
        _quiet_lm_eval()
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        self.config = config
        local = TaskManager(include_path=config.include_path, include_defaults=False).all_tasks if config.include_path else []
        # indexing lm-eval's built-in tasks costs ~15 s: only do it when some task is not local
        needs_defaults = any(t.task not in local for t in config.tasks)
        self.manager = TaskManager(include_path=config.include_path or None, include_defaults=needs_defaults)
        unknown = [t.task for t in config.tasks if t.task not in self.manager.all_tasks]
        if unknown:
            raise FitnessError(
                f"fitness.tasks: lm-eval does not know task {unknown[0]!r}; "
                f"tasks under fitness.include_path: {', '.join(sorted(local)) or 'none'}"
            )
        self._tasks: dict[str, dict] = {}
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, device=device)

    def tasks(self, split: str) -> dict:
        """The task dict for one split ('search' or 'test'), built on first use and reused for every candidate."""
        if split not in self._tasks:
            loaded = self.manager.load([t.task for t in self.config.tasks])
            for t in self.config.tasks:
                task = loaded["tasks"][t.task]
                name = t.search_split if split == "search" else t.test_split
                if name not in task.dataset:
                    raise FitnessError(
                        f"fitness.tasks.{t.task}.{split}_split: split {name!r} not in the data; "
                        f"available: {', '.join(task.dataset)}"
                    )
                task.config.test_split = name
            self._tasks[split] = loaded
        return self._tasks[split]

    def score(self, split: str = "search") -> Score:
        """Evaluate the model as it is now; NaN metrics raise, so a broken candidate fails its trial."""
        from lm_eval.evaluator import evaluate

        tasks = self.tasks(split)
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # lm-eval's per-call progress bars
            results = evaluate(
                self.lm, tasks, limit=self.config.limit, cache_requests=False, bootstrap_iters=0,
                log_samples=False, verbosity="ERROR",
            )["results"]
        per_task: dict[str, float] = {}
        for t in self.config.tasks:
            metrics = results[t.task]
            key = next((k for k in metrics if k.split(",")[0] == t.metric), None)
            if key is None:
                names = sorted({k.split(",")[0] for k in metrics if not k.endswith("_stderr") and k != "alias"})
                raise FitnessError(f"fitness.tasks.{t.task}.metric: {t.metric!r} not reported; reported: {names}")
            value = float(metrics[key])
            if math.isnan(value):
                raise FloatingPointError(f"task {t.task}: metric {t.metric} is NaN")
            per_task[t.task] = value
        total = sum(t.weight for t in self.config.tasks) or 1.0
        value = sum(t.weight * per_task[t.task] for t in self.config.tasks) / total
        return Score(value=value, per_task=per_task)
