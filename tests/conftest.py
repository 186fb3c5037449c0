"""Shared fixtures: the shipped tiny zoo, a copy of the demo study pointed at a temporary DB, the evomerge command
run in this process, and a study's trials as the store reads them."""
from __future__ import annotations

import os
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "experiments" / "tiny"
FITNESS = ROOT / "fitness" / "tiny"


@pytest.fixture(scope="session")
def tiny() -> Path:
    return TINY


def write_study(tmp: Path, **overrides) -> Path:
    """A study file in `tmp` using the shipped zoo and fitness tasks (absolute paths), small enough for tests."""
    data = yaml.safe_load((TINY / "study.yaml").read_text())
    data["models"] = {"base": str(TINY / "base"), "parents": [str(TINY / "up"), str(TINY / "rot")]}
    data["fitness"]["include_path"] = str(FITNESS)
    data["fitness"]["limit"] = 40
    data["budget"] = 6
    data["optimizer"] = {"name": "cmaes", "popsize": 4}
    data["baselines"] = {"weight": [0.5, 1.0], "density": [0.5]}
    for k, v in overrides.items():
        data[k] = v
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_fitness(path: Path, **fields) -> Path:
    """The study file at `path` with these `fitness:` fields set."""
    data = yaml.safe_load(path.read_text())
    data["fitness"].update(fields)
    path.write_text(yaml.safe_dump(data))
    return path


BUDGET = 16


def small_study(tmp: Path, **overrides) -> Path:
    """Four generations of four candidates, ten examples per task: a study whose trials take a fraction of a second."""
    return with_fitness(write_study(tmp, budget=BUDGET, baselines={"weight": [0.5], "density": [0.5]}, **overrides),
                        limit=10)


@pytest.fixture(scope="session")
def small_executor(tmp_path_factory):
    """One local worker on the small study for every test that scores with one: the zoo and lm-eval's tasks are
    loaded once per session.  A test that changes what a worker holds builds its own."""
    from evomerge.executors import LocalExecutor
    from evomerge.studyfile import load_study

    return LocalExecutor(load_study(small_study(tmp_path_factory.mktemp("worker"))))


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    return write_study(tmp_path)


@pytest.fixture
def evomerge_cmd() -> list[str]:
    exe = shutil.which("evomerge")
    assert exe, "the evomerge console script is not installed (pip install -e .)"
    return [exe]


@dataclass(frozen=True)
class Ran:
    """What a command left: its exit code and what it printed (the fields of `subprocess.CompletedProcess`)."""

    returncode: int
    stdout: str
    stderr: str


def evomerge(*args: object) -> Ran:
    """`evomerge ARGS`, run in this process through typer's CliRunner: the same code, exit codes and messages as the
    console script, without its seconds of imports per call.  Tests where a real process is the point (a kill, a
    signal, concurrent runners, a process's memory) start the console script (`evomerge_cmd`) instead."""
    from typer.testing import CliRunner

    from evomerge.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
    return Ran(r.exit_code, r.stdout, stderr)


def records(study_file: Path) -> list:
    """The study's trials as `TrialRecord`s, read through its store (the trial schema has one reader)."""
    from evomerge.store import StudyStore
    from evomerge.studyfile import load_study

    cfg = load_study(study_file)
    store = StudyStore(cfg.storage_url(), cfg.study)
    try:
        return store.records()
    finally:
        store.storage.engine.dispose()
