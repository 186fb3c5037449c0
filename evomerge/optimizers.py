"""Ask/tell optimizers whose whole state survives a restart.

The controller persists `state()` in the study DB after every ask and every tell, so a killed controller resumes
from exactly where it was.  Randomness is re-seeded from (seed, generation) before each ask, so a resumed study
proposes what an uninterrupted one would have.
"""
from __future__ import annotations

import abc
import base64
import pickle
from collections.abc import Callable

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


class CatCMA(Optimizer):
    """CatCMA (`cmaes`) for mixed spaces: a Gaussian over the continuous coordinates and a categorical distribution
    per choice, learned jointly.  Genomes keep the unit-cube form: category i of n is proposed as (i + 0.5) / n, which
    the space decodes back to i."""

    def __init__(self, categories: list[int], seed: int, sigma0: float = 1 / 6, popsize: int | None = None,
                 x0: list[float] | None = None):
        from cmaes import CatCMA as _CatCMA

        self.seed = seed
        self.categories = list(categories)
        self.cont = [i for i, n in enumerate(categories) if n == 0]
        self.cat = [i for i, n in enumerate(categories) if n > 0]
        if len(self.cont) < 2 or not self.cat:
            raise ValueError("CatCMA needs at least two continuous and one categorical coordinate; "
                             "use cmaes for this search space")
        x0 = x0 or [0.5] * len(categories)
        mean = np.array([x0[i] for i in self.cont])
        bounds = np.array([[0.0, 1.0]] * len(self.cont))
        self.es = _CatCMA(mean=mean, sigma=sigma0, cat_num=np.array([categories[i] for i in self.cat]),
                          bounds=bounds, seed=seed + 1, population_size=popsize, cat_param=self._start(x0))

    def _start(self, x0: list[float]) -> np.ndarray:
        """Initial category probabilities: a yes/no choice whose x0 is v starts with P(yes) = v (as under CMA-ES,
        where x0 is the mean of the indicator); wider choices start uniform."""
        width = max(self.categories[i] for i in self.cat)
        q = np.zeros((len(self.cat), width))
        for row, i in enumerate(self.cat):
            n = self.categories[i]
            q[row, :n] = [1 - x0[i], x0[i]] if n == 2 else [1 / n] * n
        return q

    @property
    def popsize(self) -> int:
        return int(self.es.population_size)

    def ask(self, generation: int) -> list[list[float]]:
        self.es.reseed_rng((self.seed * 1_000_003 + generation) % 2**32)
        genomes = []
        for _ in range(self.popsize):
            x, c = self.es.ask()
            g = [0.0] * len(self.categories)
            for i, v in zip(self.cont, x):
                g[i] = float(v)
            for i, onehot in zip(self.cat, c):
                g[i] = (float(np.argmax(onehot)) + 0.5) / self.categories[i]
            genomes.append(g)
        return genomes

    def tell(self, genomes: list[list[float]], losses: list[float]) -> None:
        max_n = max(self.categories[i] for i in self.cat)
        solutions = []
        for g, loss in zip(genomes, losses):
            x = np.array([g[i] for i in self.cont])
            c = np.zeros((len(self.cat), max_n), dtype=bool)
            for row, i in enumerate(self.cat):
                c[row, min(int(g[i] * self.categories[i]), self.categories[i] - 1)] = True
            solutions.append(((x, c), loss))
        self.es.tell(solutions)

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

    def __getstate__(self) -> dict:
        """Pickled without its sampler, which `ask` rebuilds from (seed, generation) anyway (Optuna 5's NSGA-II
        sampler holds a thread lock, which does not pickle)."""
        import copy

        import optuna

        state = dict(self.__dict__)
        state["study"] = copy.copy(self.study)
        state["study"].sampler = optuna.samplers.RandomSampler(seed=self.seed)
        return state

    def _distributions(self) -> dict:
        from optuna.distributions import FloatDistribution

        return {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(self.dimension)}

    def ask(self, generation: int) -> list[list[float]]:
        self.study.sampler = self._sampler((self.seed * 1_000_003 + generation) % 2**31)
        dists = self._distributions()
        trials = [self.study.ask(dists) for _ in range(self.popsize)]
        self._asked = [t.number for t in trials]  # numbers, not Trial objects: each of those holds the study
        return [[float(t.params[f"x{i}"]) for i in range(self.dimension)] for t in trials]

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



def _cmaes(*, dimension: int, categories: list[int], seed: int, sigma0: float, popsize: int | None,
           x0: list[float] | None, objectives: int) -> Optimizer:
    return CMAES(dimension, seed=seed, sigma0=sigma0, popsize=popsize, x0=x0)


def _catcma(*, dimension: int, categories: list[int], seed: int, sigma0: float, popsize: int | None,
            x0: list[float] | None, objectives: int) -> Optimizer:
    return CatCMA(categories, seed=seed, sigma0=sigma0, popsize=popsize, x0=x0)


def _sampler(cls: type[OptunaSampler]) -> Callable[..., Optimizer]:
    """Optuna samplers take CMA-ES's default population size, so budgets compare generation for generation."""
    def make(*, dimension: int, categories: list[int], seed: int, sigma0: float, popsize: int | None,
             x0: list[float] | None, objectives: int) -> Optimizer:
        pop = popsize or 4 + int(3 * np.log(dimension))
        return cls(dimension, seed, pop, objectives) if cls is NSGA2 else cls(dimension, seed, pop)
    return make


# optimizer.name in study.yaml -> factory.  `cmaes` on a data-flow space is the published encoding (a continuous
# include indicator per slot, included when >= 0.5 in the unit cube); `catcma` treats those choices as categorical.
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "cmaes": _cmaes, "catcma": _catcma,
    "random": _sampler(RandomSearch), "tpe": _sampler(TPE), "nsga2": _sampler(NSGA2),
}
MULTI_OBJECTIVE = {"nsga2"}


def create_optimizer(name: str, *, dimension: int, categories: list[int] | None = None, seed: int = 0,
                     sigma0: float = 1 / 6, popsize: int | None = None, x0: list[float] | None = None,
                     objectives: int = 1) -> Optimizer:
    """A fresh optimizer by its study.yaml name (a resumed study unpickles its stored one instead)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](dimension=dimension, categories=categories or [0] * dimension, seed=seed, sigma0=sigma0,
                            popsize=popsize, x0=x0, objectives=objectives)
