"""Bad input, table-driven: every broken study file, recipe file, model or storage URL exits with code 2 and a
message naming the file and the field, and leaves an existing study DB byte-for-byte unchanged.

The commands run in process through typer's CliRunner (same code, same exit codes and messages as the console
script, without paying the import time once per case).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.config import load_study
from evomerge.executors import LocalExecutor
from evomerge.io import load_state_dict
from evomerge.study import Study
from tests.conftest import TINY
from tests.test_reliability import BAD_PG, SECRET, small_study


@pytest.fixture(scope="module")
def existing(tmp_path_factory) -> Path:
    """A study with two finished trials, its DB next to it, and its best recipe exported as best.yaml."""
    path = small_study(tmp_path_factory.mktemp("existing"))
    study = Study(load_study(path), executor=LocalExecutor(load_study(path)))
    study.run(2)
    study.best_recipe().save(path.parent / "best.yaml")
    study.storage.engine.dispose()
    with contextlib.closing(sqlite3.connect(path.parent / "tiny-ps.db")) as c:  # every write into the main file
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def digest(path: Path) -> str:
    """The DB's bytes and its rows: SQLite in WAL mode keeps recent writes in the -wal file until a checkpoint, so
    the main file's bytes alone would miss a write; the rows (read through SQLite, WAL included) cannot."""
    with contextlib.closing(sqlite3.connect(path)) as c:
        rows = "\n".join(c.iterdump())
    return hashlib.sha256(path.read_bytes()).hexdigest() + hashlib.sha256(rows.encode()).hexdigest()


def edited(data: dict, dotted: str, value: Any) -> dict:
    """A copy of `data` with the field at `dotted` (a.b.0.c) set to `value`, or deleted when value is DELETE."""
    out = copy.deepcopy(data)
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node = out
    for k in keys[:-1]:
        node = node[k]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return out


DELETE = object()


def shapes_differ(tmp: Path) -> str:
    bad = tmp / "narrow"
    shutil.copytree(TINY / "rot", bad)
    sd = load_state_dict(bad)
    sd["model.norm.weight"] = sd["model.norm.weight"][:-2]
    save_file(sd, bad / "model.safetensors")
    return str(bad)


def corrupt_safetensors(tmp: Path) -> str:
    bad = tmp / "corrupt"
    shutil.copytree(TINY / "rot", bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    return str(bad)


# (id, field to set, value (or a function of the temp dir that returns it), what the message must name)
STUDY_CASES: list[tuple[str, str, Any, list[str]]] = [
    ("missing budget", "budget", DELETE, ["budget", "required field is missing"]),
    ("missing models", "models", DELETE, ["models", "required field is missing"]),
    ("missing task name", "fitness.tasks.0.task", DELETE, ["fitness.tasks.0.task", "required"]),
    ("unknown top-level field", "budgett", 5, ["budgett", "unknown field"]),
    ("unknown nested field", "fitness.tasks.0.metrik", "acc", ["fitness.tasks.0.metrik", "unknown field"]),
    ("budget not a number", "budget", "many", ["budget", "integer"]),
    ("parents not a list", "models.parents", "up", ["models.parents", "list"]),
    ("batch size a list", "fitness.batch_size", [1], ["fitness.batch_size", "integer"]),
    ("zero budget", "budget", 0, ["budget", "greater than or equal to 1"]),
    ("negative sigma0", "optimizer.sigma0", -0.1, ["optimizer.sigma0", "greater than 0"]),
    ("population of one", "optimizer.popsize", 1, ["optimizer.popsize", "greater than or equal to 2"]),
    ("zero limit", "fitness.limit", 0, ["fitness.limit", "greater than or equal to 1"]),
    ("negative task weight", "fitness.tasks.0.weight", -1, ["fitness.tasks.0.weight", "greater than or equal to 0"]),
    ("inverted weight range", "search_space.weight", {"low": 1.0, "high": 0.0},
     ["search_space.weight", "must not exceed"]),
    ("density above one", "search_space.density", {"low": 0.5, "high": 1.5}, ["search_space", "(0, 1]"]),
    ("zero layer granularity", "search_space.layer_granularity", 0, ["search_space.layer_granularity"]),
    ("unknown merge method", "merge.method", "frankenstein", ["merge.method", "allowed: linear"]),
    ("unknown merge option", "merge.options", {"normalise": True}, ["merge", "'normalise'", "normalize"]),
    ("unknown dtype", "merge.dtype", "float8", ["merge.dtype", "float32"]),
    ("unknown preset", "search_space.preset", "ps-nowhere", ["search_space.preset", "ps-layerwise"]),
    ("missing parent directory", "models.parents.1", "/nonexistent/rot", ["models.parents.1", "does not exist"]),
    ("missing base directory", "models.base", "/nonexistent/base", ["models.base", "does not exist"]),
    ("missing task folder", "fitness.include_path", "/nonexistent/tasks", ["fitness.include_path.0", "does not exist"]),
    ("parents with mismatched shapes", "models.parents.1", shapes_differ,
     ["narrow", "model.norm.weight", "identical shapes"]),
    ("corrupt safetensors", "models.parents.1", corrupt_safetensors,
     ["corrupt/model.safetensors", "not a readable safetensors file"]),
    ("task lm-eval does not know", "fitness.tasks.0.task", "tiny_nonexistent",
     ["fitness.tasks", "'tiny_nonexistent'", "tiny_rot"]),
    ("storage URL with a wrong password", "storage", BAD_PG, ["storage", "evomerge_nobody:***@127.0.0.1"]),
    ("a changed setup under an existing name", "merge.method", "dare_ties", ["different method", "new study name"]),
    ("another optimizer under an existing name", "optimizer.name", "tpe", ["different optimizer", "new study name"]),
]


FRESH = {"parents with mismatched shapes", "corrupt safetensors"}


@pytest.mark.parametrize("name,field,value,expect", STUDY_CASES, ids=[c[0] for c in STUDY_CASES])
def test_a_bad_study_file_exits_2_naming_file_and_field_and_leaves_the_db_unchanged(
        existing, tmp_path, name, field, value, expect):
    data = yaml.safe_load(existing.read_text())
    value = value(tmp_path) if callable(value) else value
    case = existing.parent / "case.yaml"  # same folder, same study name: the same DB as the existing study
    data = edited(data, field, value)
    if name in FRESH:  # other parents under the existing name are a changed setup, refused by the DB check first
        data["study"] = "tiny-ps-other-parents"
    case.write_text(yaml.safe_dump(data))
    db = existing.parent / "tiny-ps.db"
    before = digest(db)
    r = CliRunner().invoke(app, ["run", str(case)])
    assert r.exit_code == 2, r.output
    message = r.stderr
    assert "error:" in message and "Traceback" not in r.output
    named = [str(case)] if not any(m in expect[0] for m in ("narrow", "corrupt")) else []
    for text in named + expect:
        assert text in message, f"{text!r} not in {message!r}"
    assert SECRET not in r.output
    assert digest(db) == before
    assert {p.name for p in existing.parent.glob("tiny-ps.db*")} <= {"tiny-ps.db", "tiny-ps.db-wal", "tiny-ps.db-shm"}


def test_python_tags_in_a_study_file_exit_2_and_run_nothing(existing, tmp_path):
    marker = tmp_path / "pwned"
    case = existing.parent / "case.yaml"
    case.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n" + existing.read_text())
    before = digest(existing.parent / "tiny-ps.db")
    r = CliRunner().invoke(app, ["run", str(case)])
    assert r.exit_code == 2 and str(case) in r.stderr and "not valid YAML" in r.stderr
    assert not marker.exists()
    assert digest(existing.parent / "tiny-ps.db") == before


@pytest.mark.parametrize("args,expect", [
    (["--storage", BAD_PG], ["--storage", "evomerge_nobody:***@127.0.0.1"]),
    (["--budget", "0"], ["--budget"]),
], ids=["wrong password on the command line", "zero budget on the command line"])
def test_bad_run_options_exit_2_naming_the_option(existing, args, expect):
    before = digest(existing.parent / "tiny-ps.db")
    r = CliRunner().invoke(app, ["run", str(existing), *args])
    assert r.exit_code == 2
    assert all(e in r.output for e in expect) and SECRET not in r.output
    assert digest(existing.parent / "tiny-ps.db") == before


def test_an_unwritable_export_path_exits_2_naming_it(existing, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    before = digest(existing.parent / "tiny-ps.db")
    r = CliRunner().invoke(app, ["export", str(existing), "-o", str(blocker / "best.yaml")])
    assert r.exit_code == 2 and str(blocker / "best.yaml") in r.stderr and "cannot write the recipe" in r.stderr
    assert digest(existing.parent / "tiny-ps.db") == before


# (id, field, value, what the message must name) over the exported recipe
RECIPE_CASES: list[tuple[str, str, Any, list[str]]] = [
    ("missing method", "method", DELETE, ["method", "required field is missing"]),
    ("unknown field", "weights", {}, ["weights", "unknown field"]),
    ("unknown method", "method", "frankenstein", ["unknown merge method 'frankenstein'"]),
    ("weight not a number", "groups.layers\\.0.weight", ["heavy", 0.5], ["groups.layers.0.weight.0", "number"]),
    ("one weight for two parents", "groups.layers\\.0.weight", [0.5], ["groups.layers.0.weight", "2 numbers (one per parent)"]),
    ("density above one", "groups.layers\\.0.density", [1.5, 0.5], ["groups.layers.0.density", "(0, 1]"]),
    ("unknown group parameter", "groups.layers\\.0.sharpness", [1.0, 1.0], ["groups.layers.0", "sharpness"]),
    ("a group missing", "groups.head", DELETE, ["no values for group 'head'"]),
    ("missing parent directory", "parents.1", "/nonexistent/rot", ["parents.1", "does not exist"]),
    ("unknown dtype", "dtype", "float8", ["dtype", "float32"]),
]


def recipe_edited(data: dict, dotted: str, value: Any) -> dict:
    """Like `edited`, with `\\.` standing for a dot inside a key (group names such as layers.0)."""
    keys = [k.replace("\0", ".") for k in dotted.replace("\\.", "\0").split(".")]
    out = copy.deepcopy(data)
    node = out
    for k in keys[:-1]:
        node = node[int(k) if k.isdigit() and isinstance(node, list) else k]
    last = int(keys[-1]) if keys[-1].isdigit() and isinstance(node, list) else keys[-1]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


@pytest.mark.parametrize("name,field,value,expect", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_a_bad_recipe_file_exits_2_naming_file_and_field_and_writes_no_model(existing, tmp_path, name, field, value,
                                                                             expect):
    data = yaml.safe_load((existing.parent / "best.yaml").read_text())
    case = existing.parent / f"recipe-{tmp_path.name}.yaml"  # beside best.yaml: its relative model paths still hold
    case.write_text(yaml.safe_dump(recipe_edited(data, field, value)))
    r = CliRunner().invoke(app, ["merge", str(case), str(tmp_path / "merged")])
    assert r.exit_code == 2, r.output
    for text in [str(case)] + expect:
        assert text in r.stderr, f"{text!r} not in {r.stderr!r}"
    assert not (tmp_path / "merged").exists()


def test_a_merge_into_an_unwritable_folder_exits_2_naming_it(existing, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = CliRunner().invoke(app, ["merge", str(existing.parent / "best.yaml"), str(blocker / "merged")])
    assert r.exit_code == 2 and str(blocker / "merged") in r.stderr and "cannot write the model" in r.stderr
