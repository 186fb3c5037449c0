"""The trial schema: what evomerge stores per trial, as a frozen record read from Optuna's trial in one place."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

ATTR = "evomerge."  # the prefix of evomerge's trial and study user attrs
RACED_OUT = 100.0


@dataclass(frozen=True)
class TrialRecord:
    """One trial as evomerge sees it: the trial schema, read from the stored attrs in `of` and nowhere else."""

    number: int
    trial_id: int
    state: TrialState
    values: list[float] | None
    value: float  # the weighted search fitness, whatever the number of objectives (NaN when there is none)
    generation: int | None = None
    index: int | None = None
    genome: list[float] | None = None
    recipe: dict | None = None
    scores: dict[str, float] | None = None
    examples: int | None = None
    full_fidelity: bool = True
    stages: list | None = None
    example_scores: dict[str, list[float]] | None = field(default=None, repr=False)
    error: str | None = None
    runner: str | None = None  # the `evomerge run` process that claimed it (host:pid)
    worker: str | None = None  # the worker that scored it
    attempts: int = 1  # how many workers it took (a Ray actor that died is replaced and the trial retried)
    timings: dict[str, float] | None = field(default=None, repr=False)
    wall_s: float | None = None  # from the claim to the stored result

    @classmethod
    def of(cls, t: FrozenTrial) -> TrialRecord:
        a = {k.removeprefix(ATTR): v for k, v in t.user_attrs.items() if k.startswith(ATTR)}
        single = t.values is not None and len(t.values) == 1
        return cls(number=t.number, trial_id=t._trial_id, state=t.state, values=t.values,
                   value=a.get("value", t.values[0] if single else math.nan),
                   generation=a.get("generation"), index=a.get("index"), genome=a.get("genome"),
                   recipe=a.get("recipe"), scores=a.get("scores"), examples=a.get("examples"),
                   full_fidelity=a.get("full_fidelity", True), stages=a.get("stages"),
                   example_scores=a.get("example_scores"), error=a.get("error"), runner=a.get("runner"),
                   worker=a.get("worker"), attempts=a.get("attempts", 1), timings=a.get("timings"),
                   wall_s=(t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_start and t.datetime_complete else None)

    @property
    def told(self) -> float | list[float]:
        """What the optimizer is told of this finished trial: a trial stopped by racing (one objective only) ranks
        below every trial that ran more stages (the successive-halving order), then by its estimate; its stored value
        stays the estimate.  The optimizers are rank-based, so the offset changes no ranking among full-fidelity
        trials."""
        if len(self.values) > 1 or self.full_fidelity:
            return self.values if len(self.values) > 1 else self.values[0]
        return self.values[0] - RACED_OUT + len(self.stages or [])


def ranked(records: list[TrialRecord]) -> list[TrialRecord]:
    """Complete full-fidelity trials, best weighted search fitness first (racing's early stops left out: their
    values are estimates on fewer examples)."""
    complete = [r for r in records if r.state == TrialState.COMPLETE and r.full_fidelity and not math.isnan(r.value)]
    return sorted(complete, key=lambda r: (-r.value, r.number))


def pareto_front(st: optuna.Study) -> list[TrialRecord]:
    """The non-dominated trials of a multi-objective study (per-task search scores); empty for one objective."""
    if len(st.directions) < 2:
        return []
    return [TrialRecord.of(t) for t in sorted(st.best_trials, key=lambda t: t.number)]
