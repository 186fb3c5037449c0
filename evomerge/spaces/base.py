"""The search-space interface: genome (unit cube) <-> Recipe.

Optimizers work in [0, 1]^d with the published defaults x0 = 0.5, sigma0 = 1/6; a space knows its dimension, the
name of each coordinate, and how to decode a genome into a Recipe.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence

from ..recipe import Recipe


class SearchSpace(abc.ABC):
    """Maps genomes to recipes.  Concrete spaces: `ParameterSpace` (ps), `DataflowSpace` (dfs, ps+dfs)."""

    kind: str

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
