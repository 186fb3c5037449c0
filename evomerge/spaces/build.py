"""A study file's search space, built from model headers (and, for ps+dfs, model A's study in the same storage)."""
from __future__ import annotations

from ..config import ConfigError, StudyConfig
from ..io import inspect_model
from .base import SearchSpace
from .dataflow import DataflowSpace
from .parameter import ParameterSpace


def setup_signature(cfg: StudyConfig) -> dict:
    """The part of a study's signature known before the space is built (no model file read): kind, method (data-flow
    recipes run as paths, ``passthrough``), models and optimizer."""
    return {"kind": cfg.search_space.kind, "method": cfg.merge.method if cfg.search_space.kind == "ps" else "passthrough",
            "parents": cfg.models.parents, "base": cfg.models.base, "optimizer": cfg.optimizer.name}


def build_space(cfg: StudyConfig, storage: str | None = None) -> SearchSpace:
    """The study's search space; reads only model headers (and, for ps+dfs, model A's study in `storage`)."""
    if cfg.search_space.kind != "ps":
        return _dataflow_space(cfg, storage or cfg.storage_url())
    num_layers = inspect_model(cfg.models.base or cfg.models.parents[0]).num_layers
    ss = cfg.search_space
    return ParameterSpace(
        method=cfg.merge.method, parents=cfg.models.parents, base=cfg.models.base, num_layers=num_layers,
        ranges={"weight": ss.weight, "density": ss.density, "t": ss.t},
        fixed=dict(ss.fixed), searched_groups=ss.groups, layer_granularity=ss.layer_granularity,
        filters=ss.filters, x0=dict(ss.x0), options=cfg.merge.options, dtype=cfg.candidate_dtype(),
        tokenizer_source=cfg.merge.tokenizer_source,
    )


def _dataflow_space(cfg: StudyConfig, storage: str) -> DataflowSpace:
    from ..dataflow import PathError, check_path_compatible

    ss = cfg.search_space
    a = _best_recipe_of(cfg, storage) if ss.kind == "ps+dfs" else None
    sources = ([a["base"] or a["parents"][0]] if a else []) + cfg.models.parents
    infos = [inspect_model(p) for p in sources]
    try:
        check_path_compatible([i.config for i in infos], sources)
    except PathError as e:
        raise ConfigError(cfg.path, "models.parents", str(e)) from None
    try:
        return DataflowSpace(parents=cfg.models.parents, num_layers=[i.num_layers for i in infos],
                             scale=ss.scale, repeats=ss.repeats, layout=ss.layout, a=a,
                             dtype=cfg.candidate_dtype(), base=cfg.models.base, a_study=cfg.models.a_from_study)
    except ValueError as e:
        raise ConfigError(cfg.path, "search_space.layout", str(e)) from None


def _best_recipe_of(cfg: StudyConfig, storage: str) -> dict:
    """Model A of a ps+dfs study: the best recipe of the named parameter-space study in the same storage."""
    from ..store import StudyStore

    name = cfg.models.a_from_study
    other = StudyStore(storage, name)
    if not other.exists():  # never creates a SQLite file just to look
        raise ConfigError(cfg.path, "models.a_from_study",
                          f"study {name!r} is not in this study's storage; run its study file first "
                          "(with the same storage)")
    best = other.best()
    if best is None:
        raise ConfigError(cfg.path, "models.a_from_study", f"study {name!r} has no completed trial yet")
    if best.recipe.get("path"):
        raise ConfigError(cfg.path, "models.a_from_study", f"study {name!r} is not a parameter-space (ps) study")
    return best.recipe
