"""Several `evomerge run` processes on one study in the real PostgreSQL at 127.0.0.1:5432 (trust auth, db `test`).

Without the server these tests skip on a workstation and fail in CI (CI=true), so a CI box without PostgreSQL is
noticed instead of passing quietly.
"""
import os
import signal
import subprocess
import time
import uuid
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.store import StudyStore, TrialRecord
from tests.conftest import evomerge, write_study

URL = os.environ.get("EVOMERGE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
def pg() -> str:
    import psycopg

    try:
        psycopg.connect(URL.replace("+psycopg", ""), connect_timeout=3).close()
    except psycopg.OperationalError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is unreachable at {URL} in CI: {e}")
        pytest.skip(f"PostgreSQL is unreachable at {URL}")
    return URL


@pytest.fixture
def study_name(pg):
    name = f"pg-{uuid.uuid4().hex[:10]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=pg)
    except KeyError:
        pass


def shared_study(tmp_path, name, budget):
    return write_study(tmp_path, study=name, budget=budget,
                       executor={"name": "local", "heartbeat_s": 1, "stale_after_s": 3})


def trials_of(pg, name) -> list[TrialRecord]:
    """The study's trials through its store (KeyError while no runner has created it yet)."""
    store = StudyStore(pg, name)
    try:
        return store.records()
    finally:
        store.storage.engine.dispose()


def test_three_concurrent_runners_finish_exactly_the_budget_without_duplicates(tmp_path, pg, study_name, evomerge_cmd):
    study = shared_study(tmp_path, study_name, budget=16)
    procs = [subprocess.Popen([*evomerge_cmd, "run", str(study), "--storage", pg], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]

    trials = trials_of(pg, study_name)
    assert len(trials) == 16 and all(t.state == TrialState.COMPLETE for t in trials)
    keys = Counter((t.generation, t.index) for t in trials)
    assert max(keys.values()) == 1 and len(keys) == 16
    assert len({t.runner for t in trials}) >= 2, "the runners did not share the work"


def test_a_sigkilled_runner_leaves_no_trial_running_once_the_next_runner_starts(tmp_path, pg, study_name, evomerge_cmd):
    study = shared_study(tmp_path, study_name, budget=10)
    orphans: list[int] = []
    for _ in range(4):  # a tiny candidate takes ~0.3 s: the kill may land just after the trial seen RUNNING finished
        first = subprocess.Popen([*evomerge_cmd, "run", str(study), "--storage", pg],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.2)
            try:
                trials = trials_of(pg, study_name)
            except KeyError:
                continue
            if any(t.state == TrialState.RUNNING for t in trials) and sum(t.state.is_finished() for t in trials) < 8:
                break
        first.send_signal(signal.SIGKILL)
        first.wait()
        orphans = [t.number for t in trials_of(pg, study_name) if t.state == TrialState.RUNNING]
        if orphans:
            break
    assert orphans, "the killed runner held no trial; the test proves nothing"

    r = evomerge("run", study, "--storage", pg)
    assert r.returncode == 0, r.stderr[-2000:]
    trials = trials_of(pg, study_name)
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 10}
    keys = {(t.generation, t.index) for t in trials}
    assert len(keys) == 10
    killed_runner = trials[orphans[0]].runner
    assert killed_runner != f"{os.uname().nodename}:{first.pid}", "the orphaned trial was never re-evaluated"


def test_an_unreachable_database_fails_in_seconds_with_exit_2_and_no_password(tmp_path):
    study = write_study(tmp_path)
    t0 = time.time()
    r = evomerge("run", study, "--storage", "postgresql://alice:s3cret@127.0.0.1:1/test")
    assert r.returncode == 2
    assert "cannot open the study DB" in r.stderr and "127.0.0.1:1" in r.stderr
    assert "s3cret" not in r.stdout + r.stderr
    assert time.time() - t0 < 60


def test_storage_urls_get_an_installed_driver_or_a_clear_refusal():
    from evomerge.config import ConfigError
    from evomerge.storage_url import check_storage_url

    assert check_storage_url("postgresql://u@h/db").startswith("postgresql+psycopg://")
    with pytest.raises(ConfigError, match="not a database URL"):
        check_storage_url("postgres-at-my-host")
