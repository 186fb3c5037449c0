"""Racing on real models (its rules alone: test_racing.py), final evaluation, the contamination guard,
multi-objective search and other fitness sources, on the real tiny zoo with real lm-eval and real SQLite."""
import textwrap
from pathlib import Path

import pytest
import yaml

from evomerge.config import ConfigError
from evomerge.executors import LocalExecutor
from evomerge.fitness import FitnessError, check_contamination, task_index
from evomerge.optimizers import Optimizer, create_optimizer
from evomerge.recipe import Recipe
from evomerge.store import pareto_front
from evomerge.study import Study, build_space
from evomerge.studyfile import load_study
from tests.conftest import ROOT, evomerge, records, with_fitness, write_study

RACING = {"min_examples": 10, "reduction_factor": 2, "z": 1.0}


@pytest.fixture(scope="module")
def racing(tmp_path_factory):
    """An executor whose fitness races on 10 -> 20 -> 40 examples per task (limit 40)."""
    return LocalExecutor(load_study(with_fitness(write_study(tmp_path_factory.mktemp("race")), racing=RACING)))


def unbeatable(n=40):
    """An incumbent's per-example search scores: every example right."""
    return {"tiny_up": [1.0] * n, "tiny_rot": [1.0] * n}


# ---------------------------------------------------------------- racing
def test_racing_never_promotes_fewer_than_the_configured_minimum(racing):
    recipe = build_space(racing.cfg).uniform(0.5, 0.5)
    result = racing.evaluate(recipe, "search", incumbent=unbeatable())
    score = result.score
    assert not score.full and len(score.stages) == 1
    assert score.stages[0]["examples"] == {"tiny_up": 10, "tiny_rot": 10}
    assert score.examples == 20


def test_a_stopped_candidate_is_valued_at_the_incumbents_score_plus_the_paired_difference(racing):
    """Right on the first 10 examples and wrong on the other 30, the incumbent scores 0.25 in full; a candidate
    stopped after those 10 is estimated at 0.25 + (its score there - 1)."""
    recipe = build_space(racing.cfg).uniform(0.5, 0.5)
    incumbent = {k: [1.0] * 10 + [0.0] * 30 for k in ("tiny_up", "tiny_rot")}
    score = racing.evaluate(recipe, "search", incumbent=incumbent).score
    assert not score.full
    measured = score.stages[0]["per_task"]
    assert score.per_task == pytest.approx({k: 0.25 + measured[k] - 1.0 for k in measured})


def test_a_candidate_without_incumbent_runs_every_stage_and_matches_a_plain_evaluation(racing, tmp_path):
    recipe = build_space(racing.cfg).uniform(0.5, 0.5)
    raced = racing.evaluate(recipe, "search", incumbent=None).score
    assert raced.full and [s["examples"]["tiny_up"] for s in raced.stages] == [10, 20, 40] and raced.examples == 80
    plain = LocalExecutor(load_study(write_study(tmp_path))).evaluate(recipe).score
    assert raced.per_task == pytest.approx(plain.per_task) and plain.examples == 80


def test_prebuilt_requests_score_exactly_what_lm_eval_evaluate_scores(racing):
    """The per-candidate fast path (requests built once per split and subset) against lm-eval's own `evaluate`, on
    both splits, a racing subset and its complement, with a candidate whose scores are neither 0 nor 1."""
    worker = racing.worker
    worker.resident.apply(build_space(racing.cfg).uniform(0.3, 0.3))
    fitness = worker.fitness
    order = fitness._stage_order()
    cases = [("search", 40, None), ("test", 40, None),
             ("search", None, {k: v[:10] for k, v in order.items()}),
             ("search", None, {k: v[10:20] for k, v in order.items()})]
    seen = set()
    for split, limit, samples in cases:
        for _ in range(2):  # the second run reuses the prebuilt requests
            fast, n_fast, _ = fitness._run_prebuilt(split, limit, samples)
            slow, n_slow = fitness._evaluate(fitness.tasks(split), limit, samples)
            assert n_fast == n_slow == (80 if samples is None else 20)
            for task, metrics in fast.items():
                reported = {k for k in slow[task] if "," in k and "_stderr" not in k}
                assert set(metrics) == reported
                assert all(metrics[k] == pytest.approx(slow[task][k], abs=1e-12) for k in metrics)
                seen.update(metrics.values())
    assert any(0.0 < v < 1.0 for v in seen)


def test_a_raced_study_records_examples_and_its_best_trial_is_full_fidelity(tmp_path, racing):
    cfg = load_study(with_fitness(write_study(tmp_path), racing=RACING))
    study = Study(cfg, executor=racing)
    study.run(8)
    trials, best = study.store.records(), study.store.best()
    assert all(t.examples >= 20 for t in trials)
    assert best.full_fidelity
    assert all(t.value < best.value for t in trials if not t.full_fidelity)


# ---------------------------------------------------------------- final evaluation
class SplitRecorder(LocalExecutor):
    """The real executor, recording which split each evaluation read."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.splits = []

    def submit(self, key, recipe, split="search", **options):
        self.splits.append(split)
        super().submit(key, recipe, split, **options)


def test_final_evaluation_rescoring_reads_only_the_test_split(tmp_path):
    cfg = load_study(write_study(tmp_path))
    cfg.fitness.final_top_k = 2
    recorder = SplitRecorder(cfg)
    study = Study(cfg, executor=recorder)
    study.run(4)
    recorder.splits.clear()
    rows = study.final_eval()
    assert recorder.splits == ["test", "test"]
    assert [r["rank"] for r in rows] == [1, 2] and all(r["splits"] == {"tiny_up": "test", "tiny_rot": "test"} for r in rows)
    stored = study.store.get("final_eval")["rows"]
    assert [r["trial"] for r in stored] == [r["trial"] for r in rows]
    assert study.final_eval() == rows and recorder.splits == ["test", "test"]  # stored, not scored again
    recipe = study.store.records()[rows[0]["trial"]].recipe
    assert recorder.worker.evaluate(Recipe.from_dict(recipe), "test").score.value == rows[0]["test"]


def test_a_task_whose_test_split_is_its_search_split_is_refused(tmp_path):
    path = write_study(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["fitness"]["tasks"][0]["test_split"] = "search"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="final evaluation must score data the search never read"):
        load_study(path)


# ---------------------------------------------------------------- contamination guard
def benchmark_task(folder: Path) -> Path:
    """A local lm-eval task over GSM8K (no download: only its YAML is read)."""
    folder.mkdir()
    (folder / "gsm8k_copy.yaml").write_text(textwrap.dedent("""\
        task: gsm8k_copy
        dataset_path: openai/gsm8k
        dataset_name: main
        training_split: train
        test_split: test
        output_type: generate_until
        doc_to_text: "{{question}}"
        doc_to_target: "{{answer}}"
        metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
        """))
    return folder


def test_the_guard_refuses_a_search_on_a_public_benchmarks_test_split(tmp_path):
    from evomerge.config import FitnessConfig

    tasks = [{"task": "gsm8k_copy", "search_split": "test", "test_split": "train"}]
    cfg = FitnessConfig(include_path=[str(benchmark_task(tmp_path / "tasks"))], tasks=tasks)
    with pytest.raises(FitnessError, match="test split of the public benchmark 'gsm8k_copy'.*contamination"):
        check_contamination(cfg, task_index(cfg))
    check_contamination(cfg.model_copy(update={"allow_test_split_search": True}), task_index(cfg))


def test_run_check_refuses_the_contaminated_study_before_any_write(tmp_path):
    study = write_study(tmp_path)
    data = yaml.safe_load(study.read_text())
    data["fitness"]["include_path"] = str(benchmark_task(tmp_path / "tasks"))
    data["fitness"]["tasks"] = [{"task": "gsm8k_copy", "search_split": "test", "test_split": "train"}]
    study.write_text(yaml.safe_dump(data))
    r = evomerge("run", "--check", study)
    assert r.returncode == 2 and "contamination" in r.stderr and str(study) in r.stderr
    assert not (tmp_path / "tiny-ps.db").exists()


def test_run_check_validates_a_gpu_study_offline_and_says_what_it_did_not_check():
    r = evomerge("run", "--check", ROOT / "experiments/gpu/gsm8k-mistral.yaml")
    assert r.returncode == 0, r.stderr
    assert "mistralai/Mistral-7B-v0.1: Hub id, syntax only" in " ".join(r.stdout.split())
    assert "not checked" in r.stdout


# ---------------------------------------------------------------- multi-objective
def dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def test_an_nsga2_study_yields_a_non_dominated_front(tmp_path, racing):
    cfg = load_study(write_study(tmp_path, optimizer={"name": "nsga2", "popsize": 4}))
    st = Study(cfg, executor=racing.__class__(cfg)).run(8)
    front = pareto_front(st)
    assert front
    assert all(not dominates(a.values, b.values) for a in front for b in front)
    rest = [t for t in st.get_trials() if t.number not in {f.number for f in front}]
    assert all(any(dominates(f.values, t.values) or f.values == t.values for f in front) for t in rest)

    r = evomerge("export", tmp_path / "study.yaml", "--pareto", tmp_path / "front")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "front").iterdir()) == [f"trial-{t.number:05d}.yaml" for t in front]


def test_optuna_sampler_optimizers_resume_from_their_state_exactly():
    for name in ("random", "tpe", "nsga2"):
        a = create_optimizer(name, dimension=3, seed=7, popsize=4, objectives=2)
        for g in range(3):
            genomes = a.ask(g)
            losses = [[sum(x), -x[0]] if name == "nsga2" else sum(x) for x in genomes]
            a.tell(genomes, losses)
        b = Optimizer.from_state(a.state())
        assert a.ask(3) == b.ask(3), name


def test_nsga2_with_a_single_task_is_refused(tmp_path):
    path = write_study(tmp_path, optimizer={"name": "nsga2"})
    data = yaml.safe_load(path.read_text())
    data["fitness"]["tasks"] = data["fitness"]["tasks"][:1]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="at least two tasks"):
        load_study(path)


# ---------------------------------------------------------------- other fitness sources
def test_perplexity_and_callable_sources_score_the_split_they_are_given(tmp_path, monkeypatch):
    (tmp_path / "search.txt").write_text("up:abc=ABC\nrot:abc=bcd\n")
    (tmp_path / "test.txt").write_text("zzzzzzzzzz qqqqqqq\n")
    (tmp_path / "my_fitness.py").write_text(textwrap.dedent("""\
        def score(model, tokenizer, split):
            return {"search": 0.25, "test": 0.75}[split]
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    study = with_fitness(write_study(tmp_path), tasks=[
        {"task": "ppl", "source": "perplexity", "search_split": "search.txt", "test_split": "test.txt"},
        {"task": "mine", "source": "callable", "function": "my_fitness:score"},
    ])
    executor = LocalExecutor(load_study(study))
    recipe = build_space(executor.cfg).uniform(0.5, 0.5)
    search, test = executor.evaluate(recipe, "search").score, executor.evaluate(recipe, "test").score
    assert search.per_task["mine"] == 0.25 and test.per_task["mine"] == 0.75
    assert 0 < test.per_task["ppl"] <= 1 and 0 < search.per_task["ppl"] <= 1
    assert test.per_task["ppl"] != search.per_task["ppl"]  # each split reads its own file
    assert search.value == pytest.approx((search.per_task["ppl"] + 0.25) / 2)


def test_a_callable_that_does_not_import_is_a_clear_error(tmp_path):
    study = write_study(tmp_path)
    data = yaml.safe_load(study.read_text())
    data["fitness"]["tasks"] = [{"task": "mine", "source": "callable", "function": "no_such_module_xyz:score"}]
    study.write_text(yaml.safe_dump(data))
    with pytest.raises(FitnessError, match="cannot import 'no_such_module_xyz:score'"):
        LocalExecutor(load_study(study)).worker


def test_a_fitness_that_adds_up_to_nan_fails_its_trial_not_the_study(tmp_path, monkeypatch):
    (tmp_path / "extremes.py").write_text(textwrap.dedent("""\
        def high(model, tokenizer, split):
            return float("inf")

        def low(model, tokenizer, split):
            return float("-inf")
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    study = with_fitness(write_study(tmp_path), tasks=[
        {"task": "high", "source": "callable", "function": "extremes:high"},
        {"task": "low", "source": "callable", "function": "extremes:low"},
    ])
    Study(load_study(study)).run(2)
    trials = records(study)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all("fitness is NaN" in t.error for t in trials)
