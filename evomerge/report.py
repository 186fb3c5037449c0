"""`evomerge report`: pictures of a study and a markdown page that embeds them, read from the study DB alone.

People judge a search by looking at it: did the best score still climb, which tasks did the winners trade, what does
the winning recipe do layer by layer.  Everything here comes from the trials' stored attributes (`evomerge.*`), so a
report can be drawn on any machine that can open the storage, while the study runs or long after.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from .io import group_order  # noqa: E402
from .store import StudyStore, TrialRecord, ranked  # noqa: E402

DPI = 100


def plot_scores(trials: list[TrialRecord], out: Path) -> Path:
    """Every trial's score in the order it was proposed, the best so far as a step line, failures as red crosses."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=DPI)
    done = [t for t in trials if t.state == TrialState.COMPLETE and not np.isnan(t.value)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if done:
        xs = [t.number for t in done]
        ys = [t.value for t in done]
        ax.scatter(xs, ys, s=12, alpha=0.6, label="trial")
        ax.step(xs, np.maximum.accumulate(ys), where="post", color="C1", linewidth=2, label="best so far")
    if failed:
        floor = min((t.value for t in done), default=0.0)
        ax.scatter([t.number for t in failed], [floor] * len(failed), marker="x", color="red", label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness (search split)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_tasks(top: list[TrialRecord], out: Path) -> Path:
    """Per-task scores of the top trials as grouped bars: which skills each winner trades against the others."""
    tasks = sorted({k for t in top for k in (t.scores or {})})
    fig, ax = plt.subplots(figsize=(7, 4), dpi=DPI)
    width = 0.8 / max(len(tasks), 1)
    x = np.arange(len(top))
    for j, task in enumerate(tasks):
        ax.bar(x + j * width, [(t.scores or {}).get(task, 0.0) for t in top], width,
               label=task)
    ax.set_xticks(x + width * (len(tasks) - 1) / 2, [f"#{t.number}" for t in top])
    ax.set_xlabel("trial (best first)")
    ax.set_ylabel("task score (search split)")
    ax.grid(axis="y", alpha=0.3)
    top_score = max([(t.scores or {}).get(k, 0.0) for t in top for k in tasks] or [1.0])
    ax.set_ylim(0, 1.2 * max(top_score, 1e-6))  # headroom for the legend
    if tasks:
        ax.legend(loc="upper center", ncol=len(tasks))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_recipe(recipe: dict, out: Path) -> Path:
    """The winner's per-group, per-parent weights (and densities) as heatmaps, input side on the left."""
    groups = sorted(recipe["groups"], key=group_order)
    params = [p for p in ("weight", "density") if any(p in recipe["groups"][g] for g in groups)]
    parents = [Path(p).name for p in recipe["parents"]]
    size = (max(6.0, 0.6 * len(groups) + 2), 0.6 + len(params) * (0.45 * len(parents) + 1.0))
    fig, axes = plt.subplots(len(params), 1, figsize=size, dpi=DPI, squeeze=False)
    for ax, p in zip(axes[:, 0], params):
        m = np.array([[recipe["groups"][g].get(p, [np.nan] * len(parents))[i] for g in groups]
                      for i in range(len(parents))])
        im = ax.imshow(m, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(parents)), parents)
        ax.set_xticks(range(len(groups)), [g.removeprefix("layers.") for g in groups])
        ax.set_title(p)
        if len(groups) * len(parents) <= 80:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("merge group (embed, layer index, head)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_path(path: dict, sources: list[str], out: Path) -> Path:
    """A data-flow path: position in the merged model (x) against the source layer it runs (y), one colour per
    source model, marker area by the scale on the stream entering that position.

    `path` is a recipe's ``path``: ``layers`` as ``[model, layer]`` pairs in order, optional ``scales``; `sources`
    names the models the indices refer to.
    """
    layers = path["layers"]
    scales = path.get("scales") or [1.0] * len(layers)
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers) + 2), 4), dpi=DPI)
    xs = np.arange(len(layers))
    ys = [layer for _, layer in layers]
    ax.plot(xs, ys, color="grey", linewidth=0.8, zorder=1)
    for k, name in enumerate(sources):
        idx = [i for i, (m, _) in enumerate(layers) if m == k]
        ax.scatter(idx, [ys[i] for i in idx], s=[20 + 60 * abs(scales[i]) for i in idx],
                   color=f"C{k}", label=Path(name).name, zorder=2)
    ax.set_xlabel("position in the merged model")
    ax.set_ylabel("source layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def write_report(store: StudyStore, out_dir: str | Path, storage: str = "", top: int = 5) -> Path:
    """Draw the plots into `out_dir` and write `summary.md` embedding them; returns the summary's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = store.summary()
    trials = sorted(store.records(), key=lambda t: t.number)
    top_trials = ranked(trials)[:top]
    lines = [f"# Study `{s['study']}`", ""]
    if storage:
        lines += [f"Storage: `{storage}`", ""]
    lines += [f"- trials: {s['trials']} ({s['complete']} complete, {s['fail']} failed, {s['running']} running)",
              f"- search-space dimension: {s['dimension']}"]
    if s["best"]:
        b = s["best"]
        lines.append(f"- best: trial {b['trial']}, fitness {_f(b['value'])} (search split)")
    lines.append("")
    if trials:
        lines += ["## Scores over trials", "", f"![scores]({plot_scores(trials, out / 'scores.png').name})", ""]
    if top_trials:
        tasks = sorted({k for t in top_trials for k in (t.scores or {})})
        lines += ["## Top trials", "", "| trial | generation | fitness | " + " | ".join(tasks) + " |",
                  "|---|---|---|" + "---|" * len(tasks)]
        for t in top_trials:
            per = t.scores or {}
            lines.append(f"| {t.number} | {'-' if t.generation is None else t.generation} | {_f(t.value)} | "
                         + " | ".join(_f(per.get(k)) for k in tasks) + " |")
        lines += ["", f"![per-task scores]({plot_tasks(top_trials, out / 'tasks.png').name})", ""]
    recipe = (s["best"] or {}).get("recipe")
    if recipe and recipe.get("groups"):
        lines += ["## Winning recipe", "", f"Method `{recipe['method']}`, parents "
                  + ", ".join(f"`{Path(p).name}`" for p in recipe["parents"]) + ".", "",
                  f"![recipe]({plot_recipe(recipe, out / 'recipe.png').name})", ""]
    if recipe and recipe.get("path"):
        sources = (["model A (merge)"] if recipe["path"].get("a") else []) + recipe["parents"]
        lines += ["## Winning data-flow path", "",
                  f"![path]({plot_path(recipe['path'], sources, out / 'path.png').name})", ""]
    if s["final_table"]:
        tasks = sorted({k for r in s["final_table"] for k in (r.get("per_task") or {})})
        lines += ["## Test split", "", "| model | test | search | " + " | ".join(tasks) + " |",
                  "|---|---|---|" + "---|" * len(tasks)]
        for r in s["final_table"]:
            per = r.get("per_task") or {}
            lines.append(f"| {r['model']} | {_f(r['test'])} | {_f(r.get('search'))} | "
                         + " | ".join(_f(per.get(k)) for k in tasks) + " |")
        lines.append("")
    if s["errors"]:
        lines += ["## Failed trials", ""] + [f"- trial {e['trial']}: {e['error']}" for e in s["errors"][:10]] + [""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary
