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

    def __setstate__(self, state: dict) -> None:
        """Make a restored CMA-ES behave exactly like the one that was saved.

        Pickling copies the global NumPy generator pycma samples from, so the copy would ignore the per-generation
        seeding in `ask`: point it back at the global one.  And pycma files its proposals under hash(bytes), which
        Python salts per process: re-file them under this process's hashes, or a resumed `tell` would miss its own
        proposals and update the distribution differently."""
        self.__dict__.update(state)
        self.es.opts["randn"] = self.es.sm.randn = np.random.randn
        sent = self.es.sent_solutions
        if not hasattr(sent, "_unhashed_keys"):
            return
        new = {old: sent.key(x) for old, x in sent._unhashed_keys.items()}
        sent.data = {new.get(k, k): v for k, v in sent.data.items()}
        sent.data_with_same_key = {new.get(k, k): v for k, v in sent.data_with_same_key.items()}
        sent._unhashed_keys = {new[k]: x for k, x in sent._unhashed_keys.items()}

    def ask(self, generation: int) -> list[list[float]]:
        np.random.seed((self.seed * 1_000_003 + generation) % 2**32)
        return [list(map(float, x)) for x in self.es.ask()]

    def tell(self, genomes: list[list[float]], losses: list[float]) -> None:
        self.es.tell([np.asarray(g) for g in genomes], losses)
