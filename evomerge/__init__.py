"""evomerge: evolutionary search for model-merge recipes."""
import os

# OpenMP threads that wait for work sleep instead of spinning.  Spinning wins a little on an idle machine and loses
# everything on a shared one: with one other CPU-bound process, a demo trial took 70x its idle time (each spinning
# thread holds a core the other process needs, and vice versa; see bench/contention.py).  Set before torch loads
# its OpenMP runtime; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
