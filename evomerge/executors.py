"""Executors run trials.  `local` evaluates in this process; `ray` keeps a pool of Ray actors, one per GPU or per
CPU slot.  Every worker (`worker.Worker`) keeps the parents and the lm-eval tasks resident, so a candidate costs one
in-place materialization plus forward passes.

The controller talks to both through one small interface: `submit` jobs while `free_slots` says a worker is idle,
and take `results` as they complete, so no worker waits for a straggler that the optimizer does not need.
"""
from __future__ import annotations

import abc
import os
import socket
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from .config import ExecutorConfig, StudyConfig
from .errors import EvomergeError
from .recipe import Recipe
from .worker import TrialResult, Worker


class ExecutorError(EvomergeError, ValueError):
    """The executor cannot start (Ray not installed, cluster unreachable, no resources for one actor)."""


class Executor(abc.ABC):
    """Runs `Worker.evaluate(recipe, split, **options)` jobs; keys are the caller's, results come back by key."""

    name: str

    @abc.abstractmethod
    def start(self) -> None:
        """Load the parents into every worker; input errors (bad models, unknown tasks) surface here."""

    @abc.abstractmethod
    def free_slots(self) -> int:
        """How many more jobs can be submitted before one is waiting for a worker."""

    @abc.abstractmethod
    def submit(self, key: Hashable, recipe: Recipe, split: str = "search", **options: Any) -> None: ...

    @abc.abstractmethod
    def results(self, timeout: float | None = None) -> list[tuple[Hashable, TrialResult]]:
        """Results of finished jobs, at least one unless `timeout` passes first or nothing is in flight."""

    def evaluate(self, recipe: Recipe, split: str = "search", **options: Any) -> TrialResult:
        """One job, start to end (the final table, baselines); only call it with nothing else in flight."""
        key = object()
        self.submit(key, recipe, split, **options)
        while True:
            for k, result in self.results():
                if k is key:
                    return result

    def close(self) -> None:
        """Release the workers."""


def cores_available() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LocalExecutor(Executor):
    """In-process, one candidate at a time: the default, and the reference the Ray executor must match."""

    name = "local"
    workers = 1

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self._worker: Worker | None = None
        self._queue: list[tuple[Hashable, Recipe, str, dict]] = []

    @property
    def threads(self) -> int:
        """torch/OpenMP threads of the worker: `executor.threads`, else the available cores over the workers."""
        return self.cfg.executor.threads or max(1, cores_available() // self.workers)

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            torch.set_num_threads(self.threads)
            self._worker = Worker(self.cfg)
        return self._worker

    def start(self) -> None:
        self.worker

    def free_slots(self) -> int:
        return 0 if self._queue else 1

    def submit(self, key: Hashable, recipe: Recipe, split: str = "search", **options: Any) -> None:
        self._queue.append((key, recipe, split, options))

    def results(self, timeout: float | None = None) -> list[tuple[Hashable, TrialResult]]:
        if not self._queue:
            return []
        key, recipe, split, options = self._queue.pop(0)
        return [(key, self.worker.evaluate(recipe, split, **options))]


class _Actor:
    """The body of one Ray actor: a Worker held for the actor's life, its threads pinned as configured."""

    def __init__(self, cfg: StudyConfig, threads: int):
        torch.set_num_threads(threads)
        self.error: Exception | None = None
        self.worker: Worker | None = None
        try:
            self.worker = Worker(cfg)
        except ValueError as e:  # input errors (ConfigError, FitnessError, ...) go back to the controller as-is
            self.error = e
        self.name = f"ray:{socket.gethostname()}:{os.getpid()}"

    def ready(self) -> dict:
        if self.error is not None:
            raise self.error
        return {"pid": os.getpid(), "name": self.name, "device": str(self.worker.device)}

    def evaluate(self, recipe: Recipe, split: str, options: dict) -> TrialResult:
        result = self.worker.evaluate(recipe, split, **options)
        result.worker = self.name
        return result


@dataclass
class _Job:
    key: Hashable
    recipe: Recipe
    split: str
    options: dict
    attempts: int = 0


@dataclass
class _Slot:
    handle: Any
    pid: int | None = None
    job: _Job | None = None
    ref: Any = None
    ready: Any = None


class RayExecutor(Executor):
    """A pool of Ray actors (one per GPU, or per CPU slot), each with the parents resident for its whole life.

    A job goes to whichever actor is free.  An actor that dies (killed, out of memory, node lost) is replaced by a
    fresh one and its job is retried, up to `max_retries` times; after that the job's result is a failure carrying
    Ray's reason, so only that trial fails and the study goes on.
    """

    name = "ray"

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.ec: ExecutorConfig = cfg.executor
        self.slots: list[_Slot] = []
        self.backlog: list[_Job] = []
        self._started_ray = False

    # ------------------------------------------------------------- cluster and actors
    def _connect(self) -> None:
        try:
            import ray
        except ImportError as e:
            raise ExecutorError("executor.name: ray is not installed; pip install 'evomerge[ray]'") from e
        if ray.is_initialized():
            return
        address = self.ec.address or os.environ.get("RAY_ADDRESS")
        if address not in (None, "auto"):
            _check_reachable(address)
        env = {"OMP_NUM_THREADS": str(self._threads())}
        env.update({k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TQDM_DISABLE",
                                               "TOKENIZERS_PARALLELISM", "PYTHONPATH", "OMP_WAIT_POLICY",
                                               "GOMP_SPINCOUNT")
                    if k in os.environ})
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as e:
            raise ExecutorError(
                f"executor.address: cannot join the Ray cluster at {address!r} ({str(e).splitlines()[0]}); check "
                "that `ray start --head` runs there and its port is reachable, or leave the address out to start "
                "a local Ray"
            ) from None
        self._started_ray = address is None

    def _actor_options(self) -> tuple[int, dict]:
        import ray

        total = ray.cluster_resources()
        gpus = self.ec.num_gpus_per_actor
        if gpus is None:
            gpus = 1 if total.get("GPU", 0) >= 1 and self.cfg.device in ("auto", "cuda") else 0
        cpus = self.ec.num_cpus_per_actor
        fits = int(total.get("GPU", 0) // gpus) if gpus else int(total.get("CPU", 0) // cpus)
        actors = self.ec.actors or fits
        if actors < 1 or (self.ec.actors and self.ec.actors > fits):
            raise ExecutorError(
                f"executor.actors: the Ray cluster has {total.get('GPU', 0):g} GPUs and {total.get('CPU', 0):g} CPUs, "
                f"room for {fits} actors of {gpus:g} GPU / {cpus:g} CPU each; lower executor.actors or "
                "num_gpus_per_actor / num_cpus_per_actor, or add Ray workers"
            )
        return actors, {"num_gpus": gpus, "num_cpus": cpus}

    def _threads(self) -> int:
        """An actor's torch/OpenMP threads: `threads_per_actor`, else its CPU reservation (at least one), so actors
        sharing a node never oversubscribe it."""
        return self.ec.threads_per_actor or max(1, int(self.ec.num_cpus_per_actor))

    def _new_actor(self) -> Any:
        return self._actor_class.remote(self.cfg, self._threads())

    def start(self) -> None:
        if self.slots:
            return
        import ray

        self._connect()
        n, options = self._actor_options()
        self._actor_class = ray.remote(**options)(_Actor)
        slots = [_Slot(self._new_actor()) for _ in range(n)]
        try:
            infos = ray.get([s.handle.ready.remote() for s in slots])
        except ray.exceptions.RayTaskError as e:
            raise e.cause if isinstance(e.cause, ValueError) else ExecutorError(f"a Ray actor failed to start: {e}")
        except ray.exceptions.RayActorError as e:
            raise ExecutorError(f"a Ray actor died while loading the parents (out of memory?): {e}") from None
        for s, info in zip(slots, infos):
            s.pid = info["pid"]
        self.slots = slots

    def workers(self) -> list[dict]:
        """Each actor's process id (None while a replacement is still loading) and the key of its job, if any."""
        import ray

        for s in self.slots:
            if s.pid is None and s.ready is not None and ray.wait([s.ready], timeout=0)[0]:
                try:
                    s.pid = ray.get(s.ready)["pid"]
                except ray.exceptions.RayError:
                    pass
                s.ready = None
        return [{"pid": s.pid, "job": None if s.job is None else s.job.key} for s in self.slots]

    # ------------------------------------------------------------- jobs
    def free_slots(self) -> int:
        return sum(s.job is None for s in self.slots) - len(self.backlog)

    def submit(self, key: Hashable, recipe: Recipe, split: str = "search", **options: Any) -> None:
        self.start()
        self.backlog.append(_Job(key, recipe, split, options))
        self._dispatch()

    def _dispatch(self) -> None:
        for s in self.slots:
            if s.job is None and self.backlog:
                s.job = self.backlog.pop(0)
                s.job.attempts += 1
                s.ref = s.handle.evaluate.remote(s.job.recipe, s.job.split, s.job.options)

    def results(self, timeout: float | None = None) -> list[tuple[Hashable, TrialResult]]:
        import ray

        busy = [s for s in self.slots if s.job is not None]
        if not busy:
            return []
        ready, _ = ray.wait([s.ref for s in busy], num_returns=1, timeout=timeout)
        done = []
        for s in busy:
            if s.ref not in ready:
                continue
            job, ref = s.job, s.ref
            s.job, s.ref = None, None
            try:
                result = ray.get(ref)
                result.attempts = job.attempts
                done.append((job.key, result))
            except ray.exceptions.RayActorError as e:
                self._replace(s)
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                if job.attempts <= self.ec.max_retries:
                    self.backlog.insert(0, job)
                else:
                    done.append((job.key, TrialResult(
                        None, {}, f"worker died {job.attempts} times evaluating this trial; last: {reason}",
                        self.name, job.attempts)))
            except ray.exceptions.RayTaskError as e:
                done.append((job.key, TrialResult(None, {}, f"{type(e.cause).__name__}: {e.cause}", self.name)))
        self._dispatch()
        return done

    def _replace(self, slot: _Slot) -> None:
        """A dead actor's slot gets a fresh actor; it loads the parents while the others keep working."""
        import ray

        ray.kill(slot.handle, no_restart=True)
        slot.handle, slot.pid = self._new_actor(), None
        slot.ready = slot.handle.ready.remote()

    def close(self) -> None:
        import ray

        for s in self.slots:
            ray.kill(s.handle, no_restart=True)
        self.slots = []
        if self._started_ray:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minute of retries, when no Ray head answers at an address.

    The GCS and the Ray Client endpoint both speak gRPC: any gRPC server answers a call to an unknown method with
    UNIMPLEMENTED at once, while a refused or silent address gives UNAVAILABLE or a timeout."""
    import grpc

    hostport = address.removeprefix("ray://")
    if ":" not in hostport:
        hostport += ":10001" if address.startswith("ray://") else ":6379"
    channel = grpc.insecure_channel(hostport)
    try:
        channel.unary_unary("/evomerge.Probe/Ping")(b"", timeout=timeout)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise ExecutorError(
                f"executor.address: no Ray head answers at {address!r} ({e.code().name.lower()}); check the host "
                "and port of the Ray head (`ray start --head` prints them), firewalls, or leave the address out to "
                "start a local Ray"
            ) from None
    finally:
        channel.close()


def make_executor(cfg: StudyConfig) -> Executor:
    """The executor the study file asks for."""
    return RayExecutor(cfg) if cfg.executor.name == "ray" else LocalExecutor(cfg)
