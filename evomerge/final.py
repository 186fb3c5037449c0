"""The final evaluation and the baselines: what `run` prints once the search is done, scored on the test split.

The search only ever reads the search split; here the top-k trials and the reference models (base, each parent,
model A, the best uniform merge) are scored on the test split, once, and stored in the study so that `status`,
`report` and a re-run read them back instead of scoring again.
"""
from __future__ import annotations

from .config import StudyConfig
from .executors import Executor
from .recipe import Recipe
from .spaces import SearchSpace
from .store import StudyStore


def final_table(cfg: StudyConfig, space: SearchSpace, store: StudyStore, executor: Executor) -> list[dict]:
    """Test-split scores of the space's reference models, the best uniform merge and the evolved best; computed once.

    Data-flow studies have no uniform merge: their rows are base (if set), model A and each parent run as their own
    unscaled paths, and the evolved best.  The uniform baseline is the study's method with one weight and density
    everywhere, the best of a small grid chosen on the search split, exactly like the evolved best.  The evolved best
    is rank 1 of the final evaluation.
    """
    cached = store.get("final")
    best = store.best()
    if cached and best and cached.get("best_trial") == best.number:
        return cached["rows"]
    rows = [_row(executor, label, recipe) for label, recipe in space.references()]
    uniform = _best_uniform(cfg, space, executor)
    if uniform is not None:
        rows.append(_row(executor, "best uniform " + cfg.merge.method, uniform[0], search=uniform[1]))
    if best is not None:
        top = final_eval(cfg, store, executor)[0]
        rows.append({"model": "evolved best", **{k: top[k] for k in ("test", "per_task", "search", "trial")},
                     "recipe": best.recipe})
        store.put("final", {"best_trial": best.number, "rows": rows})
    return rows


def final_eval(cfg: StudyConfig, store: StudyStore, executor: Executor) -> list[dict]:
    """The top-k trials (by search fitness, full fidelity only) re-scored on the test split.

    Stored in the study attr `evomerge.final_eval`, apart from the trials' search scores; a trial already scored is
    not scored again, so calling this after more trials only evaluates newcomers to the top-k.
    """
    top = store.ranked()[: cfg.fitness.final_top_k]
    done = {r["trial"]: r for r in (store.get("final_eval") or {}).get("rows", [])}
    rows = []
    for rank, t in enumerate(top, 1):
        row = done.get(t.number)
        if row is None:
            result = executor.evaluate(Recipe.from_dict(t.recipe), "test")
            row = {"trial": t.number, "search": t.value,
                   "test": None if result.score is None else result.score.value,
                   "per_task": None if result.score is None else result.score.per_task,
                   "splits": {x.task: x.test_split for x in cfg.fitness.tasks}, "error": result.error}
        rows.append({**row, "rank": rank})
    store.put("final_eval", {"top_k": cfg.fitness.final_top_k, "rows": rows})
    return rows


def _best_uniform(cfg: StudyConfig, space: SearchSpace, executor: Executor) -> tuple[Recipe, float] | None:
    best: tuple[Recipe, float] | None = None
    for recipe in space.uniform_grid(cfg.baselines.weight, cfg.baselines.density, seed=cfg.seed):
        result = executor.evaluate(recipe, "search")
        if result.score is not None and (best is None or result.score.value > best[1]):
            best = (recipe, result.score.value)
    return best


def _row(executor: Executor, name: str, recipe: Recipe, search: float | None = None) -> dict:
    result = executor.evaluate(recipe, "test")
    return {"model": name, "test": None if result.score is None else result.score.value,
            "per_task": None if result.score is None else result.score.per_task,
            "search": search, "trial": None, "recipe": recipe.to_dict()}
