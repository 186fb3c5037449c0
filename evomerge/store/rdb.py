"""The study store: the one place that reads and writes a study in its DB (Optuna's RDB storage, private API included).

Everything evomerge keeps per trial (genome, recipe, scores, timings, ...) is a trial user attr ``evomerge.<field>``,
read into a frozen `TrialRecord` here and written here; the study-level state (signature, optimizer checkpoint,
pending generation, final tables) are study user attrs, read and written here too.  The controller (`study.py`), the
reports and `evomerge status` all go through `StudyStore`, so an Optuna upgrade touches one module, and reading a
study never imports the loop, the merge engine or lm-eval.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from ..errors import EvomergeError
from ..storage_url import safe_url
from .records import ATTR, TrialRecord, pareto_front, ranked

LOCK_NAMESPACE = 0x65766F  # "evo": the advisory-lock class of evomerge's per-study generation lock
optuna.logging.set_verbosity(optuna.logging.WARNING)


class StorageError(EvomergeError, ValueError):
    """The study DB cannot be reached or opened."""


class StudyBusy(EvomergeError, ValueError):
    """Another runner holds this SQLite study DB."""


class StudyMismatch(EvomergeError, ValueError):
    """The study name already exists in the storage with another search space or models."""


def storage_error(url: str, e: Exception) -> StorageError:
    """What failed and what to check, with the URL's password masked (also where the driver's message echoes it)."""
    reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
    password = make_url(url).password
    if password:
        reason = reason.replace(str(password), "***")
    return StorageError(f"cannot open the study DB {safe_url(url)} ({reason}); check that the server runs and is "
                        "reachable, and that the user, password and database exist")


def missing_sqlite_file(url: str) -> bool:
    """A SQLite URL whose file does not exist: looking a study up there would create the file."""
    u = make_url(url)
    return u.get_backend_name() == "sqlite" and bool(u.database) and not Path(u.database).exists()


class StudyStore:
    """One named study in one storage: connection, the runner locks, claiming and recording trials, the optimizer's
    checkpoint, and every query `status`, `export` and `report` make."""

    def __init__(self, url: str, study: str, heartbeat_s: float = 10.0, stale_after_s: float = 60.0):
        self.url, self.study = url, study
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._storage: RDBStorage | None = None
        self._optuna: optuna.Study | None = None
        self._upsert = None  # built on first use, for this storage's dialect
        self._lock: int | None = None  # the sidecar's file descriptor while this object holds a SQLite study

    @property
    def backend(self) -> str:
        return make_url(self.url).get_backend_name()

    @property
    def database(self) -> str | None:
        return make_url(self.url).database

    @property
    def shared(self) -> bool:
        """Whether several runners may work on this storage at once (anything but SQLite)."""
        return self.backend != "sqlite"

    @property
    def storage(self) -> RDBStorage:
        """Optuna's RDB storage, connected once; an unreachable server fails here, in seconds, with what to check."""
        if self._storage is None:
            kwargs = {"postgresql": {"connect_args": {"connect_timeout": 5}},
                      "sqlite": {"connect_args": {"factory": _WalConnection}}}.get(self.backend, {})
            try:
                for attempt in range(3):  # runners starting together on a fresh DB race to create the tables
                    try:
                        with warnings.catch_warnings():  # Optuna calls heartbeats experimental; we drive them
                            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                            self._storage = RDBStorage(self.url, engine_kwargs=kwargs,
                                                       heartbeat_interval=max(1, round(self.heartbeat_s)),
                                                       grace_period=max(1, round(self.stale_after_s)))
                        break
                    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                        if attempt == 2:
                            raise
                        time.sleep(0.5 + attempt)
            except sqlalchemy.exc.SQLAlchemyError as e:
                raise storage_error(self.url, e) from None
        return self._storage

    def exists(self) -> bool:
        """Whether the study is in the storage; never creates a SQLite file just to find out (a study once found
        stays: none is deleted under a running command)."""
        if self._optuna is not None:
            return True
        if missing_sqlite_file(self.url):
            return False
        try:
            self._optuna = optuna.load_study(study_name=self.study, storage=self.storage)
            return True
        except KeyError:
            return False
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:
            raise storage_error(self.url, e) from None

    @property
    def optuna(self) -> optuna.Study:
        if self._optuna is None:
            self._optuna = optuna.load_study(study_name=self.study, storage=self.storage)
        return self._optuna

    def create(self, objectives: int, signature: dict, dimension: int) -> optuna.Study:
        """Open the study, creating it (with its signature and dimension) when it is new."""
        st = optuna.create_study(study_name=self.study, storage=self.storage, directions=["maximize"] * objectives,
                                 load_if_exists=True)
        if ATTR + "signature" not in st.user_attrs:
            st.set_user_attr(ATTR + "signature", signature)
            st.set_user_attr(ATTR + "dimension", dimension)
        self._optuna = st
        return st

    def check_setup(self, setup: dict) -> None:
        """The study DB is reachable and, if the study exists, its stored signature agrees with `setup` on every key
        both have; never creates a SQLite file (only its folder must exist)."""
        if missing_sqlite_file(self.url):
            folder = Path(self.database).parent
            if not folder.is_dir():
                raise storage_error(self.url, OSError(f"folder {folder} does not exist"))
            return
        if self.exists():
            stored = self.get("signature") or {}
            changed = next((k for k in setup if k in stored and stored[k] != setup[k]), None)
            if changed:
                raise StudyMismatch(
                    f"study {self.study!r} already exists in this storage with a different {changed}; "
                    "use a new study name (or another storage) for a changed setup")

    # ---------------------------------------------------------------- study-level state
    def get(self, key: str, default: Any = None) -> Any:
        """A study attr: ``signature``, ``dimension``, ``optimizer``, ``pending``, ``final``, ``final_eval``."""
        return self.optuna.user_attrs.get(ATTR + key, default)

    def put(self, key: str, value: Any) -> None:
        self.optuna.set_user_attr(ATTR + key, value)

    # ---------------------------------------------------------------- locks
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the SQLite study DB for this runner, or raise `StudyBusy` at once naming the holder; re-entrant.

        `fcntl.flock` on ``<db>.lock``: the kernel releases it when the holder exits however it exits (SIGKILL
        included), so no stale lock is ever left to clean up.  The file itself stays, naming the last holder.  Shared
        storages (PostgreSQL) need no lock: their runners cooperate through the DB."""
        db = self.database
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

    @contextlib.contextmanager
    def advancing(self) -> Iterator[None]:
        """One runner at a time may re-queue, tell, ask and enqueue: a PostgreSQL advisory lock, released by the
        server if its holder dies.  SQLite has one runner, so nothing to hold."""
        if self.backend != "postgresql":
            yield
            return
        key = {"ns": LOCK_NAMESPACE, "id": self.optuna._study_id}
        with self.storage.engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:ns, :id)"), key)
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:ns, :id)"), key)
                conn.commit()

    def heartbeat(self, held: dict[int, int]) -> contextlib.AbstractContextManager:
        """Mark the `held` trials alive from a thread while the loop waits (shared storages only)."""
        return _Heartbeat(self.storage, held, self.heartbeat_s) if self.shared else contextlib.nullcontext()

    # ---------------------------------------------------------------- trials: the writes
    def requeue_abandoned(self) -> None:
        """RUNNING trials of dead runners back to WAITING: on SQLite all of them (this runner holds the lock), on a
        shared storage those whose heartbeat went silent."""
        if self.shared:
            ids = self.storage._get_stale_trial_ids(self.optuna._study_id)
        else:
            ids = [t._trial_id for t in self.optuna.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        for trial_id in ids:
            self.storage.set_trial_state_values(trial_id, TrialState.WAITING)

    def enqueue(self, generation: int, index: int, genome: list[float]) -> None:
        self.optuna.enqueue_trial({}, user_attrs={ATTR + "generation": generation, ATTR + "index": index,
                                                  ATTR + "genome": genome})

    def claim(self, trial_id: int) -> bool:
        """WAITING -> RUNNING, atomic: of several runners, exactly one wins.  The heartbeat is written before the
        claim, so no other runner ever sees the claimed trial as stale."""
        if self.shared:
            self.storage.record_heartbeat(trial_id)
        try:
            return bool(self.storage.set_trial_state_values(trial_id, TrialState.RUNNING))
        except optuna.exceptions.UpdateFinishedTrialError:
            return False

    def started(self, trial_id: int, recipe: dict, runner: str) -> None:
        self._set_attrs(trial_id, {"recipe": recipe, "runner": runner})

    def record(self, trial_id: int, number: int, values: list[float] | None, *, score: Any, error: str | None,
               timings: dict[str, float], worker: str, attempts: int) -> None:
        """Store a result (`score`: the fitness's `Score`, None for a failed trial); one whose trial another runner
        finished meanwhile (we were taken for dead) is dropped.

        The values go to the storage directly, not through `optuna.Study.tell`: tell re-reads the whole trial and
        runs the study's sampler hooks, which evomerge's controller never uses; on a tiny candidate that is time it
        cannot spare."""
        try:
            attrs = {"timings": timings, "worker": worker}
            if attempts > 1:
                attrs["attempts"] = attempts
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

    # ---------------------------------------------------------------- trials: the queries
    def records(self) -> list[TrialRecord]:
        return [TrialRecord.of(t) for t in self.optuna.get_trials(deepcopy=False)]

    def finished(self) -> int:
        """Trials finished (COMPLETE or FAIL) so far."""
        return sum(t.state.is_finished() for t in self.optuna.get_trials(deepcopy=False))

    def ranked(self) -> list[TrialRecord]:
        return ranked(self.records())

    def best(self) -> TrialRecord | None:
        """The best trial scored on the whole search subset, by weighted fitness (also with several objectives)."""
        top = self.ranked()
        return top[0] if top else None

    def pareto_front(self) -> list[TrialRecord]:
        return pareto_front(self.optuna)

    def summary(self) -> dict:
        """Counts, best trial, failures and final tables, for `status` and `report`; reads only the DB."""
        trials = self.records()
        count = {s.name.lower(): sum(t.state == s for t in trials)
                 for s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)}
        top = ranked(trials)
        best = {"trial": top[0].number, "value": top[0].value, "scores": top[0].scores,
                "recipe": top[0].recipe} if top else None
        final, final_eval = self.get("final"), self.get("final_eval")
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        return {"study": self.optuna.study_name, "trials": len(trials), **count, "best": best,
                "examples": sum(t.examples for t in complete if t.examples),
                "raced_out": sum(not t.full_fidelity for t in complete),
                "final_eval": final_eval["rows"] if final_eval else None,
                "pareto_front": [{"trial": t.number, "scores": t.scores, "value": t.value}
                                 for t in self.pareto_front()],
                "dimension": self.get("dimension"),
                "final_table": final["rows"] if final else None,
                "errors": [{"trial": t.number, "error": t.error} for t in trials if t.state == TrialState.FAIL]}


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


class _WalConnection(sqlite3.Connection):
    """A study DB's SQLite connection in WAL mode with normal sync, set as it opens (before Optuna creates the
    tables), and only for the store's own engine: a trial writes a dozen attrs, and a full fsync per write cost
    ~25 ms each (over a third of a tiny candidate's time).  A killed process still loses nothing committed; only a
    power cut may lose the last trials, which the resume logic re-evaluates."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA journal_mode=WAL").close()
        self.execute("PRAGMA synchronous=NORMAL").close()
