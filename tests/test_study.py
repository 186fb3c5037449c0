"""The controller on the real tiny zoo, real lm-eval and a real SQLite study DB."""
import optuna
import pytest
from optuna.trial import TrialState

from evomerge.executors import LocalExecutor, TrialResult
from evomerge.study import Study
from evomerge.studyfile import load_study
from tests.conftest import records, write_study


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    return LocalExecutor(load_study(write_study(tmp_path_factory.mktemp("ex"))))


def test_run_stops_at_the_budget_and_stores_every_trial(study_file, executor):
    study = Study(load_study(study_file), executor=executor)
    study.run(6)
    trials = study.store.records()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    t = trials[0]
    assert None not in (t.genome, t.recipe, t.timings, t.generation, t.index)
    assert set(t.scores) == {"tiny_up", "tiny_rot"}


def test_running_again_resumes_without_re_evaluating(study_file, executor):
    cfg = load_study(study_file)
    Study(cfg, executor=executor).run(5)
    before = {t.number: t.datetime_complete for t in optuna.load_study(study_name=cfg.study, storage=cfg.storage_url()).trials}
    after = Study(cfg, executor=executor).run(9).get_trials()
    assert len(after) == 9
    assert all(after[n].datetime_complete == dt for n, dt in before.items())
    keys = [(t.generation, t.index) for t in records(study_file)]
    assert len(set(keys)) == 9


class FailingSecond(LocalExecutor):
    """The real local executor, except that the second candidate's fitness raises, as a broken candidate would."""

    def __init__(self, inner):
        super().__init__(inner.cfg)
        self._worker, self.calls = inner.worker, 0

    def results(self, timeout=None):
        self.calls += 1
        if self.calls == 2:
            key = self._queue.pop(0)[0]
            return [(key, TrialResult(None, {}, "FloatingPointError: task tiny_up: metric exact_match is NaN"))]
        return super().results(timeout)


def test_a_failing_candidate_fails_its_trial_and_the_study_goes_on(study_file, executor):
    Study(load_study(study_file), executor=FailingSecond(executor)).run(6)
    trials = records(study_file)
    states = [t.state for t in trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 5
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    assert "NaN" in failed.error


def test_worker_reports_a_broken_recipe_as_an_error_not_an_exception(executor):
    recipe = Study(executor.cfg, executor=executor).space.uniform(0.5, 0.5)
    recipe.groups["layers.1"]["weight"] = [0.5]  # one weight for two parents
    result = executor.evaluate(recipe)
    assert result.score is None and result.error


def test_optimizer_state_is_persisted_each_generation(study_file, executor):
    study = Study(load_study(study_file), executor=executor)
    study.run(4)
    assert study.store.get("optimizer")["generation"] == 1
    study.run(8)
    assert study.store.get("optimizer")["generation"] == 2
