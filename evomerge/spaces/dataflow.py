"""Data-flow space (dfs, ps+dfs): which layers of which model a token passes through, and how its stream is scaled.

Two layouts of the genome:

* ``published`` (the literature's DFS): the layers of all source models laid out in order (A's, then B's, ...) and
  repeated ``repeats`` times, ``T = M x repeats`` slots; per slot an include/skip choice and a scale for the hidden
  state entering that layer.  The path always starts with A's first layer and ends with A's last (both unscaled), and
  embeddings and head are A's.  Dimension ``2 T``.
* ``positions`` (the shape of SMM-Bench: for two 32-layer models, 32 categorical variables of 3 categories plus 63
  continuous): per depth ``k`` one choice among A's layer k, B's layer k, or skip; and a scale for each
  (depth, source) pair the stream can enter, except A's first layer, which receives A's embeddings unscaled
  (``2 L - 1`` scales).  Dimension ``L + 2 L - 1``.

Categorical coordinates live in the unit interval like the rest: category ``min(floor(x * n), n - 1)``.  For an
include/skip pair that is "include when x >= 0.5", the unit-cube form of the published rule "indicator > 0" under
CMA-ES; CatCMA proposes category centres ``(i + 0.5) / n``.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Range
from ..recipe import Recipe
from .base import Resident, SearchSpace

if TYPE_CHECKING:
    import torch

    from ..config import StudyConfig


def category(x: float, n: int) -> int:
    return min(max(int(x * n), 0), n - 1)


class DataflowSpace(SearchSpace):
    """Genome -> layer path over resident sources (model A first); one subclass per layout (see the module
    docstring).  ``DataflowSpace(..., layout=...)`` builds the layout's class."""

    kinds = ("dfs", "ps+dfs")
    layouts: dict[str, type[DataflowSpace]] = {}
    layout: str

    @classmethod
    def load(cls, cfg: StudyConfig, device: torch.device) -> Resident:
        """Source models loaded once (model A merged once for ps+dfs, on the first recipe that names it); a candidate
        is a layer path run through one shell built from the first parent, which is what lm-eval wraps."""
        from ..dataflow import Dataflow

        d = Dataflow(cfg.models.parents[0], device, cfg.candidate_dtype())
        return Resident(d, d.model, None, d.apply)

    @classmethod
    def write_model(cls, recipe: Recipe, out_dir: Path, device: torch.device, max_shard_bytes: int) -> Path:
        """The path's layers copied into a plain model directory (unsharded: a path is at most its sources' size)."""
        from ..dataflow import write_path_model

        return write_path_model(recipe, out_dir, device)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        DataflowSpace.layouts[cls.layout] = cls

    def __new__(cls, *args, layout: str = "published", **kwargs):
        if cls is DataflowSpace:
            if layout not in cls.layouts:
                raise ValueError(f"unknown data-flow layout {layout!r}; allowed: {', '.join(cls.layouts)}")
            cls = cls.layouts[layout]
        return super().__new__(cls)

    def __init__(self, *, parents: list[str], num_layers: list[int], scale: Range, repeats: int = 3,
                 layout: str = "published", a: dict | None = None, dtype: str = "float32", base: str | None = None,
                 a_study: str | None = None):
        self.kind = "ps+dfs" if a else "dfs"
        self.parents = list(parents)
        self.a = a
        self.a_study = a_study
        self.base = base
        self.num_layers = list(num_layers)
        self.scale = scale
        self.repeats = repeats
        self.dtype = dtype
        self.labels = (["A"] if a else []) + [Path(p).name for p in self.parents]

    @property
    def names(self) -> list[str]:
        return self._names

    def categories(self) -> list[int]:
        return self._categories

    def _unscaled(self) -> float:
        """Where in the unit interval a scale of 1.0 lies (the start of every scale coordinate)."""
        one = (1.0 - self.scale.low) / (self.scale.high - self.scale.low) if self.scale.high > self.scale.low else 0.5
        return min(max(one, 0.0), 1.0)

    def decode(self, genome: Sequence[float], seed: int = 0) -> Recipe:
        if len(genome) != self.dimension:
            raise ValueError(f"genome has {len(genome)} coordinates; this space has {self.dimension}")
        return self.recipe(self.steps(genome), seed)

    @abc.abstractmethod
    def steps(self, genome: Sequence[float]) -> list[tuple[int, int, float]]:
        """The path a genome stands for, as ``(model, layer, scale)`` steps."""

    def recipe(self, steps: list[tuple[int, int, float]], seed: int = 0) -> Recipe:
        path = {"layers": [[m, k] for m, k, _ in steps], "scales": [s for _, _, s in steps]}
        if self.a:
            path["a"] = self.a
        return Recipe(method="passthrough", parents=self.parents, groups={}, dtype=self.dtype, seed=seed, path=path)

    def identity(self, model: int) -> Recipe:
        """One source model's own path (every layer once, unscaled): the parent rows of the final table."""
        return self.recipe([(model, k, 1.0) for k in range(self.num_layers[model])])

    def signature(self) -> dict:
        """A changed model A (its study found a better recipe) is a different study."""
        return {**super().signature(), "a": self.a}

    def describe(self) -> str:
        return f"{self.kind} (passthrough)"

    def references(self) -> list[tuple[str, Recipe]]:
        """Base (if set), model A and each parent run as their own unscaled paths."""
        from ..io import inspect_model

        rows = []
        if self.base:
            layers = [[0, i] for i in range(inspect_model(self.base).num_layers)]
            rows.append(("base", Recipe("passthrough", [self.base], {}, path={"layers": layers})))
        labels = ([f"model A (best of {self.a_study})"] if self.a else []) + [
            f"parent {Path(p).name}" for p in self.parents]
        return rows + [(label, self.identity(m)) for m, label in enumerate(labels)]


class PublishedLayout(DataflowSpace):
    """The literature's DFS: ``T = M x repeats`` slots, an include/skip choice and a scale per slot."""

    layout = "published"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.slots = [(m, k) for _ in range(self.repeats) for m, n in enumerate(self.num_layers) for k in range(n)]
        slot_names = [f"slot{t}:{self.labels[m]}.{k}" for t, (m, k) in enumerate(self.slots)]
        self._names = [f"{s}/include" for s in slot_names] + [f"{s}/scale" for s in slot_names]
        self._categories = [2] * len(self.slots) + [0] * len(self.slots)

    def x0(self) -> list[float]:
        """The search starts around model A's own path, unscaled: scales at 1.0, A's inner layers of the first repeat
        leaning to include (0.85) and every other slot to skip (0.1).  From the centre of the cube (half of all
        slots included) nearly every path is far from any working model."""
        last = self.num_layers[0] - 1
        lean = [0.85 if t < self.num_layers[0] and 0 < k < last else 0.1 for t, (m, k) in enumerate(self.slots)]
        return lean + [self._unscaled()] * len(self.slots)

    def steps(self, genome: Sequence[float]) -> list[tuple[int, int, float]]:
        t = len(self.slots)
        inner = [(m, k, self.scale.at(genome[t + i])) for i, (m, k) in enumerate(self.slots) if category(genome[i], 2)]
        return [(0, 0, 1.0), *inner, (0, self.num_layers[0] - 1, 1.0)]


class PositionsLayout(DataflowSpace):
    """SMM-Bench's shape: per depth one choice among A's layer, B's layer or skip, and a scale per entry point."""

    layout = "positions"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if len(self.num_layers) != 2 or self.num_layers[0] != self.num_layers[1]:
            raise ValueError("layout 'positions' needs exactly two source models with the same number of layers")
        depth = self.num_layers[0]
        self.scale_keys = [(m, k) for k in range(depth) for m in (0, 1) if (m, k) != (0, 0)]
        self._names = ([f"depth{k}/choice" for k in range(depth)]
                       + [f"depth{k}/scale/{self.labels[m]}" for m, k in self.scale_keys])
        self._categories = [3] * depth + [0] * len(self.scale_keys)

    def x0(self) -> list[float]:
        """Choices at the centre, scales at 1.0 (model A's own path, unscaled, is one step away)."""
        return [0.5 if n else self._unscaled() for n in self._categories]

    def steps(self, genome: Sequence[float]) -> list[tuple[int, int, float]]:
        depth = self.num_layers[0]
        scales = {key: self.scale.at(x) for key, x in zip(self.scale_keys, genome[depth:])}
        scales[(0, 0)] = 1.0
        steps = []
        for k in range(depth):
            m = category(genome[k], 3)
            if m < 2:
                steps.append((m, k, scales[(m, k)]))
        return steps
