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

from collections.abc import Sequence
from pathlib import Path

from ..config import Range
from ..recipe import Recipe
from .base import SearchSpace


def category(x: float, n: int) -> int:
    return min(max(int(x * n), 0), n - 1)


class DataflowSpace(SearchSpace):
    """Genome -> layer path over resident sources (model A first); see the module docstring for the layouts."""

    def __init__(self, *, parents: list[str], num_layers: list[int], scale: Range, repeats: int = 3,
                 layout: str = "published", a: dict | None = None, dtype: str = "float32"):
        self.kind = "ps+dfs" if a else "dfs"
        self.parents = list(parents)
        self.a = a
        self.num_layers = list(num_layers)
        self.scale = scale
        self.repeats = repeats
        self.layout = layout
        self.dtype = dtype
        labels = (["A"] if a else []) + [Path(p).name for p in self.parents]
        if layout == "published":
            self.slots = [(m, l) for _ in range(repeats) for m, n in enumerate(self.num_layers) for l in range(n)]
            slot_names = [f"slot{t}:{labels[m]}.{l}" for t, (m, l) in enumerate(self.slots)]
            self._names = [f"{s}/include" for s in slot_names] + [f"{s}/scale" for s in slot_names]
            self._categories = [2] * len(self.slots) + [0] * len(self.slots)
        elif layout == "positions":
            if len(self.num_layers) != 2 or self.num_layers[0] != self.num_layers[1]:
                raise ValueError("layout 'positions' needs exactly two source models with the same number of layers")
            depth = self.num_layers[0]
            self.scale_keys = [(m, k) for k in range(depth) for m in (0, 1) if (m, k) != (0, 0)]
            self._names = ([f"depth{k}/choice" for k in range(depth)]
                           + [f"depth{k}/scale/{labels[m]}" for m, k in self.scale_keys])
            self._categories = [3] * depth + [0] * len(self.scale_keys)
        else:
            raise ValueError(f"unknown data-flow layout {layout!r}; allowed: published, positions")

    @property
    def names(self) -> list[str]:
        return self._names

    def categories(self) -> list[int]:
        return self._categories

    def x0(self) -> list[float]:
        """The search starts around model A's own path, unscaled: scales at 1.0; in the published layout, A's inner
        layers of the first repeat leaning to include (0.85) and every other slot to skip (0.1).  From the centre of
        the cube (half of all slots included) nearly every path is far from any working model."""
        one = (1.0 - self.scale.low) / (self.scale.high - self.scale.low) if self.scale.high > self.scale.low else 0.5
        one = min(max(one, 0.0), 1.0)
        if self.layout != "published":
            return [0.5 if n else one for n in self._categories]
        last = self.num_layers[0] - 1
        lean = [0.85 if t < self.num_layers[0] and 0 < l < last else 0.1 for t, (m, l) in enumerate(self.slots)]
        return lean + [one] * len(self.slots)

    def decode(self, genome: Sequence[float], seed: int = 0) -> Recipe:
        if len(genome) != self.dimension:
            raise ValueError(f"genome has {len(genome)} coordinates; this space has {self.dimension}")
        steps = self._published(genome) if self.layout == "published" else self._positions(genome)
        return self.recipe(steps, seed)

    def recipe(self, steps: list[tuple[int, int, float]], seed: int = 0) -> Recipe:
        path = {"layers": [[m, l] for m, l, _ in steps], "scales": [s for _, _, s in steps]}
        if self.a:
            path["a"] = self.a
        return Recipe(method="passthrough", parents=self.parents, groups={}, dtype=self.dtype, seed=seed, path=path)

    def identity(self, model: int) -> Recipe:
        """One source model's own path (every layer once, unscaled): the parent rows of the final table."""
        return self.recipe([(model, l, 1.0) for l in range(self.num_layers[model])])

    def _published(self, genome: Sequence[float]) -> list[tuple[int, int, float]]:
        t = len(self.slots)
        inner = [(m, l, self.scale.at(genome[t + i])) for i, (m, l) in enumerate(self.slots) if category(genome[i], 2)]
        return [(0, 0, 1.0), *inner, (0, self.num_layers[0] - 1, 1.0)]

    def _positions(self, genome: Sequence[float]) -> list[tuple[int, int, float]]:
        depth = self.num_layers[0]
        scales = {key: self.scale.at(x) for key, x in zip(self.scale_keys, genome[depth:])}
        scales[(0, 0)] = 1.0
        steps = []
        for k in range(depth):
            m = category(genome[k], 3)
            if m < 2:
                steps.append((m, k, scales[(m, k)]))
        return steps
