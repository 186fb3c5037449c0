"""The controller: ask -> decode -> evaluate -> tell -> persist, one generation at a time, resumable at any point.

Every candidate is an Optuna trial in the study DB (genome, recipe, per-task scores, timings, state), read and
written through the `StudyStore`.  The optimizer's state and the genomes of the generation in flight live in the same
DB, so running the same command again after a crash re-evaluates only what did not finish: a stale RUNNING trial is
taken over, never duplicated.
"""
from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from . import final
from .config import ConfigError, StudyConfig
from .executors import Executor, TrialResult, make_executor
from .optimizers import MULTI_OBJECTIVE, Optimizer, create_optimizer
from .recipe import Recipe
from .spaces import build_space, setup_signature
from .storage_url import check_storage_url
from .store import StorageError, StudyBusy, StudyMismatch, StudyStore, TrialRecord, ranked

__all__ = ["MAX_CMA_DIMENSION", "Progress", "StorageError", "Study", "StudyBusy", "StudyMismatch",
           "build_space", "losses"]
POLL_S = 0.5  # how often an idle runner looks for claimable work
MAX_CMA_DIMENSION = 5000  # a published 7B layer-wise space is a few hundred


@dataclass
class Progress:
    done: int
    budget: int
    best: float | None


class Study:
    """One named study in one storage; `run` drives it to its budget and `final_table` scores the winners.

    Several runners (processes, machines) may drive one study in a shared database (PostgreSQL): each generation's
    candidates are WAITING trials that a runner claims atomically (WAITING -> RUNNING), one runner at a time
    advances the optimizer under a database lock, and a runner that dies is noticed by its silent heartbeat: its
    RUNNING trials go back to WAITING and are evaluated by someone else, once.  SQLite is for one runner at a time:
    its RUNNING trials at start-up belong to a dead run and are taken over at once, which `exclusive` makes safe: an
    OS lock on a sidecar file (``<db>.lock``) that a second runner finds taken, and that dies with its holder.
    """

    def __init__(self, cfg: StudyConfig, storage: str | None = None, executor: Executor | None = None):
        self.cfg = cfg
        self.storage_url = check_storage_url(storage) if storage else cfg.storage_url()
        self.store = StudyStore(self.storage_url, cfg.study, cfg.executor.heartbeat_s, cfg.executor.stale_after_s)
        self.store.check_setup(setup_signature(cfg))  # fail fast: the DB before any model file is read
        self.space = build_space(cfg, self.storage_url)
        self.executor = executor or make_executor(cfg)
        self.runner = f"{socket.gethostname()}:{os.getpid()}"
        self._new_optimizer()  # an optimizer that cannot work on this space is a config error, raised before any write

    # ---------------------------------------------------------------- storage
    @property
    def storage(self) -> optuna.storages.RDBStorage:
        return self.store.storage

    @property
    def optuna(self) -> optuna.Study:
        return self.store.optuna

    @property
    def shared(self) -> bool:
        return self.store.shared

    def exclusive(self) -> AbstractContextManager[None]:
        """Hold the SQLite study DB for this runner (see `StudyStore.exclusive`)."""
        return self.store.exclusive()

    def exists(self) -> bool:
        return self.store.exists()

    def finished(self) -> int:
        """Trials finished (COMPLETE or FAIL) so far; 0 for a study not yet in the storage."""
        return self.store.finished() if self.exists() else 0

    @property
    def multi_objective(self) -> bool:
        """One objective per fitness task (NSGA-II) instead of their weighted mean."""
        return self.cfg.optimizer.name in MULTI_OBJECTIVE

    def signature(self) -> dict:
        sig = {**self.space.signature(), "optimizer": self.cfg.optimizer.name}
        if self.cfg.merge.tokenizer_source:
            sig["tokenizer_source"] = self.cfg.merge.tokenizer_source
        return sig

    def check_compatible(self) -> None:
        """Refuse, before any write, to resume an existing study whose setup differs from this file's: the store's
        check of the setup, now with the whole signature (the space's coordinate names included)."""
        self.store.check_setup(self.signature())

    def _checkpoint(self) -> tuple[Optimizer, int, bool]:
        """The optimizer, the generation it is at, and whether it has already asked for that generation's genomes.

        These three travel in one attribute (one SQL write), so a kill between any two writes can never pair an
        optimizer state with the wrong generation: a resumed study re-proposes exactly what an uninterrupted one
        would.
        """
        ckpt = self.store.get("optimizer")
        if ckpt:
            return Optimizer.from_state(ckpt["state"]), ckpt["generation"], ckpt["asked"]
        return self._new_optimizer(), 0, False

    def _save_checkpoint(self, opt: Optimizer, generation: int, asked: bool) -> Optimizer:
        """Store the checkpoint and go on from the stored copy, never the live object: a resumed controller only
        ever has the stored one, so any state a pickle does not carry faithfully shows up in every run alike, not
        only in resumed ones."""
        text = opt.state()
        self.store.put("optimizer", {"generation": generation, "asked": asked, "state": text})
        return Optimizer.from_state(text)

    def _new_optimizer(self) -> Optimizer:
        o = self.cfg.optimizer
        d = self.space.dimension
        if o.name in ("cmaes", "catcma") and d > MAX_CMA_DIMENSION:
            raise ConfigError(self.cfg.path, "search_space", (
                f"dimension {d}: CMA-ES keeps {d}x{d} matrices ({3 * 8 * d * d / 1e9:.1f} GB) and decomposes them "
                f"as it goes; keep the dimension under {MAX_CMA_DIMENSION} (a coarser layer_granularity, fewer "
                "repeats or groups) or use optimizer tpe or random"))
        try:
            return create_optimizer(o.name, dimension=self.space.dimension, categories=self.space.categories(),
                                    seed=self.cfg.seed, sigma0=o.sigma0, popsize=o.popsize, x0=self.space.x0(),
                                    objectives=len(self.cfg.fitness.tasks))
        except ValueError as e:
            raise ConfigError(self.cfg.path, "optimizer.name", str(e)) from None

    # ---------------------------------------------------------------- the loop
    def run(self, budget: int | None = None, on_trial: Callable[[Progress], None] | None = None) -> optuna.Study:
        """Evaluate candidates until `budget` trials have finished (COMPLETE or FAIL); safe to call again, and
        safe to call from several processes at once on a shared storage."""
        with self.exclusive():
            return self._run(budget or self.cfg.budget, on_trial)

    def _open_or_create(self) -> optuna.Study:
        """The study in its storage, created with this file's signature and dimension on first use; a stored study
        whose setup differs is refused before anything is written."""
        self.check_compatible()
        n = len(self.cfg.fitness.tasks) if self.multi_objective else 1
        return self.store.create(n, self.signature(), self.space.dimension)

    def _run(self, budget: int, on_trial: Callable[[Progress], None] | None) -> optuna.Study:
        st = self._open_or_create()
        if not self.shared:
            self.store.requeue_abandoned()
        held: dict[int, int] = {}  # trial id -> trial number, of the trials this runner evaluates now
        next_check = 0.0
        with self.store.heartbeat(held):
            while True:
                trials = self.store.records()
                waiting = [t for t in trials if t.state == TrialState.WAITING]
                if not waiting or time.monotonic() >= next_check:
                    with self.store.advancing():
                        self._advance(budget)
                    next_check = time.monotonic() + self.cfg.executor.heartbeat_s
                    trials = self.store.records()
                    waiting = [t for t in trials if t.state == TrialState.WAITING]
                finished = sum(t.state.is_finished() for t in trials)
                if finished >= budget and not held:
                    return st
                running = sum(t.state == TrialState.RUNNING for t in trials)
                incumbent = self.incumbent_scores(trials) if waiting else None  # unchanged until a result is recorded
                for t in waiting:
                    if self.executor.free_slots() <= 0 or finished + running >= budget:
                        break
                    if self._claim(t, held, incumbent):
                        running += 1
                if not held:
                    time.sleep(POLL_S)
                    continue
                for trial_id, result in self.executor.results(timeout=self.cfg.executor.heartbeat_s):
                    self._record(trial_id, held.pop(trial_id), result)
                    if on_trial:
                        best = self.store.best()
                        on_trial(Progress(self.store.finished(), budget, best.value if best else None))

    def _advance(self, budget: int) -> None:
        """Under the lock: re-queue trials of dead runners, tell a finished generation, ask and enqueue the next."""
        if self.shared:
            self.store.requeue_abandoned()
        trials = self.store.records()
        opt, generation, asked = self._checkpoint()
        pending = self.store.get("pending")
        if asked:  # the stored pending genomes are this generation's: written before the checkpoint said so
            mine = {t.index: t for t in trials if t.generation == generation}
            if len(mine) == len(pending["genomes"]) and all(t.state.is_finished() for t in mine.values()):
                values = [mine[i].told if mine[i].state == TrialState.COMPLETE else None for i in range(len(mine))]
                opt.tell(pending["genomes"], losses(values, len(self.optuna.directions)))
                generation, asked = generation + 1, False
                opt = self._save_checkpoint(opt, generation, asked)
        if len(trials) >= budget:
            return
        if not asked:  # asking is seeded per generation, so a kill before the checkpoint re-asks the same genomes
            pending = {"generation": generation, "genomes": opt.ask(generation)}
            self.store.put("pending", pending)
            self._save_checkpoint(opt, generation, asked=True)
        g = pending["generation"]
        have = {t.index for t in trials if t.generation == g}
        room = budget - len(trials)
        for index, genome in enumerate(pending["genomes"]):
            if index not in have and room > 0:
                self.store.enqueue(g, index, genome)
                room -= 1

    def _claim(self, t: TrialRecord, held: dict, incumbent: dict[str, list[float]] | None) -> bool:
        """Take one WAITING trial (of several runners, exactly one wins) and hand it to the executor."""
        if not self.store.claim(t.trial_id):
            return False
        recipe = self.space.decode(t.genome, seed=self.cfg.seed * 1_000_003 + t.generation * 1_009 + t.index)
        self.store.started(t.trial_id, recipe.to_dict(), self.runner)
        held[t.trial_id] = t.number
        self.executor.submit(t.trial_id, recipe, "search", incumbent=incumbent)
        return True

    def _record(self, trial_id: int, number: int, result: TrialResult) -> None:
        """Store a result; a NaN fitness (Optuna would refuse it) fails the trial."""
        score, error = result.score, result.error
        values = None if score is None else [float(v) for v in (
            [score.per_task[t.task] for t in self.cfg.fitness.tasks] if self.multi_objective else [score.value])]
        if values is not None and any(math.isnan(v) for v in values):
            score, error = None, f"FloatingPointError: the fitness is NaN: {values}"
        self.store.record(trial_id, number, values, score=score, error=error, timings=result.timings,
                          worker=result.worker, attempts=result.attempts)

    def incumbent_scores(self, trials: list[TrialRecord]) -> dict[str, list[float]] | None:
        """The per-example search scores of the best full-fidelity trial among `trials`, which racing pairs
        candidates against (None without racing or before the first)."""
        if self.cfg.fitness.racing is None:
            return None
        best = next(iter(ranked(trials)), None)
        return best.example_scores if best else None

    # ---------------------------------------------------------------- results
    def best_recipe(self) -> Recipe | None:
        best = self.store.best()
        return Recipe.from_dict(best.recipe) if best else None

    def final_table(self) -> list[dict]:
        """Test-split scores of the reference models, the best uniform merge and the evolved best (`final`)."""
        return final.final_table(self.cfg, self.space, self.store, self.executor)

    def final_eval(self) -> list[dict]:
        """The top-k trials re-scored on the test split (`final`)."""
        return final.final_eval(self.cfg, self.store, self.executor)


def losses(values: list, objectives: int = 1) -> list:
    """Optimizer losses (lower is better) from told values (higher is better); a failed candidate gets one worse
    than the worst of its generation.  With several objectives each loss is a list, one entry per task."""
    told = [v for v in values if v is not None]
    if objectives > 1:
        worst = [max((-v[i] for v in told), default=0.0) for i in range(objectives)]
        return [[-x for x in v] if v is not None else [w + 1.0 for w in worst] for v in values]
    worst = max((-v for v in told), default=0.0)
    return [-v if v is not None else worst + 1.0 for v in values]
