"""study.yaml and recipe.yaml, validated: every error names the file, the field and what is allowed.

Paths inside a file are relative to that file.  Search-space presets are YAML files under ``search_spaces/`` (or any
path); the study may override any preset field.
"""
from __future__ import annotations

import errno
import importlib.util
import re
import stat
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .merge.methods import METHODS, InvalidRecipe, validate
from .mergekit import check_sections, from_mergekit, is_mergekit, model_for
from .recipe import Recipe

PRESETS_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


MAX_FILE_BYTES = 1 << 20  # a study, preset, recipe or config file; real ones are a few kB
MAX_DEPTH = 32  # YAML nesting, aliases expanded; the deepest real field is ~6 levels down
MAX_NODES = 100_000  # YAML values, aliases expanded: an alias bomb stops here, not in pydantic or a message
MAX_MESSAGE = 400  # characters of one value or path in a message
MAX_POPSIZE = 100_000  # candidates per generation: each a stored trial and a genome held in memory
MAX_BUDGET = 10_000_000  # trials; each is a few rows in the study DB
MAX_SEED = 2**32 - 1  # what numpy's and pycma's seeding accept


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut in the middle past `limit` characters: a message must never render a huge value or path."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}…({len(text) - limit} characters cut)…{text[-limit // 4:]}"


class ConfigError(ValueError):
    """Bad input in a user file; the CLI prints it and exits with code 2."""

    def __init__(self, file: str | Path, field: str, message: str):
        self.file, self.field, self.message = shorten(str(file)), shorten(field, 200), shorten(message, 2 * MAX_MESSAGE)
        super().__init__(f"{self.file}: {self.field}: {self.message}" if field else f"{self.file}: {self.message}")


class _Strict(BaseModel):
    """Unknown fields refused; NaN and infinity refused in every float (a range check is never false for NaN)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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
    tokenizer_source: str | None = Field(
        None, description="parents with added tokens: base (default), union, or one of models.parents (mergekit's "
                          "meaning); decides the rows of embeddings and head and the exported tokenizer")

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
    layer_granularity: int = Field(1, ge=0, le=100_000, description="layers per group; 0: all layers one group")
    granularity: Literal["layer", "module"] | list[str] = Field(
        "layer", description="layer: one group per layer block; module: attention, MLP and the rest (norms) "
                             "apart; or a list of tensor-name filters, each searched apart from the rest")
    x0: dict[Literal["weight", "density", "t"], float] = Field(
        default_factory=dict, description="where the search starts, per parameter in its own units "
                                          "(default: the middle of its range)")
    groups: list[Literal["embed", "layers", "head"]] = Field(default_factory=lambda: ["embed", "layers", "head"])
    weight: RangeConfig = RangeConfig(low=0.0, high=1.0)
    density: RangeConfig = RangeConfig(low=0.1, high=1.0)
    t: RangeConfig = Field(RangeConfig(low=0.0, high=1.0), description="slerp's interpolation factor, searched for slerp")
    fixed: dict[Literal["weight", "density", "t", "gamma", "epsilon"], float] = Field(
        default_factory=lambda: {"weight": 0.5, "density": 1.0})

    layout: Literal["published", "positions"] = "published"
    repeats: int = Field(3, ge=1, le=1000, description="published layout: how many times the source layers are laid out")
    scale: RangeConfig = RangeConfig(low=0.4, high=1.5)

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


class OptimizerConfig(_Strict):
    name: Literal["cmaes", "catcma", "random", "tpe", "nsga2"] = Field(
        "cmaes", description="nsga2 searches one objective per fitness task (a Pareto front) instead of their weighted mean")
    sigma0: float = Field(1 / 6, gt=0, le=1e6)
    popsize: int | None = Field(None, ge=2, le=MAX_POPSIZE,
                                description="candidates per generation; each is a stored trial and a genome in memory")


LM_EVAL_OPTIONS = ("num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "gen_kwargs")


class TaskConfig(_Strict):
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


class RacingConfig(_Strict):
    """Multi-fidelity racing: a candidate is scored on nested stratified subsets of the search split and stops as
    soon as it provably cannot beat the incumbent (successive-halving stages; elimination by a confidence bound on
    its per-example differences from the incumbent)."""

    min_examples: int = Field(10, ge=1, le=10**9, description="examples per task every candidate is scored on, at least")
    reduction_factor: float = Field(3.0, gt=1, le=1e6, description="each stage has this many times the previous examples")
    z: float = Field(1.0, ge=0, le=100,
                     description="width of the confidence bound on the mean paired difference, in standard errors")


class FitnessConfig(_Strict):
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


class BaselineConfig(_Strict):
    """The grid of uniform merges (one weight and density everywhere) that the final table compares against."""

    weight: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], max_length=100)
    density: list[float] = Field(default_factory=lambda: [0.3, 0.6, 1.0], max_length=100)


class ExecutorConfig(_Strict):
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


class WorkerConfig(_Strict):
    """Where a worker keeps the parents (see the memory plan, `evomerge run --check`)."""

    parents: Literal["auto", "resident", "host"] = Field(
        "auto", description="resident: on the device at their stored size; host: mapped from their files and "
                            "streamed to the device per candidate; auto: resident when they fit")
    device_memory: float | None = Field(None, gt=0, le=1e6, description="GB the worker may use on its device "
                                                                "(default: what is free; host memory on CPU)")


class StudyConfig(_Strict):
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


def read_text(path: Path, what: str = "file", limit: int = MAX_FILE_BYTES) -> str:
    """A user file's text: UTF-8, at most `limit` bytes; a directory, a too-long path or an unreadable file is a
    ConfigError that says which."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(path, "", f"{what} not found") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the {what}: {_os_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(path, "", f"is a directory; give the {what} itself (a .yaml file)")
    if st.st_size > limit:
        raise ConfigError(path, "", f"{st.st_size} bytes, more than the {limit} a {what} may have")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the {what}: {_os_reason(e)}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(path, "", f"not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                                    "save the file as UTF-8") from None


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ENAMETOOLONG:
        return "the path is longer than the operating system allows (255 bytes per name, 4096 in all)"
    return e.strerror or type(e).__name__


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that stops nesting past MAX_DEPTH while composing (the composer recurses: thousands of
    levels would end in a RecursionError)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_tree(path: Path, root: yaml.Node) -> None:
    """Refuse duplicate keys (YAML would keep the last one silently), and trees too large or too deep once aliases
    are expanded (an alias bomb is a few lines that expand to billions of values) or that contain themselves."""
    memo: dict[int, tuple[int, int]] = {}  # node -> (expanded size, expanded height)
    active: set[int] = set()

    def walk(node: yaml.Node, field: str, depth: int) -> tuple[int, int]:
        if id(node) in memo:
            size, height = memo[id(node)]
        else:
            if id(node) in active:
                raise ConfigError(path, field, "an alias refers to a value that contains it (a cycle)")
            active.add(id(node))
            size, height = 1, 0
            if isinstance(node, yaml.MappingNode):
                seen: dict[str, int] = {}
                for k, v in node.value:
                    key = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
                    sub = f"{field}.{key}" if field else key
                    if key in seen and key != "<<":
                        raise ConfigError(path, sub, f"duplicate key (lines {seen[key]} and {k.start_mark.line + 1}); "
                                                     "YAML would silently keep the last value: keep one")
                    seen[key] = k.start_mark.line + 1
                    s, h = walk(v, sub, depth + 1)
                    size, height = size + s + 1, max(height, h + 1)
            elif isinstance(node, yaml.SequenceNode):
                for i, v in enumerate(node.value):
                    s, h = walk(v, f"{field}.{i}" if field else str(i), depth + 1)
                    size, height = size + s, max(height, h + 1)
            active.discard(id(node))
            memo[id(node)] = size, height
        if depth + height > MAX_DEPTH:
            raise ConfigError(path, field, f"nested deeper than {MAX_DEPTH} levels (aliases expanded)")
        if size > MAX_NODES:
            raise ConfigError(path, field, f"more than {MAX_NODES} values (aliases expanded): "
                                           "an alias bomb, or not a config file")
        return size, height

    walk(root, "", 0)


def load_yaml(path: Path, what: str = "file") -> dict:
    """A user YAML file as a mapping, safely: UTF-8, size-, depth- and alias-bounded, no duplicate keys, no tags
    that run code."""
    text = read_text(path, what)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(path, "", "empty file; expected a mapping of fields")
        _check_tree(path, node)
        data = loader.construct_document(node)
    except ConfigError:
        raise
    except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an integer of more digits than Python converts
        raise ConfigError(path, "", f"not valid YAML ({e})") from None
    finally:
        loader.dispose()
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
    found = next((c for c in candidates if _is(c, stat.S_ISREG)), None)
    if found is None:
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(study_path, "search_space.preset", f"{preset!r} not found; presets: {', '.join(names)}")
    data = load_yaml(found, "preset")
    return {**data, **raw}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_snapshot(repo_id: str) -> str:
    """A Hub model's local snapshot (downloaded once into the HF cache); weights as safetensors, never pickles."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"])


def _is(p: str | Path, kind=stat.S_ISDIR) -> bool:
    """Whether `p` exists and is of `kind`; False, not an exception, for a path the OS refuses (too long, ...)."""
    try:
        return kind(Path(p).stat().st_mode)
    except (OSError, ValueError):
        return False


def _check_path(file: Path, field: str, p: str) -> None:
    """Refuse, by name, a path the operating system cannot hold (it would otherwise raise deep inside)."""
    if "\0" in p:
        raise ConfigError(file, field, "a path cannot contain a NUL character")
    try:
        Path(p).expanduser().stat()
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise ConfigError(file, field, f"{shorten(p, 80)}: {_os_reason(e)}") from None


def check_device(v: str) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N`: checked as a word here, for presence when the study runs."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", v):
        raise ValueError(f"unknown device {shorten(v, 60)!r}; allowed: auto, cpu, cuda, cuda:N")
    return v


def _check_device_present(path: Path, device: str) -> None:
    import torch

    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        index = int(device.partition(":")[2] or 0)
        if index >= n:
            raise ConfigError(path, "device", f"{device} requested, but this machine has "
                                              f"{n or 'no'} CUDA device{'s' if n != 1 else ''}; use auto or cpu")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def _check_models(path: Path, cfg: StudyConfig) -> None:
    """Every local model directory read as far as its headers (config.json, safetensors headers), before anything
    is written or loaded; errors name the study field.  The tokenizer comes from the base (else the first parent);
    a parameter-space merge needs identical tensor shapes (vocabulary rows aside with `merge.tokenizer_source`)."""
    from .io import ModelFilesError, check_compatible, inspect_model
    from .vocab import check_vocab_compatible

    fields = ([("models.base", cfg.models.base)] if cfg.models.base else []) + [
        (f"models.parents.{i}", p) for i, p in enumerate(cfg.models.parents)]
    local = [(f, p) for f, p in fields if _is(p)]
    infos = []
    for field, p in local:
        try:
            infos.append(inspect_model(p))
        except ModelFilesError as e:
            raise ConfigError(path, field, str(e)) from None
    if local and local[0][1] == (cfg.models.base or cfg.models.parents[0]):
        field, p = local[0]
        if not any((Path(p) / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(path, field, f"{p} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): the "
                                           "candidates are scored with this model's tokenizer; copy it in")
    if cfg.search_space.kind != "ps":
        return  # a layer path may join models of different depths: build_space checks what its stream needs
    by_path = {str(p): f for f, p in local}
    try:
        if infos:
            (check_vocab_compatible if cfg.merge.tokenizer_source else check_compatible)(infos)
    except ModelFilesError as e:
        field = next((f for p, f in by_path.items() if str(e).startswith(p + ":")), "models")
        raise ConfigError(path, field, str(e)) from None


def _model_path(study: Path, field: str, p: str, download: bool) -> str:
    """A local model directory (relative to the study file), or a Hub id `org/name` that must not clash with one."""
    _check_path(study, field, p)
    local = _resolve(study.parent, p)
    if _is(local):
        return local
    if Path(local).exists():
        raise ConfigError(study, field, f"{local} is a file; a model directory (config.json, weights) is expected")
    if not _HUB_ID.match(p):
        raise ConfigError(study, field, f"model directory {local} does not exist (and {p!r} is not a Hub id org/name)")
    if not download:
        return p
    try:
        return _hub_snapshot(p)
    except Exception as e:  # noqa: BLE001 - hub errors are many; the user needs the id and the reason
        raise ConfigError(study, field, f"Hub model {p!r} is neither a local directory nor downloadable "
                                        f"({type(e).__name__}: {e}); set HF_HUB_OFFLINE=0 to allow downloads") from None


def load_study(path: str | Path, download: bool = True, task_search_path: list[str] | None = None) -> StudyConfig:
    """Parse and validate a study file, or a mergekit-evolve config as the study it means; model paths come back
    absolute and existing.

    Models given as Hub ids are fetched into the HF cache; with `download=False` (``run --check``) they are only
    checked for syntax and left as ids.  `task_search_path` (absolute folders) is mergekit-evolve's option of that
    name: where its file's tasks are found.
    """
    from .evolve import is_evolve, study_from_evolve

    path = Path(path)
    data = load_yaml(path, "study file")
    notes: list[str] = []
    if is_evolve(data):
        data, notes = study_from_evolve(data, path, task_search_path)
    elif task_search_path:
        raise ConfigError(path, "", "--task-search-path is for mergekit-evolve files; set fitness.include_path")
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
    tok = cfg.merge.tokenizer_source
    if tok not in (None, "base", "union"):
        local = _resolve(path.parent, tok)
        if local not in [cfg.models.base, *cfg.models.parents] and tok not in [cfg.models.base, *cfg.models.parents]:
            raise ConfigError(path, "merge.tokenizer_source", f"{tok!r} is not base, union, nor models.base or one of "
                                                              "models.parents")
        cfg.merge.tokenizer_source = local if Path(local).is_dir() else tok
    _check_models(path, cfg)
    if download:
        _check_device_present(path, cfg.device)
    for i, t in enumerate(cfg.fitness.tasks):
        if t.source == "perplexity":
            for split in ("search_split", "test_split"):
                _check_path(path, f"fitness.tasks.{i}.{split}", getattr(t, split))
                f = _resolve(d, getattr(t, split))
                if not _is(f, stat.S_ISREG):
                    raise ConfigError(path, f"fitness.tasks.{i}.{split}", f"text file {f} does not exist")
                setattr(t, split, f)
    for i, p in enumerate(cfg.fitness.include_path):
        _check_path(path, f"fitness.include_path.{i}", p)
    cfg.fitness.include_path = [_resolve(d, p) for p in cfg.fitness.include_path]
    for i, p in enumerate(cfg.fitness.include_path):
        if not _is(p):
            raise ConfigError(path, f"fitness.include_path.{i}", f"folder {p} does not exist")
    if cfg.storage and cfg.storage.startswith("sqlite:///") and not cfg.storage.startswith("sqlite:////"):
        cfg.storage = "sqlite:///" + _resolve(d, cfg.storage.removeprefix("sqlite:///"))
    if cfg.executor.name == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(path, "executor.name", "ray is not installed here: pip install 'evomerge[ray]'")
    if cfg.storage:
        cfg.storage = check_storage_url(cfg.storage, path, "storage")
    cfg._path = path.resolve()
    cfg._notes = notes
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
    seed: int = Field(0, ge=0, le=MAX_SEED)
    path: PathFile | None = None
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
    tok = rf.tokenizer_source
    if tok not in (None, "base", "union"):
        tok = _resolve(d, tok)
        if tok not in [base, *parents]:
            raise ConfigError(path, prefix + "tokenizer_source", f"{rf.tokenizer_source!r} is not base, union, "
                                                                 "nor the base or a parent of this recipe")
    return Recipe(method=rf.method, parents=parents, base=base, groups={g: dict(v) for g, v in rf.groups.items()},
                  options=rf.options, dtype=rf.dtype, seed=rf.seed, path=layer_path, tokenizer_source=tok)


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
    """Each model directory exists and its config.json and weight headers read; errors name the recipe's field."""
    from .io import ModelFilesError, inspect_model

    for field, p in fields:
        if p is None:
            continue
        _check_path(path, field, p)
        if not _is(p):
            raise ConfigError(path, field, f"model directory {p} does not exist")
        try:
            inspect_model(p)
        except ModelFilesError as e:
            raise ConfigError(path, field, str(e)) from None


def _load_mergekit(path: Path, data: dict, notes: list[str] | None = None) -> Recipe:
    """A mergekit config: its models must be local directories (evomerge never downloads)."""
    from .io import ModelFilesError, inspect_model

    try:
        check_sections(data)
    except InvalidRecipe as e:
        raise ConfigError(path, e.field, e.message) from None
    ref = model_for(data)
    if ref is None:
        raise ConfigError(path, "models", "no model named (base_model, models or slices)")
    ref_dir = _resolve(path.parent, ref)
    _check_dirs(path, [("base_model" if data.get("base_model") else "models", ref_dir)])
    try:
        info = inspect_model(ref_dir)
        recipe = from_mergekit(data, info, lambda p: _resolve(path.parent, p), notes)
        validate(recipe.method, recipe.base, recipe.parents, recipe.groups, recipe.options)
    except InvalidRecipe as e:
        raise ConfigError(path, e.field, e.message) from None
    except ModelFilesError as e:
        raise ConfigError(path, "models", str(e)) from None
    _check_dirs(path, [("base_model", recipe.base)] + [(f"models.{i}", p) for i, p in enumerate(recipe.parents)])
    return recipe
