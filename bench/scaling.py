"""Throughput of the Ray executor with 2 actors over 1 on the tiny zoo, each actor held to one CPU thread.

    python bench/scaling.py [--trials 16]

Each pool first loads the parents (not timed), then drives a fresh SQLite study of the demo (CMA-ES, population 8,
so no actor waits at a generation barrier) through the real controller loop; the ratio of trials per second is the
figure (goal >= 1.7).  Needs an otherwise idle machine with 2 free cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

import ray  # noqa: E402
import yaml  # noqa: E402

from evomerge.executors import RayExecutor  # noqa: E402
from evomerge.study import Study  # noqa: E402
from evomerge.studyfile import load_study  # noqa: E402


def study_file(folder: Path, actors: int) -> Path:
    data = yaml.safe_load((ROOT / "experiments/tiny/study.yaml").read_text())
    data["study"] = f"scaling-{actors}"
    data["models"] = {"base": str(ROOT / "experiments/tiny/base"),
                      "parents": [str(ROOT / "experiments/tiny/up"), str(ROOT / "experiments/tiny/rot")]}
    data["fitness"]["include_path"] = str(ROOT / "fitness/tiny")
    data["optimizer"] = {"name": "cmaes", "popsize": 8}
    data["executor"] = {"name": "ray", "actors": actors, "num_cpus_per_actor": 1, "threads_per_actor": 1}
    path = folder / f"study-{actors}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def throughput(folder: Path, actors: int, trials: int) -> float:
    cfg = load_study(study_file(folder, actors))
    executor = RayExecutor(cfg)
    executor.start()
    try:
        t0 = time.perf_counter()
        Study(cfg, executor=executor).run(trials)
        return trials / (time.perf_counter() - t0)
    finally:
        executor.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    passed = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TQDM_DISABLE")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in passed}})
    with tempfile.TemporaryDirectory() as tmp:
        one = throughput(Path(tmp), 1, args.trials)
        two = throughput(Path(tmp), 2, args.trials)
    ray.shutdown()
    print(f"1 actor : {one:.3f} trials/s")
    print(f"2 actors: {two:.3f} trials/s")
    print(f"scaling 2 over 1: {two / one:.2f}x (goal >= 1.7)")


if __name__ == "__main__":
    main()
