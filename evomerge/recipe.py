"""A Recipe is plain data: everything needed to rebuild one merged model, and nothing else.

The optimizer never sees tensors and the merge engine never sees the optimizer; search spaces translate genomes into
Recipes.  Every stored trial keeps its Recipe, so any trial can be re-materialized, exported or re-scored later.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

FORMAT = "evomerge-recipe/1"


@dataclass
class Recipe:
    """One merged model.

    ``groups`` maps a merge group (``embed``, ``layers.<i>``, ``head``) to its per-parent tensor parameters, e.g.
    ``{"layers.0": {"weight": [0.7, 0.2], "density": [0.9, 0.5]}}``, lists aligned with ``parents``.
    A layer may be split into module groups ``layers.<i>.<filter>`` (e.g. ``self_attn``, ``mlp``): tensors of layer
    i whose names contain the filter take that group's values (the first matching group, in the recipe's order), the
    rest of the layer (its norms) ``layers.<i>``'s.
    ``options`` holds the method's global options (``normalize``, ``rescale``).  ``seed`` fixes DARE's random drops.
    ``tokenizer_source`` (mergekit's meaning): ``base`` (None: the same), ``union``, or one model's path; it decides
    the rows of embeddings and head when parents added tokens.

    ``path`` (data-flow recipes, method ``passthrough``) is a layer path: ``layers`` lists ``[model, layer]`` per
    position and ``scales`` the factor on the hidden state entering it.  Model indices refer to ``parents``, preceded,
    when ``path.a`` holds a parameter-space recipe (PS+DFS), by that recipe's merge as model 0.
    """

    method: str
    parents: list[str]
    groups: dict[str, dict[str, list[float]]]
    base: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    seed: int = 0
    path: dict[str, Any] | None = None
    tokenizer_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"format": FORMAT, **asdict(self)}
        if data["tokenizer_source"] is None:
            del data["tokenizer_source"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        data = {k: v for k, v in data.items() if k != "format"}
        return cls(**data)

    def with_paths_relative_to(self, directory: Path) -> Recipe:
        """A copy whose local model paths are written relative to `directory` (where the YAML will live)."""
        def rel(p: str | None) -> str | None:
            if p is None or not Path(p).is_absolute():
                return p
            return os.path.relpath(p, directory)

        path = self.path
        if path and path.get("a"):
            path = {**path, "a": Recipe.from_dict(path["a"]).with_paths_relative_to(directory).to_dict()}
        tok = self.tokenizer_source
        return Recipe(**{**asdict(self), "base": rel(self.base), "parents": [rel(p) for p in self.parents],
                         "path": path, "tokenizer_source": tok if tok in (None, "base", "union") else rel(tok)})

    def save(self, path: str | Path) -> Path:
        """Write the recipe as YAML, model paths relative to the file so the pair can be moved together."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.with_paths_relative_to(path.resolve().parent).to_dict()
        path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
        return path
