"""How much slower a trial gets when another CPU-bound process shares the machine.

    python bench/contention.py [--trials 24] [--threads N]

Runs the tiny demo (experiments/tiny/study.yaml: TIES, 24 dimensions, both tasks) through the local executor twice,
each into its own temporary SQLite DB: alone, then while a second process keeps the CPU busy (a PyTorch matmul loop
with PyTorch's default thread count: another training or evaluation job, the usual neighbour).  Per-trial time is the
median over trials of materialization plus fitness (the trial's stored timings), after one warm-up trial.  Prints
both, their ratio (goal: at most 3), the thread count the worker used, and the 1-minute load average before each
phase: on a shared machine other work inflates both numbers.

`--threads N` sets `executor.threads` (default: the executor's own sizing: the cores this process may use over the
workers).  `OMP_WAIT_POLICY=ACTIVE python bench/contention.py` shows the behaviour before evomerge made idle OpenMP
threads sleep (it sets OMP_WAIT_POLICY=PASSIVE, with a short spin first, GOMP_SPINCOUNT=2000, unless the environment
sets the policy); `GOMP_SPINCOUNT=0 python bench/contention.py`, threads that sleep at once.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEIGHBOUR_ENV = dict(os.environ)  # the competitor runs as any other job would, without evomerge's OpenMP setting
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# isort: off
import evomerge  # noqa: E402,F401  (before torch: it sets how OpenMP threads wait, read when torch loads OpenMP)
import torch  # noqa: E402
# isort: on
import yaml  # noqa: E402

from evomerge.executors import LocalExecutor  # noqa: E402
from evomerge.study import Study  # noqa: E402
from evomerge.studyfile import load_study  # noqa: E402

COMPETITOR = """
import torch
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def study_file(folder: Path, trials: int, threads: int | None) -> Path:
    data = yaml.safe_load((ROOT / "experiments/tiny/study.yaml").read_text())
    data["models"] = {"base": str(ROOT / "experiments/tiny/base"),
                      "parents": [str(ROOT / "experiments/tiny/up"), str(ROOT / "experiments/tiny/rot")]}
    data["fitness"]["include_path"] = str(ROOT / "fitness/tiny")
    data["budget"] = trials + 1
    if threads:
        data["executor"] = {"name": "local", "threads": threads}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def per_trial(folder: Path, trials: int, threads: int | None) -> tuple[float, int]:
    """Median seconds per trial (materialize + fitness), skipping the first, and the worker's thread count."""
    folder.mkdir()
    cfg = load_study(study_file(folder, trials, threads))
    study = Study(cfg, executor=LocalExecutor(cfg))
    study.run(trials + 1)
    done = sorted(study.store.records(), key=lambda t: t.number)[1:]
    times = [t.timings["materialize_s"] + t.timings["fitness_s"] for t in done]
    return statistics.median(times), torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None, help="executor.threads (default: the executor's sizing)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        load_alone = os.getloadavg()[0]
        alone, threads = per_trial(Path(tmp) / "alone", args.trials, args.threads)
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=NEIGHBOUR_ENV)
        try:
            time.sleep(3)  # the competitor's import and first products
            load_busy = os.getloadavg()[0]
            busy, _ = per_trial(Path(tmp) / "busy", args.trials, args.threads)
        finally:
            competitor.kill()
            competitor.wait()
    print(f"cores available: {len(os.sched_getaffinity(0))}, worker threads: {threads}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, "
          f"trials: {args.trials}")
    print(f"alone:     {alone * 1000:7.1f} ms per trial (load average {load_alone:.2f} before)")
    print(f"contended: {busy * 1000:7.1f} ms per trial (load average {load_busy:.2f} before, competitor running)")
    print(f"ratio:     {busy / alone:7.2f}x (goal <= 3x)")


if __name__ == "__main__":
    main()
