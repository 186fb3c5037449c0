"""How a worker's idle OpenMP threads wait: set by importing evomerge, before torch loads its OpenMP runtime."""
import os
import subprocess
import sys

READ = "import os, evomerge; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def waiting(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return subprocess.run([sys.executable, "-c", READ], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_evomerge_makes_idle_openmp_threads_sleep_after_a_short_spin():
    assert waiting() == "PASSIVE 2000"


def test_an_explicit_wait_policy_in_the_environment_wins_over_the_spin():
    assert waiting(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE None"


def test_an_explicit_spin_count_in_the_environment_wins():
    assert waiting(GOMP_SPINCOUNT="0") == "PASSIVE 0"
