"""Racing's rules as pure functions: stage sizes, the paired stopping rule, the control-variate estimate, the stage
loop over a scoring function, and what the optimizer is told of a raced trial.  No model: a candidate here is a table
of per-example scores, which is all racing ever sees of one."""
import pytest
from optuna.trial import TrialState

from evomerge.racing import estimate, example_order, keep_racing, race, stage_sizes
from evomerge.store import RACED_OUT, TrialRecord
from evomerge.study import losses


def scorer(table: dict[str, list[float]], asked: list | None = None):
    """`race`'s score callable for a candidate whose per-example values are `table` (by example index); records
    what it was asked for."""
    def score(samples):
        if asked is not None:
            asked.append({k: list(v) for k, v in samples.items()})
        return sum(len(v) for v in samples.values()), {k: [table[k][i] for i in v] for k, v in samples.items()}
    return score


def ordered(table: dict[str, list[float]], order: dict[str, list[int]]) -> dict[str, list[float]]:
    """A table's values in racing order: what an incumbent's stored `example_scores` hold."""
    return {k: [table[k][i] for i in order[k]] for k in order}


ORDER = {"a": example_order("a", 40, seed=0), "b": example_order("b", 40, seed=0)}
W = {"a": 1.0, "b": 1.0}


# ---------------------------------------------------------------- stage sizes and example order
def test_stage_sizes_start_at_the_minimum_and_end_at_the_full_subset():
    for minimum, factor, full in [(10, 3, 100), (10, 2, 40), (1, 3, 1000), (25, 1.5, 30)]:
        sizes = stage_sizes(minimum, factor, full)
        assert sizes[0] >= min(minimum, full) and sizes[-1] == full and sizes == sorted(set(sizes))
    assert stage_sizes(10, 3, 100) == [10, 30, 100]


def test_a_stage_too_close_to_the_full_subset_is_skipped():
    assert stage_sizes(25, 1.5, 30) == [30]


def test_fewer_examples_than_the_minimum_are_scored_all_at_once():
    assert stage_sizes(50, 3, 20) == [20]


def test_the_example_order_is_a_permutation_fixed_by_seed_and_task():
    order = example_order("a", 50, seed=3)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == example_order("a", 50, seed=3)
    assert order != example_order("b", 50, seed=3) and order != example_order("a", 50, seed=4)


# ---------------------------------------------------------------- the stopping rule
def test_keep_racing_drops_only_candidates_clearly_below_the_incumbent():
    w = {"a": 1.0}
    inc = {"a": [1.0, 0.0] * 5}
    assert keep_racing({"a": [0.0, 1.0] * 5}, inc, w, 1.0)  # as good on average, on other examples
    assert keep_racing({"a": [0.0] + inc["a"][1:]}, inc, w, 1.0)  # one example lost: within the bound
    assert not keep_racing({"a": [0.0] * 10}, inc, w, 1.0)
    assert keep_racing({"a": [0.0] * 10}, {"a": [1.0] + [0.0] * 9}, w, 1.0)  # one loss in ten is not proof


def test_keep_racing_pairs_examples_so_a_consistent_small_loss_is_caught():
    """Three losses in 30 and no win: a difference no unpaired bound on scores of 0.47 and 0.57 could see."""
    inc = {"a": [1.0] * 17 + [0.0] * 13}
    cand = {"a": [0.0] * 3 + [1.0] * 14 + [0.0] * 13}
    assert not keep_racing(cand, inc, {"a": 1.0}, 1.0)
    assert keep_racing(cand, inc, {"a": 1.0}, 4.0)  # a wide enough bound keeps everyone


def test_keep_racing_keeps_a_candidate_the_incumbent_has_no_scores_to_compare_with():
    assert keep_racing({"a": [0.0] * 10}, {"a": [1.0] * 5}, {"a": 1.0}, 1.0)


def test_keep_racing_weighs_each_tasks_difference_by_its_weight():
    """Every example lost on a task that weighs nothing is no reason to stop."""
    cand, inc = {"a": [0.0] * 10, "b": [1.0] * 10}, {"a": [1.0] * 10, "b": [1.0] * 10}
    assert keep_racing(cand, inc, {"a": 0.0, "b": 1.0}, 1.0)
    assert not keep_racing(cand, inc, {"a": 1.0, "b": 1.0}, 1.0)


def test_with_a_single_example_the_variance_is_taken_as_its_largest():
    """One loss in one example is within a z = 1 bound of variance 1; a z of 0 trusts the mean alone."""
    assert keep_racing({"a": [0.0]}, {"a": [1.0]}, {"a": 1.0}, 1.0)
    assert not keep_racing({"a": [0.0]}, {"a": [1.0]}, {"a": 1.0}, 0.0)


# ---------------------------------------------------------------- the control variate
def test_a_stopped_candidate_is_estimated_at_the_incumbents_full_score_plus_the_paired_difference():
    """Right on the first 10 examples and wrong on the other 30, the incumbent scores 0.25 in full; a candidate
    scoring 0.8 on those 10 is estimated at 0.25 + (0.8 - 1)."""
    incumbent = {"a": [1.0] * 10 + [0.0] * 30}
    assert estimate({"a": 0.8}, incumbent, {"a": 10}) == pytest.approx({"a": 0.05})


def test_the_estimate_of_a_candidate_equal_to_the_incumbent_on_its_examples_is_the_incumbents_score():
    incumbent = {"a": [1.0, 0.0, 0.0, 1.0] * 10}
    assert estimate({"a": 0.5}, incumbent, {"a": 4}) == pytest.approx({"a": 0.5})


# ---------------------------------------------------------------- the stage loop
def test_without_an_incumbent_every_stage_runs_and_the_result_is_the_plain_mean():
    table = {"a": [float(i % 3 == 0) for i in range(40)], "b": [float(i % 2) for i in range(40)]}
    r = race(ORDER, scorer(table), None, W, min_examples=10, factor=2, z=1.0)
    assert r.full and [s["examples"]["a"] for s in r.stages] == [10, 20, 40] and r.examples == 80
    assert r.per_task == pytest.approx({k: sum(v) / 40 for k, v in table.items()})
    assert r.values == ordered(table, ORDER)


def test_each_stage_asks_only_for_its_new_examples_in_racing_order():
    asked: list = []
    race(ORDER, scorer({"a": [1.0] * 40, "b": [1.0] * 40}, asked), None, W, 10, 2, 1.0)
    assert [s["a"] for s in asked] == [ORDER["a"][:10], ORDER["a"][10:20], ORDER["a"][20:40]]


def test_a_candidate_clearly_below_the_incumbent_stops_after_the_first_stage():
    incumbent = {"a": [1.0] * 40, "b": [1.0] * 40}
    r = race(ORDER, scorer({"a": [0.0] * 40, "b": [0.0] * 40}), incumbent, W, 10, 2, 1.0)
    assert not r.full and len(r.stages) == 1 and r.examples == 20
    assert r.stages[0]["examples"] == {"a": 10, "b": 10} and r.values == {"a": [0.0] * 10, "b": [0.0] * 10}
    assert r.per_task == pytest.approx({"a": 0.0, "b": 0.0})  # 1 + (0 - 1): the control variate


def test_a_candidate_as_good_as_the_incumbent_runs_to_the_end():
    table = {"a": [float(i % 2) for i in range(40)], "b": [1.0] * 40}
    r = race(ORDER, scorer(table), ordered(table, ORDER), W, 10, 2, 1.0)
    assert r.full and len(r.stages) == 3 and r.examples == 80


def test_the_last_stage_is_never_followed_by_a_check():
    """Even a candidate below the incumbent at every stage is scored in full once its last stage has run; with a
    single stage there is no check at all."""
    one = {"a": example_order("a", 8, seed=0)}
    r = race(one, scorer({"a": [0.0] * 8}), {"a": [1.0] * 8}, {"a": 1.0}, 10, 2, 1.0)
    assert r.full and len(r.stages) == 1 and r.per_task == {"a": 0.0}


def test_a_task_with_fewer_examples_stays_at_its_full_count_while_the_others_grow():
    order = {"a": example_order("a", 40, seed=0), "b": example_order("b", 12, seed=0)}
    r = race(order, scorer({"a": [1.0] * 40, "b": [1.0] * 12}), None, W, 10, 2, 1.0)
    assert [s["examples"] for s in r.stages] == [{"a": 10, "b": 12}, {"a": 20, "b": 12}, {"a": 40, "b": 12}]
    assert r.examples == 52


# ---------------------------------------------------------------- what the optimizer is told
def told(value, full: bool = True, stages: int = 0, values=None) -> float | list[float]:
    """What the optimizer is told of a finished trial with these values and racing attrs."""
    values = values or [value]
    return TrialRecord(number=0, trial_id=0, state=TrialState.COMPLETE, values=values, value=values[0],
                       full_fidelity=full, stages=[{}] * stages).told


def test_a_full_fidelity_trial_is_told_its_value():
    assert told(0.4) == 0.4


def test_a_raced_out_trial_ranks_below_every_full_fidelity_trial():
    assert told(0.99, full=False, stages=2) < told(0.0)
    assert told(0.5, full=False, stages=2) == pytest.approx(0.5 - RACED_OUT + 2)


def test_among_raced_out_trials_the_one_that_ran_more_stages_ranks_higher():
    assert told(0.1, full=False, stages=2) > told(0.9, full=False, stages=1)


def test_a_multi_objective_trial_is_told_its_values_unchanged():
    assert told(None, full=False, stages=1, values=[0.2, 0.7]) == [0.2, 0.7]


def test_losses_negate_told_values_so_lower_is_better():
    assert losses([0.25, 0.75]) == [-0.25, -0.75]


def test_a_failed_candidate_loses_by_one_more_than_the_worst_of_its_generation():
    assert losses([0.25, None, 0.75]) == [-0.25, 0.75, -0.75]
    assert losses([None, None]) == [1.0, 1.0]


def test_with_several_objectives_a_failed_candidate_is_worst_on_each():
    assert losses([[0.5, 0.1], None, [0.2, 0.9]], objectives=2) == [[-0.5, -0.1], [0.8, 0.9], [-0.2, -0.9]]
