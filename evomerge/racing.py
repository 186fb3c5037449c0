"""Racing (multi-fidelity): stop a candidate early once it clearly cannot beat the incumbent.

A candidate is scored on nested subsets of each task's search examples (a fixed per-task permutation, so every task
is represented in the same proportion at every stage), each stage ``reduction_factor`` times larger than the last,
starting at ``min_examples`` per task.  After each stage it is compared with the incumbent example by example (a
paired test: two merges of the same parents answer most examples alike, so the differences vary far less than the
scores do); it stops when even the upper confidence bound of the difference is below zero.  Only new examples are
scored at each stage, so a candidate that runs to the end costs exactly what a plain evaluation costs.

Pure functions over per-example scores: the scoring itself is the `score` callable `race` is given, so every rule
here is tested without a model.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

Scores = dict[str, list[float]]  # per task, per-example metric values in racing order


def stage_sizes(min_examples: int, factor: float, full: int) -> list[int]:
    """Examples per task at each racing stage: min, min·f, min·f², ... and always `full` last.

    A stage within a factor of √f of the full subset is skipped: it would save too little to pay for its check.
    """
    sizes, n = [], float(min_examples)
    while n * math.sqrt(factor) <= full:
        if not sizes or round(n) > sizes[-1]:
            sizes.append(int(round(n)))
        n *= factor
    return sizes + [full] if not sizes or sizes[-1] < full else sizes


def example_order(task: str, n: int, seed: int) -> list[int]:
    """A task's fixed permutation of its `n` search examples; the stages are its prefixes.  Seeded by the study's
    seed and the task's name, so every worker (and every resume) races on the same examples."""
    order = list(range(n))
    random.Random(f"{seed}:{task}").shuffle(order)
    return order


def keep_racing(candidate: Scores, incumbent: Scores, weights: dict[str, float], z: float) -> bool:
    """Whether a candidate may still beat the incumbent, given its per-example scores on a prefix of the incumbent's.

    A paired test: per task, the differences candidate - incumbent on the same examples; the weighted mean
    difference plus `z` standard errors (each task's sample variance of its differences over its n) must stay
    >= 0.  Differences of two merges of the same parents are mostly zero, so this separates them with a fraction of
    the examples an unpaired bound needs.  With a single example per task the variance is unknown and taken as 1,
    the largest a difference of two scores in [0, 1] can have.
    """
    total = sum(weights.values()) or 1.0
    mean = var = 0.0
    for k, w in weights.items():
        n = len(candidate[k])
        if len(incumbent.get(k, ())) < n:
            return True  # the incumbent was not scored on these examples: nothing to compare with
        d = [c - i for c, i in zip(candidate[k], incumbent[k])]
        mean += w / total * statistics.fmean(d)
        var += (w / total) ** 2 * (statistics.variance(d) if n > 1 else 1.0) / n
    return mean + z * math.sqrt(var) >= -1e-12  # one loss in n sits exactly on the z = 1 bound: kept


def estimate(measured: dict[str, float], incumbent: Scores, done: dict[str, int]) -> dict[str, float]:
    """A stopped candidate's full-subset scores: the incumbent's full score plus the paired difference on the
    examples both were scored on (a control variate, far less noisy than the candidate's own partial mean)."""
    return {k: statistics.fmean(incumbent[k]) + measured[k] - statistics.fmean(incumbent[k][:done[k]])
            for k in measured}


@dataclass(frozen=True)
class Race:
    """A raced candidate: per-task scores (estimates when `full` is False), the examples scored, per stage the
    examples per task and the cumulative per-task means, and the per-example values in racing order."""

    per_task: dict[str, float]
    examples: int
    stages: list[dict]
    full: bool
    values: Scores


def race(order: dict[str, list[int]], score: Callable[[dict[str, list[int]]], tuple[int, Scores]],
         incumbent: Scores | None, weights: dict[str, float], min_examples: int, factor: float, z: float) -> Race:
    """Score a candidate stage by stage on prefixes of `order` until it ends or `keep_racing` drops it.

    `score(samples)` scores the examples at `samples` (task -> example indices) and returns the examples scored and
    their per-example values; only the examples new at each stage are asked for.  Without an incumbent every stage
    runs, and the result is what a plain evaluation of the whole subset gives.
    """
    sizes = {k: stage_sizes(min_examples, factor, len(v)) for k, v in order.items()}
    n_stages = max(len(s) for s in sizes.values())
    done = {k: 0 for k in order}
    values: Scores = {k: [] for k in order}
    stages: list[dict] = []
    examples = 0
    for s in range(n_stages):
        target = {k: v[min(s, len(v) - 1)] for k, v in sizes.items()}
        samples = {k: order[k][done[k]:target[k]] for k in order if target[k] > done[k]}
        n, new = score(samples)
        examples += n
        for k in samples:
            values[k] += [float(v) for v in new[k]]
        done = target
        stages.append({"examples": dict(done), "per_task": {k: statistics.fmean(v) for k, v in values.items()}})
        last = s == n_stages - 1
        if not last and incumbent is not None and not keep_racing(values, incumbent, weights, z):
            break
    full = all(done[k] == len(order[k]) for k in order)
    per_task = dict(stages[-1]["per_task"])
    if not full:
        per_task = estimate(per_task, incumbent, done)
    return Race(per_task, examples, stages, full, values)
