"""The controller: ask -> decode -> evaluate -> tell -> persist, one generation at a time, resumable at any point.

Every candidate is an Optuna trial in the study DB (genome, recipe, per-task scores, timings, state).  The optimizer's
state and the genomes of the generation in flight live in the same DB, so running the same command again after a
crash re-evaluates only what did not finish: a stale RUNNING trial is taken over, never duplicated.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from .config import StudyConfig
from .executors import LocalExecutor, TrialResult
from .io import inspect_model
from .optimizers import CMAES, Optimizer
from .recipe import Recipe
from .spaces import ParameterSpace, Range

ATTR = "evomerge."
optuna.logging.set_verbosity(optuna.logging.WARNING)


class StudyMismatch(ValueError):
    """The study name already exists in the storage with another search space or models."""


class StorageError(ValueError):
    """The storage URL cannot be opened (wrong password, unknown host or role, missing driver); password masked."""


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

    # ---------------------------------------------------------------- storage
    def exists(self) -> bool:
        """Whether the study is in the storage; never creates a SQLite file just to find out."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import SQLAlchemyError

        url = make_url(self.storage_url)
        if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
            return False
        try:
            optuna.load_study(study_name=self.cfg.study, storage=self.storage_url)
            return True
        except KeyError:
            return False
        except (SQLAlchemyError, ImportError) as e:
            reason = str(getattr(e, "orig", None) or e).splitlines()[0]
            if url.password:
                reason = reason.replace(str(url.password), "***")
            raise StorageError(f"cannot open {url.render_as_string(hide_password=True)} ({reason})") from None

    @property
    def optuna(self) -> optuna.Study:
        if self._optuna is None:
            self._optuna = optuna.load_study(study_name=self.cfg.study, storage=self.storage_url)
        return self._optuna

    def _open_or_create(self) -> optuna.Study:
        st = optuna.create_study(study_name=self.cfg.study, storage=self.storage_url, direction="maximize",
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

    def _checkpoint(self, st: optuna.Study) -> tuple[Optimizer, int, bool]:
        """The optimizer, the generation it is at, and whether it has already asked for that generation's genomes.

        These three travel in one attribute (one SQL write), so a kill between any two writes can never pair an
        optimizer state with the wrong generation: a resumed study re-proposes exactly what an uninterrupted one would.
        """
        ckpt = st.user_attrs.get(ATTR + "optimizer")
        if ckpt:
            return Optimizer.from_state(ckpt["state"]), ckpt["generation"], ckpt["asked"]
        o = self.cfg.optimizer
        return CMAES(self.space.dimension, seed=self.cfg.seed, sigma0=o.sigma0, popsize=o.popsize), 0, False

    @staticmethod
    def _save_checkpoint(st: optuna.Study, opt: Optimizer, generation: int, asked: bool) -> Optimizer:
        """Store the checkpoint and go on from the stored copy, never the live object: a resumed controller only
        ever has the stored one, so any state a pickle does not carry faithfully shows up in every run alike, not
        only in resumed ones."""
        text = opt.state()
        st.set_user_attr(ATTR + "optimizer", {"generation": generation, "asked": asked, "state": text})
        return Optimizer.from_state(text)

    # ---------------------------------------------------------------- the loop
    def run(self, budget: int | None = None, on_trial: Callable[[Progress], None] | None = None) -> optuna.Study:
        """Evaluate candidates until `budget` trials have finished (COMPLETE or FAIL); safe to call again."""
        budget = budget or self.cfg.budget
        st = self._open_or_create()
        opt, generation, asked = self._checkpoint(st)
        while True:
            trials = st.get_trials(deepcopy=False)
            finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
            if len(finished) >= budget:
                return st
            if not asked:  # asking is deterministic (seeded per generation), so a kill before the save re-asks the same
                st.set_user_attr(ATTR + "pending", {"generation": generation, "genomes": opt.ask(generation)})
                opt, asked = self._save_checkpoint(st, opt, generation, asked=True), True
            pending = st.user_attrs[ATTR + "pending"]
            values = self._run_generation(st, pending, budget, on_trial)
            if values is None:
                return st
            worst = max((-v for v in values if v is not None), default=0.0)
            opt.tell(pending["genomes"], [-v if v is not None else worst + 1.0 for v in values])
            generation, asked = generation + 1, False
            opt = self._save_checkpoint(st, opt, generation, asked)
            st.set_user_attr(ATTR + "generation", generation)
            st.set_user_attr(ATTR + "pending", None)

    def _run_generation(self, st: optuna.Study, pending: dict, budget: int,
                        on_trial: Callable[[Progress], None] | None) -> list[float | None] | None:
        """Evaluate the generation's unfinished candidates; None when the budget ran out part-way."""
        g = pending["generation"]
        trials = st.get_trials(deepcopy=False)
        mine = {t.user_attrs[ATTR + "index"]: t for t in trials
                if t.user_attrs.get(ATTR + "generation") == g and ATTR + "index" in t.user_attrs}
        # a trial killed before its generation and index were both stored belongs to no candidate: take it over
        stale = [t for t in trials if t.state == TrialState.RUNNING
                 and not (ATTR + "generation" in t.user_attrs and ATTR + "index" in t.user_attrs)]
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
        values: list[float | None] = []
        for index, genome in enumerate(pending["genomes"]):
            t = mine.get(index)
            if t is not None and t.state == TrialState.COMPLETE:
                values.append(t.value)
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
                  genome: list[float]) -> float | None:
        seed = self.cfg.seed * 1_000_003 + generation * 1_009 + index
        recipe = self.space.decode(genome, seed=seed)
        for k, v in {"generation": generation, "index": index, "genome": genome,
                     "recipe": recipe.to_dict()}.items():
            trial.set_user_attr(ATTR + k, v)
        result = self.executor.evaluate(recipe)
        trial.set_user_attr(ATTR + "timings", result.timings)
        trial.set_user_attr(ATTR + "worker", self.executor.name)
        if result.score is None:
            trial.set_user_attr(ATTR + "error", result.error)
            st.tell(trial, state=TrialState.FAIL)
            return None
        trial.set_user_attr(ATTR + "scores", result.score.per_task)
        st.tell(trial, result.score.value)
        return result.score.value

    # ---------------------------------------------------------------- results
    def best_trial(self) -> optuna.trial.FrozenTrial | None:
        complete = [t for t in self.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        return max(complete, key=lambda t: (t.value, -t.number)) if complete else None

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
            rows.append(self._row("evolved best", self.best_recipe(), search=best.value, trial=best.number))
            st.set_user_attr(ATTR + "final", {"best_trial": best.number, "rows": rows})
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


def _best_value(st: optuna.Study) -> float | None:
    try:
        v = st.best_value
        return None if math.isnan(v) else v
    except ValueError:
        return None


def summarize(st: optuna.Study) -> dict:
    """Counts and best trial, for `status`; reads only the DB."""
    trials = st.get_trials(deepcopy=False)
    count = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)}
    best = None
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        b = max(complete, key=lambda t: (t.value, -t.number))
        best = {"trial": b.number, "value": b.value, "scores": b.user_attrs.get(ATTR + "scores"),
                "recipe": b.user_attrs.get(ATTR + "recipe")}
    final = st.user_attrs.get(ATTR + "final")
    return {"study": st.study_name, "trials": len(trials), **count, "best": best,
            "dimension": st.user_attrs.get(ATTR + "dimension"),
            "final_table": final["rows"] if final else None,
            "errors": [{"trial": t.number, "error": t.user_attrs.get(ATTR + "error")}
                       for t in trials if t.state == TrialState.FAIL]}
