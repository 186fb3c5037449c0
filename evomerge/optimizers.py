"""Ask/tell optimizers whose whole state survives a restart.

The controller persists `state()` in the study DB after every ask and every tell, so a killed controller resumes
from exactly where it was.  Randomness is re-seeded from (seed, generation) before each ask, so a resumed study
proposes what an uninterrupted one would have.
"""
from __future__ import annotations

import abc
import base64
import pickle

import cma
import numpy as np
from cma.utilities.utils import SolutionDict


class Optimizer(abc.ABC):
    """One generation at a time: `ask` returns genomes in [0, 1]^d, `tell` takes their losses (lower is better)."""

    @abc.abstractmethod
    def ask(self, generation: int) -> list[list[float]]: ...

    @abc.abstractmethod
    def tell(self, genomes: list[list[float]], losses: list[float]) -> None: ...

    def state(self) -> str:
        """Opaque text for the study DB (written and read only by evomerge itself)."""
        return base64.b64encode(pickle.dumps(self)).decode()

    @staticmethod
    def from_state(text: str) -> Optimizer:
        obj = pickle.loads(base64.b64decode(text))
        if not isinstance(obj, Optimizer):
            raise TypeError("stored optimizer state is not an evomerge optimizer")
        return obj


class CMAES(Optimizer):
    """pycma's CMA-ES in the unit cube; defaults from the published method (x0 = 0.5, sigma0 = 1/6)."""

    def __init__(self, dimension: int, seed: int, sigma0: float = 1 / 6, popsize: int | None = None,
                 x0: list[float] | None = None):
        self.seed = seed
        opts = {"bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0}
        if popsize:
            opts["popsize"] = popsize
        self.es = cma.CMAEvolutionStrategy(x0 or [0.5] * dimension, sigma0, opts)

    @property
    def popsize(self) -> int:
        return int(self.es.popsize)

    def ask(self, generation: int) -> list[list[float]]:
        np.random.seed((self.seed * 1_000_003 + generation) % 2**32)
        return [list(map(float, x)) for x in self.es.ask()]

    def tell(self, genomes: list[list[float]], losses: list[float]) -> None:
        self.es.tell([np.asarray(g) for g in genomes], losses)

    def __setstate__(self, state: dict) -> None:
        """Make a restored optimizer behave exactly like the one that was saved.

        pycma samples through a bound `np.random.randn`, which pickling turns into a private copy of the generator,
        so the per-generation seeding in `ask` would no longer reach it; and it finds the solutions it handed out by
        `hash(x.tobytes())`, which Python salts per process, so state read by another process (a resume, a second
        runner) must be re-keyed or `tell` no longer recognizes its own solutions."""
        self.__dict__.update(state)
        if _copied_global_randn(self.es.opts.get("randn")):
            self.es.opts["randn"] = np.random.randn
        if _copied_global_randn(getattr(getattr(self.es, "sm", None), "randn", None)):
            self.es.sm.randn = np.random.randn
        seen: set[int] = set()
        todo = [self.es]
        while todo:
            obj = todo.pop()
            if id(obj) in seen or not hasattr(obj, "__dict__"):
                continue
            seen.add(id(obj))
            if isinstance(obj, SolutionDict):
                _rekey(obj)
            todo.extend(v for v in vars(obj).values()
                        if hasattr(v, "__dict__") and type(v).__module__.startswith("cma"))


def _copied_global_randn(f: object) -> bool:
    return isinstance(getattr(f, "__self__", None), np.random.RandomState)


def _rekey(d: SolutionDict) -> None:
    data, same, unhashed = d.data, d.data_with_same_key, d._unhashed_keys
    d.data, d.data_with_same_key, d._unhashed_keys = {}, {}, {}
    for k, v in data.items():
        x = unhashed.get(k, k)
        new = d.key(x)
        d.data[new] = v
        if k in same:
            d.data_with_same_key[new] = same[k]
        if k in unhashed:
            d._unhashed_keys[new] = x
