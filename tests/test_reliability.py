"""Reliability: a killed study resumes into the same study, a broken candidate fails only its own trial, and nothing
unsafe is loaded or leaked.  Real subprocesses, real SIGKILL, real SQLite, the real tiny zoo and lm-eval."""
from __future__ import annotations

import gc
import math
import pickle
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from evomerge.config import load_study
from evomerge.executors import LocalExecutor
from evomerge.study import ATTR, Study
from tests.conftest import write_study

BUDGET = 16


def run(cmd, *args, timeout=300):
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def small_study(tmp: Path, **overrides) -> Path:
    """Four generations of four candidates, ten examples per task: a study whose trials take a fraction of a second."""
    path = write_study(tmp, budget=BUDGET, baselines={"weight": [0.5], "density": [0.5]}, **overrides)
    data = yaml.safe_load(path.read_text())
    data["fitness"]["limit"] = 10
    path.write_text(yaml.safe_dump(data))
    return path


def finished(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("select count(*) from trials where state in ('COMPLETE','FAIL')").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def history(study_file: Path) -> list[tuple]:
    """What the study decided, trial by trial, in proposal order: the sequence a resume must reproduce exactly."""
    cfg = load_study(study_file)
    st = optuna.load_study(study_name=cfg.study, storage=cfg.storage_url())
    rows = []
    for t in st.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append((a[ATTR + "generation"], a[ATTR + "index"], t.state.name, a[ATTR + "genome"], a[ATTR + "recipe"],
                     t.value, a.get(ATTR + "scores"), a.get(ATTR + "error")))
    return sorted(rows, key=lambda r: (r[0], r[1]))


def test_a_study_killed_at_ten_random_points_resumes_into_the_uninterrupted_study(tmp_path, evomerge_cmd):
    reference = small_study(tmp_path / "reference" if (tmp_path / "reference").mkdir() is None else None)
    r = run(evomerge_cmd, "run", reference)
    assert r.returncode == 0, r.stderr

    killed = small_study(tmp_path / "killed" if (tmp_path / "killed").mkdir() is None else None)
    db = killed.parent / "tiny-ps.db"
    rng = random.Random(20240607)
    targets = sorted(rng.sample(range(BUDGET - 1), 10))  # kill once at least this many trials have finished ...
    kills_mid_study = 0
    for target in targets:
        proc = subprocess.Popen([*evomerge_cmd, "run", str(killed)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while finished(db) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))  # ... plus a random fraction of a trial: inside materialize, lm-eval, a write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills_mid_study += finished(db) < BUDGET
        proc.wait()
    assert kills_mid_study >= 8, "the kills should land while trials are still being evaluated"
    r = run(evomerge_cmd, "run", killed)
    assert r.returncode == 0, r.stderr

    resumed, uninterrupted = history(killed), history(reference)
    assert len(uninterrupted) == BUDGET
    assert [row[:2] for row in resumed] == [(g, i) for g in range(4) for i in range(4)]
    assert resumed == uninterrupted
    with sqlite3.connect(db) as c:
        assert c.execute("select count(*) from trials").fetchone()[0] == BUDGET, "a killed trial was duplicated"


# ---------------------------------------------------------------------------------------------- candidate failures
@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    return LocalExecutor(load_study(small_study(tmp_path_factory.mktemp("ex"))))


class Poisoned:
    """The real executor, with one candidate's recipe poisoned so that the real merge and model break on it."""

    name = "local"

    def __init__(self, inner: LocalExecutor, poison):
        self.inner, self.poison, self.calls = inner, poison, 0

    @property
    def worker(self):
        return self.inner.worker

    def evaluate(self, recipe, split="search"):
        self.calls += 1
        if self.calls == 2:
            self.poison(recipe)
        return self.inner.evaluate(recipe, split)


def _nan_weight(recipe) -> None:
    recipe.groups["layers.1"]["weight"] = [float("nan"), 0.5]


def run_with(study_file: Path, executor, budget: int = 6) -> optuna.Study:
    return Study(load_study(study_file), executor=executor).run(budget)


def test_nan_weights_give_nan_logits_and_fail_only_their_trial(tmp_path, executor):
    st = run_with(small_study(tmp_path), Poisoned(executor, _nan_weight))
    states = [t.state for t in st.get_trials()]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 5
    failed = next(t for t in st.get_trials() if t.state == TrialState.FAIL)
    assert failed.user_attrs[ATTR + "recipe"]["groups"]["layers.1"]["weight"][0] != failed.user_attrs[ATTR + "recipe"]["groups"]["layers.1"]["weight"][0]
    assert "NaN" in failed.user_attrs[ATTR + "error"]


def test_the_model_is_whole_again_after_a_nan_candidate(executor):
    space = Study(executor.cfg, executor=executor).space
    before = executor.evaluate(space.uniform(0.5, 0.5)).score.value
    bad = space.uniform(0.5, 0.5)
    _nan_weight(bad)
    assert executor.evaluate(bad).score is None
    assert executor.evaluate(space.uniform(0.5, 0.5)).score.value == before


class RaisingTask:
    """A fitness that raises inside lm-eval's evaluation, the way a broken task or metric would."""


def test_an_exception_inside_fitness_fails_the_trial_with_its_reason(tmp_path, executor, monkeypatch):
    fitness = executor.worker.fitness
    real = fitness.score
    calls = {"n": 0}

    def score(split="search"):
        calls["n"] += 1
        if calls["n"] == 3:
            return real("no-such-split")
        return real(split)

    monkeypatch.setattr(fitness, "score", score)
    st = run_with(small_study(tmp_path), executor)
    failed = [t for t in st.get_trials() if t.state == TrialState.FAIL]
    assert len(failed) == 1 and len(st.get_trials()) == 6
    assert "no-such-split" in failed[0].user_attrs[ATTR + "error"] or "KeyError" in failed[0].user_attrs[ATTR + "error"]
