"""What racing saves, what a candidate costs besides forward passes, and whether CMA-ES beats random search.

    python bench/fitness_cost.py [--seeds 5] [--budget 150] [--race-budget 300] [--min-examples 10] [--z 1] ...

On the tiny zoo (experiments/tiny/study.yaml: TIES, ps-layerwise, 24 dimensions, 100 search examples per task), for
each seed it runs three studies into a temporary SQLite DB: CMA-ES at full fidelity (`--budget` trials), CMA-ES with
racing (until its incumbent reaches the full run's best test score, or it has spent as many examples as the full run,
or `--race-budget` trials), and random search at full fidelity (`--budget` trials).

* **Racing ratio** (per seed).  T = the test score of the full-fidelity run's final best trial.  For a run, E(T) is
  the number of search examples evaluated (all trials, in order, up to and including the trial after which the
  incumbent - the best full-fidelity trial so far by search score - first has a test score >= T).  The ratio is
  E_racing(T) / E_full(T); "not reached" when the racing run's incumbent never reaches T within its budget.
  Test scores are computed for incumbents only, after the runs (the search never reads them).
* **Overhead** (full-fidelity CMA-ES trials): per trial, wall time from the trial's start to its completion in the
  study DB (materialize, requests, forward passes, filters, metrics, DB writes) minus the time inside the model's
  forward passes (`generate` / forward calls) minus materialization, as a fraction of the wall time; summed over
  trials.  Materialization's own share is printed apart.
* **CMA-ES vs random**: the test score of each run's best trial (by search score) at equal budget; wins out of seeds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from evomerge.executors import LocalExecutor  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.study import Study  # noqa: E402
from evomerge.studyfile import load_study  # noqa: E402

RACING = {"min_examples": 10, "reduction_factor": 3, "z": 1.0}


def study_file(folder: Path, name: str, seed: int, optimizer: str, racing: bool) -> Path:
    data = yaml.safe_load((ROOT / "experiments/tiny/study.yaml").read_text())
    data["study"], data["seed"] = name, seed
    data["models"] = {"base": str(ROOT / "experiments/tiny/base"),
                      "parents": [str(ROOT / "experiments/tiny/up"), str(ROOT / "experiments/tiny/rot")]}
    data["fitness"]["include_path"] = str(ROOT / "fitness/tiny")
    data["optimizer"] = {"name": optimizer}
    if racing:
        data["fitness"]["racing"] = RACING
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Run:
    """One finished study: trials in order, with the incumbent's test score looked up on demand (and cached)."""

    def __init__(self, study: Study, executor: LocalExecutor, tests: dict):
        self.trials = sorted(study.store.records(), key=lambda t: t.number)
        self.executor, self.tests = executor, tests

    def test_of(self, t) -> float:
        key = tuple(t.genome)
        if key not in self.tests:
            self.tests[key] = self.executor.evaluate(Recipe.from_dict(t.recipe), "test").score.value
        return self.tests[key]

    def incumbents(self):
        """(examples so far, incumbent trial) after every trial that changed the incumbent."""
        best, examples = None, 0
        for t in self.trials:
            examples += t.examples or 0
            if t.state.name == "COMPLETE" and t.full_fidelity:
                if best is None or t.value > best.value:
                    best = t
                    yield examples, t

    def final_best(self):
        return list(self.incumbents())[-1][1]

    def examples_to_reach(self, target: float) -> int | None:
        for examples, t in self.incumbents():
            if self.test_of(t) >= target - 1e-12:
                return examples
        return None

    def total_examples(self) -> int:
        return sum(t.examples or 0 for t in self.trials)


def run_study(folder: Path, name: str, seed: int, optimizer: str, racing: bool, budget: int,
              executors: dict) -> Study:
    cfg = load_study(study_file(folder, name, seed, optimizer, racing))
    study = Study(cfg, storage=f"sqlite:///{folder / 'bench.db'}", executor=executors[racing])
    study.run(budget)
    return study


def overhead(study: Study) -> tuple[float, float]:
    wall = forward = materialize = 0.0
    for t in study.store.records():
        if t.state.name != "COMPLETE":
            continue
        wall += t.wall_s
        forward += t.timings["forward_s"]
        materialize += t.timings["materialize_s"]
    return (wall - forward - materialize) / wall, materialize / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=150)
    ap.add_argument("--race-budget", type=int, default=300, help="most trials for the racing run")
    ap.add_argument("--min-examples", type=int, default=RACING["min_examples"])
    ap.add_argument("--reduction-factor", type=float, default=RACING["reduction_factor"])
    ap.add_argument("--z", type=float, default=RACING["z"])
    args = ap.parse_args()
    RACING.update(min_examples=args.min_examples, reduction_factor=args.reduction_factor, z=args.z)
    print(f"racing: {RACING}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    t_start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    executors = {r: LocalExecutor(load_study(study_file(folder, "exec", 0, "cmaes", r))) for r in (False, True)}
    for executor in executors.values():  # loads the parents before the first trial, as `evomerge run` does
        executor.start()
    ratios, overheads, mat_shares, wins, ties = [], [], [], 0, 0
    print(f"{'seed':>4} {'T(full)':>8} {'E_full':>7} {'E_race':>7} {'ratio':>6} {'race trials':>11} "
          f"{'race ex/trial':>13} {'cma test':>8} {'rand test':>9} {'overhead':>8}")
    for seed in range(args.seeds):
        tests: dict = {}
        full = run_study(folder, f"full-{seed}", seed, "cmaes", False, args.budget, executors)
        f = Run(full, executors[False], tests)
        target = f.test_of(f.final_best())
        e_full = f.examples_to_reach(target)
        race, trials = None, 0
        while trials < args.race_budget:  # racing runs until it reaches T, or its trial budget is spent
            trials = min(trials + 15, args.race_budget)
            race = run_study(folder, f"race-{seed}", seed, "cmaes", True, trials, executors)
            r = Run(race, executors[False], tests)
            if r.examples_to_reach(target) is not None or r.total_examples() >= f.total_examples():
                break
        e_race = r.examples_to_reach(target)
        rand = run_study(folder, f"random-{seed}", seed, "random", False, args.budget, executors)
        x = Run(rand, executors[False], tests)
        ratio = None if e_race is None else e_race / e_full
        ratios.append(ratio)
        oh, mat = overhead(full)
        overheads.append(oh)
        mat_shares.append(mat)
        cma_test, rand_test = target, x.test_of(x.final_best())
        wins += cma_test > rand_test
        ties += cma_test == rand_test
        print(f"{seed:>4} {target:>8.3f} {e_full:>7} {e_race if e_race is not None else '-':>7} "
              f"{'n/r' if ratio is None else f'{ratio:.3f}':>6} {len(r.trials):>11} "
              f"{r.total_examples() / len(r.trials):>13.1f} {cma_test:>8.3f} {rand_test:>9.3f} {oh:>8.3f}", flush=True)
    reached = [q for q in ratios if q is not None]
    print()
    print("racing: examples to reach the full-fidelity best test score, racing / full: median "
          + (f"{statistics.median(reached):.3f}" if len(reached) == len(ratios) else
             f"{statistics.median(reached + [float('inf')] * (len(ratios) - len(reached))):.3f}")
          + f" (reached on {len(reached)}/{len(ratios)} seeds; per seed: "
          + ", ".join("n/r" if q is None else f"{q:.3f}" for q in ratios) + ")  goal <= 0.25, stretch 0.1")
    print(f"overhead per candidate (all but forward passes and materialization) / candidate time: mean "
          f"{statistics.mean(overheads):.3f} (max {max(overheads):.3f})  goal <= 0.10; "
          f"materialization: {statistics.mean(mat_shares):.3f} of candidate time")
    print(f"CMA-ES vs random search at {args.budget} trials (test score of the best trial): CMA-ES wins "
          f"{wins}/{args.seeds}" + (f" ({ties} ties)" if ties else ""))
    print(f"wall time {time.perf_counter() - t_start:.0f} s; load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
