"""The evomerge command as a user runs it: real SQLite, real lm-eval; a real process where the process is the point
(SIGKILL, the console script's exit code)."""
import json
import signal
import sqlite3
import subprocess
import time

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import evomerge, write_study


def run(cmd, *args, timeout=600):
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def db_of(study_file):
    return study_file.parent / "tiny-ps.db"


def finished_trials(db):
    with sqlite3.connect(db) as c:
        try:
            return c.execute("select count(*) from trials where state in ('COMPLETE','FAIL')").fetchone()[0]
        except sqlite3.OperationalError:  # the run has created the file but not yet Optuna's tables
            return 0


def test_run_status_export_merge_reproduce_the_winner(tmp_path):
    study = write_study(tmp_path)
    r = evomerge("run", study)
    assert r.returncode == 0, r.stderr
    assert "dimension 24" in r.stdout and "evolved best" in r.stdout
    s = json.loads(evomerge("status", study, "--json").stdout)
    assert s["complete"] == 6 and s["running"] == 0
    rows = {row["model"]: row for row in s["final_table"]}
    assert {"base", "parent up", "parent rot", "best uniform ties", "evolved best"} <= set(rows)

    assert evomerge("export", study, "-o", tmp_path / "best.yaml").returncode == 0
    recipe = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert recipe["method"] == "ties" and len(recipe["groups"]) == 6
    r = evomerge("merge", tmp_path / "best.yaml", tmp_path / "merged")
    assert r.returncode == 0, r.stderr

    from evomerge.fitness import Fitness
    from evomerge.studyfile import load_study

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    score = Fitness(load_study(study).fitness, model, tok, "cpu").score("test")
    assert score.value == rows["evolved best"]["test"]


def test_sigkill_mid_study_then_rerun_loses_and_duplicates_nothing(tmp_path, evomerge_cmd):
    study = write_study(tmp_path, budget=14)
    proc = subprocess.Popen([*evomerge_cmd, "run", str(study)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if db_of(study).exists() and finished_trials(db_of(study)) >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = finished_trials(db_of(study))
    assert 5 <= killed_at < 14

    r = evomerge("run", study)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(db_of(study)) as c:
        states = [s for (s,) in c.execute("select state from trials")]
        keys = c.execute(
            "select a.value_json, b.value_json from trial_user_attributes a join trial_user_attributes b "
            "on a.trial_id = b.trial_id where a.key = 'evomerge.generation' and b.key = 'evomerge.index'"
        ).fetchall()
    assert states.count("COMPLETE") + states.count("FAIL") == 14
    assert len(states) == 14, "a stale RUNNING trial was duplicated instead of taken over"
    assert len(set(keys)) == 14


def test_the_console_script_exits_2_naming_file_and_field_and_writes_no_db(tmp_path, evomerge_cmd):
    """The installed command itself (every other bad-input case runs in process: tests/test_bad_input.py)."""
    study = write_study(tmp_path)
    data = yaml.safe_load(study.read_text())
    data["fitness"]["tasks"][0]["metrik"] = "acc"
    study.write_text(yaml.safe_dump(data))
    r = run(evomerge_cmd, "run", study)
    assert r.returncode == 2
    assert str(study) in r.stderr and "fitness.tasks.0.metrik" in r.stderr
    assert not db_of(study).exists()
