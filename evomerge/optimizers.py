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

    def ask(self, generation: int) -> list[list[float]]:
        np.random.seed((self.seed * 1_000_003 + generation) % 2**32)
        return [list(map(float, x)) for x in self.es.ask()]

    def tell(self, genomes: list[list[float]], losses: list[float]) -> None:
        self.es.tell([np.asarray(g) for g in genomes], losses)


class OptunaSampler(Optimizer):
    """An Optuna sampler behind ask/tell: a private in-memory Optuna study holds the history.

    The study pickles with the optimizer (so `state()` persists it like pycma's state), and a fresh sampler seeded
    from (seed, generation) is installed before each ask, so a resumed study proposes what an uninterrupted one
    would have.  With several objectives, `tell` takes one list of losses per genome (lower is better each).
    """

    def __init__(self, dimension: int, seed: int, popsize: int, objectives: int = 1):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dimension, self.seed, self.popsize, self.objectives = dimension, seed, popsize, objectives
        self.study = optuna.create_study(directions=["minimize"] * objectives, sampler=self._sampler(seed))
        self._asked: list = []

    @abc.abstractmethod
    def _sampler(self, seed: int): ...

    def _distributions(self) -> dict:
        from optuna.distributions import FloatDistribution

        return {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(self.dimension)}

    def ask(self, generation: int) -> list[list[float]]:
        self.study.sampler = self._sampler((self.seed * 1_000_003 + generation) % 2**31)
        dists = self._distributions()
        self._asked = [self.study.ask(dists) for _ in range(self.popsize)]
        return [[float(t.params[f"x{i}"]) for i in range(self.dimension)] for t in self._asked]

    def tell(self, genomes: list[list[float]], losses: list) -> None:
        if len(genomes) != len(self._asked):
            raise ValueError(f"told {len(genomes)} genomes for {len(self._asked)} asked")
        for trial, loss in zip(self._asked, losses):
            self.study.tell(trial, loss)
        self._asked = []


class RandomSearch(OptunaSampler):
    """Uniform random genomes: the baseline every other optimizer has to beat at equal budget."""

    def _sampler(self, seed: int):
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)


class TPE(OptunaSampler):
    """Optuna's TPE; `constant_liar` keeps a generation asked in one go from collapsing onto one point."""

    def _sampler(self, seed: int):
        import optuna

        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True,
                                          n_startup_trials=max(10, self.popsize))


class NSGA2(OptunaSampler):
    """Optuna's NSGA-II over one objective per fitness task; the study keeps its Pareto front."""

    def _sampler(self, seed: int):
        import optuna

        return optuna.samplers.NSGAIISampler(seed=seed, population_size=self.popsize)


OPTIMIZERS: dict[str, type[Optimizer]] = {"cmaes": CMAES, "random": RandomSearch, "tpe": TPE, "nsga2": NSGA2}
MULTI_OBJECTIVE = {"nsga2"}


def make_optimizer(name: str, dimension: int, seed: int, sigma0: float = 1 / 6, popsize: int | None = None,
                   objectives: int = 1) -> Optimizer:
    """The optimizer a study's `optimizer.name` asks for; popsize defaults to CMA-ES's own rule for every kind."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if name == "cmaes":
        return CMAES(dimension, seed=seed, sigma0=sigma0, popsize=popsize)
    pop = popsize or 4 + int(3 * np.log(dimension))
    if name in MULTI_OBJECTIVE:
        return OPTIMIZERS[name](dimension, seed, pop, objectives)
    return OPTIMIZERS[name](dimension, seed, pop)
