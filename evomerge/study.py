"""The controller: ask -> decode -> evaluate -> tell -> persist, one generation at a time, resumable at any point.

Every candidate is an Optuna trial in the study DB (genome, recipe, per-task scores, timings, state).  The optimizer's
state and the genomes of the generation in flight live in the same DB, so running the same command again after a
crash re-evaluates only what did not finish: a stale RUNNING trial is taken over, never duplicated.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import os
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

from .config import ConfigError, StudyConfig
from .errors import EvomergeError
from .executors import Executor, TrialResult, make_executor
from .io import inspect_model
from .optimizers import MULTI_OBJECTIVE, Optimizer, create_optimizer
from .recipe import Recipe
from .spaces import DataflowSpace, ParameterSpace, SearchSpace
from .storage_url import check_storage_url, safe_url

ATTR = "evomerge."
LOCK_NAMESPACE = 0x65766F  # "evo": the advisory-lock class of evomerge's per-study generation lock
POLL_S = 0.5  # how often an idle runner looks for claimable work
MAX_CMA_DIMENSION = 5000  # a published 7B layer-wise space is a few hundred
optuna.logging.set_verbosity(optuna.logging.WARNING)


class StudyMismatch(EvomergeError, ValueError):
    """The study name already exists in the storage with another search space or models."""


def build_space(cfg: StudyConfig, storage: str | None = None) -> SearchSpace:
    """The study's search space; reads only model headers (and, for ps+dfs, model A's study in `storage`)."""
    if cfg.search_space.kind != "ps":
        return _dataflow_space(cfg, storage or cfg.storage_url())
    num_layers = inspect_model(cfg.models.base or cfg.models.parents[0]).num_layers
    ss = cfg.search_space
    return ParameterSpace(
        method=cfg.merge.method, parents=cfg.models.parents, base=cfg.models.base, num_layers=num_layers,
        ranges={"weight": ss.weight, "density": ss.density, "t": ss.t},
        fixed=dict(ss.fixed), searched_groups=ss.groups, layer_granularity=ss.layer_granularity,
        filters=ss.filters, x0=dict(ss.x0), options=cfg.merge.options, dtype=cfg.candidate_dtype(),
        tokenizer_source=cfg.merge.tokenizer_source,
    )


def _dataflow_space(cfg: StudyConfig, storage: str) -> DataflowSpace:
    from .dataflow import PathError, check_path_compatible

    ss = cfg.search_space
    a = _best_recipe_of(cfg, storage) if ss.kind == "ps+dfs" else None
    sources = ([a["base"] or a["parents"][0]] if a else []) + cfg.models.parents
    infos = [inspect_model(p) for p in sources]
    try:
        check_path_compatible([i.config for i in infos], sources)
    except PathError as e:
        raise ConfigError(cfg.path, "models.parents", str(e)) from None
    try:
        return DataflowSpace(parents=cfg.models.parents, num_layers=[i.num_layers for i in infos],
                             scale=ss.scale, repeats=ss.repeats, layout=ss.layout, a=a,
                             dtype=cfg.candidate_dtype())
    except ValueError as e:
        raise ConfigError(cfg.path, "search_space.layout", str(e)) from None


def _best_recipe_of(cfg: StudyConfig, storage: str) -> dict:
    """Model A of a ps+dfs study: the best recipe of the named parameter-space study in the same storage."""
    name = cfg.models.a_from_study
    try:
        if _missing_sqlite_file(storage):
            raise KeyError(name)  # never create a SQLite file just to look
        other = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ConfigError(cfg.path, "models.a_from_study",
                          f"study {name!r} is not in this study's storage; run its study file first "
                          "(with the same storage)") from None
    ranked = ranked_trials(other)
    if not ranked:
        raise ConfigError(cfg.path, "models.a_from_study", f"study {name!r} has no completed trial yet")
    recipe = ranked[0].user_attrs[ATTR + "recipe"]
    if recipe.get("path"):
        raise ConfigError(cfg.path, "models.a_from_study", f"study {name!r} is not a parameter-space (ps) study")
    return recipe


@dataclass
class Progress:
    done: int
    budget: int
    best: float | None


def _signature(cfg: StudyConfig, space: SearchSpace) -> dict:
    sig = {"kind": space.kind, "method": cfg.merge.method, "names": space.names,
           "parents": cfg.models.parents, "base": cfg.models.base, "optimizer": cfg.optimizer.name}
    if cfg.merge.tokenizer_source:
        sig["tokenizer_source"] = cfg.merge.tokenizer_source
    if space.kind != "ps":  # a changed model A (its study found a better recipe) is a different study
        sig.update(method="passthrough", a=getattr(space, "a", None))
    return sig


class StorageError(EvomergeError, ValueError):
    """The study DB cannot be reached or opened."""


class StudyBusy(EvomergeError, ValueError):
    """Another runner holds this SQLite study DB."""


def _storage_error(url: str, e: Exception) -> StorageError:
    """What failed and what to check, with the URL's password masked (also where the driver's message echoes it)."""
    reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
    password = make_url(url).password
    if password:
        reason = reason.replace(str(password), "***")
    return StorageError(f"cannot open the study DB {safe_url(url)} ({reason}); check that the server runs and is "
                        "reachable, and that the user, password and database exist")


def _missing_sqlite_file(url: str) -> bool:
    """A SQLite URL whose file does not exist: looking a study up there would create the file."""
    u = make_url(url)
    return u.get_backend_name() == "sqlite" and bool(u.database) and not Path(u.database).exists()


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
        self._optuna: optuna.Study | None = None
        self._storage: RDBStorage | None = None
        self._check_stored_setup()  # fail fast: the DB before any model file is read
        self.space = build_space(cfg, self.storage_url)
        self.executor = executor or make_executor(cfg)
        self.runner = f"{socket.gethostname()}:{os.getpid()}"
        self._upsert = None  # built on first use, for this storage's dialect
        self._lock: int | None = None  # the sidecar's file descriptor while this object runs a SQLite study
        self._new_optimizer()  # an optimizer that cannot work on this space is a config error, raised before any write

    # ---------------------------------------------------------------- storage
    @property
    def shared(self) -> bool:
        """Whether several runners may work on this storage at once (anything but SQLite)."""
        return make_url(self.storage_url).get_backend_name() != "sqlite"

    @property
    def storage(self) -> RDBStorage:
        """Optuna's RDB storage, connected once; an unreachable server fails here, in seconds, with what to check."""
        if self._storage is None:
            ec = self.cfg.executor
            postgres = make_url(self.storage_url).get_backend_name() == "postgresql"
            kwargs = {"connect_args": {"connect_timeout": 5}} if postgres else {}
            try:
                for attempt in range(3):  # runners starting together on a fresh DB race to create the tables
                    try:
                        with warnings.catch_warnings():  # Optuna calls heartbeats experimental; we drive them
                            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                            self._storage = RDBStorage(self.storage_url, engine_kwargs=kwargs,
                                                       heartbeat_interval=max(1, round(ec.heartbeat_s)),
                                                       grace_period=max(1, round(ec.stale_after_s)))
                        break
                    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                        if attempt == 2:
                            raise
                        time.sleep(0.5 + attempt)
            except sqlalchemy.exc.SQLAlchemyError as e:
                raise _storage_error(self.storage_url, e) from None
        return self._storage

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the SQLite study DB for this runner, or raise `StudyBusy` at once naming the holder; re-entrant.

        `fcntl.flock` on ``<db>.lock``: the kernel releases it when the holder exits however it exits (SIGKILL
        included), so no stale lock is ever left to clean up.  The file itself stays, naming the last holder.  Shared
        storages (PostgreSQL) need no lock: their runners cooperate through the DB."""
        db = make_url(self.storage_url).database
        if self.shared or self._lock is not None or not db or db == ":memory:":
            yield
            return
        lock = f"{db}.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot create the runner lock {lock} ({e.strerror}); the study DB's folder must "
                               "exist and be writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StudyBusy(f"the study DB {db} is in use by {holder}: SQLite takes one runner per study. Wait for it "
                            "(or stop it: re-running resumes), or keep the study in PostgreSQL "
                            "(storage: postgresql://...) to run several runners on it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self._lock = fd
        try:
            yield
        finally:
            self._lock = None
            os.close(fd)

    def finished(self) -> int:
        """Trials finished (COMPLETE or FAIL) so far; 0 for a study not yet in the storage."""
        if not self.exists():
            return 0
        return sum(t.state.is_finished() for t in self.optuna.get_trials(deepcopy=False))

    def exists(self) -> bool:
        """Whether the study is in the storage; never creates a SQLite file just to find out."""
        if _missing_sqlite_file(self.storage_url):
            return False
        try:
            self._optuna = optuna.load_study(study_name=self.cfg.study, storage=self.storage)
            return True
        except KeyError:
            return False
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:
            raise _storage_error(self.storage_url, e) from None

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
        self.check_compatible()
        n = len(self.cfg.fitness.tasks) if self.multi_objective else 1
        st = optuna.create_study(study_name=self.cfg.study, storage=self.storage, directions=["maximize"] * n,
                                 load_if_exists=True)
        if ATTR + "signature" not in st.user_attrs:
            st.set_user_attr(ATTR + "signature", _signature(self.cfg, self.space))
            st.set_user_attr(ATTR + "dimension", self.space.dimension)
        self._optuna = st
        return st

    def _check_stored_setup(self) -> None:
        """The study DB is reachable and, if the study exists, its models, method and optimizer are this file's.

        Runs before the models' files are opened, so a run that would fail on its DB fails in seconds, not after
        loading the parents; `check_compatible` compares the rest of the signature once the space is known."""
        u = make_url(self.storage_url)
        if _missing_sqlite_file(self.storage_url):
            folder = Path(u.database).parent
            if not folder.is_dir():
                raise _storage_error(self.storage_url, OSError(f"folder {folder} does not exist"))
            return
        if self.exists():
            stored = self.optuna.user_attrs.get(ATTR + "signature") or {}
            kind = self.cfg.search_space.kind
            sig = {"kind": kind, "method": self.cfg.merge.method if kind == "ps" else "passthrough",
                   "parents": self.cfg.models.parents, "base": self.cfg.models.base,
                   "optimizer": self.cfg.optimizer.name}
            changed = next((k for k in sig if k in stored and stored[k] != sig[k]), None)
            if changed:
                raise StudyMismatch(
                    f"study {self.cfg.study!r} already exists in this storage with a different {changed}; "
                    "use a new study name (or another storage) for a changed setup")

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
        optimizer state with the wrong generation: a resumed study re-proposes exactly what an uninterrupted one
        would.
        """
        ckpt = st.user_attrs.get(ATTR + "optimizer")
        if ckpt:
            return Optimizer.from_state(ckpt["state"]), ckpt["generation"], ckpt["asked"]
        return self._new_optimizer(), 0, False

    @staticmethod
    def _save_checkpoint(st: optuna.Study, opt: Optimizer, generation: int, asked: bool) -> Optimizer:
        """Store the checkpoint and go on from the stored copy, never the live object: a resumed controller only
        ever has the stored one, so any state a pickle does not carry faithfully shows up in every run alike, not
        only in resumed ones."""
        text = opt.state()
        st.set_user_attr(ATTR + "optimizer", {"generation": generation, "asked": asked, "state": text})
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

    @contextlib.contextmanager
    def _advancing(self, st: optuna.Study) -> Iterator[None]:
        """One runner at a time may re-queue, tell, ask and enqueue: a PostgreSQL advisory lock, released by the
        server if its holder dies.  SQLite has one runner, so nothing to hold."""
        if make_url(self.storage_url).get_backend_name() != "postgresql":
            yield
            return
        key = {"ns": LOCK_NAMESPACE, "id": st._study_id}
        with self.storage.engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:ns, :id)"), key)
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:ns, :id)"), key)
                conn.commit()

    # ---------------------------------------------------------------- the loop
    def run(self, budget: int | None = None, on_trial: Callable[[Progress], None] | None = None) -> optuna.Study:
        """Evaluate candidates until `budget` trials have finished (COMPLETE or FAIL); safe to call again, and
        safe to call from several processes at once on a shared storage."""
        with self.exclusive():
            return self._run(budget or self.cfg.budget, on_trial)

    def _run(self, budget: int, on_trial: Callable[[Progress], None] | None) -> optuna.Study:
        st = self._open_or_create()
        if not self.shared:
            for t in st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                self.storage.set_trial_state_values(t._trial_id, TrialState.WAITING)
        held: dict[int, int] = {}  # trial id -> trial number, of the trials this runner evaluates now
        beat = (_Heartbeat(self.storage, held, self.cfg.executor.heartbeat_s) if self.shared
                else contextlib.nullcontext())
        next_check = 0.0
        with beat:
            while True:
                trials = st.get_trials(deepcopy=False)
                waiting = [t for t in trials if t.state == TrialState.WAITING]
                if not waiting or time.monotonic() >= next_check:
                    with self._advancing(st):
                        self._advance(st, budget)
                    next_check = time.monotonic() + self.cfg.executor.heartbeat_s
                    trials = st.get_trials(deepcopy=False)
                    waiting = [t for t in trials if t.state == TrialState.WAITING]
                finished = sum(t.state.is_finished() for t in trials)
                if finished >= budget and not held:
                    return st
                running = sum(t.state == TrialState.RUNNING for t in trials)
                incumbent = self.incumbent_scores(st) if waiting else None  # unchanged until a result is recorded
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
                        on_trial(Progress(sum(t.state.is_finished() for t in st.get_trials(deepcopy=False)),
                                          budget, _best_value(st)))

    def _advance(self, st: optuna.Study, budget: int) -> None:
        """Under the lock: re-queue trials of dead runners, tell a finished generation, ask and enqueue the next."""
        if self.shared:
            for trial_id in self.storage._get_stale_trial_ids(st._study_id):
                self.storage.set_trial_state_values(trial_id, TrialState.WAITING)
        trials = st.get_trials(deepcopy=False)
        opt, generation, asked = self._checkpoint(st)
        pending = st.user_attrs.get(ATTR + "pending")
        if asked:  # the stored pending genomes are this generation's: written before the checkpoint said so
            mine = {t.user_attrs[ATTR + "index"]: t for t in trials
                    if t.user_attrs.get(ATTR + "generation") == generation}
            if len(mine) == len(pending["genomes"]) and all(t.state.is_finished() for t in mine.values()):
                values = [told_value(mine[i]) if mine[i].state == TrialState.COMPLETE else None for i in range(len(mine))]
                opt.tell(pending["genomes"], _losses(values, len(st.directions)))
                generation, asked = generation + 1, False
                opt = self._save_checkpoint(st, opt, generation, asked)
        if len(trials) >= budget:
            return
        if not asked:  # asking is seeded per generation, so a kill before the checkpoint re-asks the same genomes
            pending = {"generation": generation, "genomes": opt.ask(generation)}
            st.set_user_attr(ATTR + "pending", pending)
            self._save_checkpoint(st, opt, generation, asked=True)
        g = pending["generation"]
        have = {t.user_attrs.get(ATTR + "index") for t in trials if t.user_attrs.get(ATTR + "generation") == g}
        room = budget - len(trials)
        for index, genome in enumerate(pending["genomes"]):
            if index not in have and room > 0:
                attrs = {ATTR + "generation": g, ATTR + "index": index, ATTR + "genome": genome}
                st.enqueue_trial({}, user_attrs=attrs)
                room -= 1

    def _claim(self, t: optuna.trial.FrozenTrial, held: dict, incumbent: dict[str, list[float]] | None) -> bool:
        """Take one WAITING trial (atomic: of several runners, exactly one wins) and hand it to the executor.

        The heartbeat is written before the claim, so no other runner ever sees the claimed trial as stale."""
        if self.shared:
            self.storage.record_heartbeat(t._trial_id)
        try:
            if not self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        g, index = t.user_attrs[ATTR + "generation"], t.user_attrs[ATTR + "index"]
        recipe = self.space.decode(t.user_attrs[ATTR + "genome"], seed=self.cfg.seed * 1_000_003 + g * 1_009 + index)
        self._set_attrs(t._trial_id, {"recipe": recipe.to_dict(), "runner": self.runner})
        held[t._trial_id] = t.number
        self.executor.submit(t._trial_id, recipe, "search", incumbent=incumbent)
        return True

    def _record(self, trial_id: int, number: int, result: TrialResult) -> None:
        """Store a result; one whose trial another runner finished meanwhile (we were taken for dead) is dropped.

        The values go to the storage directly, not through `optuna.Study.tell`: tell re-reads the whole trial and
        runs the study's sampler hooks, which evomerge's controller never uses; on a tiny candidate that is time
        it cannot spare.  A NaN fitness (tell would refuse it) fails the trial."""
        score, error = result.score, result.error
        values = None if score is None else [float(v) for v in (
            [score.per_task[t.task] for t in self.cfg.fitness.tasks] if self.multi_objective else [score.value])]
        if values is not None and any(math.isnan(v) for v in values):
            score, error = None, f"FloatingPointError: the fitness is NaN: {values}"
        try:
            attrs = {"timings": result.timings, "worker": result.worker}
            if result.attempts > 1:
                attrs["attempts"] = result.attempts
            if score is None:
                attrs["error"] = error
            else:
                attrs.update({"scores": score.per_task, "value": score.value, "examples": score.examples,
                              "full_fidelity": score.full, "stages": score.stages})
                if score.full and score.example_scores:  # what later candidates race against, should it lead
                    attrs["example_scores"] = score.example_scores
            self._set_attrs(trial_id, attrs)
            if score is None:
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            else:
                self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, values)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as e:
            if not self.storage.get_trial(trial_id).state.is_finished():
                raise
            optuna.logging.get_logger("evomerge").warning("trial %d was finished by another runner: %s", number, e)

    def _set_attrs(self, trial_id: int, attrs: dict) -> None:
        """Several trial user attrs in one statement and one transaction, the same rows `Trial.set_user_attr`
        writes: each separate write is a lookup, an upsert and a commit (a WAL sync on SQLite), which on a tiny
        candidate cost more than its filters and metrics together.  The upsert is built once and run with the rows
        as parameters, so SQLAlchemy compiles it once per study, not once per write."""
        from optuna.storages._rdb.models import TrialModel
        from optuna.storages._rdb.storage import _create_scoped_session

        if self._upsert is None:
            self._upsert = _attr_upsert(self.storage.engine.name)
        if self._upsert is False:
            for key, value in attrs.items():
                self.storage.set_trial_user_attr(trial_id, ATTR + key, value)
            return
        rows = [{"trial_id": trial_id, "key": ATTR + k, "value_json": json.dumps(v)} for k, v in attrs.items()]
        with _create_scoped_session(self.storage.scoped_session, True) as session:
            self.storage.check_trial_is_updatable(trial_id, TrialModel.find_or_raise_by_id(trial_id, session).state)
            session.execute(self._upsert, rows)

    def incumbent_scores(self, st: optuna.Study) -> dict[str, list[float]] | None:
        """The per-example search scores of the best full-fidelity trial so far, which racing pairs candidates
        against (None without racing or before the first)."""
        if self.cfg.fitness.racing is None:
            return None
        best = self.best_trial(st)
        return best.user_attrs.get(ATTR + "example_scores") if best else None

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

        Data-flow studies have no uniform merge: their rows are base (if set), model A and each parent run as their
        own unscaled paths, and the evolved best.  The uniform baseline is the study's method with one weight and
        density everywhere, the best of a small grid chosen on the search split, exactly like the evolved best.  The
        evolved best is rank 1 of the final evaluation.
        """
        st = self.optuna
        cached = st.user_attrs.get(ATTR + "final")
        best = self.best_trial()
        if cached and best and cached.get("best_trial") == best.number:
            return cached["rows"]
        rows = self._dataflow_rows() if self.space.kind != "ps" else self._ps_rows()
        if best is not None:
            top = self.final_eval()[0]
            rows.append({"model": "evolved best", **{k: top[k] for k in ("test", "per_task", "search", "trial")},
                         "recipe": best.user_attrs[ATTR + "recipe"]})
            st.set_user_attr(ATTR + "final", {"best_trial": best.number, "rows": rows})
        return rows

    def _dataflow_rows(self) -> list[dict]:
        """Each source model run as its own path (model A first when it is a PS merge)."""
        rows = []
        if self.cfg.models.base:
            layers = [[0, i] for i in range(inspect_model(self.cfg.models.base).num_layers)]
            rows.append(self._row("base", Recipe("passthrough", [self.cfg.models.base], {}, path={"layers": layers})))
        labels = ([f"model A (best of {self.cfg.models.a_from_study})"] if self.space.a else []) + [
            f"parent {Path(p).name}" for p in self.cfg.models.parents]
        return rows + [self._row(label, self.space.identity(m)) for m, label in enumerate(labels)]

    def _ps_rows(self) -> list[dict]:
        rows = []
        n = len(self.cfg.models.parents)
        if self.cfg.models.base:
            base = Recipe("task_arithmetic", self.cfg.models.parents, self._uniform_groups([0.0] * n), self.cfg.models.base)
            rows.append(self._row("base", base))
        for i, p in enumerate(self.cfg.models.parents):
            one_hot = [1.0 if j == i else 0.0 for j in range(n)]
            rows.append(self._row(f"parent {Path(p).name}",
                                  Recipe("linear", self.cfg.models.parents, self._uniform_groups(one_hot),
                                         self.cfg.models.base)))
        uniform = self._best_uniform()
        if uniform is not None:
            rows.append(self._row("best uniform " + self.cfg.merge.method, uniform[0], search=uniform[1]))
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
        return {g: {"weight": list(weights)} for g in self.space.uniform(0.5).groups}

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


def _attr_upsert(backend: str):
    """INSERT ... ON CONFLICT (trial_id, key) DO UPDATE for trial user attrs, or False where the dialect has none."""
    from optuna.storages._rdb.models import TrialUserAttributeModel as Attr
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(backend)
    if dialect is None:
        return False
    insert = dialect.insert(Attr)
    return insert.on_conflict_do_update(index_elements=[Attr.trial_id, Attr.key],
                                        set_={"value_json": insert.excluded.value_json})


class _Heartbeat(threading.Thread):
    """Marks this runner's RUNNING trials alive in the DB, from a thread, while the loop waits on results."""

    def __init__(self, storage: RDBStorage, held: dict, interval: float):
        super().__init__(daemon=True, name="evomerge-heartbeat")
        self.storage, self.held, self.interval = storage, held, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            for trial_id in list(self.held):
                try:
                    self.storage.record_heartbeat(trial_id)
                except sqlalchemy.exc.SQLAlchemyError:
                    pass  # a DB hiccup: the next beat retries, well before the trial counts as stale

    def __enter__(self) -> _Heartbeat:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.join()


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(conn, _record) -> None:
    """Every SQLite study DB in WAL mode with normal sync, set before its tables are created: a trial writes a dozen
    attrs, and a full fsync per write cost ~25 ms each (over a third of a tiny candidate's time).  A killed process
    still loses nothing committed; only a power cut may lose the last trials, which the resume logic re-evaluates."""
    if isinstance(conn, sqlite3.Connection):
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()


RACED_OUT = 100.0


def told_value(t: optuna.trial.FrozenTrial) -> float | list[float]:
    """What the optimizer is told of a finished trial: a trial stopped by racing (one objective only) ranks below
    every trial that ran more stages (the successive-halving order), then by its estimate; its stored value stays the
    estimate.  The optimizers are rank-based, so the offset changes no ranking among full-fidelity trials."""
    if len(t.values) > 1 or t.user_attrs.get(ATTR + "full_fidelity", True):
        return t.values if len(t.values) > 1 else t.value
    return t.value - RACED_OUT + len(t.user_attrs.get(ATTR + "stages") or [])


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
    count = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)}
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
