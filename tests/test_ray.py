"""The Ray executor on a real local Ray (2 CPUs), real actors holding the tiny zoo, real process kills.

One Ray session and one actor pool serve the whole module: starting Ray costs ~5 s and an actor set ~10 s.
"""
import os
import signal
import subprocess
import time

import pytest
import ray
from optuna.trial import TrialState

from evomerge.executors import LocalExecutor, RayExecutor
from evomerge.study import Study
from evomerge.studyfile import load_study
from tests.conftest import write_study

RAY = {"name": "ray", "actors": 2, "num_cpus_per_actor": 1, "threads_per_actor": 1, "max_retries": 2}


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ex = RayExecutor(load_study(write_study(tmp_path_factory.mktemp("ray"), executor=RAY)))
    ex.start()
    yield ex
    ex.close()
    ray.shutdown()


def ray_study(tmp_path, **overrides):
    return load_study(write_study(tmp_path, **{"executor": RAY, **overrides}))


def test_two_cpu_actors_complete_a_study_and_share_its_trials(tmp_path, executor):
    study = Study(ray_study(tmp_path), executor=executor)
    study.run(8)
    trials = study.store.records()
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.worker for t in trials}) == 2


def test_an_actor_scores_a_recipe_exactly_as_the_local_executor_does(tmp_path, executor):
    cfg = ray_study(tmp_path, executor="local")
    recipe = Study(cfg, executor=executor).space.uniform(0.7, 0.6, seed=3)
    assert executor.evaluate(recipe).score == LocalExecutor(cfg).evaluate(recipe).score


def kill_a_busy_actor(executor, killed):
    """on_trial hook: SIGKILL the process of one actor that is evaluating a trial, once."""

    def hook(progress):
        busy = [w for w in executor.workers() if w["job"] is not None and w["pid"] is not None]
        if not killed and busy:
            os.kill(busy[0]["pid"], signal.SIGKILL)
            killed.append(busy[0])

    return hook


def test_a_killed_actor_is_replaced_and_its_trial_retried(tmp_path, executor):
    killed = []
    study = Study(ray_study(tmp_path), executor=executor)
    study.run(8, on_trial=kill_a_busy_actor(executor, killed))
    assert killed, "no actor was busy when a trial finished"
    trials = study.store.records()
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert any(t.attempts == 2 for t in trials)
    pids = [w["pid"] for w in executor.workers()]
    assert len(pids) == 2 and killed[0]["pid"] not in pids


def test_a_trial_whose_actor_dies_past_max_retries_fails_with_the_reason(tmp_path, executor, monkeypatch):
    monkeypatch.setattr(executor.ec, "max_retries", 0)
    killed = []
    study = Study(ray_study(tmp_path), executor=executor)
    study.run(6, on_trial=kill_a_busy_actor(executor, killed))
    trials = study.store.records()
    states = [t.state for t in trials]
    assert len(states) == 6 and states.count(TrialState.FAIL) == 1
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    assert "worker died 1 times" in failed.error


def test_an_unreachable_ray_address_exits_2_in_seconds_before_the_db_is_touched(tmp_path, evomerge_cmd):
    study = write_study(tmp_path, executor={"name": "ray", "address": "127.0.0.1:1"})
    t0 = time.time()
    r = subprocess.run([*evomerge_cmd, "run", str(study)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "executor.address" in r.stderr and "127.0.0.1:1" in r.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "tiny-ps.db").exists()


@pytest.mark.parametrize("executor,field", [
    ({"name": "local", "actors": 2}, "actors applies only to the ray executor"),
    ({"name": "ray", "heartbeat_s": 10, "stale_after_s": 15}, "stale_after_s (15) must be at least twice"),
    ({"name": "dask"}, "executor.name"),
])
def test_executor_settings_that_cannot_work_are_refused_naming_the_field(tmp_path, executor, field):
    from evomerge.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_study(write_study(tmp_path, executor=executor))
    assert "executor" in str(e.value) and field in str(e.value)
