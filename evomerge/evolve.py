"""mergekit-evolve configs as evomerge studies, so its users keep their files now that it is deprecated.

A mergekit-evolve file has ``genome`` (models, base_model, merge_method, tokenizer_source, layer_granularity,
normalize, allow_negative_weights, filters, smooth) and ``tasks`` plus lm-eval settings.  `study_from_evolve` maps it
onto the study it means; what evomerge does differently, or does not do, comes back as notes so a user reads it
instead of finding out.  The mapping (README, "Coming from mergekit-evolve"):

* its genome starts at weight 1/n (n = its models), density 1: ``search_space.x0``;
* it takes ``abs()`` of weights unless negative weights are allowed: weight range [0, 1], else [-1, 1];
* CMA-ES with sigma0 1/6: the same, in evomerge's unit cube (the weight range's width is its scale);
* it normalizes ties, dare_ties and linear unless told otherwise and DARE-rescales by L1: the same;
* it merges in bfloat16: evomerge keeps float32 (exact scores, and bfloat16 arithmetic is slow on CPUs); set
  ``merge.dtype: bfloat16`` in a converted study to match.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .config import ConfigError

GENOME_KEYS = {"models", "base_model", "merge_method", "tokenizer_source", "layer_granularity", "normalize",
               "allow_negative_weights", "filters", "smooth"}
TOP_KEYS = {"genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
            "fewshot_as_multiturn"}
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")
NEEDS_BASE = ("ties", "dare_ties", "task_arithmetic")
MAX_FEVALS = 100  # mergekit-evolve's --max-fevals default


def is_evolve(data: dict[str, Any]) -> bool:
    return "genome" in data


def study_from_evolve(data: dict[str, Any], path: Path, task_search_path: list[str] | None = None
                      ) -> tuple[dict[str, Any], list[str]]:
    """The study a mergekit-evolve file means (model paths as written, relative to `path`), and notes on what
    differs.  Raises `ConfigError` naming the file and the field."""
    def bad(field: str, message: str) -> ConfigError:
        return ConfigError(path, field, message)

    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise bad(unknown[0], f"not a mergekit-evolve field; known: {', '.join(sorted(TOP_KEYS))}")
    genome = data["genome"]
    if not isinstance(genome, dict):
        raise bad("genome", "expected a mapping (models, merge_method, ...)")
    unknown = sorted(set(genome) - GENOME_KEYS)
    if unknown:
        raise bad(f"genome.{unknown[0]}", f"not a genome field; known: {', '.join(sorted(GENOME_KEYS))}")
    method = genome.get("merge_method")
    if method not in METHODS:
        raise bad("genome.merge_method", f"{method!r} is not one mergekit-evolve searches: {', '.join(METHODS)}")
    models = genome.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise bad("genome.models", "expected a non-empty list of model paths or Hub ids")
    base = genome.get("base_model")
    if base is not None and not isinstance(base, str):
        raise bad("genome.base_model", f"expected a model path or Hub id, got {base!r}")
    if method in NEEDS_BASE and not base:
        raise bad("genome.base_model", f"{method} works on task vectors: set base_model")
    granularity = genome.get("layer_granularity", 0)
    if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 0:
        raise bad("genome.layer_granularity", f"expected a whole number >= 0 (0: all layers one group), "
                                              f"got {granularity!r}")
    filters = genome.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) and f for f in filters):
        raise bad("genome.filters", f"expected a list of tensor-name substrings, got {filters!r}")
    for key in ("normalize", "allow_negative_weights", "smooth", "shuffle", "random_init", "apply_chat_template",
                "fewshot_as_multiturn"):
        where = genome if key in GENOME_KEYS else data
        if where.get(key) is not None and not isinstance(where[key], bool):
            raise bad(f"genome.{key}" if where is genome else key, f"expected true or false, got {where[key]!r}")
    notes: list[str] = []
    parents = [m for m in models if m != base]
    if method == "linear":  # no task vectors: every model listed is averaged, the base too
        parents, base = list(models), None
    if method == "slerp":
        if filters or genome.get("smooth"):
            raise bad("genome.filters" if filters else "genome.smooth", "mergekit-evolve refuses this with slerp too")
        if len(models) != 2:
            raise bad("genome.models", f"slerp interpolates two models, got {len(models)}: mergekit-evolve's "
                                       "per-layer choice of the two heaviest models has no evomerge equivalent")
        base, parents = models[0], models[1:]
        notes.append("genome: slerp searches t per layer group directly (mergekit-evolve: softmax of two weights); "
                     f"t = 0 is {models[0]}")
    elif base in models:
        notes.append("genome.models: the base model's own weight is not searched (its task vector is zero, so "
                     "it only ever entered mergekit's normalization)")
    if not parents:
        raise bad("genome.models", "no model besides base_model to merge")

    negative = bool(genome.get("allow_negative_weights"))
    normalize = genome.get("normalize")
    options: dict[str, Any] = {}
    if method != "slerp":
        options["normalize"] = normalize if normalize is not None else method in ("ties", "dare_ties", "linear")
    if method == "dare_ties":
        options["rescale_mode"] = "l1"
    if genome.get("smooth"):
        notes.append("genome.smooth: no equivalent (values interpolated between layer groups); searched as "
                     "discrete layer groups")
    space: dict[str, Any] = {"kind": "ps", "layer_granularity": granularity, "groups": ["embed", "layers", "head"],
                             "granularity": filters or "layer", "weight": {"low": -1.0 if negative else 0.0,
                                                                           "high": 1.0},
                             "density": {"low": 0.1, "high": 1.0}, "t": {"low": 0.0, "high": 1.0},
                             "x0": {"weight": 1 / len(models), "density": 1.0}}
    notes.append("genome: embeddings and head are searched as their own groups (mergekit-evolve ties them to the "
                 "first and last layer groups)")
    if method != "slerp":
        notes.append(f"genome: weights searched in [{space['weight']['low']:g}, 1] (mergekit-evolve: unbounded, "
                     f"{'sign kept' if negative else 'abs() taken'}); densities in [0.1, 1] (abs() clamped to [0, 1])")

    tasks = _tasks(data.get("tasks"), data.get("limit"), bad)
    fitness: dict[str, Any] = {"tasks": tasks, "include_path": list(task_search_path or [])}
    for key in ("num_fewshot", "apply_chat_template", "fewshot_as_multiturn"):
        if data.get(key) is not None:
            fitness[key] = data[key]
    if data.get("shuffle"):
        notes.append("shuffle: no equivalent; a task's search subset is its first `limit` examples (racing, "
                     "fitness.racing, draws a fixed random order instead)")
    if data.get("random_init"):
        notes.append("random_init: no equivalent; the search starts at x0 (weight 1/n, density 1)")
    notes.append("fitness.tasks: mergekit-evolve scores each task's own test split; evomerge searches on "
                 "search_split and keeps test_split held out (set both per task; here search/test)")

    merge: dict[str, Any] = {"method": method, "options": options, "dtype": "float32"}
    notes.append("merge.dtype: float32 (mergekit-evolve merges in bfloat16; set merge.dtype to match)")
    if genome.get("tokenizer_source") is not None:
        merge["tokenizer_source"] = genome["tokenizer_source"]
    n = len(models)
    study = {"study": re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem), "seed": 0, "budget": MAX_FEVALS,
             "models": {"base": base, "parents": parents} if base else {"parents": parents},
             "merge": merge, "search_space": space, "optimizer": {"name": "cmaes", "sigma0": 1 / 6},
             "fitness": fitness,
             "baselines": {"weight": [1 / n], "density": [1.0]}}
    return study, notes


def _tasks(raw: Any, limit: Any, bad) -> list[dict[str, Any]]:
    """evomerge tasks from mergekit-evolve's: a bare name or {name, weight=1.0, metric="acc,none"}; `limit` becomes
    each task's search subset."""
    if not isinstance(raw, list) or not raw:
        raise bad("tasks", "expected a non-empty list of task names or {name, weight, metric}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise bad("limit", f"expected a whole number >= 1, got {limit!r}")
    out = []
    for i, t in enumerate(raw):
        if isinstance(t, str):
            t = {"name": t}
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad(f"tasks.{i}", "expected a task name or {name, weight, metric}")
        unknown = sorted(set(t) - {"name", "weight", "metric"})
        if unknown:
            raise bad(f"tasks.{i}.{unknown[0]}", "not a task field; known: metric, name, weight")
        weight = t.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise bad(f"tasks.{i}.weight", f"expected a number >= 0, got {weight!r}")
        if not isinstance(t.get("metric", "acc,none"), str):
            raise bad(f"tasks.{i}.metric", f"expected a metric name such as 'acc,none', got {t['metric']!r}")
        task = {"task": t["name"], "metric": t.get("metric", "acc,none"), "weight": float(weight)}
        if limit is not None:
            task["limit"] = limit
        out.append(task)
    return out


def relocated(study: dict, source_dir: Path, out_dir: Path) -> dict:
    """A converted study whose local paths (read relative to `source_dir`) are written relative to `out_dir`, where
    the study file goes; Hub ids stay as they are."""
    def moved(p: str | None) -> str | None:
        if p is None or not (source_dir / p).exists():
            return p
        return os.path.relpath((source_dir / p).resolve(), out_dir)

    models = study["models"]
    models["parents"] = [moved(p) for p in models["parents"]]
    if models.get("base"):
        models["base"] = moved(models["base"])
    if study["merge"].get("tokenizer_source") not in (None, "base", "union"):
        study["merge"]["tokenizer_source"] = moved(study["merge"]["tokenizer_source"])
    study["fitness"]["include_path"] = [os.path.relpath(p, out_dir) for p in study["fitness"]["include_path"]]
    return study
