"""study.yaml and recipe.yaml, validated: every error names the file, the field and what is allowed.

Paths inside a file are relative to that file.  Search-space presets are YAML files under ``search_spaces/`` (or any
path); the study may override any preset field.
"""
from __future__ import annotations

import importlib.util
import re
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
    a_from_study: str | None = Field(
        None, description="ps+dfs: model A is the merge of the best recipe of this study (same storage)")


class MergeConfig(_Strict):
    method: str = "ties"
    options: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="the candidate's dtype; default: the dtype the parents' files hold")

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
    """A preset (file under search_spaces/) plus any overrides in the study.

    `ps` uses the merge fields (layer_granularity ... fixed); `dfs` and `ps+dfs` use the data-flow fields (layout,
    repeats, scale), see evomerge/spaces/dataflow.py.
    """

    kind: Literal["ps", "dfs", "ps+dfs"] = "ps"
    layer_granularity: int = Field(1, ge=1)
    groups: list[Literal["embed", "layers", "head"]] = Field(default_factory=lambda: ["embed", "layers", "head"])
    weight: RangeConfig = RangeConfig(low=0.0, high=1.0)
    density: RangeConfig = RangeConfig(low=0.1, high=1.0)
    t: RangeConfig = Field(RangeConfig(low=0.0, high=1.0), description="slerp's interpolation factor, searched for slerp")
    fixed: dict[Literal["weight", "density", "t", "gamma", "epsilon"], float] = Field(
        default_factory=lambda: {"weight": 0.5, "density": 1.0})

    layout: Literal["published", "positions"] = "published"
    repeats: int = Field(3, ge=1, description="published layout: how many times the source layers are laid out")
    scale: RangeConfig = RangeConfig(low=0.4, high=1.5)

    @model_validator(mode="after")
    def _density_in_range(self) -> SearchSpaceConfig:
        if self.density.low <= 0 or self.density.high > 1:
            raise ValueError("density range must lie within (0, 1]")
        if self.t.low < 0 or self.t.high > 1:
            raise ValueError("t range must lie within [0, 1]")
        return self

    @model_validator(mode="after")
    def _scale_positive(self) -> SearchSpaceConfig:
        if self.scale.low <= 0:
            raise ValueError("scale.low must be > 0 (a scale <= 0 erases or flips the hidden state)")
        return self


class OptimizerConfig(_Strict):
    name: Literal["cmaes", "catcma", "random", "tpe", "nsga2"] = Field(
        "cmaes", description="nsga2 searches one objective per fitness task (a Pareto front) instead of their weighted mean")
    sigma0: float = Field(1 / 6, gt=0)
    popsize: int | None = Field(None, ge=2)


class TaskConfig(_Strict):
    """One fitness task: an lm-eval task (default), perplexity on local text files, or a Python callable."""

    task: str = Field(..., description="lm-eval task name (from fitness.include_path or lm-eval's own); "
                                       "for other sources, the name the scores are stored under")
    source: Literal["lm-eval", "perplexity", "callable"] = "lm-eval"
    metric: str = "exact_match"
    weight: float = Field(1.0, ge=0)
    search_split: str = Field("search", description="lm-eval split, or the text file (perplexity) the search reads")
    test_split: str = Field("test", description="lm-eval split, or the text file (perplexity) the final eval reads")
    function: str | None = Field(None, description="source callable: `module:function`, "
                                                   "called as function(model, tokenizer, split) -> float")

    @model_validator(mode="after")
    def _source_fields(self) -> TaskConfig:
        if self.search_split == self.test_split:
            raise ValueError(f"search_split and test_split are both {self.search_split!r}: the final evaluation "
                             "must score data the search never read")
        if self.source == "callable" and not (self.function and re.fullmatch(r"[\w.]+:\w+", self.function)):
            raise ValueError("source callable needs `function: module:function`")
        if self.source != "callable" and self.function:
            raise ValueError(f"`function` is only for source callable (this task's source is {self.source})")
        return self


class RacingConfig(_Strict):
    """Multi-fidelity racing: a candidate is scored on nested stratified subsets of the search split and stops as
    soon as it provably cannot beat the incumbent (successive-halving stages; elimination by a confidence bound on
    its per-example differences from the incumbent)."""

    min_examples: int = Field(10, ge=1, description="examples per task every candidate is scored on, at least")
    reduction_factor: float = Field(3.0, gt=1, description="each stage has this many times the previous examples")
    z: float = Field(1.0, ge=0,
                     description="width of the confidence bound on the mean paired difference, in standard errors")


class FitnessConfig(_Strict):
    tasks: list[TaskConfig] = Field(..., min_length=1)
    include_path: list[str] = Field(default_factory=list, description="folders of lm-eval task YAMLs")
    batch_size: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1, description="examples per task and split (None: all)")
    racing: RacingConfig | None = Field(None, description="multi-fidelity racing on the search split (off: None)")
    final_top_k: int = Field(3, ge=1, description="best trials re-scored on the test split after the search")
    allow_test_split_search: bool = Field(
        False, description="let a search split be a public benchmark's test split (contaminates the final number)")

    @field_validator("include_path", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class BaselineConfig(_Strict):
    """The grid of uniform merges (one weight and density everywhere) that the final table compares against."""

    weight: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    density: list[float] = Field(default_factory=lambda: [0.3, 0.6, 1.0])


class ExecutorConfig(_Strict):
    """Where trials run, and how runners sharing one study DB keep each other honest."""

    name: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="ray: 'auto', 'host:port' or 'ray://host:port'; "
                                                  "None: $RAY_ADDRESS, else a new local Ray")
    actors: int | None = Field(None, ge=1, description="ray: actor count (default: one per GPU, else per CPU slot)")
    num_gpus_per_actor: float | None = Field(None, ge=0, description="ray: default 1 when the cluster has GPUs")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    threads_per_actor: int | None = Field(None, ge=1, description="ray: torch/OpenMP threads inside each actor")
    max_retries: int = Field(2, ge=0, description="ray: re-runs of a trial whose actor died, before it fails")
    heartbeat_s: float = Field(10.0, gt=0, description="how often a runner marks its running trials alive")
    stale_after_s: float = Field(60.0, gt=0, description="a running trial silent this long is re-queued")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self) -> ExecutorConfig:
        if self.name == "local":
            extra = [k for k in ("address", "actors", "num_gpus_per_actor", "threads_per_actor")
                     if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{extra[0]} applies only to the ray executor (set name: ray)")
        if self.stale_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"stale_after_s ({self.stale_after_s:g}) must be at least twice heartbeat_s "
                             f"({self.heartbeat_s:g}), or live trials would be taken for dead")
        return self


class WorkerConfig(_Strict):
    """Where a worker keeps the parents (see the memory plan, `evomerge run --check`)."""

    parents: Literal["auto", "resident", "host"] = Field(
        "auto", description="resident: on the device at their stored size; host: mapped from their files and "
                            "streamed to the device per candidate; auto: resident when they fit")
    device_memory: float | None = Field(None, gt=0, description="GB the worker may use on its device "
                                                                "(default: what is free; host memory on CPU)")


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
    executor: ExecutorConfig = ExecutorConfig()
    worker: WorkerConfig = WorkerConfig()
    _path: Path = PrivateAttr(default_factory=Path)

    @model_validator(mode="after")
    def _objectives(self) -> StudyConfig:
        if self.optimizer.name == "nsga2":
            if len(self.fitness.tasks) < 2:
                raise ValueError("optimizer nsga2 searches one objective per fitness task: give at least two tasks")
            if self.fitness.racing is not None:
                raise ValueError("fitness.racing needs one incumbent to race against; with nsga2 set it to null")
        return self

    @model_validator(mode="after")
    def _base_when_needed(self) -> StudyConfig:
        if self.search_space.kind != "ps":
            return self  # a data-flow search runs layers as they are: merge.method never applies
        if METHODS[self.merge.method].uses_base and not self.models.base:
            raise ValueError(f"merge method {self.merge.method} works on task vectors: set models.base")
        try:
            validate(self.merge.method, self.models.base, self.models.parents, {}, self.merge.options)
        except InvalidRecipe as e:
            raise ValueError(f"merge.{e.field}: {e.message}" if e.field.startswith("options") else str(e)) from None
        return self

    @model_validator(mode="after")
    def _model_a_source(self) -> StudyConfig:
        if self.search_space.kind == "ps+dfs" and not self.models.a_from_study:
            raise ValueError("search space ps+dfs takes model A from a ps study: set models.a_from_study")
        if self.models.a_from_study and self.search_space.kind != "ps+dfs":
            raise ValueError("models.a_from_study is only used by search_space kind ps+dfs")
        if self.models.a_from_study == self.study:
            raise ValueError("models.a_from_study must name another study")
        return self

    @property
    def path(self) -> Path:
        return self._path

    def candidate_dtype(self) -> str:
        """The candidate's dtype: ``merge.dtype``, else the one the parents' files hold (read from the headers)."""
        from .io import stored_size

        return self.merge.dtype or stored_size(self.models.base or self.models.parents[0])[2]

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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_snapshot(repo_id: str) -> str:
    """A Hub model's local snapshot (downloaded once into the HF cache); weights as safetensors, never pickles."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"])


def _model_path(study: Path, field: str, p: str, download: bool) -> str:
    """A local model directory (relative to the study file), or a Hub id `org/name` that must not clash with one."""
    local = _resolve(study.parent, p)
    if Path(local).is_dir():
        return local
    if not _HUB_ID.match(p):
        raise ConfigError(study, field, f"model directory {local} does not exist (and {p!r} is not a Hub id org/name)")
    if not download:
        return p
    try:
        return _hub_snapshot(p)
    except Exception as e:  # noqa: BLE001 - hub errors are many; the user needs the id and the reason
        raise ConfigError(study, field, f"Hub model {p!r} is neither a local directory nor downloadable "
                                        f"({type(e).__name__}: {e}); set HF_HUB_OFFLINE=0 to allow downloads") from None


def load_study(path: str | Path, download: bool = True) -> StudyConfig:
    """Parse and validate a study file; model paths come back absolute and existing.

    Models given as Hub ids are fetched into the HF cache; with `download=False` (``run --check``) they are only
    checked for syntax and left as ids.
    """
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
        cfg.models.base = _model_path(path, "models.base", cfg.models.base, download)
    cfg.models.parents = [_model_path(path, f"models.parents.{i}", p, download) for i, p in enumerate(cfg.models.parents)]
    for i, t in enumerate(cfg.fitness.tasks):
        if t.source == "perplexity":
            for split in ("search_split", "test_split"):
                f = _resolve(d, getattr(t, split))
                if not Path(f).is_file():
                    raise ConfigError(path, f"fitness.tasks.{i}.{split}", f"text file {f} does not exist")
                setattr(t, split, f)
    cfg.fitness.include_path = [_resolve(d, p) for p in cfg.fitness.include_path]
    for i, p in enumerate(cfg.fitness.include_path):
        if not Path(p).is_dir():
            raise ConfigError(path, f"fitness.include_path.{i}", f"folder {p} does not exist")
    if cfg.storage and cfg.storage.startswith("sqlite:///") and not cfg.storage.startswith("sqlite:////"):
        cfg.storage = "sqlite:///" + _resolve(d, cfg.storage.removeprefix("sqlite:///"))
    if cfg.executor.name == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(path, "executor.name", "ray is not installed here: pip install 'evomerge[ray]'")
    if cfg.storage:
        cfg.storage = check_storage_url(cfg.storage, path, "storage")
    cfg._path = path.resolve()
    return cfg


class PathFile(_Strict):
    """A data-flow recipe's layer path; `a` (PS+DFS) is a parameter-space recipe whose merge is model 0."""

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
    def _shape(self) -> PathFile:
        if self.scales is not None:
            if len(self.scales) != len(self.layers):
                raise ValueError(f"{len(self.scales)} scales for {len(self.layers)} layers")
            if any(s <= 0 for s in self.scales):
                raise ValueError("scales must be > 0")
        return self


def safe_url(url: str) -> str:
    """A storage URL fit for printing: the password, if any, masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<storage URL>"


def check_storage_url(url: str, file: str | Path = "--storage", field: str = "") -> str:
    """A usable SQLAlchemy URL: parsed, with an installed driver (`postgresql://` picks psycopg 3 when psycopg2 is
    absent); the password never appears in the message."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
    except ArgumentError:
        raise ConfigError(file, field, "not a database URL; expected e.g. sqlite:///study.db or "
                                       "postgresql://user@host:5432/db") from None
    if u.drivername == "postgresql" and importlib.util.find_spec("psycopg2") is None:
        u = u.set(drivername="postgresql+psycopg")
    try:
        u.get_dialect().import_dbapi()
    except Exception as e:  # noqa: BLE001 - SQLAlchemy raises NoSuchModuleError or the driver's ImportError
        hint = " (pip install 'evomerge[postgres]')" if u.get_backend_name() == "postgresql" else ""
        raise ConfigError(file, field, f"no database driver for {u.drivername!r}{hint}: {e}") from None
    return u.render_as_string(hide_password=False)


class RecipeFile(_Strict):
    format: Literal["evomerge-recipe/1"] = "evomerge-recipe/1"
    method: str
    base: str | None = None
    parents: list[str] = Field(..., min_length=1)
    groups: dict[str, dict[str, list[float]]]
    options: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    path: PathFile | None = None

    @model_validator(mode="after")
    def _path_is_passthrough(self) -> RecipeFile:
        if self.path is not None and self.method != "passthrough":
            raise ValueError("a layer path goes with method passthrough")
        return self


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe YAML, evomerge's own or a mergekit config; model paths resolve relative to the file.

    Everything is checked before any tensor is read: method, parameters and their ranges, model count, base model.
    """
    path = Path(path)
    data = _read_yaml(path)
    if is_mergekit(data):
        return _load_mergekit(path, data)
    return _recipe_from(path, data, "")


def _recipe_from(path: Path, data: dict, prefix: str) -> Recipe:
    try:
        rf = RecipeFile.model_validate(data)
    except ValidationError as err:
        _raise_first(path, err, prefix)
    if rf.path is None:
        try:
            validate(rf.method, rf.base, rf.parents, rf.groups, rf.options)
        except InvalidRecipe as e:
            raise ConfigError(path, prefix + e.field, e.message) from None
    d = path.parent
    base = _resolve(d, rf.base) if rf.base else None
    parents = [_resolve(d, p) for p in rf.parents]
    _check_dirs(path, [(prefix + "base", base)] + [(f"{prefix}parents.{i}", p) for i, p in enumerate(parents)])
    layer_path = None
    if rf.path is not None:
        layer_path = rf.path.model_dump(exclude_none=True)
        layer_path["layers"] = [list(x) for x in rf.path.layers]
        if rf.path.a is not None:
            a = _recipe_from(path, rf.path.a, prefix + "path.a.")
            if a.path is not None:
                raise ConfigError(path, prefix + "path.a", "model A must be a parameter-space recipe (no path)")
            layer_path["a"] = a.to_dict()
        _check_path_indices(path, prefix, layer_path, parents)
    return Recipe(method=rf.method, parents=parents, base=base, groups={g: dict(v) for g, v in rf.groups.items()},
                  options=rf.options, dtype=rf.dtype, seed=rf.seed, path=layer_path)


def _check_path_indices(path: Path, prefix: str, layer_path: dict, parents: list[str]) -> None:
    """Every [model, layer] must exist; checked from the model headers, before any weight is read."""
    from .io import inspect_model

    a = layer_path.get("a")
    sources = ([a["base"] or a["parents"][0]] if a else []) + parents
    counts = [inspect_model(s).num_layers for s in sources]
    for k, (m, l) in enumerate(layer_path["layers"]):
        if not 0 <= m < len(sources):
            raise ConfigError(path, f"{prefix}path.layers.{k}", f"model {m} does not exist; models are 0..{len(sources) - 1}"
                              + (" (0 is the merge of path.a, then parents)" if a else " (indices into parents)"))
        if not 0 <= l < counts[m]:
            raise ConfigError(path, f"{prefix}path.layers.{k}", f"model {m} has layers 0..{counts[m] - 1}, not {l}")


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
