"""CMA-ES state handed between processes (a resumed run, or another runner on a shared study) behaves exactly as
if one process had kept it: Python salts `hash(bytes)` per process, and pycma keys its solutions by that hash."""
import json
import os
import subprocess
import sys

from evomerge.optimizers import CMAES

STEP = """
import json, sys, warnings
import cma
from evomerge.optimizers import Optimizer
warnings.simplefilter("error", cma.evolution_strategy.InjectionWarning)
opt = Optimizer.from_state(sys.stdin.read())
genomes = json.loads(sys.argv[1])
opt.tell(genomes, [sum((x - 0.3) ** 2 for x in g) for g in genomes])
print(json.dumps({"next": opt.ask(int(sys.argv[2])), "state": opt.state()}))
"""


def test_state_told_in_another_process_proposes_what_one_process_would():
    kept, handed = CMAES(6, seed=0, popsize=4), CMAES(6, seed=0, popsize=4)
    genomes, handed_genomes = kept.ask(0), handed.ask(0)
    state = handed.state()
    for generation in range(1, 6):
        kept.tell(genomes, [sum((x - 0.3) ** 2 for x in g) for g in genomes])
        genomes = kept.ask(generation)
        r = subprocess.run([sys.executable, "-c", STEP, json.dumps(handed_genomes), str(generation)], input=state,
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONHASHSEED": str(generation)})
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout)
        state, handed_genomes = out["state"], out["next"]
        assert handed_genomes == genomes
