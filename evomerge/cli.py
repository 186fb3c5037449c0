"""The `evomerge` command: run, status, export, report, merge, convert.

Bad input exits with code 2 and a message naming the file and field; nothing is written to the study DB before the
study file, the models and the fitness tasks have all been checked.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.text import Text

from .console import (
    Guarded,
    compact_recipe,
    err,
    out,
    print_final_eval,
    print_notes,
    print_pareto,
    print_table,
    trial_bar,
)
from .errors import EvomergeError

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# no locals in tracebacks: they would print storage URLs, passwords included
app = typer.Typer(cls=Guarded, add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0],
                  pretty_exceptions_show_locals=False)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show the traceback of an unexpected error")) -> None:
    """Evolutionary merge-recipe optimizer for LLMs."""


def _fail(e: Exception, study_file: Optional[Path] = None, storage: Optional[str] = None) -> None:
    """Print a user error and exit 2; errors found past the study file get its name and field in front."""
    from .fitness import FitnessError
    from .merge import RecipeMismatch
    from .merge.plan import MemoryPlanError
    from .store import StorageError, StudyBusy, StudyMismatch

    msg = str(e)
    if isinstance(e, StorageError):
        msg = f"{'--storage' if storage else f'{study_file}: storage'}: {msg}"
    elif isinstance(e, MemoryPlanError) and study_file:
        msg = f"{study_file}: worker: {msg}"
    elif isinstance(e, (FitnessError, StudyMismatch, RecipeMismatch, StudyBusy)) and study_file:
        msg = f"{study_file}: {msg}"
    err.print(Text.assemble(("error: ", "bold red"), msg), highlight=False, soft_wrap=True)  # msg is not markup
    raise typer.Exit(2)


def _load(study_file: Path, task_search_path: Optional[list[Path]] = None, device_memory: Optional[float] = None,
          download: bool = True):
    from .studyfile import load_study

    try:
        cfg = load_study(study_file, download=download, task_search_path=_absolute(task_search_path))
    except EvomergeError as e:
        _fail(e)
    print_notes(study_file, cfg.notes)
    if device_memory is not None:
        cfg.worker.device_memory = device_memory
    return cfg


def _absolute(paths: Optional[list[Path]]) -> Optional[list[str]]:
    return [str(p.resolve()) for p in paths] if paths else None


def _print_plan(cfg, study_file: Path) -> None:
    """The worker's memory plan on this machine's device (before anything loads); exit 2 when nothing fits."""
    from .io import pick_device
    from .merge.plan import study_plan

    try:
        plan = study_plan(cfg, pick_device(cfg.device))
    except EvomergeError as e:
        _fail(e, study_file)
    if plan is not None:
        out.print(plan.describe(), highlight=False)


def _open_study(study_file: Path, storage: Optional[str]):
    """The study file's stored study, read through the store alone: reading never builds the search space, starts a
    worker or imports the controller."""
    from .spaces import setup_signature
    from .storage_url import check_storage_url, safe_url
    from .store import StudyStore

    cfg = _load(study_file)
    try:
        url = check_storage_url(storage) if storage else cfg.storage_url()
        store = StudyStore(url, cfg.study, cfg.executor.heartbeat_s, cfg.executor.stale_after_s)
        store.check_setup(setup_signature(cfg))  # a study file whose setup differs is not this study
        if not store.exists():
            _fail(ValueError(f"{study_file}: study {cfg.study!r} not found in {safe_url(url)}; "
                             f"run `evomerge run {study_file}` first"))
    except EvomergeError as e:
        _fail(e, study_file, storage)
    return cfg, store


StorageOpt = typer.Option(None, "--storage", help="SQLAlchemy URL of the study DB (overrides the study file)")
TaskSearchOpt = typer.Option(None, "--task-search-path",
                             help="mergekit-evolve files: folder of lm-eval task YAMLs (as mergekit-evolve's option)")


@app.command()
def run(
    study_file: Path = typer.Argument(..., help="study YAML"),
    budget: Optional[int] = typer.Option(None, "--budget", min=1, help="number of trials (overrides the file)"),
    storage: Optional[str] = StorageOpt,
    check: bool = typer.Option(False, "--check", help="validate the study file offline (no download, no DB) and exit"),
    task_search_path: Optional[list[Path]] = TaskSearchOpt,
    device_memory: Optional[float] = typer.Option(None, "--device-memory", min=0.001,
                                                  help="GB a worker may use on its device (overrides worker.device_memory)"),
) -> None:
    """Run (or resume) a study until its budget of trials is reached, then print the test-split table.

    A mergekit-evolve config runs as the study it means (`--budget` plays `--max-fevals`; the study is named after
    the file and stored beside it unless --storage says otherwise); `evomerge convert` writes that study out."""
    from .study import Study

    if check:
        _check(study_file, task_search_path, device_memory)
        return
    cfg = _load(study_file, task_search_path, device_memory)
    total = budget or cfg.budget
    study = None
    _INTERRUPTS.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_interrupt(sys.unraisablehook)
    try:  # whatever ends the run (done, a bad input, Ctrl-C), the executor's workers are shut down
        try:
            study = Study(cfg, storage)
            with study.exclusive():  # a second runner on a SQLite study is refused here, before loading anything
                _run(study, total, study_file)
        except EvomergeError as e:
            _fail(e, study_file, storage)
    except KeyboardInterrupt:
        done = study.finished() if study is not None else 0
        err.print(f"interrupted at {done}/{total} trials; re-run the same command to resume", highlight=False)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        if study is not None:
            study.executor.close()


_INTERRUPTS: list[int] = []


def _on_sigint(signum: int, frame: object) -> None:
    """Ctrl-C during `run`: remembered as well as raised.  Python raises KeyboardInterrupt wherever the main thread
    is, and inside a weakref callback or a ``__del__`` it is printed and ignored, so the run would go on to its end;
    the loop raises it again after the next trial (`_stop_if_interrupted`)."""
    _INTERRUPTS.append(signum)
    raise KeyboardInterrupt


def _quiet_interrupt(hook: Callable[[Any], object]) -> Callable[[Any], None]:
    """An unraisable-exception hook that drops the KeyboardInterrupt `_on_sigint` raised inside a weakref callback or a
    ``__del__`` (Python would print its traceback; the loop stops the run after the next trial) and passes anything
    else to `hook`."""
    def quiet(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _INTERRUPTS):
            hook(unraisable)
    return quiet


def _stop_if_interrupted() -> None:
    if _INTERRUPTS:
        raise KeyboardInterrupt


def _run(study, total: int, study_file: Path) -> None:
    """Check the DB, print the plan, start the workers, run the study to `total` trials with a progress bar, print
    the final tables."""
    from .storage_url import safe_url

    cfg = study.cfg
    out.print(f"study [bold]{cfg.study}[/] in {safe_url(study.storage_url)}")
    study.check_compatible()  # the DB first: reachable, and the stored setup this file's, before any weight is read
    out.print(f"search space {study.space.describe()}: dimension {study.space.dimension}")
    _print_plan(cfg, study_file)
    if cfg.executor.name == "ray":
        address = cfg.executor.address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
        out.print(f"executor ray at {address}")
    study.executor.start()  # loads parents and tasks; nothing is written to the DB before this succeeds
    done = study.finished()
    if done:
        out.print(f"resuming study {cfg.study}: {done} of {total} trials done")
    with trial_bar(total, done) as update:
        study.run(total, on_trial=lambda p: (_stop_if_interrupted(), update(p.done, p.best)))
        done = study.store.finished()
        best = study.store.best()
        update(min(done, total), best.value if best else None)
    print_table(study.final_table())
    print_final_eval(study.final_eval())


def _check(study_file: Path, task_search_path: Optional[list[Path]] = None,
           device_memory: Optional[float] = None) -> None:
    """Everything that can be checked without downloading models or data, and a list of what was not."""
    from .fitness import FitnessError, check_tasks

    cfg = _load(study_file, task_search_path, device_memory, download=False)  # local models: headers checked
    try:
        models = [m for m in [cfg.models.base, *cfg.models.parents] if m]
        local = [m for m in models if Path(m).is_dir()]
        notes = check_tasks(cfg.fitness)
    except FitnessError as e:
        _fail(ValueError(f"{study_file}: {e}"))
    except EvomergeError as e:
        _fail(e)
    out.print(f"[green]ok[/] {study_file}: fields, merge method, search space, optimizer, fitness tasks")
    hub = [m for m in models if m not in local]
    for m in local:
        out.print(f"  model {m}: local directory")
    for m in hub:
        out.print(f"  model {m}: Hub id, syntax only (existence, architecture and tokenizer not checked offline)")
    for n in notes:
        out.print(f"  {n}")
    _print_plan(cfg, study_file)


@app.command()
def status(
    study_file: Path = typer.Argument(..., help="study YAML"),
    as_json: bool = typer.Option(False, "--json", help="print the status as JSON"),
    storage: Optional[str] = StorageOpt,
) -> None:
    """Trials done / failed / running, the best score and recipe, and the final table once computed."""
    _, store = _open_study(study_file, storage)
    s = store.summary()
    if as_json:
        sys.stdout.write(json.dumps(s, indent=2) + "\n")
        return
    out.print(f"study [bold]{s['study']}[/]: {s['complete']} complete, {s['fail']} failed, {s['running']} running, "
              f"{s['waiting']} waiting "
              f"(dimension {s['dimension']})")
    if s["best"]:
        out.print(f"best trial {s['best']['trial']}: {s['best']['value']:.4f} {s['best']['scores']}")
        if s["best"]["recipe"]:
            out.print(compact_recipe(s["best"]["recipe"]), highlight=False, markup=False)
    for e in s["errors"][:5]:
        out.print(f"[yellow]trial {e['trial']} failed:[/] {e['error']}")
    if s["examples"]:
        out.print(f"examples evaluated on the search split: {s['examples']} ({s['raced_out']} trials stopped early by racing)")
    if s["pareto_front"]:
        print_pareto(s["pareto_front"])
    if s["final_table"]:
        print_table(s["final_table"])
    if s["final_eval"]:
        print_final_eval(s["final_eval"])


@app.command()
def export(
    study_file: Path = typer.Argument(..., help="study YAML"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="recipe YAML to write"),
    pareto: Optional[Path] = typer.Option(None, "--pareto", help="folder: one recipe YAML per Pareto-front member"),
    fmt: str = typer.Option("evomerge", "--format", help="evomerge (this tool's recipe) or mergekit (a merge config)"),
    storage: Optional[str] = StorageOpt,
) -> None:
    """Write the best trial's recipe as a standalone YAML (evomerge's recipe or a mergekit config), or the Pareto
    front as one recipe per member."""
    from .recipe import Recipe

    if (output is None) == (pareto is None):
        _fail(ValueError("give exactly one of -o/--output FILE or --pareto DIR"))
    if fmt not in ("evomerge", "mergekit"):
        _fail(ValueError(f"--format: {fmt!r} is not one of evomerge, mergekit"))
    cfg, store = _open_study(study_file, storage)
    final = {r["trial"]: r for r in (store.get("final_eval") or {}).get("rows", [])}
    if pareto is not None:
        front = store.pareto_front()
        if not front:
            _fail(ValueError(f"{study_file}: study {cfg.study!r} has no Pareto front "
                             "(it needs optimizer nsga2 and at least one completed trial)"))
        for t in front:
            path = pareto / f"trial-{t.number:05d}.yaml"
            _write_recipe(Recipe.from_dict(t.recipe), path, t, final.get(t.number), fmt)
        out.print(f"wrote {len(front)} recipes to {pareto} (Pareto front on {', '.join(t.task for t in cfg.fitness.tasks)})")
        return
    best = store.best()
    if best is None:
        _fail(ValueError(f"{study_file}: study {cfg.study!r} has no completed trial yet"))
    _write_recipe(Recipe.from_dict(best.recipe), output, best, final.get(best.number), fmt)
    test = final.get(best.number, {}).get("test")
    out.print(f"wrote {output} (trial {best.number}, search score {best.value:.4f}"
              + (f", test score {test:.4f})" if test is not None else ", no final evaluation yet)"))


def _write_recipe(recipe, path: Path, trial, final: Optional[dict], fmt: str = "evomerge") -> None:
    """The recipe YAML, headed by comment lines with the trial's search and (when run) final test scores."""
    from .recipefile import write_recipe

    lines = [f"# trial {trial.number}: search score {trial.value:.4f} {json.dumps(trial.scores)}"]
    if final and final.get("test") is not None:
        lines.append(f"# final evaluation (test split): {final['test']:.4f} {json.dumps(final['per_task'])}")
    try:
        write_recipe(recipe, path, fmt, lines)
    except OSError as e:
        _fail(ValueError(f"{path}: cannot write the recipe ({e.strerror})"))
    except ValueError as e:
        _fail(ValueError(f"{path}: {e}"))


@app.command()
def report(
    study_file: Path = typer.Argument(..., help="study YAML"),
    output: Path = typer.Option(..., "-o", "--output", help="folder for the PNG plots and summary.md"),
    top: int = typer.Option(5, "--top", min=1, help="how many of the best trials to compare task by task"),
    storage: Optional[str] = StorageOpt,
) -> None:
    """Plots (scores over trials, per-task scores of the top trials, the winning recipe) and a markdown summary."""
    from .report import write_report
    from .storage_url import safe_url

    _, store = _open_study(study_file, storage)
    try:
        summary = write_report(store, output, safe_url(store.url), top)
    except OSError as e:
        _fail(ValueError(f"{output}: cannot write the report ({e.strerror})"))
    out.print(f"wrote {summary}")


@app.command()
def merge(
    recipe_file: Path = typer.Argument(..., help="recipe YAML: evomerge's (from `evomerge export`) or a mergekit config"),
    out_dir: Path = typer.Argument(..., help="output model directory"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    shard_size: float = typer.Option(2.0, "--shard-size", min=0.001, help="largest safetensors shard, in GB"),
) -> None:
    """Stream a recipe into a Hugging Face model directory: safetensors shards + index, config, tokenizer, model card.

    Tensors are merged one at a time from the parents' (sharded) safetensors, so memory stays at a few tensors per
    parent whatever the model size.
    """
    from .config import check_device
    from .io import pick_device
    from .recipefile import load_recipe
    from .spaces import SearchSpace

    notes: list[str] = []
    try:
        check_device(device)
    except ValueError as e:
        _fail(ValueError(f"--device: {e}"))
    try:
        recipe = load_recipe(recipe_file, notes)
        print_notes(recipe_file, notes)
        SearchSpace.of_recipe(recipe).write_model(recipe, out_dir, pick_device(device), int(shard_size * 1e9))
    except EvomergeError as e:
        _fail(e, recipe_file)
    except OSError as e:
        _fail(ValueError(f"{out_dir}: cannot write the model ({e.strerror})"))
    out.print(f"wrote {out_dir}")


@app.command()
def convert(
    evolve_file: Path = typer.Argument(..., help="mergekit-evolve config YAML"),
    output: Path = typer.Option(..., "-o", "--output", help="evomerge study YAML to write"),
    budget: Optional[int] = typer.Option(None, "--budget", min=1, help="trials (mergekit-evolve's --max-fevals)"),
    random_seed: Optional[int] = typer.Option(None, "--random-seed", help="the study's seed (as mergekit-evolve's)"),
    task_search_path: Optional[list[Path]] = TaskSearchOpt,
) -> None:
    """Write the evomerge study a mergekit-evolve config means, for editing; what differs is noted at its top."""
    import yaml

    from .config import ConfigError
    from .evolve import is_evolve, relocated, study_from_evolve
    from .studyfile import load_study
    from .userfile import load_yaml

    try:
        data = load_yaml(evolve_file, "mergekit-evolve config")
        if not is_evolve(data):
            raise ConfigError(evolve_file, "genome", "not a mergekit-evolve config (it has no genome)")
        study, notes = study_from_evolve(data, evolve_file, _absolute(task_search_path))
    except EvomergeError as e:
        _fail(e)
    if budget:
        study["budget"] = budget
    if random_seed is not None:
        study["seed"] = random_seed
    study = relocated(study, evolve_file.resolve().parent, output.resolve().parent)
    header = [f"# converted from the mergekit-evolve config {evolve_file} by `evomerge convert`"]
    header += [f"# note: {n}" for n in notes]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("\n".join(header) + "\n" + yaml.safe_dump(study, sort_keys=False))
    except OSError as e:
        _fail(ValueError(f"{output}: cannot write the study ({e.strerror})"))
    try:
        load_study(output, download=False)
    except EvomergeError as e:
        output.unlink()
        _fail(e)
    print_notes(evolve_file, notes)
    out.print(f"wrote {output}: study {study['study']!r}; check it with `evomerge run {output} --check`")


if __name__ == "__main__":
    app()
