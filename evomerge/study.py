"""The controller: ask -> decode -> evaluate -> tell -> persist, one generation at a time, resumable at any point.

Every candidate is an Optuna trial in the study DB (genome, recipe, per-task scores, timings, state).  The optimizer's
state and the genomes of the generation in flight live in the same DB, so running the same command again after a
crash re-evaluates only what did not finish: a stale RUNNING trial is taken over, never duplicated.
"""
from __future__ import annotations

import itertools
import math
import sqlite3
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import Engine

from .config import StudyConfig
from .executors import LocalExecutor, TrialResult
from .io import inspect_model
from .optimizers import MULTI_OBJECTIVE, Optimizer, make_optimizer
from .recipe import Recipe
from .spaces import ParameterSpace, Range

ATTR = "evomerge."
optuna.logging.set_verbosity(optuna.logging.WARNING)


class StudyMismatch(ValueError):
    """The study name already exists in the storage with another search space or models."""


def build_space(cfg: StudyConfig) -> ParameterSpace:
    """The study's search space; reads only model headers."""
    num_layers = inspect_model(cfg.models.base or cfg.models.parents[0]).num_layers
    ss = cfg.search_space
    return ParameterSpace(
        method=cfg.merge.method, parents=cfg.models.parents, base=cfg.models.base, num_layers=num_layers,
        ranges={"weight": Range(ss.weight.low, ss.weight.high), "density": Range(ss.density.low, ss.density.high)},
        fixed=dict(ss.fixed), searched_groups=ss.groups, layer_granularity=ss.layer_granularity,
        options=cfg.merge.options, dtype=cfg.merge.dtype,
    )


@dataclass
class Progress:
    done: int
    budget: int
    best: float | None


def _signature(cfg: StudyConfig, space: ParameterSpace) -> dict:
    return {"kind": space.kind, "method": cfg.merge.method, "names": space.names,
            "parents": cfg.models.parents, "base": cfg.models.base}


class Study:
    """One named study in one storage; `run` drives it to its budget and `final_table` scores the winners."""

    def __init__(self, cfg: StudyConfig, storage: str | None = None, executor: LocalExecutor | None = None):
        self.cfg = cfg
        self.storage_url = storage or cfg.storage_url()
        self.space = build_space(cfg)
        self.executor = executor or LocalExecutor(cfg)
        self._optuna: optuna.Study | None = None
        self._storage: optuna.storages.BaseStorage | str | None = None

    # ---------------------------------------------------------------- storage
    def exists(self) -> bool:
        """Whether the study is in the storage; never creates a SQLite file just to find out."""
        from sqlalchemy.engine import make_url

        url = make_url(self.storage_url)
        if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
            return False
        try:
            optuna.load_study(study_name=self.cfg.study, storage=self.storage)
            return True
        except KeyError:
            return False

    @property
    def storage(self) -> optuna.storages.BaseStorage | str:
        """The study DB; SQLite in WAL mode with normal sync: a trial writes a dozen attrs, and a full fsync per
        write cost ~25 ms each (over a third of a tiny candidate's time).  A killed process still loses nothing
        committed; only a power cut may lose the last trials, which the resume logic re-evaluates."""
        if self._storage is None:
            self._storage = optuna.storages.RDBStorage(self.storage_url)
        return self._storage

    @property
    def optuna(self) -> optuna.Study:
        if self._optuna is None:
            self._optuna = optuna.load_study(study_name=self.cfg.study, storage=self.storage)
        return self._optuna

    @property
    def multi_objective(self) -> bool:
        """One objective per fitness task (NSGA-II) instead of their weighted mean."""
        return self.cfg.optimizer.name in MULTI_OBJECTIVE

    def _open_or_create(self) -> optuna.Study:
        n = len(self.cfg.fitness.tasks) if self.multi_objective else 1
        st = optuna.create_study(study_name=self.cfg.study, storage=self.storage, directions=["maximize"] * n,
                                 load_if_exists=True)
        if ATTR + "signature" not in st.user_attrs:
            st.set_user_attr(ATTR + "signature", _signature(self.cfg, self.space))
            st.set_user_attr(ATTR + "dimension", self.space.dimension)
        self._optuna = st
        self.check_compatible()
        return st

    def check_compatible(self) -> None:
        """Refuse, before any write, to resume an existing study whose setup differs from this file's."""
        if self.exists():
            stored = self.optuna.user_attrs.get(ATTR + "signature")
            sig = _signature(self.cfg, self.space)
            if stored is not None and stored != sig:
                changed = next(k for k in sig if stored.get(k) != sig[k])
                raise StudyMismatch(
                    f"study {self.cfg.study!r} already exists in this storage with a different {changed}; "
                    "use a new study name (or another storage) for a changed setup"
                )

    def _optimizer(self, st: optuna.Study) -> Optimizer:
        text = st.user_attrs.get(ATTR + "optimizer")
        if text:
            return Optimizer.from_state(text)
        o = self.cfg.optimizer
        return make_optimizer(o.name, self.space.dimension, seed=self.cfg.seed, sigma0=o.sigma0, popsize=o.popsize,
                              objectives=len(self.cfg.fitness.tasks))

    # ---------------------------------------------------------------- the loop
    def run(self, budget: int | None = None, on_trial: Callable[[Progress], None] | None = None) -> optuna.Study:
        """Evaluate candidates until `budget` trials have finished (COMPLETE or FAIL); safe to call again."""
        budget = budget or self.cfg.budget
        st = self._open_or_create()
        opt = self._optimizer(st)
        while True:
            trials = st.get_trials(deepcopy=False)
            finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
            if len(finished) >= budget:
                return st
            pending = st.user_attrs.get(ATTR + "pending")
            if pending is None:
                generation = st.user_attrs.get(ATTR + "generation", 0)
                pending = {"generation": generation, "genomes": opt.ask(generation)}
                st.set_user_attr(ATTR + "optimizer", opt.state())
                st.set_user_attr(ATTR + "pending", pending)
            values = self._run_generation(st, pending, budget, on_trial)
            if values is None:
                return st
            opt.tell(pending["genomes"], _losses(values, len(st.directions)))
            st.set_user_attr(ATTR + "optimizer", opt.state())
            st.set_user_attr(ATTR + "generation", pending["generation"] + 1)
            st.set_user_attr(ATTR + "pending", None)

    def _run_generation(self, st: optuna.Study, pending: dict, budget: int,
                        on_trial: Callable[[Progress], None] | None) -> list[float | None] | None:
        """Evaluate the generation's unfinished candidates; None when the budget ran out part-way."""
        g = pending["generation"]
        trials = st.get_trials(deepcopy=False)
        mine = {t.user_attrs.get(ATTR + "index"): t for t in trials if t.user_attrs.get(ATTR + "generation") == g}
        stale = [t for t in trials if t.state == TrialState.RUNNING and ATTR + "index" not in t.user_attrs]
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
        values: list[float | None] = []
        for index, genome in enumerate(pending["genomes"]):
            t = mine.get(index)
            if t is not None and t.state == TrialState.COMPLETE:
                values.append(told_value(t))
                continue
            if t is not None and t.state == TrialState.FAIL:
                values.append(None)
                continue
            if finished >= budget:
                return None
            trial = optuna.trial.Trial(st, t._trial_id) if t is not None else (
                optuna.trial.Trial(st, stale.pop()._trial_id) if stale else st.ask()
            )
            values.append(self._evaluate(st, trial, g, index, genome))
            finished += 1
            if on_trial:
                on_trial(Progress(finished, budget, _best_value(st)))
        return values

    def _evaluate(self, st: optuna.Study, trial: optuna.trial.Trial, generation: int, index: int,
                  genome: list[float]) -> float | list[float] | None:
        seed = self.cfg.seed * 1_000_003 + generation * 1_009 + index
        recipe = self.space.decode(genome, seed=seed)
        for k, v in {"generation": generation, "index": index, "genome": genome,
                     "recipe": recipe.to_dict()}.items():
            trial.set_user_attr(ATTR + k, v)
        result = self.executor.evaluate(recipe, "search", self.incumbent_stages(st))
        trial.set_user_attr(ATTR + "timings", result.timings)
        trial.set_user_attr(ATTR + "worker", self.executor.name)
        if result.score is None:
            trial.set_user_attr(ATTR + "error", result.error)
            st.tell(trial, state=TrialState.FAIL)
            return None
        score = result.score
        for k, v in {"scores": score.per_task, "value": score.value, "examples": score.examples,
                     "full_fidelity": score.full, "stages": score.stages}.items():
            trial.set_user_attr(ATTR + k, v)
        values = [score.per_task[t.task] for t in self.cfg.fitness.tasks] if self.multi_objective else score.value
        st.tell(trial, values)
        return _for_optimizer(values, score.full, len(score.stages))

    def incumbent_stages(self, st: optuna.Study) -> list[dict] | None:
        """The racing record of the best full-fidelity trial so far (None without racing or before the first)."""
        if self.cfg.fitness.racing is None:
            return None
        best = self.best_trial(st)
        return best.user_attrs.get(ATTR + "stages") if best else None

    # ---------------------------------------------------------------- results
    def best_trial(self, st: optuna.Study | None = None) -> optuna.trial.FrozenTrial | None:
        """The best trial scored on the whole search subset, by weighted fitness (also with several objectives)."""
        ranked = ranked_trials(st or self.optuna)
        return ranked[0] if ranked else None

    def best_recipe(self) -> Recipe | None:
        t = self.best_trial()
        return Recipe.from_dict(t.user_attrs[ATTR + "recipe"]) if t else None

    def final_table(self) -> list[dict]:
        """Test-split scores of base, each parent, the best uniform merge and the evolved best; computed once.

        The uniform baseline is the study's method with one weight and density everywhere, the best of a small
        grid chosen on the search split, exactly like the evolved best.
        """
        st = self.optuna
        cached = st.user_attrs.get(ATTR + "final")
        best = self.best_trial()
        if cached and best and cached.get("best_trial") == best.number:
            return cached["rows"]
        rows = []
        n = len(self.cfg.models.parents)
        if self.cfg.models.base:
            base = Recipe("task_arithmetic", self.cfg.models.parents, self._uniform_groups([0.0] * n), self.cfg.models.base)
            rows.append(self._row("base", base))
        for i, p in enumerate(self.cfg.models.parents):
            one_hot = [1.0 if j == i else 0.0 for j in range(n)]
            rows.append(self._row(f"parent {p.rstrip('/').split('/')[-1]}",
                                  Recipe("linear", self.cfg.models.parents, self._uniform_groups(one_hot),
                                         self.cfg.models.base)))
        uniform = self._best_uniform()
        if uniform is not None:
            rows.append(self._row("best uniform " + self.cfg.merge.method, uniform[0], search=uniform[1]))
        if best is not None:
            top = self.final_eval()[0]
            rows.append({"model": "evolved best", **{k: top[k] for k in ("test", "per_task", "search", "trial")},
                         "recipe": best.user_attrs[ATTR + "recipe"]})
            st.set_user_attr(ATTR + "final", {"best_trial": best.number, "rows": rows})
        return rows

    def final_eval(self) -> list[dict]:
        """The top-k trials (by search fitness, full fidelity only) re-scored on the test split.

        Stored in the study attr `evomerge.final_eval`, apart from the trials' search scores; a trial already
        scored is not scored again, so calling this after more trials only evaluates newcomers to the top-k.
        """
        st = self.optuna
        top = ranked_trials(st)[: self.cfg.fitness.final_top_k]
        done = {r["trial"]: r for r in (st.user_attrs.get(ATTR + "final_eval") or {}).get("rows", [])}
        rows = []
        for rank, t in enumerate(top, 1):
            row = done.get(t.number)
            if row is None:
                result = self.executor.evaluate(Recipe.from_dict(t.user_attrs[ATTR + "recipe"]), "test")
                row = {"trial": t.number, "search": trial_value(t),
                       "test": None if result.score is None else result.score.value,
                       "per_task": None if result.score is None else result.score.per_task,
                       "splits": {x.task: x.test_split for x in self.cfg.fitness.tasks}, "error": result.error}
            rows.append({**row, "rank": rank})
        st.set_user_attr(ATTR + "final_eval", {"top_k": self.cfg.fitness.final_top_k, "rows": rows})
        return rows

    def _uniform_groups(self, weights: list[float]) -> dict:
        return {g: {"weight": list(weights)} for g in self.executor.worker.materializer.groups}

    def _best_uniform(self) -> tuple[Recipe, float] | None:
        has_density = "density" in self.space.method.tensor_params
        grid = itertools.product(self.cfg.baselines.weight, self.cfg.baselines.density if has_density else [None])
        best: tuple[Recipe, float] | None = None
        for w, d in grid:
            recipe = self.space.uniform(w, d, seed=self.cfg.seed)
            result = self.executor.evaluate(recipe, "search")
            if result.score is not None and (best is None or result.score.value > best[1]):
                best = (recipe, result.score.value)
        return best

    def _row(self, name: str, recipe: Recipe, search: float | None = None, trial: int | None = None) -> dict:
        result: TrialResult = self.executor.evaluate(recipe, "test")
        return {"model": name, "test": None if result.score is None else result.score.value,
                "per_task": None if result.score is None else result.score.per_task,
                "search": search, "trial": trial, "recipe": recipe.to_dict()}


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(conn, _record) -> None:
    """Every SQLite study DB in WAL mode with normal sync, set before its tables are created (see Study.storage)."""
    if isinstance(conn, sqlite3.Connection):
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()


RACED_OUT = 100.0


def _for_optimizer(values: float | list[float], full: bool, stages: int) -> float | list[float]:
    """What the optimizer is told: a trial stopped by racing ranks below every trial that ran more stages (the
    successive-halving order), then by its estimate; its stored value stays the estimate.  The optimizers are
    rank-based, so the offset changes no ranking among full-fidelity trials."""
    return values if full else values - RACED_OUT + stages


def told_value(t: optuna.trial.FrozenTrial) -> float | list[float]:
    """`_for_optimizer` for a stored trial (a resumed generation)."""
    values = t.values if len(t.values) > 1 else t.value
    return _for_optimizer(values, t.user_attrs.get(ATTR + "full_fidelity", True), len(t.user_attrs.get(ATTR + "stages") or []))


def trial_value(t: optuna.trial.FrozenTrial) -> float:
    """A trial's weighted search fitness, whatever the number of objectives the study has."""
    return t.user_attrs.get(ATTR + "value", t.value if t.values and len(t.values) == 1 else math.nan)


def ranked_trials(st: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete full-fidelity trials, best weighted search fitness first (racing's early stops left out: their
    values are estimates on fewer examples)."""
    complete = [t for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get(ATTR + "full_fidelity", True) and not math.isnan(trial_value(t))]
    return sorted(complete, key=lambda t: (-trial_value(t), t.number))


def _best_value(st: optuna.Study) -> float | None:
    ranked = ranked_trials(st)
    return trial_value(ranked[0]) if ranked else None


def _losses(values: list, objectives: int = 1) -> list:
    """Optimizer losses (lower is better) from told values (higher is better); a failed candidate gets one worse
    than the worst of its generation.  With several objectives each loss is a list, one entry per task."""
    told = [v for v in values if v is not None]
    if objectives > 1:
        worst = [max((-v[i] for v in told), default=0.0) for i in range(objectives)]
        return [[-x for x in v] if v is not None else [w + 1.0 for w in worst] for v in values]
    worst = max((-v for v in told), default=0.0)
    return [-v if v is not None else worst + 1.0 for v in values]


def pareto_front(st: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The non-dominated trials of a multi-objective study (per-task search scores); empty for one objective."""
    if len(st.directions) < 2:
        return []
    return sorted(st.best_trials, key=lambda t: t.number)


def summarize(st: optuna.Study) -> dict:
    """Counts and best trial, for `status`; reads only the DB."""
    trials = st.get_trials(deepcopy=False)
    count = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)}
    best = None
    ranked = ranked_trials(st)
    if ranked:
        b = ranked[0]
        best = {"trial": b.number, "value": trial_value(b), "scores": b.user_attrs.get(ATTR + "scores"),
                "recipe": b.user_attrs.get(ATTR + "recipe")}
    final = st.user_attrs.get(ATTR + "final")
    final_eval = st.user_attrs.get(ATTR + "final_eval")
    examples = [t.user_attrs.get(ATTR + "examples") for t in trials if t.state == TrialState.COMPLETE]
    return {"study": st.study_name, "trials": len(trials), **count, "best": best,
            "examples": sum(e for e in examples if e), "raced_out": sum(
                not t.user_attrs.get(ATTR + "full_fidelity", True) for t in trials if t.state == TrialState.COMPLETE),
            "final_eval": final_eval["rows"] if final_eval else None,
            "pareto_front": [{"trial": t.number, "scores": t.user_attrs.get(ATTR + "scores"), "value": trial_value(t)}
                             for t in pareto_front(st)],
            "dimension": st.user_attrs.get(ATTR + "dimension"),
            "final_table": final["rows"] if final else None,
            "errors": [{"trial": t.number, "error": t.user_attrs.get(ATTR + "error")}
                       for t in trials if t.state == TrialState.FAIL]}
