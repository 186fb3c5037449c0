"""The search-space interface: genome (unit cube) <-> Recipe.

Optimizers work in [0, 1]^d with the published defaults x0 = 0.5, sigma0 = 1/6; a space knows its dimension, the
name of each coordinate, and how to decode a genome into a Recipe.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence

from ..recipe import Recipe


class SearchSpace(abc.ABC):
    """Maps genomes to recipes, and answers every question that depends on the kind of space, so no caller switches
    on it.  Concrete spaces: `ParameterSpace` (ps), `DataflowSpace` (dfs, ps+dfs; one subclass per layout)."""

    kind: str
    method: str
    parents: list[str]
    base: str | None

    @property
    @abc.abstractmethod
    def names(self) -> list[str]:
        """One readable name per genome coordinate, e.g. ``layers.3/weight/up``."""

    @property
    def dimension(self) -> int:
        return len(self.names)

    def x0(self) -> list[float]:
        return [0.5] * self.dimension

    def categories(self) -> list[int]:
        """Per coordinate: 0 for continuous, n >= 2 for a choice among n categories (for mixed optimizers)."""
        return [0] * self.dimension

    @abc.abstractmethod
    def decode(self, genome: Sequence[float], seed: int = 0) -> Recipe:
        """The recipe a genome stands for; coordinates outside [0, 1] are clipped."""

    def signature(self) -> dict:
        """What a stored study must share with this space to be resumed with it."""
        return {"kind": self.kind, "method": self.method_name, "names": self.names, "parents": self.parents,
                "base": self.base}

    @property
    def method_name(self) -> str:
        """The merge method its recipes use (data-flow recipes run as paths: ``passthrough``)."""
        return "passthrough"

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for `run`: the kind, the method and how the genome is grouped."""

    @abc.abstractmethod
    def references(self) -> list[tuple[str, Recipe]]:
        """The final table's reference rows, labelled: the base and each parent (and model A) as recipes."""

    def uniform_grid(self, weights: Sequence[float], densities: Sequence[float], seed: int = 0) -> list[Recipe]:
        """The uniform merges the best-uniform baseline picks from (none where the space has no uniform merge)."""
        return []
