"""study.yaml and recipe.yaml, validated: every error names the file, the field and what is allowed.

Paths inside a file are relative to that file.  Search-space presets are YAML files under ``search_spaces/`` (or any
path); the study may override any preset field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .merge.methods import METHODS, InvalidRecipe, validate
from .mergekit import from_mergekit, is_mergekit, model_for
from .recipe import Recipe

PRESETS_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


class ConfigError(ValueError):
    """Bad input in a user file; the CLI prints it and exits with code 2."""

    def __init__(self, file: str | Path, field: str, message: str):
        self.file, self.field, self.message = str(file), field, message
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelsConfig(_Strict):
    base: str | None = Field(None, description="common ancestor; needed by task-vector methods")
    parents: list[str] = Field(..., min_length=1)


class MergeConfig(_Strict):
    method: str = "ties"
    options: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown merge method {v!r}; allowed: {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _options_known(self) -> MergeConfig:
        allowed = METHODS[self.method].options
        for k in self.options:
            if k not in allowed:
                raise ValueError(f"option {k!r} is not one of {self.method}'s options: {', '.join(allowed) or 'none'}")
        return self


class RangeConfig(_Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> RangeConfig:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class SearchSpaceConfig(_Strict):
    """A `ps` preset (file under search_spaces/) plus any overrides in the study."""

    kind: Literal["ps"] = "ps"
    layer_granularity: int = Field(1, ge=1)
    groups: list[Literal["embed", "layers", "head"]] = Field(default_factory=lambda: ["embed", "layers", "head"])
    weight: RangeConfig = RangeConfig(low=0.0, high=1.0)
    density: RangeConfig = RangeConfig(low=0.1, high=1.0)
    fixed: dict[Literal["weight", "density"], float] = Field(default_factory=lambda: {"weight": 0.5, "density": 1.0})

    @model_validator(mode="after")
    def _density_in_range(self) -> SearchSpaceConfig:
        if self.density.low <= 0 or self.density.high > 1:
            raise ValueError("density range must lie within (0, 1]")
        return self


class OptimizerConfig(_Strict):
    name: Literal["cmaes"] = "cmaes"
    sigma0: float = Field(1 / 6, gt=0)
    popsize: int | None = Field(None, ge=2)


class TaskConfig(_Strict):
    task: str = Field(..., description="lm-eval task name (from fitness.include_path or lm-eval's own)")
    metric: str = "exact_match"
    weight: float = Field(1.0, ge=0)
    search_split: str = "search"
    test_split: str = "test"


class FitnessConfig(_Strict):
    tasks: list[TaskConfig] = Field(..., min_length=1)
    include_path: list[str] = Field(default_factory=list, description="folders of lm-eval task YAMLs")
    batch_size: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1, description="examples per task and split (None: all)")

    @field_validator("include_path", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class BaselineConfig(_Strict):
    """The grid of uniform merges (one weight and density everywhere) that the final table compares against."""

    weight: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    density: list[float] = Field(default_factory=lambda: [0.3, 0.6, 1.0])


class StudyConfig(_Strict):
    study: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="study name inside the storage")
    storage: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<study file dir>/<study>.db")
    seed: int = 0
    budget: int = Field(..., ge=1, description="number of trials (evaluated candidates)")
    device: str = "auto"
    models: ModelsConfig
    merge: MergeConfig = MergeConfig()
    search_space: SearchSpaceConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    fitness: FitnessConfig
    baselines: BaselineConfig = BaselineConfig()
    _path: Path = PrivateAttr(default_factory=Path)

    @model_validator(mode="after")
    def _base_when_needed(self) -> StudyConfig:
        if METHODS[self.merge.method].uses_base and not self.models.base:
            raise ValueError(f"merge method {self.merge.method} works on task vectors: set models.base")
        try:
            validate(self.merge.method, self.models.base, self.models.parents, {}, self.merge.options)
        except InvalidRecipe as e:
            raise ValueError(f"merge.{e.field}: {e.message}" if e.field.startswith("options") else str(e)) from None
        return self

    @property
    def path(self) -> Path:
        return self._path

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self._path.parent / (self.study + '.db')}"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(path, "", "file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(path, "", f"not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(path, "", "expected a mapping of fields at the top level")
    return data


def _raise_first(path: Path, err: ValidationError, prefix: str = "") -> None:
    e = err.errors()[0]
    loc = prefix + ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field (check its spelling against the documented fields)"
    elif e["type"] == "missing":
        msg = "required field is missing"
    raise ConfigError(path, loc, msg) from None


def _resolve(base_dir: Path, p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base_dir / q).resolve())


def _load_preset(study_path: Path, raw: Any) -> dict:
    """`search_space` may be a preset name/path string, or a mapping with `preset:` plus overrides."""
    if isinstance(raw, str):
        raw = {"preset": raw}
    if not isinstance(raw, dict):
        raise ConfigError(study_path, "search_space", "expected a preset name or a mapping")
    raw = dict(raw)
    preset = raw.pop("preset", None)
    if preset is None:
        return raw
    candidates = [study_path.parent / preset, PRESETS_DIR / preset, PRESETS_DIR / f"{preset}.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(study_path, "search_space.preset", f"{preset!r} not found; presets: {', '.join(names)}")
    data = _read_yaml(found)
    return {**data, **raw}


def load_study(path: str | Path) -> StudyConfig:
    """Parse and validate a study file; model paths come back absolute, and must exist."""
    path = Path(path)
    data = _read_yaml(path)
    if "search_space" in data:
        data["search_space"] = _load_preset(path, data["search_space"])
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as err:
        _raise_first(path, err)
    d = path.parent
    if cfg.models.base:
        cfg.models.base = _resolve(d, cfg.models.base)
    cfg.models.parents = [_resolve(d, p) for p in cfg.models.parents]
    for field, p in [("models.base", cfg.models.base)] + [(f"models.parents.{i}", p) for i, p in enumerate(cfg.models.parents)]:
        if p is not None and not Path(p).is_dir():
            raise ConfigError(path, field, f"model directory {p} does not exist")
    cfg.fitness.include_path = [_resolve(d, p) for p in cfg.fitness.include_path]
    for i, p in enumerate(cfg.fitness.include_path):
        if not Path(p).is_dir():
            raise ConfigError(path, f"fitness.include_path.{i}", f"folder {p} does not exist")
    if cfg.storage and cfg.storage.startswith("sqlite:///") and not cfg.storage.startswith("sqlite:////"):
        cfg.storage = "sqlite:///" + _resolve(d, cfg.storage.removeprefix("sqlite:///"))
    cfg._path = path.resolve()
    return cfg


class RecipeFile(_Strict):
    format: Literal["evomerge-recipe/1"] = "evomerge-recipe/1"
    method: str
    base: str | None = None
    parents: list[str] = Field(..., min_length=1)
    groups: dict[str, dict[str, list[float]]]
    options: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe YAML, evomerge's own or a mergekit config; model paths resolve relative to the file.

    Everything is checked before any tensor is read: method, parameters and their ranges, model count, base model.
    """
    path = Path(path)
    data = _read_yaml(path)
    d = path.parent
    if is_mergekit(data):
        return _load_mergekit(path, data)
    try:
        rf = RecipeFile.model_validate(data)
    except ValidationError as err:
        _raise_first(path, err)
    try:
        validate(rf.method, rf.base, rf.parents, rf.groups, rf.options)
    except InvalidRecipe as e:
        raise ConfigError(path, e.field, e.message) from None
    base = _resolve(d, rf.base) if rf.base else None
    parents = [_resolve(d, p) for p in rf.parents]
    _check_dirs(path, [("base", base)] + [(f"parents.{i}", p) for i, p in enumerate(parents)])
    return Recipe(method=rf.method, parents=parents, base=base, groups={g: dict(v) for g, v in rf.groups.items()},
                  options=rf.options, dtype=rf.dtype, seed=rf.seed)


def _check_dirs(path: Path, fields: list[tuple[str, str | None]]) -> None:
    for field, p in fields:
        if p is not None and not Path(p).is_dir():
            raise ConfigError(path, field, f"model directory {p} does not exist")


def _load_mergekit(path: Path, data: dict) -> Recipe:
    """A mergekit config: its models must be local directories (evomerge never downloads)."""
    from .io import ModelFilesError, inspect_model

    ref = model_for(data)
    if ref is None:
        raise ConfigError(path, "models", "no model named (base_model, models or slices)")
    ref_dir = _resolve(path.parent, ref)
    _check_dirs(path, [("base_model" if data.get("base_model") else "models", ref_dir)])
    try:
        info = inspect_model(ref_dir)
        recipe = from_mergekit(data, info, lambda p: _resolve(path.parent, p))
        validate(recipe.method, recipe.base, recipe.parents, recipe.groups, recipe.options)
    except InvalidRecipe as e:
        raise ConfigError(path, e.field, e.message) from None
    except ModelFilesError as e:
        raise ConfigError(path, "models", str(e)) from None
    _check_dirs(path, [("base_model", recipe.base)] + [(f"models.{i}", p) for i, p in enumerate(recipe.parents)])
    return recipe
