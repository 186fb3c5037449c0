"""A Recipe is plain data: everything needed to rebuild one merged model, and nothing else.

The optimizer never sees tensors and the merge engine never sees the optimizer; search spaces translate genomes into
Recipes.  Every stored trial keeps its Recipe, so any trial can be re-materialized, exported or re-scored later.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import EvomergeError

FORMAT = "evomerge-recipe/1"

# the dtypes a candidate can be merged in; torch's are derived from these names where torch is used
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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

    def to_yaml(self, directory: Path) -> str:
        """The recipe as YAML for a file in `directory`, model paths relative to it so the pair moves together."""
        return yaml.safe_dump(self.with_paths_relative_to(directory).to_dict(), sort_keys=False,
                              default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        """Write the recipe as YAML, model paths relative to the file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(path.resolve().parent))
        return path


class PathError(EvomergeError, ValueError):
    """A layer path that cannot run or be exported (empty, out of range, incompatible models)."""


@dataclass(frozen=True)
class Step:
    """One path position: the decoder `layer` of source `model`, entered by the stream times `scale`."""

    model: int
    layer: int
    scale: float = 1.0


class LayerPath(BaseModel):
    """A recipe's ``path`` checked once, by the same rules whether it comes from a recipe file (errors name the
    field) or from a stored trial: at least one ``[model, layer]``, one positive scale per position if scales are
    given.  ``a`` (PS+DFS) is a parameter-space recipe whose merge is model 0."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    layers: list[tuple[int, int]] = Field(..., description="[model, layer] per path position")
    scales: list[float] | None = None
    a: dict[str, Any] | None = None

    @field_validator("layers")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        if not v:
            raise ValueError("the layer path is empty: at least one [model, layer] is needed")
        return v

    @model_validator(mode="after")
    def _shape(self) -> LayerPath:
        if self.scales is not None:
            if len(self.scales) != len(self.layers):
                raise ValueError(f"{len(self.scales)} scales for {len(self.layers)} layers")
            if any(s <= 0 for s in self.scales):
                raise ValueError("scales must be > 0 (a scale <= 0 erases or flips the hidden state)")
        return self

    @classmethod
    def of(cls, path: dict[str, Any]) -> LayerPath:
        """A stored recipe's path mapping, checked; `PathError` with the first broken rule otherwise."""
        try:
            return cls.model_validate(path)
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(str(p) for p in e["loc"])
            raise PathError(f"path{'.' + where if where else ''}: {e['msg'].removeprefix('Value error, ')}") from None

    @property
    def steps(self) -> list[Step]:
        scales = self.scales or [1.0] * len(self.layers)
        return [Step(m, layer, s) for (m, layer), s in zip(self.layers, scales)]
