"""Loading a recipe file, evomerge's own or a mergekit config, into a `Recipe`: the schema, then model paths resolved
against the file's folder and every model read as far as its headers, before any tensor is read.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator

from .config import MAX_SEED, ConfigError, Strict
from .mergekit import check_sections, from_mergekit, is_mergekit, model_for
from .methodspec import InvalidRecipe, check_recipe
from .recipe import Dtype, LayerPath, Recipe
from .userfile import check_path, exists_as, load_yaml, raise_first, resolve

if TYPE_CHECKING:
    from .io import ModelInfo


class RecipeFile(Strict):
    """An evomerge recipe file (what `evomerge export` writes): the `Recipe` fields, checked."""

    format: Literal["evomerge-recipe/1"] = "evomerge-recipe/1"
    method: str
    base: str | None = None
    parents: list[str] = Field(..., min_length=1)
    groups: dict[str, dict[str, list[float]]]
    options: dict[str, Any] = Field(default_factory=dict)
    dtype: Dtype = "float32"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    path: LayerPath | None = None
    tokenizer_source: str | None = Field(None, description="base (default), union, or a model directory")

    @model_validator(mode="after")
    def _path_is_passthrough(self) -> RecipeFile:
        if self.path is not None and self.method != "passthrough":
            raise ValueError("a layer path goes with method passthrough")
        return self


def load_recipe(path: str | Path, notes: list[str] | None = None) -> Recipe:
    """Parse and validate a recipe YAML, evomerge's own or a mergekit config; model paths resolve relative to the file.

    Everything is checked before any tensor is read: method, parameters and their ranges, model count, base model.
    mergekit settings read but not needed add a line to `notes`.
    """
    path = Path(path)
    data = load_yaml(path, "recipe")
    if is_mergekit(data):
        return _load_mergekit(path, data, notes)
    return _recipe_from(path, data, "")


def _recipe_from(path: Path, data: dict, prefix: str) -> Recipe:
    try:
        rf = RecipeFile.model_validate(data)
    except ValidationError as err:
        raise_first(path, err, prefix)
    if rf.path is None:
        try:
            check_recipe(rf.method, rf.base, rf.parents, rf.groups, rf.options)
        except InvalidRecipe as e:
            raise ConfigError(path, prefix + e.field, e.message) from None
    d = path.parent
    base = resolve(d, rf.base) if rf.base else None
    parents = [resolve(d, p) for p in rf.parents]
    infos = _check_dirs(path, [(prefix + "base", base)] + [(f"{prefix}parents.{i}", p) for i, p in enumerate(parents)])
    layer_path = None
    if rf.path is not None:
        layer_path = rf.path.model_dump(exclude_none=True)
        layer_path["layers"] = [list(x) for x in rf.path.layers]
        if rf.path.a is not None:
            a = _recipe_from(path, rf.path.a, prefix + "path.a.")
            if a.path is not None:
                raise ConfigError(path, prefix + "path.a", "model A must be a parameter-space recipe (no path)")
            layer_path["a"] = a.to_dict()
        _check_path_indices(path, prefix, layer_path, parents, infos)
    tok = rf.tokenizer_source
    if tok not in (None, "base", "union"):
        tok = resolve(d, tok)
        if tok not in [base, *parents]:
            raise ConfigError(path, prefix + "tokenizer_source", f"{rf.tokenizer_source!r} is not base, union, "
                                                                 "nor the base or a parent of this recipe")
    return Recipe(method=rf.method, parents=parents, base=base, groups={g: dict(v) for g, v in rf.groups.items()},
                  options=rf.options, dtype=rf.dtype, seed=rf.seed, path=layer_path, tokenizer_source=tok)


def _check_path_indices(path: Path, prefix: str, layer_path: dict, parents: list[str],
                        infos: dict[str, ModelInfo]) -> None:
    """Every [model, layer] must exist; checked from the model headers (`infos`, read once), before any weight is
    read."""
    from .io import inspect_model

    a = layer_path.get("a")
    sources = ([a["base"] or a["parents"][0]] if a else []) + parents
    counts = [(infos.get(s) or inspect_model(s)).num_layers for s in sources]
    for k, (m, layer) in enumerate(layer_path["layers"]):
        if not 0 <= m < len(sources):
            raise ConfigError(path, f"{prefix}path.layers.{k}", f"model {m} does not exist; models are 0..{len(sources) - 1}"
                              + (" (0 is the merge of path.a, then parents)" if a else " (indices into parents)"))
        if not 0 <= layer < counts[m]:
            raise ConfigError(path, f"{prefix}path.layers.{k}", f"model {m} has layers 0..{counts[m] - 1}, not {layer}")


def _check_dirs(path: Path, fields: list[tuple[str, str | None]],
                known: dict[str, ModelInfo] | None = None) -> dict[str, ModelInfo]:
    """Each model directory exists and its config.json and weight headers read (those in `known` were read
    already); errors name the recipe's field.  Returns every model's headers by path."""
    from .io import ModelFilesError, inspect_model

    infos = dict(known or {})
    for field, p in fields:
        if p is None or p in infos:
            continue
        check_path(path, field, p)
        if not exists_as(p):
            raise ConfigError(path, field, f"model directory {p} does not exist")
        try:
            infos[p] = inspect_model(p)
        except ModelFilesError as e:
            raise ConfigError(path, field, str(e)) from None
    return infos


def _load_mergekit(path: Path, data: dict, notes: list[str] | None = None) -> Recipe:
    """A mergekit config: its models must be local directories (evomerge never downloads)."""
    from .io import ModelFilesError

    try:
        check_sections(data)
    except InvalidRecipe as e:
        raise ConfigError(path, e.field, e.message) from None
    ref = model_for(data)
    if ref is None:
        raise ConfigError(path, "models", "no model named (base_model, models or slices)")
    ref_dir = resolve(path.parent, ref)
    known = _check_dirs(path, [("base_model" if data.get("base_model") else "models", ref_dir)])
    try:
        info = known[ref_dir]
        recipe = from_mergekit(data, info, lambda p: resolve(path.parent, p), notes)
        check_recipe(recipe.method, recipe.base, recipe.parents, recipe.groups, recipe.options)
    except InvalidRecipe as e:
        raise ConfigError(path, e.field, e.message) from None
    except ModelFilesError as e:
        raise ConfigError(path, "models", str(e)) from None
    _check_dirs(path, [("base_model", recipe.base)] + [(f"models.{i}", p) for i, p in enumerate(recipe.parents)], known)
    return recipe


def mergekit_yaml(recipe: Recipe, directory: Path) -> str:
    """`recipe` as a mergekit config for a file in `directory` (paths relative to it); a layer path has no mergekit
    form."""
    import yaml

    from .io import inspect_model
    from .mergekit import to_mergekit

    if recipe.path is not None:
        raise ValueError("a data-flow (layer path) recipe has no mergekit form; write the model with `evomerge merge`")
    data = to_mergekit(recipe.with_paths_relative_to(directory), inspect_model(recipe.base or recipe.parents[0]))
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def write_recipe(recipe: Recipe, path: Path, fmt: str = "evomerge", header: Sequence[str] = ()) -> None:
    """The recipe as YAML, evomerge's (`Recipe.to_yaml`) or mergekit's, headed by `header` comment lines."""
    directory = path.resolve().parent
    text = mergekit_yaml(recipe, directory) if fmt == "mergekit" else recipe.to_yaml(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in header) + text)
