"""The study file's schema (study.yaml, as pydantic models): fields, defaults, bounds and the rules between fields.

A torch-free leaf: reading the file (YAML, presets, paths, Hub ids, model headers) is `studyfile`, recipe files are
`recipefile`.  Every error names the file, the field and what is allowed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from .errors import MAX_MESSAGE, EvomergeError, shorten
from .methodspec import SPECS, InvalidRecipe, check_recipe
from .recipe import Dtype
from .spaces.kinds import KINDS, Kind, KindName

MAX_FILE_BYTES = 1 << 20  # a study, preset, recipe or config file; real ones are a few kB
MAX_POPSIZE = 100_000  # candidates per generation: each a stored trial and a genome held in memory
MAX_BUDGET = 10_000_000  # trials; each is a few rows in the study DB
MAX_SEED = 2**32 - 1  # what numpy's and pycma's seeding accept


class ConfigError(EvomergeError, ValueError):
    """Bad input in a user file; the CLI prints it and exits with code 2."""

    def __init__(self, file: str | Path, field: str, message: str):
        self.file, self.field, self.message = shorten(str(file)), shorten(field, 200), shorten(message, 2 * MAX_MESSAGE)
        super().__init__(f"{self.file}: {self.field}: {self.message}" if field else f"{self.file}: {self.message}")


class Strict(BaseModel):
    """Unknown fields refused; NaN and infinity refused in every float (a range check is never false for NaN)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelsConfig(Strict):
    base: str | None = Field(None, description="common ancestor; needed by task-vector methods")
    parents: list[str] = Field(..., min_length=1)
    a_from_study: str | None = Field(
        None, description="ps+dfs: model A is the merge of the best recipe of this study (same storage)")


class MergeConfig(Strict):
    method: str = "ties"
    options: dict[str, Any] = Field(default_factory=dict)
    dtype: Dtype | None = Field(
        None, description="the candidate's dtype; default: the dtype the parents' files hold")
    tokenizer_source: str | None = Field(
        None, description="parents with added tokens: base (default), union, or one of models.parents (mergekit's "
                          "meaning); decides the rows of embeddings and head and the exported tokenizer")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SPECS:
            raise ValueError(f"unknown merge method {v!r}; allowed: {', '.join(SPECS)}")
        return v

    @model_validator(mode="after")
    def _options_known(self) -> MergeConfig:
        allowed = SPECS[self.method].options
        for k in self.options:
            if k not in allowed:
                raise ValueError(f"option {k!r} is not one of {self.method}'s options: {', '.join(allowed) or 'none'}")
        return self


class Range(Strict):
    """A searched parameter's interval; a genome coordinate in [0, 1] maps onto it linearly."""

    model_config = ConfigDict(frozen=True)

    low: float
    high: float

    def __init__(self, low: float, high: float) -> None:  # positional, as the search spaces write it
        super().__init__(low=low, high=high)

    def at(self, x: float) -> float:
        """The value at genome coordinate `x`, clipped to [0, 1]."""
        return self.low + min(max(x, 0.0), 1.0) * (self.high - self.low)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class SearchSpaceConfig(Strict):
    """A preset (file under search_spaces/) plus any overrides in the study.

    `ps` uses the merge fields (layer_granularity ... fixed); `dfs` and `ps+dfs` use the data-flow fields (layout,
    repeats, scale), see evomerge/spaces/dataflow.py.
    """

    kind: KindName = "ps"
    layer_granularity: int = Field(1, ge=0, le=100_000, description="layers per group; 0: all layers one group")
    granularity: Literal["layer", "module"] | list[str] = Field(
        "layer", description="layer: one group per layer block; module: attention, MLP and the rest (norms) "
                             "apart; or a list of tensor-name filters, each searched apart from the rest")
    x0: dict[Literal["weight", "density", "t"], float] = Field(
        default_factory=dict, description="where the search starts, per parameter in its own units "
                                          "(default: the middle of its range)")
    groups: list[Literal["embed", "layers", "head"]] = Field(default_factory=lambda: ["embed", "layers", "head"])
    weight: Range = Range(0.0, 1.0)
    density: Range = Range(0.1, 1.0)
    t: Range = Field(Range(0.0, 1.0), description="slerp's interpolation factor, searched for slerp")
    fixed: dict[Literal["weight", "density", "t", "gamma", "epsilon"], float] = Field(
        default_factory=lambda: {"weight": 0.5, "density": 1.0})

    layout: Literal["published", "positions"] = "published"
    repeats: int = Field(3, ge=1, le=1000, description="published layout: how many times the source layers are laid out")
    scale: Range = Range(0.4, 1.5)

    @property
    def traits(self) -> Kind:
        """What this kind of space asks of the rest of the study (see `spaces.kinds`)."""
        return KINDS[self.kind]

    @model_validator(mode="after")
    def _density_in_range(self) -> SearchSpaceConfig:
        if self.density.low <= 0 or self.density.high > 1:
            raise ValueError("density range must lie within (0, 1]")
        if self.t.low < 0 or self.t.high > 1:
            raise ValueError("t range must lie within [0, 1]")
        return self

    @model_validator(mode="after")
    def _filters_usable(self) -> SearchSpaceConfig:
        if isinstance(self.granularity, list):
            bad = [f for f in self.granularity if not f or "/" in f or f.strip() != f]
            if bad or not self.granularity or len(set(self.granularity)) != len(self.granularity):
                raise ValueError(f"granularity: filters must be distinct, non-empty tensor-name substrings without "
                                 f"'/' or spaces, got {self.granularity!r}")
        for p, v in self.x0.items():
            r = getattr(self, p)
            if not r.low <= v <= r.high:
                raise ValueError(f"x0.{p}: {v} is outside the searched range [{r.low}, {r.high}]")
        return self

    @property
    def filters(self) -> list[str]:
        """The tensor-name filters each layer group is split by (none at layer granularity)."""
        from .io import MODULES

        if isinstance(self.granularity, list):
            return list(self.granularity)
        return list(MODULES) if self.granularity == "module" else []

    @model_validator(mode="after")
    def _scale_positive(self) -> SearchSpaceConfig:
        if self.scale.low <= 0:
            raise ValueError("scale.low must be > 0 (a scale <= 0 erases or flips the hidden state)")
        return self


class OptimizerConfig(Strict):
    name: Literal["cmaes", "catcma", "random", "tpe", "nsga2"] = Field(
        "cmaes", description="nsga2 searches one objective per fitness task (a Pareto front) instead of their weighted mean")
    sigma0: float = Field(1 / 6, gt=0, le=1e6)
    popsize: int | None = Field(None, ge=2, le=MAX_POPSIZE,
                                description="candidates per generation; each is a stored trial and a genome in memory")


LM_EVAL_OPTIONS = ("num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "gen_kwargs")


class TaskConfig(Strict):
    """One fitness task: an lm-eval task (default), perplexity on local text files, or a Python callable."""

    task: str = Field(..., description="lm-eval task name (from fitness.include_path or lm-eval's own); "
                                       "for other sources, the name the scores are stored under")
    source: Literal["lm-eval", "perplexity", "callable"] = "lm-eval"
    metric: str = "exact_match"
    weight: float = Field(1.0, ge=0, le=1e6)
    search_split: str = Field("search", description="lm-eval split, or the text file (perplexity) the search reads")
    test_split: str = Field("test", description="lm-eval split, or the text file (perplexity) the final eval reads")
    function: str | None = Field(None, description="source callable: `module:function`, "
                                                   "called as function(model, tokenizer, split) -> float")
    limit: int | None = Field(None, ge=1, description="lm-eval: search on the first `limit` examples of the "
                                                      "search split (the search subset); the test split is unaffected")
    num_fewshot: int | None = Field(None, ge=0, description="lm-eval: overrides fitness.num_fewshot for this task")
    apply_chat_template: bool | None = Field(None, description="lm-eval: overrides fitness.apply_chat_template")
    fewshot_as_multiturn: bool | None = Field(None, description="lm-eval: overrides fitness.fewshot_as_multiturn")
    gen_kwargs: dict[str, Any] | None = Field(None, description="lm-eval: generation kwargs merged into this "
                                                                "generate_until task's, over fitness.gen_kwargs")

    @model_validator(mode="after")
    def _source_fields(self) -> TaskConfig:
        if self.search_split == self.test_split:
            raise ValueError(f"search_split and test_split are both {self.search_split!r}: the final evaluation "
                             "must score data the search never read")
        if self.source == "callable" and not (self.function and re.fullmatch(r"[\w.]+:\w+", self.function)):
            raise ValueError("source callable needs `function: module:function`")
        if self.source != "callable" and self.function:
            raise ValueError(f"`function` is only for source callable (this task's source is {self.source})")
        lm_only = [k for k in LM_EVAL_OPTIONS + ("limit",) if getattr(self, k) is not None]
        if self.source != "lm-eval" and lm_only:
            raise ValueError(f"{lm_only[0]} is an lm-eval option; this task's source is {self.source}")
        return self


class RacingConfig(Strict):
    """Multi-fidelity racing: a candidate is scored on nested stratified subsets of the search split and stops as
    soon as it provably cannot beat the incumbent (successive-halving stages; elimination by a confidence bound on
    its per-example differences from the incumbent)."""

    min_examples: int = Field(10, ge=1, le=10**9, description="examples per task every candidate is scored on, at least")
    reduction_factor: float = Field(3.0, gt=1, le=1e6, description="each stage has this many times the previous examples")
    z: float = Field(1.0, ge=0, le=100,
                     description="width of the confidence bound on the mean paired difference, in standard errors")


class FitnessConfig(Strict):
    tasks: list[TaskConfig] = Field(..., min_length=1)
    include_path: list[str] = Field(default_factory=list, description="folders of lm-eval task YAMLs")
    batch_size: int = Field(32, ge=1, le=100_000)
    limit: int | None = Field(None, ge=1, le=10**9, description="examples per task and split (None: all)")
    racing: RacingConfig | None = Field(None, description="multi-fidelity racing on the search split (off: None)")
    final_top_k: int = Field(3, ge=1, le=1000, description="best trials re-scored on the test split after the search")
    allow_test_split_search: bool = Field(
        False, description="let a search split be a public benchmark's test split (contaminates the final number)")
    num_fewshot: int | None = Field(None, ge=0, description="lm-eval's num_fewshot for every task (None: the "
                                                            "task's own; a task whose YAML says 0 keeps 0, as lm-eval)")
    apply_chat_template: bool = Field(False, description="lm-eval: wrap prompts in the tokenizer's chat template")
    fewshot_as_multiturn: bool = Field(False, description="lm-eval: few-shot examples as chat turns "
                                                          "(needs apply_chat_template)")
    gen_kwargs: dict[str, Any] | None = Field(None, description="lm-eval: generation kwargs merged into every "
                                                                "generate_until task's")

    @model_validator(mode="after")
    def _multiturn_needs_chat(self) -> FitnessConfig:
        for i, t in enumerate(self.tasks):
            if self.option(t, "fewshot_as_multiturn") and not self.option(t, "apply_chat_template"):
                where = f"tasks.{i}.fewshot_as_multiturn" if t.fewshot_as_multiturn else "fewshot_as_multiturn"
                raise ValueError(f"{where}: few-shot examples as chat turns need apply_chat_template: true")
        return self

    def option(self, task: TaskConfig, name: str) -> Any:
        """A task's lm-eval option: its own setting, else the study's (``gen_kwargs``: the two merged)."""
        if name == "gen_kwargs":
            merged = {**(self.gen_kwargs or {}), **(task.gen_kwargs or {})}
            return merged or None
        own = getattr(task, name)
        return own if own is not None else getattr(self, name)

    def search_limit(self, task: TaskConfig) -> int | None:
        """Examples of a task's search split the search reads: its own `limit`, else the study's."""
        return task.limit or self.limit

    @field_validator("include_path", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class BaselineConfig(Strict):
    """The grid of uniform merges (one weight and density everywhere) that the final table compares against."""

    weight: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], max_length=100)
    density: list[float] = Field(default_factory=lambda: [0.3, 0.6, 1.0], max_length=100)


class ExecutorConfig(Strict):
    """Where trials run, and how runners sharing one study DB keep each other honest."""

    name: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="ray: 'auto', 'host:port' or 'ray://host:port'; "
                                                  "None: $RAY_ADDRESS, else a new local Ray")
    actors: int | None = Field(None, ge=1, le=10_000,
                               description="ray: actor count (default: one per GPU, else per CPU slot)")
    num_gpus_per_actor: float | None = Field(None, ge=0, le=1024, description="ray: default 1 when the cluster has GPUs")
    num_cpus_per_actor: float = Field(1.0, gt=0, le=1024)
    threads_per_actor: int | None = Field(None, ge=1, le=1024, description="ray: torch/OpenMP threads inside each "
                                                                          "actor (default: its num_cpus_per_actor)")
    threads: int | None = Field(None, ge=1, le=1024, description="local: torch/OpenMP threads of the worker "
                                                                "(default: the cores this process may run on)")
    max_retries: int = Field(2, ge=0, le=100, description="ray: re-runs of a trial whose actor died, before it fails")
    heartbeat_s: float = Field(10.0, gt=0, le=86_400, description="how often a runner marks its running trials alive")
    stale_after_s: float = Field(60.0, gt=0, le=10**7, description="a running trial silent this long is re-queued")

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
        elif self.threads is not None:
            raise ValueError("threads applies to the local executor; a Ray actor uses threads_per_actor")
        if self.stale_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"stale_after_s ({self.stale_after_s:g}) must be at least twice heartbeat_s "
                             f"({self.heartbeat_s:g}), or live trials would be taken for dead")
        return self


class WorkerConfig(Strict):
    """Where a worker keeps the parents (see the memory plan, `evomerge run --check`)."""

    parents: Literal["auto", "resident", "host"] = Field(
        "auto", description="resident: on the device at their stored size; host: mapped from their files and "
                            "streamed to the device per candidate; auto: resident when they fit")
    device_memory: float | None = Field(None, gt=0, le=1e6, description="GB the worker may use on its device "
                                                                "(default: what is free; host memory on CPU)")


class StudyConfig(Strict):
    study: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", max_length=128,
                       description="study name inside the storage (and the default SQLite file's name)")
    storage: str | None = Field(None, max_length=4096,
                                description="SQLAlchemy URL; default sqlite:///<study file dir>/<study>.db")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    budget: int = Field(..., ge=1, le=MAX_BUDGET, description="number of trials (evaluated candidates)")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    models: ModelsConfig
    merge: MergeConfig = MergeConfig()
    search_space: SearchSpaceConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    fitness: FitnessConfig
    baselines: BaselineConfig = BaselineConfig()
    executor: ExecutorConfig = ExecutorConfig()
    worker: WorkerConfig = WorkerConfig()
    _path: Path = PrivateAttr(default_factory=Path)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

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
        if not self.search_space.traits.merges:
            return self  # a data-flow search runs layers as they are: merge.method never applies
        if SPECS[self.merge.method].uses_base and not self.models.base:
            raise ValueError(f"merge method {self.merge.method} works on task vectors: set models.base")
        try:
            check_recipe(self.merge.method, self.models.base, self.models.parents, {}, self.merge.options)
        except InvalidRecipe as e:
            raise ValueError(f"merge.{e.field}: {e.message}" if e.field.startswith("options") else str(e)) from None
        return self

    @model_validator(mode="after")
    def _model_a_source(self) -> StudyConfig:
        if self.search_space.traits.model_a and not self.models.a_from_study:
            raise ValueError(f"search space {self.search_space.kind} takes model A from a ps study: set "
                             "models.a_from_study")
        if self.models.a_from_study and not self.search_space.traits.model_a:
            kinds = " or ".join(k.name for k in KINDS.values() if k.model_a)
            raise ValueError(f"models.a_from_study is only used by search_space kind {kinds}")
        if self.models.a_from_study == self.study:
            raise ValueError("models.a_from_study must name another study")
        return self

    @property
    def path(self) -> Path:
        return self._path

    @property
    def notes(self) -> list[str]:
        """What reading the file noticed but did not refuse (a mergekit-evolve setting without an equivalent)."""
        return self._notes

    def candidate_dtype(self) -> str:
        """The candidate's dtype: ``merge.dtype``, else the one the parents' files hold (read from the headers)."""
        from .io import stored_size

        return self.merge.dtype or stored_size(self.models.base or self.models.parents[0])[2]

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self._path.parent / (self.study + '.db')}"


def check_device(v: str) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N`: checked as a word here, for presence when the study runs."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", v):
        raise ValueError(f"unknown device {shorten(v, 60)!r}; allowed: auto, cpu, cuda, cuda:N")
    return v

