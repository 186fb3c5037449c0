"""Reliability: a killed study resumes into the same study, a broken candidate fails only its own trial, and nothing
unsafe is loaded or leaked.  Real subprocesses, real SIGKILL, real SQLite, the real tiny zoo and lm-eval."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from evomerge import cli
from evomerge.cli import app
from evomerge.executors import LocalExecutor
from evomerge.study import Study
from evomerge.studyfile import load_study
from tests.conftest import BUDGET, evomerge, records, small_study


def run(cmd, *args, timeout=300):
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def finished(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("select count(*) from trials where state in ('COMPLETE','FAIL')").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def history(study_file: Path) -> list[tuple]:
    """What the study decided, trial by trial, in proposal order: the sequence a resume must reproduce exactly."""
    return sorted(((r.generation, r.index, r.state.name, r.genome, r.recipe, r.values, r.scores, r.error)
                   for r in records(study_file)), key=lambda row: (row[0], row[1]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_executor) -> list[tuple]:
    """The history of the small study run start to end in this process: what every resumed run must reproduce."""
    reference = small_study(tmp_path_factory.mktemp("reference"))
    Study(load_study(reference), executor=small_executor).run(BUDGET)
    return history(reference)


def test_a_study_killed_at_ten_random_points_resumes_into_the_uninterrupted_study(tmp_path, evomerge_cmd,
                                                                                  uninterrupted):
    (tmp_path / "killed").mkdir()
    killed = small_study(tmp_path / "killed")
    db = killed.parent / "tiny-ps.db"
    rng = random.Random(20240607)
    targets = sorted(rng.sample(range(BUDGET - 1), 10))  # kill once at least this many trials have finished ...
    kills_mid_study = 0
    for target in targets:
        proc = subprocess.Popen([*evomerge_cmd, "run", str(killed)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while finished(db) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))  # ... plus a random fraction of a trial: inside materialize, lm-eval, a write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills_mid_study += finished(db) < BUDGET
        proc.wait()
    assert kills_mid_study >= 8, "the kills should land while trials are still being evaluated"
    r = evomerge("run", killed)
    assert r.returncode == 0, r.stderr

    resumed = history(killed)
    assert len(uninterrupted) == BUDGET
    assert [row[:2] for row in resumed] == [(g, i) for g in range(4) for i in range(4)]
    assert resumed == uninterrupted
    with sqlite3.connect(db) as c:
        assert c.execute("select count(*) from trials").fetchone()[0] == BUDGET, "a killed trial was duplicated"


def test_ctrl_c_stops_in_one_line_and_the_rerun_says_it_resumes_into_the_uninterrupted_study(tmp_path, evomerge_cmd,
                                                                                           uninterrupted):
    study = small_study(tmp_path)
    db = tmp_path / "tiny-ps.db"
    proc = subprocess.Popen([*evomerge_cmd, "run", str(study)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while finished(db) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    done = finished(db)
    assert f"interrupted at {done}/{BUDGET} trials; re-run the same command to resume" in stderr
    assert "Traceback" not in stderr + stdout and 0 < done < BUDGET

    r = evomerge("run", study)
    assert r.returncode == 0, r.stderr
    assert f"resuming study tiny-ps: {done} of {BUDGET} trials done" in r.stdout
    assert history(study) == uninterrupted


def test_a_ctrl_c_that_lands_in_a_weakref_callback_is_not_printed_and_anything_else_still_is():
    """Python prints an exception raised inside a weakref callback or ``__del__`` (a SQLAlchemy cleanup, say) as a
    traceback and goes on; `run` remembers the Ctrl-C and stops after the trial, so that one is dropped."""
    seen = []
    quiet = cli._quiet_interrupt(seen.append)
    interrupt, other = SimpleNamespace(exc_value=KeyboardInterrupt()), SimpleNamespace(exc_value=ValueError("x"))
    cli._INTERRUPTS.clear()
    quiet(interrupt)  # not one of run's: the user's own, passed on
    cli._INTERRUPTS.append(signal.SIGINT)
    try:
        quiet(interrupt)
        quiet(other)
    finally:
        cli._INTERRUPTS.clear()
    assert seen == [interrupt, other]


def test_a_second_runner_on_one_sqlite_study_is_refused_at_once_and_a_killed_runner_leaves_no_lock(tmp_path,
                                                                                                 evomerge_cmd):
    study = small_study(tmp_path)
    db = tmp_path / "tiny-ps.db"
    first = subprocess.Popen([*evomerge_cmd, "run", str(study), "--budget", "1000"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while finished(db) < 2 and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.Popen([*evomerge_cmd, "run", str(study)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        _, stderr = second.communicate(timeout=120)
        assert first.poll() is None, "the first runner should still be running"
        assert second.returncode == 2, stderr
        assert f"in use by pid {first.pid} on " in stderr and "PostgreSQL" in stderr and "Traceback" not in stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    budget = finished(db) + 4  # the killed runner's trial in flight, and the rest of its generation
    rerun = evomerge("run", study, "--budget", budget)  # in this process
    assert rerun.returncode == 0, rerun.stderr  # the dead runner's lock died with it
    assert "evolved best" in rerun.stdout
    with sqlite3.connect(db) as c:
        rows = c.execute("select t.state, a.value_json from trials t join trial_user_attributes a "
                         "on a.trial_id = t.trial_id and a.key = 'evomerge.runner'").fetchall()
        placed = c.execute("select count(distinct g.value_json || '/' || i.value_json) from trial_user_attributes g "
                           "join trial_user_attributes i on g.trial_id = i.trial_id and g.key = 'evomerge.generation' "
                           "and i.key = 'evomerge.index'").fetchone()[0]
        assert placed == c.execute("select count(*) from trials").fetchone()[0], "a candidate was enqueued twice"
    assert sum(state in ("COMPLETE", "FAIL") for state, _ in rows) == budget
    runners = {json.loads(v).rsplit(":", 1)[1] for _, v in rows}
    assert runners <= {str(first.pid), str(os.getpid())} and str(second.pid) not in runners


# ------------------------------------------------------------------------------------------ candidate failures
class NaNWeightForSecond(LocalExecutor):
    """The real executor; the second candidate's recipe gets huge (finite, so valid) unnormalized weights on one
    layer, which the real merge and forward pass turn into NaN logits."""

    def __init__(self, inner: LocalExecutor):
        super().__init__(inner.cfg)
        self._worker, self.calls = inner.worker, 0

    def submit(self, key, recipe, split="search", **options):
        self.calls += 1
        if self.calls == 2:
            recipe.groups["layers.1"]["weight"] = [3e38, 3e38]
            recipe.options = {**recipe.options, "normalize": False}
        super().submit(key, recipe, split, **options)


def test_nan_logits_fail_only_their_trial_with_the_reason(tmp_path, small_executor):
    study = Study(load_study(small_study(tmp_path)), executor=NaNWeightForSecond(small_executor))
    study.run(6)
    trials = study.store.records()
    states = [t.state for t in trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 5
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    assert "logits are not finite" in failed.error


def test_after_a_nan_candidate_the_next_candidate_scores_as_if_it_never_happened(small_executor):
    executor = small_executor
    space = Study(executor.cfg, executor=executor).space
    before = executor.evaluate(space.uniform(0.5, 0.5))
    poisoned = space.uniform(0.5, 0.5)
    poisoned.groups["layers.1"]["weight"] = [3e38, 3e38]
    poisoned.options = {**poisoned.options, "normalize": False}
    result = executor.evaluate(poisoned)
    assert result.score is None and "logits are not finite" in result.error
    after = executor.evaluate(space.uniform(0.5, 0.5))
    assert after.score.value == before.score.value and after.score.per_task == before.score.per_task


BOOM_TASK = """
task: tiny_boom
custom_dataset: !function _data.load_up
test_split: search
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 10, do_sample: false}
process_results: !function boom.process_results
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
metadata: {version: 1.0}
"""


def test_an_exception_inside_fitness_fails_each_trial_with_its_reason_and_the_study_finishes(tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(Path(__file__).resolve().parent.parent / "fitness" / "tiny", tasks)
    (tasks / "tiny_boom.yaml").write_text(BOOM_TASK)
    (tasks / "boom.py").write_text("def process_results(doc, results):\n"
                                   "    return {'exact_match': {}[results[0]]}  # a metric with a bug\n")
    study = small_study(tmp_path)
    data = yaml.safe_load(study.read_text())
    data["fitness"]["include_path"] = str(tasks)
    data["fitness"]["tasks"].append({"task": "tiny_boom", "metric": "exact_match"})
    data["budget"] = 8
    study.write_text(yaml.safe_dump(data))
    cfg = load_study(study)
    st = Study(cfg, executor=LocalExecutor(cfg))
    st.run()
    trials = st.store.records()
    assert len(trials) == 8 and all(t.state == TrialState.FAIL for t in trials)
    assert all(t.error.startswith("KeyError") for t in trials)
    assert st.store.get("optimizer")["generation"] == 2, "the optimizer went on through two failed generations"


OOM_SCRIPT = """
import json, resource, sys
from evomerge.studyfile import load_study
from evomerge.executors import LocalExecutor
from evomerge.study import Study

def vm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))

class TightMemoryForSecond(LocalExecutor):
    calls, vm = 0, {}
    def results(self, timeout=None):
        self.calls += 1
        if self.calls != 2:
            return super().results(timeout)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        self.vm["before"] = vm()
        resource.setrlimit(resource.RLIMIT_AS, (vm() + 2**20, hard))
        try:
            return super().results(timeout)
        finally:
            self.vm["after"] = vm()
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

cfg = load_study(sys.argv[1])
ex = TightMemoryForSecond(cfg)
ex.start()
st = Study(cfg, executor=ex).run(6)
print(json.dumps({"states": [t.state.name for t in st.trials], "vm": ex.vm,
                  "errors": [t.user_attrs.get("evomerge.error") for t in st.trials]}))
"""


def test_out_of_memory_fails_the_trial_releases_its_memory_and_the_study_goes_on(tmp_path):
    """A real allocation failure: the address space is capped 1 MiB above what the worker holds for one candidate
    (with every allocation of 64 KiB or more a fresh mapping, so the cap bites inside the merge).  On CUDA,
    `torch.cuda.OutOfMemoryError` takes the same branch of `Worker.evaluate`, which also empties the CUDA cache."""
    import os
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, "-c", OOM_SCRIPT, str(small_study(tmp_path))], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["states"] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert "can't allocate memory" in out["errors"][1]
    assert out["vm"]["after"] <= out["vm"]["before"] + 2**20, "the failed candidate's memory was not returned"


# -------------------------------------------------------------------------------------------------- security
class Payload:
    """Unpickling this runs a shell command that creates a file: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os_system, (f"touch {self.marker}",))


def os_system(cmd: str) -> int:
    import os

    return os.system(cmd)


def malicious_model(tmp: Path, tiny: Path) -> tuple[Path, Path]:
    """A copy of a tiny parent whose weights are a pytorch_model.bin that runs code when unpickled."""
    model, marker = tmp / "evil", tmp / "pwned"
    shutil.copytree(tiny / "rot", model)
    (model / "model.safetensors").unlink()
    torch.save({"model.norm.weight": torch.ones(128), "payload": Payload(marker)}, model / "pytorch_model.bin")
    return model, marker


def test_a_malicious_pickle_checkpoint_is_refused_without_running_it(tmp_path, tiny):
    from evomerge.io import ModelFilesError, inspect_model, load_state_dict

    model, marker = malicious_model(tmp_path, tiny)
    for read in (inspect_model, load_state_dict):
        with pytest.raises(ModelFilesError, match="weights-only"):
            read(model)
    assert not marker.exists()


def test_run_with_a_malicious_parent_exits_2_and_runs_nothing(tmp_path, tiny):
    model, marker = malicious_model(tmp_path, tiny)
    study = small_study(tmp_path, models={"base": str(tiny / "base"), "parents": [str(tiny / "up"), str(model)]})
    r = CliRunner().invoke(app, ["run", str(study)])
    assert r.exit_code == 2 and "pytorch_model.bin" in r.stderr
    assert not marker.exists() and not (tmp_path / "tiny-ps.db").exists()


def test_remote_code_in_a_model_directory_is_never_imported(tmp_path, tiny):
    from evomerge.merge import Materializer

    model, marker = tmp_path / "remote", tmp_path / "imported"
    shutil.copytree(tiny / "rot", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                       "AutoConfig": "modeling_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    mat = Materializer(str(tiny / "base"), [str(tiny / "up"), str(model)])
    assert type(mat.model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


SECRET = "SECRETPW"
BAD_PG = f"postgresql+psycopg://evomerge_nobody:{SECRET}@127.0.0.1:5432/test"


def test_a_storage_password_never_appears_in_output_errors_or_written_files(tmp_path, evomerge_cmd):
    plain = small_study(tmp_path)
    with_password = tmp_path / "with-password.yaml"
    with_password.write_text(yaml.safe_dump({**yaml.safe_load(plain.read_text()), "storage": BAD_PG}))
    r = run(evomerge_cmd, "run", with_password)  # a real process: whatever it prints on the way out is seen
    assert r.returncode == 2
    outputs = [(r.stdout, r.stderr)]
    for args in (["status", with_password, "--json"], ["status", plain, "--storage", BAD_PG],
                 ["export", plain, "-o", tmp_path / "best.yaml", "--storage", BAD_PG],
                 ["report", with_password, "-o", tmp_path / "report"]):
        c = CliRunner().invoke(app, list(map(str, args)))
        assert c.exit_code == 2
        outputs.append((c.stdout, c.stderr))
    for stdout, stderr in outputs:
        assert "evomerge_nobody:***@127.0.0.1" in stderr
        assert SECRET not in stdout + stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != with_password]
    assert all(SECRET.encode() not in p.read_bytes() for p in written)

