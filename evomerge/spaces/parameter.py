"""Parameter space (ps): per merge group and parent, the method's searched parameters: weight and density where the
method has them, slerp's t.  Parameters not searched (della's epsilon, breadcrumbs' gamma) take fixed values.

Groups are the model's embeddings, its decoder layers (one group per `layer_granularity` layers; 0: all layers one
group, as mergekit-evolve) and its head (final norm and LM head).  With `filters` (``["self_attn", "mlp"]`` for
granularity ``module``; any tensor-name substrings, as mergekit-evolve's ``filters``) each layer group is searched
once per filter plus once for the rest, so a layer's attention, MLP and norms get their own values.  Groups a preset
does not search take the preset's fixed values, so a 2-parent, 32-layer, weight-only preset over layers alone is the
64-dimensional space of the literature.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Range
from ..methodspec import get_spec
from ..recipe import Recipe
from .base import Resident, SearchSpace

if TYPE_CHECKING:
    import torch

    from ..config import StudyConfig


class ParameterSpace(SearchSpace):
    kind = "ps"
    kinds = ("ps",)

    @classmethod
    def load(cls, cfg: StudyConfig, device: torch.device) -> Resident:
        """The parents resident in the memory mode the study's plan picked; candidates are merged into one model in
        place, with the merged vocabulary's tokenizer when `merge.tokenizer_source` builds one."""
        from ..merge import Materializer
        from ..merge.plan import study_plan

        plan = study_plan(cfg, device)
        m = Materializer(cfg.models.base, cfg.models.parents, device, cfg.merge.dtype,
                         mode=plan.mode if plan else "resident", tokenizer_source=cfg.merge.tokenizer_source,
                         rank_table=plan is None or plan.row_ranks != "sorted")
        return Resident(m, m.model, m.vocab.tokenizer if m.vocab else None, m.materialize)

    @classmethod
    def write_model(cls, recipe: Recipe, out_dir: Path, device: torch.device, max_shard_bytes: int) -> Path:
        from ..merge import write_model

        return write_model(recipe, out_dir, device, max_shard_bytes=max_shard_bytes)

    def __init__(self, *, method: str, parents: list[str], base: str | None, num_layers: int,
                 ranges: dict[str, Range], fixed: dict[str, float], searched_groups: Sequence[str] = ("embed", "layers", "head"),
                 layer_granularity: int = 1, filters: Sequence[str] = (), x0: dict[str, float] | None = None,
                 options: dict | None = None, dtype: str = "float32", tokenizer_source: str | None = None):
        self.method = get_spec(method)
        self.parents = list(parents)
        self.base = base
        self.num_layers = num_layers
        self.ranges = {p: r for p, r in ranges.items() if p in self.method.tensor_params}
        self.fixed = fixed
        self.searched = set(searched_groups)
        self.granularity = layer_granularity or num_layers
        self.filters = list(filters)
        self.start = dict(x0 or {})
        self.tokenizer_source = tokenizer_source
        self.options = dict(options or {})
        self.dtype = dtype
        self._blocks = self._make_blocks()
        self._names = [
            f"{block}/{param}/{Path(parent).name}"
            for block in self._blocks
            if self._is_searched(block)
            for param in self.ranges
            for parent in self.parents
        ]

    def _make_blocks(self) -> dict[str, list[str]]:
        """Searchable blocks (one genome slice each) and the merge groups each one sets."""
        blocks = {"embed": ["embed"]}
        for start in range(0, self.num_layers, self.granularity):
            stop = min(start + self.granularity, self.num_layers)
            name = f"layers.{start}" if stop - start == 1 else f"layers.{start}-{stop - 1}"
            blocks[name] = [f"layers.{i}" for i in range(start, stop)]
            for f in self.filters:
                blocks[f"{name}.{f}"] = [f"layers.{i}.{f}" for i in range(start, stop)]
        blocks["head"] = ["head"]
        return blocks

    def _is_searched(self, block: str) -> bool:
        return block.split(".")[0] in self.searched

    @property
    def names(self) -> list[str]:
        return self._names

    def x0(self) -> list[float]:
        """The centre of the cube, or where `x0` puts a parameter (in its own units, e.g. mergekit-evolve's weight
        1/n and density 1), mapped into the cube."""
        def unit(param: str) -> float:
            r = self.ranges[param]
            if param not in self.start or r.high == r.low:
                return 0.5
            return min(max((self.start[param] - r.low) / (r.high - r.low), 0.0), 1.0)

        return [unit(name.split("/")[1]) for name in self._names]

    def decode(self, genome: Sequence[float], seed: int = 0) -> Recipe:
        if len(genome) != self.dimension:
            raise ValueError(f"genome has {len(genome)} coordinates; this space has {self.dimension}")
        n = len(self.parents)
        it = iter(genome)
        groups: dict[str, dict[str, list[float]]] = {}
        for block, members in self._blocks.items():
            values = {p: [self._fixed(p)] * n for p in self.method.tensor_params}
            if self._is_searched(block):
                values.update({p: [r.at(next(it)) for _ in range(n)] for p, r in self.ranges.items()})
            for m in members:
                groups[m] = {p: list(v) for p, v in values.items()}
        return Recipe(method=self.method.name, parents=self.parents, base=self.base, groups=groups,
                      options=self.options, dtype=self.dtype, seed=seed, tokenizer_source=self.tokenizer_source)

    def _fixed(self, param: str) -> float:
        """A value for a parameter this space does not search: the preset's, else the method's default."""
        default = self.method.tensor_params[param]
        return self.fixed.get(param, 0.5 if default is None else default)

    def uniform(self, weight: float, density: float | None = None, seed: int = 0) -> Recipe:
        """The same method with one weight (and density) for every group and parent: the baseline search must beat."""
        values = {p: self._fixed(p) for p in self.method.tensor_params}
        if "weight" in values:
            values["weight"] = weight
        if "density" in values:
            values["density"] = 1.0 if density is None else density
        n = len(self.parents)
        groups = {m: {p: [v] * n for p, v in values.items()} for ms in self._blocks.values() for m in ms}
        return Recipe(method=self.method.name, parents=self.parents, base=self.base, groups=groups,
                      options=self.options, dtype=self.dtype, seed=seed, tokenizer_source=self.tokenizer_source)

    @property
    def method_name(self) -> str:
        return self.method.name

    def describe(self) -> str:
        grain = f"groups by {'/'.join(self.filters)} and the rest" if self.filters else "layer groups"
        return f"{self.kind} ({self.method.name}, {grain})"

    def references(self) -> list[tuple[str, Recipe]]:
        """The base (a zero-weight task arithmetic, if a base is set) and each parent alone (a one-hot linear)."""
        n = len(self.parents)
        groups = [m for ms in self._blocks.values() for m in ms]

        def uniform(method: str, weights: list[float]) -> Recipe:
            return Recipe(method, self.parents, {g: {"weight": list(weights)} for g in groups}, self.base)

        rows = [("base", uniform("task_arithmetic", [0.0] * n))] if self.base else []
        return rows + [(f"parent {Path(p).name}", uniform("linear", [float(j == i) for j in range(n)]))
                       for i, p in enumerate(self.parents)]

    def uniform_grid(self, weights: Sequence[float], densities: Sequence[float], seed: int = 0) -> list[Recipe]:
        """The study's method with one weight (and density, where it has one) everywhere, over the baseline grid."""
        has_density = "density" in self.method.tensor_params
        return [self.uniform(w, d, seed=seed)
                for w, d in itertools.product(weights, densities if has_density else [None])]
