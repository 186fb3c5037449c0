"""What the CLI prints: the two consoles, the result tables and the compact recipe, apart from the commands.

Messages are never markup: a path or value printed verbatim can hold ``[`` brackets.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .errors import shorten

# not a terminal (a log file, a pipe, CI): lines as long as they are, never wrapped mid-message
out = Console(soft_wrap=not sys.stdout.isatty())
err = Console(stderr=True, soft_wrap=True)


class Guarded(typer.core.TyperGroup):
    """Whatever escapes a command unexpectedly is one line, `error: ...` and what to do, exit 2 for bad input or the
    environment (ValueError, OSError) and 1 for anything else; the traceback only with --debug."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors and exits, already worded
            raise
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:
            if ctx.params.get("debug") or os.environ.get("EVOMERGE_DEBUG"):
                raise
            code = 2 if isinstance(e, (ValueError, OSError)) else 1
            err.print(Text.assemble(("error: ", "bold red"), shorten(f"{type(e).__name__}: {e}", 600)),
                      highlight=False)
            err.print("this was not expected: re-run with `evomerge --debug ...` for the traceback, and please report "
                      "it with the command and that traceback", highlight=False)
            raise typer.Exit(code) from None


def print_notes(file: Path, notes: list[str]) -> None:
    """One line per setting read but not applied as written: never silence."""
    for n in notes:
        err.print(Text.assemble(("note: ", "bold yellow"), f"{file}: {n}"), highlight=False, soft_wrap=True)


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def print_table(rows: list[dict]) -> None:
    table = Table(title="test split")
    table.add_column("model")
    table.add_column("test", justify="right")
    table.add_column("search", justify="right")
    tasks = sorted({k for r in rows for k in (r.get("per_task") or {})})
    for k in tasks:
        table.add_column(k, justify="right")
    for r in rows:
        per = r.get("per_task") or {}
        table.add_row(r["model"], fmt(r["test"]), fmt(r.get("search")), *[fmt(per.get(k)) for k in tasks])
    out.print(table)


def compact_recipe(r: dict, groups_shown: int = 8) -> str:
    """A recipe in a few lines: method and models by name, then per group its values (one per parent), or the
    layer path; `evomerge export` writes it whole."""
    names = ", ".join(Path(p).name for p in r["parents"])
    lines = [f"best recipe: {r['method']} of {names}" + (f" on base {Path(r['base']).name}" if r.get("base") else "")
             + (f", options {r['options']}" if r.get("options") else "")]
    if r.get("path"):
        path = r["path"]
        if path.get("a"):
            lines.append("  model 0 (A): " + compact_recipe(path["a"], groups_shown).split("\n")[0].removeprefix(
                "best recipe: "))
        scales = path.get("scales") or [1.0] * len(path["layers"])
        lines.append("  path [model:layer×scale]: " + " ".join(
            f"{m}:{layer}×{sc:.2f}" for (m, layer), sc in zip(path["layers"], scales)))
        return "\n".join(lines)
    items = list(r["groups"].items())
    for g, values in items[:groups_shown]:
        lines.append(f"  {g}: " + ", ".join(f"{k} " + " ".join(f"{v:.3f}" for v in vs) for k, vs in values.items()))
    if len(items) > groups_shown:
        lines.append(f"  ... {len(items) - groups_shown} more groups (evomerge export -o FILE writes them all)")
    return "\n".join(lines)


def print_pareto(front: list[dict]) -> None:
    table = Table(title="Pareto front (search split, one objective per task)")
    table.add_column("trial", justify="right")
    tasks = sorted({k for r in front for k in (r.get("scores") or {})})
    for k in tasks:
        table.add_column(k, justify="right")
    table.add_column("weighted", justify="right")
    for r in front:
        table.add_row(str(r["trial"]), *[fmt((r["scores"] or {}).get(k)) for k in tasks], fmt(r["value"]))
    out.print(table)


def print_final_eval(rows: list[dict]) -> None:
    table = Table(title="final evaluation: top trials re-scored on the test split")
    for c in ("rank", "trial", "search", "test"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(str(r["rank"]), str(r["trial"]), fmt(r["search"]), fmt(r["test"]))
    out.print(table)


@contextlib.contextmanager
def trial_bar(total: int, done: int) -> Iterator[Callable[[int, Optional[float]], None]]:
    """A progress bar over a study's trials (count, best score so far, elapsed, ETA); yields its update(done, best)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=out, transient=False) as bar:
        task = bar.add_task("trials", total=total, completed=min(done, total), best="-")
        yield lambda completed, best: bar.update(task, completed=completed, best=fmt(best))
