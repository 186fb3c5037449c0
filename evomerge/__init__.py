"""evomerge: evolutionary search for model-merge recipes."""
import os

# OpenMP threads that wait for work sleep instead of spinning, after a short spin.  Spinning wins on an idle machine
# and loses everything on a shared one: with one other CPU-bound process, a demo trial took 70x its idle time (each
# spinning thread holds a core the other process needs, and vice versa; see bench/contention.py).  Sleeping at once
# costs a wake-up at each of a candidate's many parallel regions, which follow each other within microseconds: the
# short spin (2000 rounds of libgomp, torch's OpenMP runtime; its GOMP_SPINCOUNT overrides the policy's zero) made a
# demo trial 1.5x faster alone (334 -> 218 ms) and kept it within 1.6x of that beside a busy neighbour.  Set before
# torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")

__version__ = "0.1.0"
