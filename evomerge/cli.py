"""The `evomerge` command: run, status, export, merge.

Bad input exits with code 2 and a message naming the file and field; nothing is written to the study DB before the
study file, the models and the fitness tasks have all been checked.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
out = Console()
err = Console(stderr=True)


def _user_errors() -> tuple[type[Exception], ...]:
    from .config import ConfigError
    from .fitness import FitnessError
    from .io import ModelFilesError
    from .merge import RecipeMismatch
    from .study import StudyMismatch

    return ConfigError, FitnessError, ModelFilesError, RecipeMismatch, StudyMismatch


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def safe_url(url: str) -> str:
    """A storage URL fit for printing: the password, if any, masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<storage URL>"


def _load(study_file: Path):
    from .config import load_study

    try:
        return load_study(study_file)
    except _user_errors() as e:
        _fail(e)


def _open_study(study_file: Path, storage: Optional[str]):
    from .study import Study

    cfg = _load(study_file)
    try:
        study = Study(cfg, storage)
        if not study.exists():
            _fail(ValueError(f"{study_file}: study {cfg.study!r} not found in {safe_url(study.storage_url)}; "
                             f"run `evomerge run {study_file}` first"))
    except _user_errors() as e:
        _fail(e)
    return study


StorageOpt = typer.Option(None, "--storage", help="SQLAlchemy URL of the study DB (overrides the study file)")


@app.command()
def run(
    study_file: Path = typer.Argument(..., help="study YAML"),
    budget: Optional[int] = typer.Option(None, "--budget", min=1, help="number of trials (overrides the file)"),
    storage: Optional[str] = StorageOpt,
) -> None:
    """Run (or resume) a study until its budget of trials is reached, then print the test-split table."""
    from .study import Study

    cfg = _load(study_file)
    try:
        study = Study(cfg, storage)
        out.print(f"study [bold]{cfg.study}[/] in {safe_url(study.storage_url)}")
        out.print(f"search space {study.space.kind} ({cfg.merge.method}): dimension {study.space.dimension}")
        study.executor.worker  # loads parents and tasks: every input error surfaces before the DB is touched
        study.check_compatible()
    except _user_errors() as e:
        _fail(e)
    total = budget or cfg.budget
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=out, transient=False) as bar:
        task = bar.add_task("trials", total=total, best="-")

        def on_trial(p) -> None:
            bar.update(task, completed=p.done, best="-" if p.best is None else f"{p.best:.4f}")

        try:
            st = study.run(total, on_trial=on_trial)
        except _user_errors() as e:
            _fail(e)
        finished = sum(t.state.is_finished() for t in st.get_trials(deepcopy=False))
        bar.update(task, completed=min(finished, total), best=_fmt(study.best_trial().value if study.best_trial() else None))
    _print_table(study.final_table())


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def _print_table(rows: list[dict]) -> None:
    table = Table(title="test split")
    table.add_column("model")
    table.add_column("test", justify="right")
    table.add_column("search", justify="right")
    tasks = sorted({k for r in rows for k in (r.get("per_task") or {})})
    for k in tasks:
        table.add_column(k, justify="right")
    for r in rows:
        per = r.get("per_task") or {}
        table.add_row(r["model"], _fmt(r["test"]), _fmt(r.get("search")), *[_fmt(per.get(k)) for k in tasks])
    out.print(table)


@app.command()
def status(
    study_file: Path = typer.Argument(..., help="study YAML"),
    as_json: bool = typer.Option(False, "--json", help="print the status as JSON"),
    storage: Optional[str] = StorageOpt,
) -> None:
    """Trials done / failed / running, the best score and recipe, and the final table once computed."""
    from .study import summarize

    study = _open_study(study_file, storage)
    s = summarize(study.optuna)
    if as_json:
        sys.stdout.write(json.dumps(s, indent=2) + "\n")
        return
    out.print(f"study [bold]{s['study']}[/]: {s['complete']} complete, {s['fail']} failed, {s['running']} running "
              f"(dimension {s['dimension']})")
    if s["best"]:
        out.print(f"best trial {s['best']['trial']}: {s['best']['value']:.4f} {s['best']['scores']}")
    for e in s["errors"][:5]:
        out.print(f"[yellow]trial {e['trial']} failed:[/] {e['error']}")
    if s["final_table"]:
        _print_table(s["final_table"])


@app.command()
def export(
    study_file: Path = typer.Argument(..., help="study YAML"),
    output: Path = typer.Option(..., "-o", "--output", help="recipe YAML to write"),
    fmt: str = typer.Option("evomerge", "--format", help="evomerge (this tool's recipe) or mergekit (a merge config)"),
    storage: Optional[str] = StorageOpt,
) -> None:
    """Write the best trial's recipe as a standalone YAML: evomerge's recipe, or a mergekit config."""
    if fmt not in ("evomerge", "mergekit"):
        _fail(ValueError(f"--format: {fmt!r} is not one of evomerge, mergekit"))
    study = _open_study(study_file, storage)
    recipe = study.best_recipe()
    if recipe is None:
        _fail(ValueError(f"{study_file}: study {study.cfg.study!r} has no completed trial yet"))
    try:
        if fmt == "mergekit":
            _save_mergekit(recipe, output)
        else:
            recipe.save(output)
    except OSError as e:
        _fail(ValueError(f"{output}: cannot write the recipe ({e.strerror})"))
    except ValueError as e:
        _fail(ValueError(f"{output}: {e}"))
    out.print(f"wrote {output} ({fmt}; trial {study.best_trial().number}, search score {study.best_trial().value:.4f})")


def _save_mergekit(recipe, output: Path) -> None:
    import yaml

    from .io import inspect_model
    from .mergekit import to_mergekit

    output.parent.mkdir(parents=True, exist_ok=True)
    rel = recipe.with_paths_relative_to(output.resolve().parent)
    data = to_mergekit(rel, inspect_model(recipe.base or recipe.parents[0]))
    output.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


@app.command()
def merge(
    recipe_file: Path = typer.Argument(..., help="recipe YAML: evomerge's (from `evomerge export`) or a mergekit config"),
    out_dir: Path = typer.Argument(..., help="output model directory"),
    device: str = typer.Option("auto", help="cpu, cuda, or auto"),
    shard_size: float = typer.Option(2.0, "--shard-size", min=0.001, help="largest safetensors shard, in GB"),
) -> None:
    """Stream a recipe into a Hugging Face model directory: safetensors shards + index, config, tokenizer, model card.

    Tensors are merged one at a time from the parents' (sharded) safetensors, so memory stays at a few tensors per
    parent whatever the model size.
    """
    from .config import load_recipe
    from .io import pick_device
    from .merge import write_model

    try:
        recipe = load_recipe(recipe_file)
        write_model(recipe, out_dir, pick_device(device), max_shard_bytes=int(shard_size * 1e9))
    except _user_errors() as e:
        _fail(e)
    except OSError as e:
        _fail(ValueError(f"{out_dir}: cannot write the model ({e.strerror})"))
    out.print(f"wrote {out_dir}")


if __name__ == "__main__":
    app()
