"""The search-space interface: genome (unit cube) <-> Recipe.

Optimizers work in [0, 1]^d with the published defaults x0 = 0.5, sigma0 = 1/6; a space knows its dimension, the
name of each coordinate, and how to decode a genome into a Recipe.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..recipe import Recipe

if TYPE_CHECKING:
    import torch

    from ..config import StudyConfig


@dataclass(frozen=True)
class Resident:
    """What a worker keeps loaded for one kind of space: the model object lm-eval wraps (every candidate runs through
    it), the merged vocabulary's tokenizer when the space brings one, and how a recipe is put into that model in
    place.  `engine` (the `Materializer` or `Dataflow`) is kept so its sources can be inspected."""

    engine: Any
    model: Any
    tokenizer: Any | None
    apply: Callable[[Recipe], object]


class SearchSpace(abc.ABC):
    """Maps genomes to recipes, and answers every question that depends on the kind of space, so no caller switches
    on it.  Concrete spaces: `ParameterSpace` (ps), `DataflowSpace` (dfs, ps+dfs; one subclass per layout)."""

    kind: str
    kinds: ClassVar[tuple[str, ...]] = ()  # the study-file kinds this class serves (set on the concrete classes)
    by_kind: ClassVar[dict[str, type[SearchSpace]]] = {}
    method: str
    parents: list[str]
    base: str | None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for kind in cls.__dict__.get("kinds", ()):
            SearchSpace.by_kind[kind] = cls

    @staticmethod
    def of_kind(kind: str) -> type[SearchSpace]:
        """The space class a study file's ``search_space.kind`` names: what a worker asks before any space is built
        (building one reads model headers and, for ps+dfs, the study DB)."""
        return SearchSpace.by_kind[kind]

    @staticmethod
    def of_recipe(recipe: Recipe) -> type[SearchSpace]:
        """The space class whose recipes look like `recipe`: a layer path is a data-flow recipe, anything else merges
        parameters."""
        return SearchSpace.by_kind["ps" if recipe.path is None else "dfs"]

    @classmethod
    @abc.abstractmethod
    def load(cls, cfg: StudyConfig, device: torch.device) -> Resident:
        """Load what every candidate of this kind of space runs on, once per worker."""

    @classmethod
    @abc.abstractmethod
    def write_model(cls, recipe: Recipe, out_dir: Path, device: torch.device, max_shard_bytes: int) -> Path:
        """Write one of this space's recipes as a Hugging Face model directory (`evomerge merge`)."""

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
